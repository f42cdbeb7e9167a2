"""The REST app of the forkd daemon: routes of the forkd v0.5 wire API, plus files and info.

Thin by design: each route validates its input (pydantic models from :mod:`forkd.wire`), calls the
:class:`~forkd.runtime.engine.Runtime` under a timeout, and answers. Every error is
``{"error": "..."}`` with the status of the :mod:`forkd.errors` class that was raised.

Middleware (all plain ASGI, outermost first): audit log -> bearer auth -> body size cap.
Routes are ``async def`` on purpose: the runtime is single-threaded (SQLite, asyncio state) and
must never be called from the thread pool.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from forkd import API_VERSION, __version__, compat, wire
from forkd.api.audit import AuditLog, AuditMiddleware
from forkd.api.auth import OPEN_PATHS, BearerAuthMiddleware
from forkd.api.e2b import PREFIX as E2B_PREFIX
from forkd.api.e2b import mount_e2b
from forkd.api.exec_stream import exec_stream_router
from forkd.api.hub import UNPACK_PATH, hub_router
from forkd.api.images import image_router
from forkd.api.limits import BodyLimitMiddleware
from forkd.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from forkd.api.metrics import Metrics
from forkd.api.models import ForkTimingMs, Health, SpawnedSandbox, VersionInfo
from forkd.api.routing import bounded, error_responses, json_response
from forkd.api.workspaces import workspace_router
from forkd.config import DEFAULT_IMAGE, DEFAULT_MEM_MIB, Limits
from forkd.errors import (
    AgentError,
    ForkdError,
    InvalidInput,
    NotFound,
    SandboxDead,
    VMError,
)
from forkd.runtime.engine import Runtime
from forkd.runtime.workspaces import Workspaces
from forkd.validate import SANDBOX_ID_RE, TAG_RE, validate_branch_request

log = logging.getLogger("forkd.api")

T = TypeVar("T")
JSON = "application/json"

_SNAPSHOT_LIST = TypeAdapter(list[wire.SnapshotInfo])
_SANDBOX_LIST = TypeAdapter(list[wire.SandboxInfo])
_PORT_LIST = TypeAdapter(list[wire.PortInfo])
_SPAWNED_LIST = TypeAdapter(list[SpawnedSandbox])
_ANY = TypeAdapter(Any)

_DESCRIPTIONS = {
    400: "Invalid input (the message names the field or value)",
    401: "Missing or invalid bearer token",
    404: "No such snapshot, sandbox or file",
    409: "Conflicts with current state (tag exists, not ready, dependents, in flight, "
    "directory not empty)",
    410: "The sandbox is dead (its QEMU exited); the message gives the reason",
    413: "Request body too large (or no room left for it in the sandbox)",
    500: "The guest agent or VM failed",
    501: "Not implemented in this build",
    503: "A capacity bound is in force; retry later",
    504: "The operation did not finish within the daemon's time bound",
}
PathQuery = Annotated[str, Query(description="absolute path inside the sandbox")]

_BASE = (401, 500)
_SANDBOX_OP = (*_BASE, 400, 404, 409, 410, 413, 504)


def _errors(*codes: int) -> dict[int | str, Any]:
    return error_responses(_DESCRIPTIONS, *codes)


def _json_list(adapter: TypeAdapter[Any], items: Any, status: int = 200) -> Response:
    return Response(adapter.dump_json(items), status, media_type=JSON)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(_ANY.dump_json({"error": message}), status, headers, media_type=JSON)


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")


def _validation_message(exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ())]
        kind = loc[0] if loc else "request"
        name = ".".join(loc[1:])
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"request body is not valid JSON ({detail})" if detail else msg)
        elif kind == "body" and not name:
            parts.append(
                "request body is required (a JSON object)"
                if err.get("type") == "missing"
                else "request body must be a JSON object sent as Content-Type: "
                f"application/json ({msg})"
            )
        elif kind == "body":
            parts.append(f"field {name!r}: {msg}")
        elif kind in ("query", "path", "header"):
            parts.append(f"{kind} parameter {name!r}: {msg}")
        else:
            parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    more = len(exc.errors()) - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class _RuntimeCounts:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def snapshot_count(self) -> int:
        return len(self._rt.list_snapshots())

    def active_sandbox_count(self) -> int:
        return len(self._rt.list_sandboxes())

    def branches_in_flight(self) -> int:
        return self._rt.branches_in_flight

    def branch_concurrency_cap(self) -> int:
        return self._rt.settings.branch_concurrency


def create_app(
    runtime: Runtime,
    *,
    token: str | None,
    audit_log: Path,
    limits: Limits | None = None,
    kill_on_exit: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The daemon app around ``runtime``.

    The app's lifespan starts the runtime (re-adopting sandboxes that still run) and closes it
    on shutdown, killing the sandboxes only with ``kill_on_exit``. ``token`` None disables auth
    (loopback use); ``audit_log`` is the JSON-lines file every request is recorded in.
    """
    lim = limits or Limits()
    audit = AuditLog(audit_log)
    metrics = Metrics(_RuntimeCounts(runtime))
    workspaces = Workspaces(runtime)

    previous_hook = runtime.on_sandbox_death

    def on_death(sandbox_id: str, reason: str) -> None:
        metrics.sandbox_deaths.inc()
        if previous_hook is not None:
            previous_hook(sandbox_id, reason)

    runtime.on_sandbox_death = on_death

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        await workspaces.start()
        await e2b.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            try:
                await e2b.close()
                await runtime.close(kill_sandboxes=kill_on_exit)
            finally:
                audit.close()

    app = FastAPI(
        title="forkd",
        version=__version__,
        summary="Copy-on-write microVM sandboxes: boot once, warm, fork hundreds.",
        description=(
            "The forkd v0.5 wire API (`/v1/snapshots`, `/v1/sandboxes`) plus files and snapshot "
            "info. Every endpoint but `/healthz` needs `Authorization: Bearer <token>` when the "
            'daemon runs with a token. Every error is `{"error": "<message>"}`.'
        ),
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.workspaces = workspaces
    app.state.metrics = metrics
    app.state.limits = lim

    # --- bounds and error mapping -------------------------------------------------------------

    async def on_sandbox(sandbox_id: str, call: Awaitable[T], seconds: float, what: str) -> T:
        """An agent or QMP call; a failure because the VM just died is reported as 410 with why."""
        try:
            return await bounded(call, seconds, what)
        except SandboxDead:
            raise
        except (AgentError, VMError) as exc:
            try:
                info = runtime.get_sandbox(sandbox_id)
            except NotFound:
                # Deleted by a concurrent request while this one ran.
                raise SandboxDead(
                    f"sandbox {sandbox_id} was deleted while this request ran"
                ) from exc
            except ForkdError:
                raise exc from None
            if info.state == "dead":
                raise SandboxDead(f"sandbox {sandbox_id} is dead: {info.dead_reason}") from exc
            raise

    @app.exception_handler(ForkdError)
    async def forkd_error(request: Request, exc: ForkdError) -> Response:
        if isinstance(exc, AgentError) and not isinstance(exc, SandboxDead):
            metrics.agent_errors.inc()
        if exc.http_status >= 500 and exc.http_status not in (501, 503):
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.http_status, exc)
        return error_response(exc.http_status, str(exc) or type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, so uvicorn logs the traceback once.
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    # --- daemon -------------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["daemon"])
    async def healthz() -> Response:
        """Liveness probe; needs no token."""
        return Response(b'{"ok":true}', media_type=JSON)

    @app.get("/version", response_model=VersionInfo, responses=_errors(*_BASE), tags=["daemon"])
    async def version() -> Response:
        return json_response(
            VersionInfo(version=__version__, api=API_VERSION, accel=runtime.accel.name)
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}},
            **_errors(*_BASE),
        },
        tags=["daemon"],
    )
    async def get_metrics() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # --- snapshots ----------------------------------------------------------------------------

    @app.get(
        "/v1/snapshots",
        response_model=list[wire.SnapshotInfo],
        responses=_errors(*_BASE),
        tags=["snapshots"],
    )
    async def list_snapshots() -> Response:
        return _json_list(_SNAPSHOT_LIST, runtime.list_snapshots())

    @app.post(
        "/v1/snapshots",
        status_code=201,
        response_model=wire.SnapshotInfo,
        responses=_errors(*_BASE, 400, 404, 409, 413, 504),
        tags=["snapshots"],
    )
    async def create_snapshot(req: wire.CreateSnapshotRequest) -> Response:
        """Boot a parent VM from an image, warm it, save it as template ``tag``.

        forkd v0.5's form (``kernel``, ``rootfs``, ``rw``, ``tap``, ``boot_wait_secs``) is
        accepted; host kernel/rootfs paths are ignored in favour of an image and the answer's
        ``warning`` says so.
        """
        image = req.image or DEFAULT_IMAGE
        warnings = compat.snapshot_notes(req, image)
        call = runtime.create_snapshot(
            req.tag,
            image=image,
            mem_mib=req.mem_mib if req.mem_mib is not None else DEFAULT_MEM_MIB,
            warmup=req.warmup,
            network=req.network,
            cpus=req.cpus,
        )
        info = await bounded(call, lim.snapshot_timeout_s, f"creating snapshot {req.tag!r}")
        if warnings:
            info = info.model_copy(update={"warning": compat.join(info.warning, *warnings)})
        return json_response(info, 201)

    @app.delete(
        "/v1/snapshots/{tag}",
        status_code=204,
        response_class=Response,
        responses=_errors(*_BASE, 400, 404, 409, 504),
        tags=["snapshots"],
    )
    async def delete_snapshot(
        tag: str,
        cascade: Annotated[bool, Query(description="also delete dependent snapshots")] = False,
        force: Annotated[bool, Query(description="delete even if others depend on it")] = False,
    ) -> Response:
        if cascade and force:
            raise InvalidInput("use either cascade or force, not both")
        call = runtime.delete_snapshot(tag, cascade=cascade, force=force)
        await bounded(call, lim.snapshot_timeout_s, f"deleting snapshot {tag!r}")
        return Response(status_code=204)

    @app.get(
        "/v1/snapshots/{tag}/info",
        response_model=wire.SnapshotDetail,
        responses=_errors(*_BASE, 400, 404),
        tags=["snapshots"],
    )
    async def snapshot_info(tag: str) -> Response:
        """Lineage (chain depth, ancestors, dependents) and sizes of one snapshot."""
        return json_response(runtime.snapshot_detail(tag))

    @app.post(
        "/v1/snapshots/{tag}/compact",
        response_model=wire.SnapshotInfo,
        responses=_errors(*_BASE, 400, 404, 409, 413, 504),
        tags=["snapshots"],
    )
    async def compact_snapshot(tag: str, req: wire.CompactRequest) -> Response:
        """Write a standalone copy of ``tag`` as ``to``."""
        call = runtime.compact_snapshot(tag, req.to)
        return json_response(await bounded(call, lim.snapshot_timeout_s, f"compacting {tag!r}"))

    # --- sandboxes ----------------------------------------------------------------------------

    @app.get(
        "/v1/sandboxes",
        response_model=list[wire.SandboxInfo],
        responses=_errors(*_BASE, 400),
        tags=["sandboxes"],
    )
    async def list_sandboxes(
        all: Annotated[bool, Query(description="include dead sandboxes")] = False,
    ) -> Response:
        """Running sandboxes (with ``all=true`` also dead ones, with their ``dead_reason``)."""
        return _json_list(_SANDBOX_LIST, runtime.list_sandboxes(include_dead=all))

    @app.post(
        "/v1/sandboxes",
        status_code=201,
        response_model=list[SpawnedSandbox],
        responses=_errors(*_BASE, 400, 404, 409, 413, 503, 504),
        tags=["sandboxes"],
    )
    async def spawn(req: wire.SpawnRequest) -> Response:
        """Fork ``n`` children from snapshot ``snapshot_tag``: all start, or none is left.

        ``per_child_netns``, ``prewarm``, ``live_fork`` and ``hugepages`` are accepted for
        compatibility (any sandbox can be live-branched); each item's ``warning`` says which
        changed nothing, and whether a ``memory_limit_mib`` could not be enforced (no writable
        cgroup: accepted anyway, as forkd v0.5 did).
        """
        notes = compat.spawn_notes(req, memory_dir=runtime.settings.memory_dir)
        n = req.n if 1 <= req.n <= 1000 else 1
        seconds = lim.spawn_timeout_s + lim.spawn_per_child_s * n
        call = runtime.spawn(
            req.snapshot_tag, req.n, memory_limit_mib=req.memory_limit_mib,
            network=req.network, allow_internet_access=req.allow_internet_access,
        )  # fmt: skip
        spawned = await bounded(call, seconds, f"forking {req.n} from {req.snapshot_tag!r}")
        out = []
        for s in spawned:
            metrics.spawn_seconds.observe(s.timing.total_ms / 1000)
            t = s.timing
            timing = ForkTimingMs(
                qemu_up_ms=round(t.qemu_up_ms, 1), restore_ms=round(t.restore_ms, 1),
                agent_ms=round(t.agent_ms, 1), total_ms=round(t.total_ms, 1), pooled=t.pooled,
            )  # fmt: skip
            warning = compat.join(s.warning, *notes)
            out.append(
                SpawnedSandbox(**s.sandbox.model_dump(), fork_timing_ms=timing, warning=warning)
            )
        return _json_list(_SPAWNED_LIST, out, 201)

    @app.get(
        "/v1/sandboxes/{sandbox_id}",
        response_model=wire.SandboxInfo,
        responses=_errors(*_BASE, 400, 404),
        tags=["sandboxes"],
    )
    async def get_sandbox(sandbox_id: str) -> Response:
        return json_response(runtime.get_sandbox(sandbox_id))

    @app.delete(
        "/v1/sandboxes/{sandbox_id}",
        status_code=204,
        response_class=Response,
        responses=_errors(*_BASE, 400, 404, 504),
        tags=["sandboxes"],
    )
    async def kill_sandbox(sandbox_id: str) -> Response:
        """Stop the sandbox's VM and forget it (a dead one is just forgotten)."""
        await bounded(runtime.kill(sandbox_id), lim.kill_timeout_s, f"killing {sandbox_id}")
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/ports",
        status_code=201,
        response_model=wire.PortInfo,
        responses=_errors(*_SANDBOX_OP),
        tags=["network"],
    )
    async def expose_port(sandbox_id: str, req: wire.PortRequest) -> Response:
        """Forward guest TCP ``port`` to a new port on the host's 127.0.0.1 (gone with the
        sandbox). A service bound to the guest's loopback only gets 409 saying how to bind."""
        call = runtime.expose_port(sandbox_id, req.port)
        info = await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"port {req.port}")
        return json_response(info, 201)

    @app.get(
        "/v1/sandboxes/{sandbox_id}/ports",
        response_model=list[wire.PortInfo],
        responses=_errors(*_BASE, 400, 404, 410),
        tags=["network"],
    )
    async def list_ports(sandbox_id: str) -> Response:
        return _json_list(_PORT_LIST, runtime.list_ports(sandbox_id))

    @app.delete(
        "/v1/sandboxes/{sandbox_id}/ports/{port}",
        status_code=204,
        response_class=Response,
        responses=_errors(*_SANDBOX_OP),
        tags=["network"],
    )
    async def remove_port(sandbox_id: str, port: int) -> Response:
        call = runtime.unexpose_port(sandbox_id, port)
        await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"removing port {port}")
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/ping",
        response_model=dict[str, Any],
        responses=_errors(*_SANDBOX_OP),
        tags=["sandboxes"],
    )
    async def ping(sandbox_id: str) -> Response:
        """Round trip to the guest agent; its pong."""
        pong = await on_sandbox(
            sandbox_id, runtime.ping(sandbox_id), lim.agent_call_timeout_s, f"ping of {sandbox_id}"
        )
        return Response(_ANY.dump_json(pong), media_type=JSON)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/exec",
        response_model=wire.ExecResponse,
        responses=_errors(*_SANDBOX_OP),
        tags=["sandboxes"],
    )
    async def exec_command(sandbox_id: str, req: wire.ExecRequest) -> Response:
        """Run ``args`` (argv, no shell) to completion; ``timeout_secs`` kills it in the guest."""
        for i, arg in enumerate(req.args):
            _no_nul(arg, f"args[{i}]")
        for key, value in (req.env or {}).items():
            if not key or "=" in key or "\0" in key:
                raise InvalidInput(f"env name {key!r} is not valid (empty, '=' or NUL)")
            _no_nul(value, f"env[{key!r}]")
        if req.cwd is not None:
            _no_nul(req.cwd, "cwd")
        t = req.timeout_secs
        seconds = (t if math.isfinite(t) and t > 0 else 0.0) + lim.exec_margin_s
        call = runtime.exec(
            sandbox_id, req.args, timeout_s=t, env=req.env, cwd=req.cwd,
            stdin=req.stdin.encode("utf-8", "surrogatepass") if req.stdin is not None else None,
            user=req.user,
        )  # fmt: skip
        return json_response(await on_sandbox(sandbox_id, call, seconds, f"exec in {sandbox_id}"))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/eval",
        response_model=wire.EvalResponse,
        responses=_errors(*_SANDBOX_OP),
        tags=["sandboxes"],
    )
    async def eval_code(sandbox_id: str, req: wire.EvalRequest) -> Response:
        """Evaluate Python in the sandbox's warm interpreter; exceptions come back in ``error``."""
        call = runtime.eval(sandbox_id, req.code)
        result = await on_sandbox(sandbox_id, call, lim.eval_timeout_s, f"eval in {sandbox_id}")
        return json_response(result)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/branch",
        status_code=201,
        response_model=wire.SnapshotInfo,
        responses={
            202: {
                "model": wire.SnapshotInfo,
                "description": 'Live branch with wait=false: status "writing" until done',
            },
            **_errors(*_SANDBOX_OP, 409, 503),
        },
        tags=["sandboxes"],
    )
    async def branch(
        sandbox_id: str, req: Annotated[wire.BranchRequest | None, Body()] = None
    ) -> Response:
        """Snapshot the running sandbox as a new template; the sandbox keeps running."""
        req = req or wire.BranchRequest()
        validate_branch_request(req.mode, req.diff, req.wait)  # 400 before the runtime is called
        t0 = time.monotonic()
        call = runtime.branch(
            sandbox_id, tag=req.tag, mode=req.mode, diff=req.diff,
            measure_diff=req.measure_diff, wait=req.wait, parent_tag=req.parent_tag,
        )  # fmt: skip
        info = await on_sandbox(sandbox_id, call, lim.branch_timeout_s, f"branch of {sandbox_id}")
        metrics.branch_seconds.observe(time.monotonic() - t0)
        return json_response(info, 202 if info.status == "writing" else 201)

    # --- files --------------------------------------------------------------------------------

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files",
        response_model=list[wire.FileEntry],
        responses=_errors(*_SANDBOX_OP),
        tags=["files"],
    )
    async def list_files(sandbox_id: str, path: PathQuery) -> Response:
        """Entries of a directory."""
        call = runtime.list_files(sandbox_id, path)
        entries = await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"listing {path!r}")
        return Response(_ANY.dump_json(entries), media_type=JSON)

    @app.delete(
        "/v1/sandboxes/{sandbox_id}/files",
        status_code=204,
        response_class=Response,
        responses=_errors(*_SANDBOX_OP),
        tags=["files"],
    )
    async def remove_file(
        sandbox_id: str,
        path: PathQuery,
        recursive: Annotated[bool, Query(description="remove a directory tree")] = False,
    ) -> Response:
        call = runtime.remove_file(sandbox_id, path, recursive=recursive)
        await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"removing {path!r}")
        return Response(status_code=204)

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files/content",
        response_class=Response,
        responses={
            200: {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "description": "The file's bytes",
            },
            **_errors(*_SANDBOX_OP),
        },
        tags=["files"],
    )
    async def read_file(sandbox_id: str, path: PathQuery) -> Response:
        call = runtime.read_file(sandbox_id, path)
        data = await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"reading {path!r}")
        return Response(data, media_type="application/octet-stream")

    @app.put(
        "/v1/sandboxes/{sandbox_id}/files/content",
        response_model=wire.FileWriteResponse,
        responses=_errors(*_SANDBOX_OP),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
        tags=["files"],
    )
    async def write_file(sandbox_id: str, path: PathQuery, request: Request) -> Response:
        """Create or replace a file with the raw request body (parent dirs are created)."""
        data = await request.body()
        call = runtime.write_file(sandbox_id, path, data)
        size = await on_sandbox(sandbox_id, call, lim.agent_call_timeout_s, f"writing {path!r}")
        return json_response(wire.FileWriteResponse(path=path, size=size))

    # --- workspaces (routes in forkd.api.workspaces) -----------------------------------------

    app.include_router(workspace_router(workspaces, lim))

    # --- hub: pack, pull, push, unpack (routes in forkd.api.hub) ------------------------------

    app.include_router(hub_router(runtime, lim))

    # --- images (routes in forkd.api.images) ------------------------------------------------

    app.include_router(image_router(runtime.settings, lim))

    # --- OpenAPI and middleware ---------------------------------------------------------------

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish_openapi(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # E2B SDKs (docs/e2b.md): /e2b checks X-API-KEY and per-sandbox tokens itself.
    e2b = mount_e2b(app, runtime, token=token, limits=lim)
    app.include_router(exec_stream_router(runtime, lim))
    app.add_middleware(BodyLimitMiddleware, limit=lim.max_body_bytes, exempt=(UNPACK_PATH,))
    app.add_middleware(BearerAuthMiddleware, token=token, open_prefixes=(E2B_PREFIX + "/",))
    app.add_middleware(AuditMiddleware, log=audit)
    return app


# Documented (the runtime enforces them, with friendlier messages than a schema check would give).
_PATH_PATTERNS = {"tag": TAG_RE.pattern, "sandbox_id": SANDBOX_ID_RE.pattern}


def _finish_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Validation errors answer 400 (documented per route), never 422; declare bearer auth."""
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            op.get("responses", {}).pop("422", None)
            for param in op.get("parameters", []):
                pattern = (
                    _PATH_PATTERNS.get(param.get("name")) if param.get("in") == "path" else None
                )
                if pattern is not None:
                    param.setdefault("schema", {})["pattern"] = pattern
            if path in OPEN_PATHS:
                op["security"] = []
    components = schema.setdefault("components", {})
    schemas = components.get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearerAuth": []}]
    return schema
