"""REST client of the forkd daemon: :class:`Controller` (sync) and :class:`AsyncController`.

Both speak the forkd v0.5 wire API (``/v1/snapshots``, ``/v1/sandboxes``) plus this daemon's
extra endpoints (files, snapshot info, eval details). Method names, keyword arguments and return
values follow forkd's own Python SDK, so code written against it keeps working: every method
returns the daemon's JSON exactly as received (plain ``dict`` / ``list``), and any non-2xx answer
raises :class:`ControllerError`.

How the two clients share code: every endpoint is described once, in :class:`_Endpoints`, as a
function that turns the method's arguments into a :class:`_Request` (HTTP method, path, query,
body, how to parse the answer). ``Controller`` and ``AsyncController`` only differ in the executor
that sends such a request (``httpx.Client`` vs ``httpx.AsyncClient``); their public methods are
generated from the same builders, so signatures, serialization rules and docstrings cannot drift.

Example::

    with Controller() as c:                      # $FORKD_URL or http://127.0.0.1:8889
        [child] = c.spawn_sandboxes("python")
        print(c.exec_command(child["id"], ["uname", "-a"])["stdout"])
        snap = c.branch_sandbox(child["id"], mode=BranchMode.DIFF)
        grandchildren = c.spawn_sandboxes(snap["tag"], n=5)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, cast
from urllib.parse import quote

import httpx

from forkd.errors import ForkdError

__all__ = [
    "DEFAULT_URL",
    "AsyncController",
    "BranchMode",
    "Controller",
    "ControllerConnectionError",
    "ControllerError",
    "SnapshotFailedError",
]

DEFAULT_URL = "http://127.0.0.1:8889"

_P = ParamSpec("_P")
_T = TypeVar("_T")

JSONDict = dict[str, Any]


class BranchMode(StrEnum):
    """How ``branch_sandbox`` snapshots a running sandbox (the wire field ``mode``)."""

    FULL = "full"
    """Pause, write the whole memory image, resume."""
    DIFF = "diff"
    """Pause, write only the pages dirtied since the sandbox's template, resume."""
    LIVE = "live"
    """Pause only to arm write-protection; memory is copied while the source keeps running."""


class ControllerError(ForkdError, RuntimeError):
    """The daemon answered with a non-2xx status.

    Attributes:
        status: the HTTP status code (404 unknown sandbox/snapshot, 409 conflict, 400 bad input,
            401 auth, 503 capacity, ...). ``0`` for :class:`ControllerConnectionError`.
        body: the parsed JSON error body (normally ``{"error": "..."}``), or the raw text when it
            was not JSON.
        url: the URL that was requested.
        error: the daemon's error message alone (``body["error"]`` when present).
    """

    def __init__(self, status: int, body: Any, url: str) -> None:
        self.status = status
        self.body = body
        self.url = url
        self.error = _error_text(body)
        self.http_status = status if status >= 400 else 502
        super().__init__(f"forkd {url}: HTTP {status}: {self.error}")


class ControllerConnectionError(ControllerError):
    """No HTTP answer at all: daemon unreachable, connection reset, or request timed out.

    ``status`` is 0 and ``body`` is ``None``; the underlying ``httpx`` error is ``__cause__``.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, None, url)
        self.error = reason
        self.args = (f"forkd {url}: {reason}",)


class SnapshotFailedError(ControllerError):
    """``wait_for_snapshot``: the snapshot reached ``status: "failed"``.

    ``body`` (also ``info``) is the snapshot's info as served; ``error`` its failure reason.
    """

    def __init__(self, tag: str, info: JSONDict, url: str) -> None:
        super().__init__(200, info, url)
        self.tag = tag
        self.info = info
        self.error = str(info.get("error") or "no error message recorded")
        self.http_status = 409
        self.args = (f"snapshot {tag!r} failed: {self.error}",)


def _error_text(body: Any) -> str:
    if body is None:
        return "(no body)"
    if isinstance(body, Mapping):
        if isinstance(body.get("error"), str):
            return str(body["error"])
        if "detail" in body:  # a framework-level error that bypassed the daemon's error mapping
            detail = body["detail"]
            return detail if isinstance(detail, str) else json.dumps(detail)
    if isinstance(body, str):
        return body or "(empty body)"
    return json.dumps(body)


# --------------------------------------------------------------------------------------------
# Request descriptions (shared by both clients)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request(Generic[_T]):
    """One HTTP exchange, independent of how it is sent."""

    method: str
    path: str
    parse: Callable[[httpx.Response], _T]
    params: dict[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    min_timeout: float | None = None
    """Requests that legitimately run long (exec, snapshot creation) raise the client timeout."""


def _parse_json(resp: httpx.Response) -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


def _parse_dict(resp: httpx.Response) -> JSONDict:
    return cast(JSONDict, _parse_json(resp))


def _parse_list(resp: httpx.Response) -> list[JSONDict]:
    return cast(list[JSONDict], _parse_json(resp))


def _parse_none(resp: httpx.Response) -> None:
    return None


def _parse_bytes(resp: httpx.Response) -> bytes:
    return resp.content


def _seg(value: str) -> str:
    """One path segment: never empty (that would address the collection), always escaped."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty id or tag, got {value!r}")
    return quote(value, safe="")


def _mode_value(mode: BranchMode | str) -> str:
    try:
        return BranchMode(mode).value
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in BranchMode)
        raise ValueError(f"unknown branch mode {mode!r}; expected one of {allowed}") from None


_TRUE = "true"

# Long operations: the daemon answers only when the work is done.
_SNAPSHOT_TIMEOUT = 600.0
_BRANCH_TIMEOUT = 120.0
_EXEC_MARGIN = 30.0
_HUB_TIMEOUT = 3600.0
_CHUNK = 1 << 20


def _pack_request(tag: str, compress: bool) -> _Request[None]:
    params = None if compress else {"compress": "false"}
    return _Request("GET", f"/v1/snapshots/{_seg(tag)}/pack", _parse_none, params=params,
                    min_timeout=_HUB_TIMEOUT)  # fmt: skip


def _unpack_request(tag: str | None, force: bool) -> _Request[JSONDict]:
    params: dict[str, str] = {}
    if tag is not None:
        params["tag"] = tag
    if force:
        params["force"] = _TRUE
    return _Request("POST", "/v1/snapshots/unpack", _parse_dict, params=params or None,
                    headers={"Content-Type": "application/octet-stream"},
                    min_timeout=_HUB_TIMEOUT)  # fmt: skip


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")


class _Endpoints:
    """Every endpoint, once. Each builder returns the request; the clients send it.

    The docstrings here are the public methods' docstrings on both clients.
    """

    # --- daemon ----------------------------------------------------------------------------

    @staticmethod
    def healthz() -> _Request[JSONDict]:
        """``GET /healthz``: ``{"ok": true}`` when the daemon is up (needs no token)."""
        return _Request("GET", "/healthz", _parse_dict)

    @staticmethod
    def version() -> _Request[JSONDict]:
        """``GET /version``: ``{"version": ..., "api": "v1"}``."""
        return _Request("GET", "/version", _parse_dict)

    # --- snapshots -------------------------------------------------------------------------

    @staticmethod
    def list_snapshots() -> _Request[list[JSONDict]]:
        """``GET /v1/snapshots``: every snapshot (SnapshotInfo dicts: tag, status, bootable...)."""
        return _Request("GET", "/v1/snapshots", _parse_list)

    @staticmethod
    def create_snapshot(
        tag: str,
        *,
        image: str | None = None,
        mem_mib: int | None = None,
        warmup: str | None = None,
        kernel: str | None = None,
        rootfs: str | None = None,
        rw: bool | None = None,
        tap: str | None = None,
        boot_wait_secs: int | None = None,
        network: Mapping[str, Any] | None = None,
        cpus: int | None = None,
    ) -> _Request[JSONDict]:
        """``POST /v1/snapshots``: boot a fresh VM, warm it, snapshot it as template ``tag``.

        Give either ``image`` (a guest image name known to this daemon; ``mem_mib`` and a
        ``warmup`` Python snippet run before the snapshot are optional) or forkd's original
        ``kernel`` + ``rootfs`` host paths (with ``rw``, ``tap``, ``boot_wait_secs``). Only the
        arguments you pass are sent. Returns the SnapshotInfo; if its ``status`` is
        ``"writing"``, follow up with :meth:`wait_for_snapshot`. The request may take minutes;
        its timeout is at least 600 s. ``network`` (``{"egress", "allow", "host_ca"}``) is the
        warm-up's egress, so a warm-up may ``pip install``.
        """
        body: JSONDict = {"tag": tag}
        optional: dict[str, Any] = {
            "image": image,
            "mem_mib": mem_mib,
            "warmup": warmup,
            "kernel": kernel,
            "rootfs": rootfs,
            "rw": rw,
            "tap": tap,
            "boot_wait_secs": boot_wait_secs,
            "network": dict(network) if network is not None else None,
            "cpus": cpus,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return _Request(
            "POST", "/v1/snapshots", _parse_dict, json=body, min_timeout=_SNAPSHOT_TIMEOUT
        )

    @staticmethod
    def delete_snapshot(tag: str, *, cascade: bool = False, force: bool = False) -> _Request[None]:
        """``DELETE /v1/snapshots/{tag}``: remove a snapshot (registry entry and files).

        A snapshot that others were branched from is refused with 409 (the error lists the
        dependents) unless ``cascade=True`` (delete the dependents too) or ``force=True``
        (delete this one anyway). The daemon refuses both flags together (400).
        """
        params: dict[str, str] = {}
        if cascade:
            params["cascade"] = _TRUE
        if force:
            params["force"] = _TRUE
        return _Request("DELETE", f"/v1/snapshots/{_seg(tag)}", _parse_none, params=params or None)

    @staticmethod
    def snapshot_info(tag: str) -> _Request[JSONDict]:
        """``GET /v1/snapshots/{tag}/info``: SnapshotInfo plus lineage and sizes.

        Extra keys: ``chain_depth``, ``ancestors``, ``dependents``, ``memory_bytes``... and
        ``status`` (``"writing"``/``"ready"``/``"failed"``) with ``error`` when failed.
        """
        return _Request("GET", f"/v1/snapshots/{_seg(tag)}/info", _parse_dict)

    @staticmethod
    def compact_snapshot(tag: str, to: str) -> _Request[JSONDict]:
        """``POST /v1/snapshots/{tag}/compact``: flatten a diff chain into a new full snapshot."""
        return _Request(
            "POST",
            f"/v1/snapshots/{_seg(tag)}/compact",
            _parse_dict,
            json={"to": to},
            min_timeout=_SNAPSHOT_TIMEOUT,
        )

    # --- hub -------------------------------------------------------------------------------

    @staticmethod
    def pull(
        ref: str,
        tag: str | None = None,
        *,
        force: bool = False,
        insecure: bool = False,
    ) -> _Request[JSONDict]:
        """``POST /v1/snapshots/pull``: the daemon fetches a pack from an OCI registry
        (``registry/repo[:tag]``) or an ``http(s)://`` URL, verifies every part, and unpacks it
        as ``tag`` (default: the packed tag; ``force`` replaces an existing one). ``insecure``:
        plain HTTP or unverified TLS. Returns ``{tag, image, image_reused, seconds,
        downloaded_bytes, download_seconds, snapshot}``."""
        body: JSONDict = {"ref": ref, "force": force, "insecure": insecure}
        if tag is not None:
            body["tag"] = tag
        return _Request(
            "POST", "/v1/snapshots/pull", _parse_dict, json=body, min_timeout=_HUB_TIMEOUT
        )

    @staticmethod
    def push(tag: str, ref: str, *, insecure: bool = False) -> _Request[JSONDict]:
        """``POST /v1/snapshots/{tag}/push``: the daemon packs template ``tag`` and pushes it to
        ``ref`` as an OCI artifact (its own registry credentials). Returns ``{ref, digest,
        bytes, stored_bytes, logical_bytes, seconds}``."""
        return _Request(
            "POST", f"/v1/snapshots/{_seg(tag)}/push", _parse_dict,
            json={"ref": ref, "insecure": insecure}, min_timeout=_HUB_TIMEOUT,
        )  # fmt: skip

    # --- sandboxes -------------------------------------------------------------------------

    @staticmethod
    def spawn_sandboxes(
        snapshot_tag: str,
        n: int = 1,
        per_child_netns: bool = False,
        memory_limit_mib: int | None = None,
        prewarm: bool = False,
        live_fork: bool = False,
        hugepages: bool = False,
        network: Mapping[str, Any] | None = None,
        allow_internet_access: bool | None = None,
    ) -> _Request[list[JSONDict]]:
        """``POST /v1/sandboxes``: fork ``n`` (1..1000) children from a snapshot.

        ``live_fork``, ``prewarm`` and ``hugepages`` are sent only when true and accepted for
        compatibility (every sandbox can be live-branched here); ``memory_limit_mib`` caps each
        child's cgroup memory. Returns one SandboxInfo dict per
        child (``id``, ``snapshot_tag``, ``pid``, ``guest_addr``, ``network``...).

        ``network``: egress policy ``{"egress": "none"|"internet"|"allowlist", "allow": [...],
        "host_ca": bool}``; ``allow_internet_access`` is E2B's shorthand for internet/none.
        Without either a child inherits its branch source's policy, else the daemon default.
        """
        body: JSONDict = {"snapshot_tag": snapshot_tag, "n": n, "per_child_netns": per_child_netns}
        if memory_limit_mib is not None:
            body["memory_limit_mib"] = memory_limit_mib
        # Sent only when set, so a v0.3-era daemon that lacks the field is not confused.
        if prewarm:
            body["prewarm"] = True
        if live_fork:
            body["live_fork"] = True
        if hugepages:
            body["hugepages"] = True
        if network is not None:
            body["network"] = dict(network)
        if allow_internet_access is not None:
            body["allow_internet_access"] = allow_internet_access
        return _Request("POST", "/v1/sandboxes", _parse_list, json=body)

    @staticmethod
    def list_sandboxes(include_dead: bool = False) -> _Request[list[JSONDict]]:
        """``GET /v1/sandboxes``: the running sandboxes (``include_dead``: dead ones too)."""
        params = {"all": "true"} if include_dead else None
        return _Request("GET", "/v1/sandboxes", _parse_list, params=params)

    @staticmethod
    def get_sandbox(sandbox_id: str) -> _Request[JSONDict]:
        """``GET /v1/sandboxes/{id}``: one sandbox's SandboxInfo."""
        return _Request("GET", f"/v1/sandboxes/{_seg(sandbox_id)}", _parse_dict)

    @staticmethod
    def expose_port(sandbox_id: str, port: int) -> _Request[JSONDict]:
        """``POST /v1/sandboxes/{id}/ports``: forward guest TCP ``port`` to the host's loopback;
        returns ``{"port", "host", "host_port", "url"}`` (the same forward if asked again)."""
        return _Request(
            "POST", f"/v1/sandboxes/{_seg(sandbox_id)}/ports", _parse_dict, json={"port": port}
        )

    @staticmethod
    def list_ports(sandbox_id: str) -> _Request[list[JSONDict]]:
        """``GET /v1/sandboxes/{id}/ports``: the sandbox's forwards."""
        return _Request("GET", f"/v1/sandboxes/{_seg(sandbox_id)}/ports", _parse_list)

    @staticmethod
    def remove_port(sandbox_id: str, port: int) -> _Request[None]:
        """``DELETE /v1/sandboxes/{id}/ports/{port}``: stop forwarding guest ``port``."""
        return _Request("DELETE", f"/v1/sandboxes/{_seg(sandbox_id)}/ports/{int(port)}",
                        _parse_none)  # fmt: skip

    @staticmethod
    def kill_sandbox(sandbox_id: str) -> _Request[None]:
        """``DELETE /v1/sandboxes/{id}``: stop the sandbox's VM and forget it."""
        return _Request("DELETE", f"/v1/sandboxes/{_seg(sandbox_id)}", _parse_none)

    @staticmethod
    def branch_sandbox(
        sandbox_id: str,
        tag: str | None = None,
        diff: bool = False,
        measure_diff: bool = False,
        mode: BranchMode | str | None = None,
        wait: bool = True,
        *,
        parent_tag: str | None = None,
    ) -> _Request[JSONDict]:
        """``POST /v1/sandboxes/{id}/branch``: snapshot a running sandbox as a new template.

        ``mode`` (a :class:`BranchMode` or ``"full"``/``"diff"``/``"live"``) picks how; when it
        is given the legacy ``diff`` flag is not sent (``mode`` wins). ``diff=True`` without a
        mode is the legacy spelling of ``mode="diff"``. ``wait=False`` (live mode only) returns
        as soon as the source resumes, with ``status: "writing"``: use
        :meth:`wait_for_snapshot`. ``tag`` defaults to a daemon-generated name. Returns the new
        SnapshotInfo; spawn children from its ``tag``.
        """
        body: JSONDict = {}
        if tag is not None:
            body["tag"] = tag
        if mode is not None:
            body["mode"] = _mode_value(mode)
        elif diff:
            body["diff"] = True
        if measure_diff:
            body["measure_diff"] = True
        if not wait:
            body["wait"] = False
        if parent_tag is not None:
            body["parent_tag"] = parent_tag
        return _Request(
            "POST",
            f"/v1/sandboxes/{_seg(sandbox_id)}/branch",
            _parse_dict,
            json=body,
            min_timeout=_BRANCH_TIMEOUT,
        )

    @staticmethod
    def exec_command(
        sandbox_id: str,
        args: Sequence[str],
        timeout_secs: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> _Request[JSONDict]:
        """``POST /v1/sandboxes/{id}/exec``: run ``args`` (argv, no shell) in the sandbox.

        For a shell command pass ``["/bin/sh", "-c", "..."]``. ``env`` adds environment
        variables, ``cwd`` sets the working directory, ``stdin`` is fed to the process. Returns
        ``{stdout, stderr, exit_code}`` plus this daemon's ``timed_out``,
        ``stdout_truncated``, ``stderr_truncated``, ``duration_ms``. A non-zero exit code is
        not an error.
        """
        if isinstance(args, str):
            raise TypeError("args must be a list of argv strings, e.g. ['/bin/sh', '-c', cmd]")
        body: JSONDict = {"args": list(args), "timeout_secs": timeout_secs}
        if env is not None:
            body["env"] = dict(env)
        if cwd is not None:
            body["cwd"] = cwd
        if stdin is not None:
            body["stdin"] = stdin
        return _Request(
            "POST",
            f"/v1/sandboxes/{_seg(sandbox_id)}/exec",
            _parse_dict,
            json=body,
            min_timeout=float(timeout_secs) + _EXEC_MARGIN,
        )

    @staticmethod
    def eval_code(sandbox_id: str, code: str) -> _Request[JSONDict]:
        """``POST /v1/sandboxes/{id}/eval``: run Python in the sandbox's warm agent process.

        Returns ``{result, error, exit_code}`` (plus ``stdout`` and ``traceback`` here).
        """
        return _Request(
            "POST", f"/v1/sandboxes/{_seg(sandbox_id)}/eval", _parse_dict, json={"code": code}
        )

    @staticmethod
    def ping_sandbox(sandbox_id: str) -> _Request[JSONDict]:
        """``POST /v1/sandboxes/{id}/ping``: round-trip to the guest agent; its pong JSON."""
        return _Request("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/ping", _parse_dict)

    # --- files (this daemon's extension) ---------------------------------------------------

    @staticmethod
    def read_file(sandbox_id: str, path: str) -> _Request[bytes]:
        """``GET /v1/sandboxes/{id}/files/content?path=``: a guest file's bytes."""
        return _Request(
            "GET",
            f"/v1/sandboxes/{_seg(sandbox_id)}/files/content",
            _parse_bytes,
            params={"path": path},
            headers={"Accept": "application/octet-stream"},
        )

    @staticmethod
    def write_file(sandbox_id: str, path: str, data: bytes | str) -> _Request[JSONDict]:
        """``PUT /v1/sandboxes/{id}/files/content?path=``: create or replace a guest file.

        ``str`` data is encoded as UTF-8. Returns ``{"path", "size"}``.
        """
        content = data.encode() if isinstance(data, str) else bytes(data)
        return _Request(
            "PUT",
            f"/v1/sandboxes/{_seg(sandbox_id)}/files/content",
            _parse_dict,
            params={"path": path},
            content=content,
            headers={"Content-Type": "application/octet-stream"},
        )

    @staticmethod
    def list_files(sandbox_id: str, path: str) -> _Request[list[JSONDict]]:
        """``GET /v1/sandboxes/{id}/files?path=DIR``: entries ``{name, path, type, size, ...}``."""
        return _Request(
            "GET", f"/v1/sandboxes/{_seg(sandbox_id)}/files", _parse_list, params={"path": path}
        )

    @staticmethod
    def remove_file(sandbox_id: str, path: str, recursive: bool = False) -> _Request[None]:
        """``DELETE /v1/sandboxes/{id}/files?path=``: remove a file (a tree with ``recursive``)."""
        params = {"path": path}
        if recursive:
            params["recursive"] = _TRUE
        return _Request(
            "DELETE", f"/v1/sandboxes/{_seg(sandbox_id)}/files", _parse_none, params=params
        )

    # --- workspaces ------------------------------------------------------------------------

    @staticmethod
    def create_workspace(
        name: str,
        snapshot_tag: str,
        per_child_netns: bool = False,
        memory_limit_mib: int | None = None,
    ) -> _Request[JSONDict]:
        """``POST /v1/workspaces``: fork a sandbox from ``snapshot_tag`` and track it as the
        durable workspace ``name`` (1-48 of ``A-Za-z0-9_-``). Returns its WorkspaceInfo
        (``status: "running"``, ``live_sandbox_id``); ``memory_limit_mib`` is kept for every
        resume."""
        body: JSONDict = {
            "name": name, "snapshot_tag": snapshot_tag, "per_child_netns": per_child_netns,
        }  # fmt: skip
        if memory_limit_mib is not None:
            body["memory_limit_mib"] = memory_limit_mib
        return _Request("POST", "/v1/workspaces", _parse_dict, json=body)

    @staticmethod
    def list_workspaces() -> _Request[list[JSONDict]]:
        """``GET /v1/workspaces``: every workspace's WorkspaceInfo."""
        return _Request("GET", "/v1/workspaces", _parse_list)

    @staticmethod
    def get_workspace(name: str) -> _Request[JSONDict]:
        """``GET /v1/workspaces/{name}``: one workspace (``running``, ``suspended`` or
        ``stale``)."""
        return _Request("GET", f"/v1/workspaces/{_seg(name)}", _parse_dict)

    @staticmethod
    def delete_workspace(name: str) -> _Request[None]:
        """``DELETE /v1/workspaces/{name}``: kill its sandbox, delete its suspend snapshots."""
        return _Request("DELETE", f"/v1/workspaces/{_seg(name)}", _parse_none)

    @staticmethod
    def suspend_workspace(name: str, diff: bool = False) -> _Request[JSONDict]:
        """``POST /v1/workspaces/{name}/suspend``: snapshot the running sandbox into
        ``current_state_tag`` (in diff mode with ``diff``), then stop it. On failure (an
        error is raised) the workspace keeps running on its previous state."""
        return _Request(
            "POST", f"/v1/workspaces/{_seg(name)}/suspend", _parse_dict, json={"diff": diff},
            min_timeout=_BRANCH_TIMEOUT,
        )  # fmt: skip

    @staticmethod
    def resume_workspace(name: str) -> _Request[JSONDict]:
        """``POST /v1/workspaces/{name}/resume``: fork a sandbox from the latest suspend
        snapshot; the answer's ``live_sandbox_id`` is the sandbox to use."""
        return _Request("POST", f"/v1/workspaces/{_seg(name)}/resume", _parse_dict, json={})


# --------------------------------------------------------------------------------------------
# The two executors
# --------------------------------------------------------------------------------------------


def _dress(method: Callable[..., Any], build: Callable[..., Any], owner: str) -> None:
    """Give a generated method the builder's name, docstring and (adjusted) signature."""
    functools.update_wrapper(method, build)
    method.__qualname__ = f"{owner}.{build.__name__}"
    # The method returns what the request parses to, not the request.
    annotations = dict(build.__annotations__)
    ret = annotations.get("return")
    if isinstance(ret, str) and ret.startswith("_Request[") and ret.endswith("]"):
        annotations["return"] = ret[len("_Request[") : -1]
    method.__annotations__ = annotations
    # inspect would otherwise follow __wrapped__ to the builder and, for a bound method, drop
    # its first parameter as if it were ``self``.
    sig = inspect.signature(build)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *sig.parameters.values()],
        return_annotation=annotations.get("return", inspect.Signature.empty),
    )


def _sync(build: Callable[_P, _Request[_T]]) -> Callable[Concatenate[Controller, _P], _T]:
    def method(self: Controller, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._send(build(*args, **kwargs))

    _dress(method, build, "Controller")
    return method


def _async(
    build: Callable[_P, _Request[_T]],
) -> Callable[Concatenate[AsyncController, _P], Awaitable[_T]]:
    async def method(self: AsyncController, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._send(build(*args, **kwargs))

    _dress(method, build, "AsyncController")
    return method


class _Base:
    """Configuration shared by both clients."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        url = base_url or os.environ.get("FORKD_URL") or DEFAULT_URL
        self.base_url: str = url.rstrip("/")
        raw_token = token if token is not None else os.environ.get("FORKD_TOKEN")
        self.token: str | None = raw_token.strip() if raw_token and raw_token.strip() else None
        self.timeout: float = timeout

    def _client_kwargs(self) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}

    def _request_kwargs(self, req: _Request[Any]) -> dict[str, Any]:
        return {
            "params": req.params, "json": req.json, "content": req.content,
            "headers": req.headers, "timeout": self._timeout_for(req),
        }  # fmt: skip

    def _timeout_for(self, req: _Request[Any]) -> float:
        return max(self.timeout, req.min_timeout or 0.0)

    def _transport_error(self, req: _Request[Any], exc: httpx.TransportError) -> ControllerError:
        url = f"{self.base_url}{req.path}"
        if isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self._timeout_for(req):g}s ({type(exc).__name__})"
        elif isinstance(exc, httpx.ConnectError):
            reason = f"cannot connect to the daemon: {exc or type(exc).__name__}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return ControllerConnectionError(url, reason)

    @staticmethod
    def _finish(req: _Request[_T], resp: httpx.Response) -> _T:
        if resp.status_code >= 400:
            body: Any
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise ControllerError(resp.status_code, body, str(resp.request.url))
        return req.parse(resp)

    @staticmethod
    def _snapshot_done(tag: str, info: JSONDict, url: str) -> bool:
        status = info.get("status", "ready")  # a daemon without the field only serves ready ones
        if status == "failed":
            raise SnapshotFailedError(tag, info, url)
        return bool(status == "ready")

    def __repr__(self) -> str:
        auth = "token" if self.token else "no token"
        return f"{type(self).__name__}({self.base_url!r}, {auth})"


def _exec_request(
    sandbox_id: str,
    args: Sequence[str],
    timeout_secs: float,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: str | None,
    *,
    stream: bool = False,
) -> _Request[JSONDict]:
    if isinstance(args, str):
        raise TypeError("args must be a list of argv strings, e.g. ['/bin/sh', '-c', cmd]")
    body: JSONDict = {"args": list(args), "timeout_secs": timeout_secs}
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        body["stdin"] = stdin
    suffix = "/exec/stream" if stream else "/exec"
    return _Request(
        "POST",
        f"/v1/sandboxes/{_seg(sandbox_id)}{suffix}",
        _parse_dict,
        json=body,
        min_timeout=float(timeout_secs) + _EXEC_MARGIN,
    )


def _file_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


class Controller(_Base):
    """Synchronous client of the forkd daemon's REST API.

    Args:
        base_url: daemon URL; defaults to ``$FORKD_URL``, then ``http://127.0.0.1:8889``.
        token: bearer token; defaults to ``$FORKD_TOKEN`` (none when unset or empty).
        timeout: per-request timeout in seconds. Long operations raise it for themselves
            (exec: ``timeout_secs`` + 30 s; snapshot create/compact: 600 s; branch: 120 s).
        transport: an ``httpx`` transport to use instead of the network (tests).

    One ``httpx.Client`` (with its connection pool) lives as long as the controller: call
    :meth:`close` or use it as a context manager. Every method raises :class:`ControllerError`
    on an HTTP error status and :class:`ControllerConnectionError` when no answer arrives.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout)
        self._http = httpx.Client(transport=transport, **self._client_kwargs())

    def _send(self, req: _Request[_T]) -> _T:
        try:
            resp = self._http.request(req.method, req.path, **self._request_kwargs(req))
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        return self._finish(req, resp)

    healthz = _sync(_Endpoints.healthz)
    version = _sync(_Endpoints.version)
    list_snapshots = _sync(_Endpoints.list_snapshots)
    create_snapshot = _sync(_Endpoints.create_snapshot)
    delete_snapshot = _sync(_Endpoints.delete_snapshot)
    snapshot_info = _sync(_Endpoints.snapshot_info)
    compact_snapshot = _sync(_Endpoints.compact_snapshot)
    spawn_sandboxes = _sync(_Endpoints.spawn_sandboxes)
    list_sandboxes = _sync(_Endpoints.list_sandboxes)
    get_sandbox = _sync(_Endpoints.get_sandbox)
    kill_sandbox = _sync(_Endpoints.kill_sandbox)
    expose_port = _sync(_Endpoints.expose_port)
    list_ports = _sync(_Endpoints.list_ports)
    remove_port = _sync(_Endpoints.remove_port)
    branch_sandbox = _sync(_Endpoints.branch_sandbox)
    exec_command = _sync(_Endpoints.exec_command)
    eval_code = _sync(_Endpoints.eval_code)
    ping_sandbox = _sync(_Endpoints.ping_sandbox)
    read_file = _sync(_Endpoints.read_file)
    write_file = _sync(_Endpoints.write_file)
    list_files = _sync(_Endpoints.list_files)
    remove_file = _sync(_Endpoints.remove_file)
    create_workspace = _sync(_Endpoints.create_workspace)
    list_workspaces = _sync(_Endpoints.list_workspaces)
    get_workspace = _sync(_Endpoints.get_workspace)
    delete_workspace = _sync(_Endpoints.delete_workspace)
    suspend_workspace = _sync(_Endpoints.suspend_workspace)
    resume_workspace = _sync(_Endpoints.resume_workspace)

    def exec_stream(
        self,
        sandbox_id: str,
        args: Sequence[str],
        timeout_secs: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> Iterator[JSONDict]:
        """``POST /v1/sandboxes/{id}/exec/stream``: the command's events as it runs.

        Yields ``{"type": "start", "pid"}``, then ``stdout``/``stderr`` events (``data``) as the
        process writes, then ``{"type": "exit", "exit_code", "timed_out", ...}`` (or an
        ``error`` event if the sandbox went away).
        """
        req = _exec_request(sandbox_id, args, timeout_secs, env, cwd, stdin, stream=True)
        kwargs = self._request_kwargs(req)
        try:
            with self._http.stream(req.method, req.path, **kwargs) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._finish(req, resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield cast(JSONDict, json.loads(line))
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc

    pull = _sync(_Endpoints.pull)
    push = _sync(_Endpoints.push)

    def pack(self, tag: str, dest: str | os.PathLike[str], *, compress: bool = True) -> int:
        """``GET /v1/snapshots/{tag}/pack``: download template ``tag`` as one pack file (with
        its image; a delta branch flattened) to ``dest``; returns its size in bytes. The file
        appears only when complete."""
        req = _pack_request(tag, compress)
        final = Path(dest)
        tmp = _partial(final)
        try:
            with self._http.stream(req.method, req.path, **self._request_kwargs(req)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._finish(req, resp)
                with open(tmp, "wb") as out:
                    for chunk in resp.iter_bytes(_CHUNK):
                        out.write(chunk)
            os.replace(tmp, final)
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return final.stat().st_size

    def unpack(
        self, path: str | os.PathLike[str], tag: str | None = None, *, force: bool = False
    ) -> JSONDict:
        """``POST /v1/snapshots/unpack``: upload a pack file; the daemon verifies and unpacks it
        (as ``tag``, default the packed one). Same answer as :meth:`pull`."""
        req = _unpack_request(tag, force)
        with open(path, "rb") as body:
            kwargs = {**self._request_kwargs(req), "content": _file_chunks(body)}
            try:
                resp = self._http.request(req.method, req.path, **kwargs)
            except httpx.TransportError as exc:
                raise self._transport_error(req, exc) from exc
        return self._finish(req, resp)

    def wait_for_snapshot(
        self, tag: str, timeout: float = 300.0, poll_interval: float = 0.2
    ) -> JSONDict:
        """Poll ``snapshot_info(tag)`` until its ``status`` is ``"ready"``; return that info.

        Raises :class:`SnapshotFailedError` (a :class:`ControllerError`, carrying the daemon's
        ``error``) when the status becomes ``"failed"``, :class:`ControllerError` 404 for an
        unknown tag, and ``TimeoutError`` when still ``"writing"`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        req = _Endpoints.snapshot_info(tag)
        while True:
            info = self._send(req)
            if self._snapshot_done(tag, info, f"{self.base_url}{req.path}"):
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"snapshot {tag!r} still {info.get('status')!r} after {timeout:g}s"
                )
            time.sleep(min(poll_interval, remaining))

    def close(self) -> None:
        """Close the connection pool. The controller is unusable afterwards."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncController(_Base):
    """The asyncio twin of :class:`Controller`: same methods and arguments, awaitable.

    Built on one ``httpx.AsyncClient``; close it with :meth:`aclose` or ``async with``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout)
        self._http = httpx.AsyncClient(transport=transport, **self._client_kwargs())

    async def _send(self, req: _Request[_T]) -> _T:
        try:
            resp = await self._http.request(req.method, req.path, **self._request_kwargs(req))
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        return self._finish(req, resp)

    async def exec_stream(
        self,
        sandbox_id: str,
        args: Sequence[str],
        timeout_secs: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> AsyncIterator[JSONDict]:
        """``POST /v1/sandboxes/{id}/exec/stream``; see :meth:`Controller.exec_stream`."""
        req = _exec_request(sandbox_id, args, timeout_secs, env, cwd, stdin, stream=True)
        kwargs = self._request_kwargs(req)
        try:
            async with self._http.stream(req.method, req.path, **kwargs) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._finish(req, resp)
                async for line in resp.aiter_lines():
                    if line.strip():
                        yield cast(JSONDict, json.loads(line))
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc

    healthz = _async(_Endpoints.healthz)
    version = _async(_Endpoints.version)
    list_snapshots = _async(_Endpoints.list_snapshots)
    create_snapshot = _async(_Endpoints.create_snapshot)
    delete_snapshot = _async(_Endpoints.delete_snapshot)
    snapshot_info = _async(_Endpoints.snapshot_info)
    compact_snapshot = _async(_Endpoints.compact_snapshot)
    spawn_sandboxes = _async(_Endpoints.spawn_sandboxes)
    list_sandboxes = _async(_Endpoints.list_sandboxes)
    get_sandbox = _async(_Endpoints.get_sandbox)
    kill_sandbox = _async(_Endpoints.kill_sandbox)
    expose_port = _async(_Endpoints.expose_port)
    list_ports = _async(_Endpoints.list_ports)
    remove_port = _async(_Endpoints.remove_port)
    branch_sandbox = _async(_Endpoints.branch_sandbox)
    exec_command = _async(_Endpoints.exec_command)
    eval_code = _async(_Endpoints.eval_code)
    ping_sandbox = _async(_Endpoints.ping_sandbox)
    read_file = _async(_Endpoints.read_file)
    write_file = _async(_Endpoints.write_file)
    list_files = _async(_Endpoints.list_files)
    remove_file = _async(_Endpoints.remove_file)
    create_workspace = _async(_Endpoints.create_workspace)
    list_workspaces = _async(_Endpoints.list_workspaces)
    get_workspace = _async(_Endpoints.get_workspace)
    delete_workspace = _async(_Endpoints.delete_workspace)
    suspend_workspace = _async(_Endpoints.suspend_workspace)
    resume_workspace = _async(_Endpoints.resume_workspace)

    pull = _async(_Endpoints.pull)
    push = _async(_Endpoints.push)

    async def pack(self, tag: str, dest: str | os.PathLike[str], *, compress: bool = True) -> int:
        """``GET /v1/snapshots/{tag}/pack``; see :meth:`Controller.pack`."""
        req = _pack_request(tag, compress)
        final = Path(dest)
        tmp = _partial(final)
        try:
            async with self._http.stream(req.method, req.path, **self._request_kwargs(req)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._finish(req, resp)
                with open(tmp, "wb") as out:
                    async for chunk in resp.aiter_bytes(_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
            os.replace(tmp, final)
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return final.stat().st_size

    async def unpack(
        self, path: str | os.PathLike[str], tag: str | None = None, *, force: bool = False
    ) -> JSONDict:
        """``POST /v1/snapshots/unpack``; see :meth:`Controller.unpack`."""
        req = _unpack_request(tag, force)

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    yield chunk

        kwargs = {**self._request_kwargs(req), "content": chunks()}
        try:
            resp = await self._http.request(req.method, req.path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        return self._finish(req, resp)

    async def wait_for_snapshot(
        self, tag: str, timeout: float = 300.0, poll_interval: float = 0.2
    ) -> JSONDict:
        """Poll ``snapshot_info(tag)`` until its ``status`` is ``"ready"``; return that info.

        Raises :class:`SnapshotFailedError` when the status becomes ``"failed"``,
        :class:`ControllerError` 404 for an unknown tag, ``TimeoutError`` after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        req = _Endpoints.snapshot_info(tag)
        while True:
            info = await self._send(req)
            if self._snapshot_done(tag, info, f"{self.base_url}{req.path}"):
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"snapshot {tag!r} still {info.get('status')!r} after {timeout:g}s"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def aclose(self) -> None:
        """Close the connection pool. The controller is unusable afterwards."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
