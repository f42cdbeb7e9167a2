"""E2B's control plane (``E2B_API_URL``) over forkd's runtime.

Shapes follow E2B's published OpenAPI spec (``spec/openapi.yml`` in e2b-dev/E2B): camelCase JSON
(with its ``templateID``/``sandboxID``/``clientID``/``allow_internet_access`` exceptions), errors
``{"code": <status>, "message": "..."}``. Both path generations are served: ``/sandboxes`` (SDKs
up to 2.50) and ``/v2/sandboxes`` (2.51 and later). A template ID is a forkd snapshot tag.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from forkd import wire
from forkd.api.e2b.state import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, E2BSandbox, E2BState, iso
from forkd.config import DEFAULT_MEM_MIB, Limits
from forkd.errors import ForkdError, GatewayTimeout, InvalidInput, NotFound

ENVD_VERSION = "0.5.7"  # the envd feature level served (octet-stream uploads: >= 0.5.7)
CLIENT_ID = "forkd"
SDK_DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")  # what Sandbox.create() asks for
HOME = "/home/user"
MAX_MAP_ENTRIES = 256
MAX_MAP_BYTES = 64 << 10


class E2BError(Exception):
    """An answer ``{"code": status, "message": ...}`` with that HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> Response:
    body = json.dumps({"code": status, "message": message})
    return Response(body, status, media_type="application/json")


def forkd_status(exc: ForkdError) -> int:
    """The status to answer a forkd error with: a dead sandbox is not found, an agent or VM
    failure is a bad gateway (the SDK's "sandbox unavailable")."""
    status = exc.http_status
    if status == 410:
        return 404
    return status if status < 500 or status in (501, 503, 504) else 502


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj), status, headers, media_type="application/json")


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")


class NewSandbox(BaseModel):
    """``NewSandbox`` (v1) and ``NewSandboxV2``: the fields forkd acts on."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    template_id: str = Field(alias="templateID")
    timeout: int | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    allow_internet_access: bool | None = None
    network: NetworkConfig | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")


class ForkBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int | None = None
    count: int | None = None


MAX_FORKS = 20


class TimeoutBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int | None = None


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], raw: bytes, *, empty_ok: bool = False) -> M:
    try:
        data = json.loads(raw) if raw.strip() else ({} if empty_ok else None)
    except ValueError as e:
        raise E2BError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise E2BError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise E2BError(400, f"invalid request: {where}: {first.get('msg')}") from None


def _check_map(name: str, value: dict[str, str] | None) -> dict[str, str]:
    value = value or {}
    if len(value) > MAX_MAP_ENTRIES or sum(len(k) + len(v) for k, v in value.items()) > (
        MAX_MAP_BYTES
    ):
        raise E2BError(400, f"{name} is too large (at most {MAX_MAP_ENTRIES} entries, 64 KiB)")
    if any("\0" in k or "\0" in v for k, v in value.items()):
        raise E2BError(400, f"{name} must not contain NUL characters")
    return value


def _timeout(value: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not 0 < value <= MAX_TIMEOUT_S:
        raise E2BError(400, f"timeout must be 1..{MAX_TIMEOUT_S} seconds, got {value}")
    return value


def egress_of(req: NewSandbox) -> tuple[wire.NetworkRequest | None, bool | None]:
    """E2B's ``allow_internet_access`` / ``network`` as forkd's egress request."""
    net = req.network
    if net is not None and (net.allow_out or net.deny_out):
        allow = [a for a in (net.allow_out or []) if a]
        deny = net.deny_out or []
        if any(a in ("0.0.0.0/0", "*") for a in allow):
            return wire.NetworkRequest(egress="internet"), None
        if allow:
            return wire.NetworkRequest(egress="allowlist", allow=allow), None
        if "0.0.0.0/0" in deny:
            return wire.NetworkRequest(egress="none"), None
        raise E2BError(400, "network.denyOut supports only 0.0.0.0/0 (deny all) in forkd")
    return None, req.allow_internet_access


class Control:
    """The control-plane routes over ``state``; ``token`` None accepts any API key."""

    def __init__(
        self,
        state: E2BState,
        token: str | None,
        limits: Limits,
        default_template: str | None = None,
    ) -> None:
        self.state = state
        self.runtime = state.runtime
        self._token = token.encode() if token is not None else None
        self.limits = limits
        self.default_template = default_template or None

    def template_tag(self, requested: str) -> str:
        """The snapshot a template ID names: itself, or for the SDKs' default IDs (``base``,
        ``code-interpreter-v1``) with no snapshot of that name, the daemon's default template
        (``FORKD_E2B_DEFAULT_TEMPLATE``)."""
        if requested in SDK_DEFAULT_TEMPLATES and self.default_template is not None:
            try:
                self.runtime.get_snapshot(requested)
            except ForkdError:
                return self.default_template
        return requested

    def check_key(self, request: Request) -> None:
        if self._token is None:
            return
        key = request.headers.get("x-api-key", "")
        if not key:
            raise E2BError(401, "missing X-API-KEY (set E2B_API_KEY to the forkd token)")
        if not hmac.compare_digest(key.encode(), self._token):
            raise E2BError(401, "invalid API key (E2B_API_KEY must be the forkd daemon token)")

    # --- bodies ----------------------------------------------------------------------------

    def _mem_mib(self, tag: str) -> int:
        try:
            return self.runtime.get_snapshot(tag).mem_mib or DEFAULT_MEM_MIB
        except ForkdError:
            return DEFAULT_MEM_MIB

    def sandbox_body(self, sb: E2BSandbox) -> dict[str, Any]:
        return {
            "templateID": sb.template_id,
            "sandboxID": sb.sandbox_id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": sb.access_token,
            "trafficAccessToken": sb.access_token,
            "domain": None,
        }

    def detail_body(self, sb: E2BSandbox, *, listed: bool = False) -> dict[str, Any]:
        end = sb.end_at if sb.end_at is not None else time.time() + MAX_TIMEOUT_S
        body: dict[str, Any] = {
            "templateID": sb.template_id,
            "sandboxID": sb.sandbox_id,
            "clientID": CLIENT_ID,
            "startedAt": iso(sb.started_at),
            "endAt": iso(end),
            "envdVersion": ENVD_VERSION,
            "cpuCount": 1,
            "memoryMB": self._mem_mib(sb.template_id),
            "diskSizeMB": 0,
            "state": "paused" if sb.paused else "running",
            "metadata": sb.metadata,
        }
        if not listed:
            body["envdAccessToken"] = sb.access_token
            if sb.allow_internet_access is not None:
                body["allowInternetAccess"] = sb.allow_internet_access
        return body

    # --- handlers --------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        req = parse_body(NewSandbox, await request.body())
        tag = self.template_tag(req.template_id)
        timeout_s = _timeout(req.timeout, DEFAULT_TIMEOUT_S)
        metadata = _check_map("metadata", req.metadata)
        envs = _check_map("envVars", req.env_vars)
        network, internet = egress_of(req)
        try:
            self.runtime.get_snapshot(tag)
        except NotFound:
            raise E2BError(
                404, f"template {tag!r} not found: a template ID is a forkd snapshot tag"
            ) from None
        except InvalidInput as e:
            raise E2BError(400, f"template ID {tag!r} is not a forkd snapshot tag: {e}") from None
        try:
            async with asyncio.timeout(self.limits.spawn_timeout_s):
                spawned = await self.runtime.spawn(
                    tag, 1, network=network, allow_internet_access=internet
                )
        except TimeoutError:
            raise GatewayTimeout(
                f"creating a sandbox did not finish within {self.limits.spawn_timeout_s:g} s"
            ) from None
        sandbox_id = spawned[0].sandbox.id
        allowed = (
            internet
            if internet is not None
            else (network.egress == "internet" if network is not None else None)
        )
        sb = self.state.add(
            sandbox_id,
            tag,
            timeout_s=timeout_s,
            metadata=metadata,
            envs=envs,
            allow_internet_access=allowed,
        )
        return _json(self.sandbox_body(sb), 201)

    async def connect(self, request: Request, sandbox_id: str) -> Response:
        """Connect to a running sandbox (200), or resume a paused one (201)."""
        body = parse_body(TimeoutBody, await request.body(), empty_ok=True)
        sb = self._get(sandbox_id, paused_ok=True)
        timeout_s = _timeout(body.timeout, None)
        status = 200
        if sb.paused:
            await self._resume(sb)
            status = 201
            if timeout_s is None:
                timeout_s = DEFAULT_TIMEOUT_S
        if timeout_s is not None:
            sb.set_timeout(timeout_s)
        self.state.save(sb)
        return _json(self.sandbox_body(sb), status)

    async def resume(self, request: Request, sandbox_id: str) -> Response:
        """The legacy ``POST /sandboxes/{id}/resume``: 201, or 409 when it is running."""
        body = parse_body(TimeoutBody, await request.body(), empty_ok=True)
        sb = self._get(sandbox_id, paused_ok=True)
        if not sb.paused:
            raise E2BError(409, f"sandbox {sandbox_id!r} is already running")
        await self._resume(sb)
        sb.set_timeout(_timeout(body.timeout, DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S)
        self.state.save(sb)
        return _json(self.sandbox_body(sb), 201)

    async def pause(self, request: Request, sandbox_id: str) -> Response:
        """``sbx.pause()``: BRANCH the sandbox into a template and stop its VM; a later
        connect (or resume) spawns it again from there, memory and files as they were."""
        sb = self._get(sandbox_id, paused_ok=True)
        if sb.paused:
            raise E2BError(409, f"sandbox {sandbox_id!r} is already paused")
        tag = f"e2b-pause-{secrets.token_hex(6)}"
        try:
            async with asyncio.timeout(self.limits.branch_timeout_s):
                await self.runtime.branch(sb.vm_id, tag=tag)
        except TimeoutError:
            raise GatewayTimeout("pausing did not finish in time") from None
        sb.owned_tags.append(tag)
        self.state.save(sb)  # the template is kept with it should the kill below fail
        await self.runtime.kill(sb.vm_id)
        sb.paused_tag = tag
        self.state.save(sb)
        return Response(status_code=204)

    async def _resume(self, sb: E2BSandbox) -> None:
        tag = str(sb.paused_tag)
        try:
            async with asyncio.timeout(self.limits.spawn_timeout_s):
                spawned = await self.runtime.spawn(tag, 1)
        except TimeoutError:
            raise GatewayTimeout("resuming did not finish in time") from None
        sb.vm_id = spawned[0].sandbox.id
        sb.paused_tag = None
        self.state.save(sb)

    async def info(self, sandbox_id: str) -> Response:
        return _json(self.detail_body(self._get(sandbox_id, paused_ok=True)))

    async def list(self, request: Request) -> Response:
        params = request.query_params
        wanted: dict[str, str] = {}
        if params.get("metadata"):
            wanted = dict(parse_qsl(params["metadata"], keep_blank_values=True))
        states = {s for s in (params.get("state") or "running").split(",") if s}
        found: list[E2BSandbox] = []
        if "running" in states:
            for info in self.runtime.list_sandboxes():
                entry = self.state.by_vm(info.id)
                if entry is None:
                    try:
                        entry = self.state.get(info.id)
                    except NotFound:
                        continue
                found.append(entry)
        if "paused" in states:
            found += [sb for sb in self.state.sandboxes.values() if sb.paused]
        out = [
            self.detail_body(sb, listed=True)
            for sb in found
            if all(sb.metadata.get(k) == v for k, v in wanted.items())
        ]
        limit = params.get("limit")
        if limit and limit.isdigit():
            out = out[: int(limit)]
        return _json(out)

    async def kill(self, sandbox_id: str) -> Response:
        self._get(sandbox_id, paused_ok=True)
        await self.state.kill(sandbox_id)
        return Response(status_code=204)

    async def set_timeout(self, request: Request, sandbox_id: str) -> Response:
        body = parse_body(TimeoutBody, await request.body())
        timeout_s = _timeout(body.timeout, None)
        if timeout_s is None:
            raise E2BError(400, "timeout is required")
        sb = self._get(sandbox_id)
        sb.set_timeout(timeout_s)
        self.state.save(sb)
        return Response(status_code=204)

    async def refresh(self, request: Request, sandbox_id: str) -> Response:
        raw = await request.body()
        try:
            duration = json.loads(raw).get("duration") if raw.strip() else None
        except (ValueError, AttributeError):
            raise E2BError(400, "request body must be a JSON object") from None
        sb = self._get(sandbox_id)
        extend = _timeout(duration if isinstance(duration, int) else None, DEFAULT_TIMEOUT_S)
        assert extend is not None
        if sb.end_at is not None:
            sb.end_at = max(sb.end_at, time.time() + extend)
            self.state.save(sb)
        return Response(status_code=204)

    async def fork(self, request: Request, sandbox_id: str) -> Response:
        """``sbx.fork(count=n)``: BRANCH the sandbox into a template (it keeps running), then
        spawn ``n`` children of it; each child starts with the parent's memory and files."""
        body = parse_body(ForkBody, await request.body(), empty_ok=True)
        count = 1 if body.count is None else body.count
        if isinstance(count, bool) or not 1 <= count <= MAX_FORKS:
            raise E2BError(400, f"count must be 1..{MAX_FORKS}, got {count}")
        timeout_s = _timeout(body.timeout, DEFAULT_TIMEOUT_S)
        parent = self._get(sandbox_id)
        tag = f"e2b-fork-{secrets.token_hex(6)}"
        try:
            async with asyncio.timeout(self.limits.branch_timeout_s):
                await self.runtime.branch(parent.vm_id, tag=tag)
            try:
                async with asyncio.timeout(self.limits.spawn_timeout_s):
                    spawned = await self.runtime.spawn(tag, count)
            except BaseException:
                await self.state.drop_tags([tag])
                raise
        except TimeoutError:
            raise GatewayTimeout("forking did not finish in time") from None
        results = []
        for child in spawned:
            sb = self.state.add(
                child.sandbox.id,
                parent.template_id,
                timeout_s=timeout_s,
                metadata=parent.metadata,
                envs=parent.envs,
                allow_internet_access=parent.allow_internet_access,
            )
            sb.users = parent.users
            sb.owned_tags.append(tag)
            self.state.save(sb)
            results.append({"sandbox": self.sandbox_body(sb)})
        return _json(results, 201)

    def _get(self, sandbox_id: str, *, paused_ok: bool = False) -> E2BSandbox:
        try:
            return self.state.get(sandbox_id, paused_ok=paused_ok)
        except NotFound as e:
            raise E2BError(404, str(e)) from None


def control_router(control: Control) -> APIRouter:
    router = APIRouter()

    async def guarded(request: Request, handler: Any, *args: Any) -> Response:
        try:
            control.check_key(request)
            response: Response = await handler(*args)
            return response
        except E2BError as e:
            return error_response(e.status, e.message)
        except ForkdError as e:
            status = (
                e.http_status if e.http_status < 500 or e.http_status in (501, 503, 504) else 502
            )
            if status == 410:
                status = 404
            return error_response(status, str(e) or type(e).__name__)

    for prefix in ("", "/v2"):

        @router.post(prefix + "/sandboxes", include_in_schema=False)
        async def create(request: Request) -> Response:
            return await guarded(request, control.create, request)

        @router.get(prefix + "/sandboxes", include_in_schema=False)
        async def list_(request: Request) -> Response:
            return await guarded(request, control.list, request)

        @router.post(prefix + "/sandboxes/{sandbox_id}/connect", include_in_schema=False)
        async def connect(request: Request, sandbox_id: str) -> Response:
            return await guarded(request, control.connect, request, sandbox_id)

    @router.get("/sandboxes/{sandbox_id}", include_in_schema=False)
    async def info(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.info, sandbox_id)

    @router.delete("/sandboxes/{sandbox_id}", include_in_schema=False)
    async def kill(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.kill, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/timeout", include_in_schema=False)
    async def set_timeout(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.set_timeout, request, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/pause", include_in_schema=False)
    async def pause(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.pause, request, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/resume", include_in_schema=False)
    async def resume(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.resume, request, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/fork", include_in_schema=False)
    async def fork(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.fork, request, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/refreshes", include_in_schema=False)
    async def refresh(request: Request, sandbox_id: str) -> Response:
        return await guarded(request, control.refresh, request, sandbox_id)

    return router


def unsupported_router(control: Control) -> APIRouter:
    """Every other path under the prefix: a clean E2B error (the SDK raises its own type)."""
    router = APIRouter()

    @router.api_route(
        "/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def unsupported(request: Request, rest: str) -> Response:
        try:
            control.check_key(request)
        except E2BError as e:
            return error_response(e.status, e.message)
        return error_response(
            501, f"{request.method} /{rest} is not supported by forkd's E2B compatibility layer"
        )

    return router
