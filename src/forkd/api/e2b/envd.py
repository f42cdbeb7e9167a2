"""E2B's in-sandbox API ("envd", ``E2B_SANDBOX_URL``) over forkd's guest agent.

Requests name their sandbox in the ``E2b-Sandbox-Id`` header (the SDK's header routing) and
carry its access token in ``X-Access-Token`` (or ``E2B-Traffic-Access-Token``). Served:
``process.Process`` Start/Connect (server streams, with a PTY when asked), List, SendInput,
SendSignal, CloseStdin, Update (PTY resize);
``filesystem.Filesystem`` Stat, ListDir, MakeDir, Move, Remove (Connect protocol, JSON codec,
see :mod:`forkd.api.e2b.connect`); ``GET``/``POST /files``; ``GET /health``. Message shapes:
:mod:`forkd.api.e2b.messages`. Commands and file operations run as the user the SDK names
(``Authorization: Basic base64("<user>:")``, ``?username=`` on ``/files``), by default ``user``
(uid 1000, home ``/home/user``, where relative paths resolve), as E2B's envd does. A guest
without that account (an image made before forkd had it) runs them as root with
``HOME=/home/user``, as forkd did before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hmac
import json
import os.path
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from forkd.api.e2b import messages as m
from forkd.api.e2b.connect import (
    STREAM_TYPE,
    ConnectError,
    end_stream,
    envelope,
    parse_stream_request,
    parse_unary,
    unary_error,
    unary_response,
)
from forkd.api.e2b.control import HOME, E2BError, error_response, forkd_status
from forkd.api.e2b.messages import Snapshot
from forkd.api.e2b.state import E2BSandbox, E2BState, Watcher
from forkd.config import Limits
from forkd.errors import AgentError, ForkdError, GuestOSError, InvalidInput, NotFound
from forkd.vmm.agent_client import AgentClient, ProcStream

KEEPALIVE_S = 30.0
MAX_WATCHERS = 16  # per sandbox
WATCH_DEPTH = 8  # directory levels a recursive watch looks at
WATCH_POLL_S = 0.5  # how often a WatchDir stream looks
MAX_LIST_ENTRIES = 10_000
MAX_FILE_BYTES = 64 << 20


DEFAULT_USER = "user"  # whom envd acts as when a call names no user


def resolve(path: str, home: str = HOME) -> str:
    """An E2B path: relative ones (and ``~``) resolve against the user's home."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConnectError("invalid_argument", f"invalid path {path!r}")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    if not path.startswith("/"):
        path = home.rstrip("/") + "/" + path
    return os.path.normpath(path)


def request_user(request: Request) -> str | None:
    """The user a call names: ``?username=`` (``/files``) or ``Authorization: Basic
    base64("<user>:")`` (RPCs); None when it names none."""
    name = request.query_params.get("username")
    if name:
        return name
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise E2BError(400, "invalid Authorization header (Basic base64 of 'user:')") from None
    return decoded.partition(":")[0] or None


def parse_passwd(text: str) -> dict[str, str]:
    """User name -> home directory, from an /etc/passwd."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] and not fields[0].startswith(("#", "+", "-")):
            users[fields[0]] = fields[5] or "/"
    return users


@dataclass(frozen=True)
class Who:
    """Whom a call acts as: ``user`` for the agent (None: root, on a guest without the
    default account) and the home relative paths resolve against."""

    user: str | None
    home: str


class Envd:
    def __init__(self, state: E2BState, limits: Limits) -> None:
        self.state = state
        self.runtime = state.runtime
        self.limits = limits

    # --- routing and auth ------------------------------------------------------------------

    def sandbox(self, request: Request) -> E2BSandbox:
        sandbox_id = request.headers.get("e2b-sandbox-id")
        if not sandbox_id:
            raise E2BError(400, "missing E2b-Sandbox-Id header (set E2B_SANDBOX_URL)")
        try:
            sb = self.state.get(sandbox_id)
        except NotFound:
            raise E2BError(502, f"sandbox {sandbox_id!r} was not found") from None
        presented = request.headers.get("x-access-token") or request.headers.get(
            "e2b-traffic-access-token"
        )
        if not presented or not hmac.compare_digest(presented.encode(), sb.access_token.encode()):
            raise E2BError(401, f"invalid or missing access token for sandbox {sandbox_id!r}")
        return sb

    async def agent(self, sb: E2BSandbox) -> AgentClient:
        agent = await self.runtime.agent(sb.vm_id)
        if sb.users is None:
            await self._read_users(sb, agent)
            if DEFAULT_USER not in (sb.users or {}):
                with contextlib.suppress(InvalidInput):  # an older guest agent: no mkdir op
                    await agent.mkdir(HOME)
        return agent

    async def _read_users(self, sb: E2BSandbox, agent: AgentClient) -> dict[str, str]:
        try:
            sb.users = parse_passwd(
                (await agent.read_file("/etc/passwd")).decode("utf-8", "replace")
            )
        except (NotFound, GuestOSError):
            sb.users = {}
        return sb.users

    async def who(self, sb: E2BSandbox, agent: AgentClient, name: str | None) -> Who:
        """Whom a call naming ``name`` (None: the default user) acts as; an unknown user is
        ``invalid_argument``, as in envd."""
        users = sb.users if sb.users is not None else await self._read_users(sb, agent)
        if name is None:
            if DEFAULT_USER in users:
                return Who(DEFAULT_USER, users[DEFAULT_USER])
            return Who(None, HOME)
        if name not in users:
            users = await self._read_users(sb, agent)  # added since the last look?
            if name not in users:
                raise ConnectError(
                    "invalid_argument", f"user {name!r} does not exist in the sandbox"
                )
        return Who(name, users[name])

    # --- process.Process -------------------------------------------------------------------

    def _env(self, sb: E2BSandbox, who: Who, envs: dict[str, str]) -> dict[str, str]:
        # With a user the agent sets HOME, USER and LOGNAME; as root on an older guest, HOME
        # is E2B's user home as before.
        base = {"HOME": HOME} if who.user is None else {}
        return {**base, **sb.envs, **envs}

    async def start(
        self, sb: E2BSandbox, msg: dict[str, Any], timeout_s: float | None, user: str | None
    ) -> Any:
        req = m.parse(m.StartRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        cwd = resolve(req.process.cwd, who.home) if req.process.cwd else who.home
        stream = await agent.proc_start(
            [req.process.cmd, *req.process.args],
            env=self._env(sb, who, req.process.envs),
            cwd=cwd,
            stdin=bool(req.stdin),
            timeout=timeout_s,
            tag=req.tag,
            user=who.user,
            pty=None if req.pty is None else (req.pty.size.cols, req.pty.size.rows),
        )
        return self._events(agent, stream)

    async def connect(
        self, sb: E2BSandbox, msg: dict[str, Any], _t: float | None, _user: str | None
    ) -> Any:
        req = m.parse(m.SelectRequest, msg)
        agent = await self.agent(sb)
        pid = await self._pid(agent, req.process)
        try:
            stream = agent.proc_attach(pid)
        except NotFound:
            raise ConnectError("not_found", f"process with pid {pid} not found") from None
        return self._events(agent, stream)

    async def _events(self, agent: AgentClient, stream: ProcStream) -> AsyncIterator[bytes]:
        try:
            yield envelope(m.start_event(stream.pid))
            while True:
                try:
                    ev = await asyncio.wait_for(stream.next(), KEEPALIVE_S)
                except TimeoutError:
                    yield envelope(m.keepalive_event())
                    continue
                if ev.kind == "exit":
                    if ev.timed_out:
                        yield end_stream(ConnectError("deadline_exceeded", "command timed out"))
                        return
                    yield envelope(m.end_event(ev.exit_code or 0, ev.signal))
                    break
                yield envelope(m.data_event(ev.kind, ev.data))
        except AgentError as e:
            yield end_stream(ConnectError("unavailable", str(e)))
            return
        finally:
            agent.proc_detach(stream)
        yield end_stream()

    async def _pid(self, agent: AgentClient, sel: m.ProcessSelector) -> int:
        if sel.pid is not None:
            return sel.pid
        if sel.tag is not None:
            for proc in await agent.proc_list():
                if proc.get("tag") == sel.tag:
                    return int(proc["pid"])
            raise ConnectError("not_found", f"process with tag {sel.tag!r} not found")
        raise ConnectError("invalid_argument", "process selector needs a pid or a tag")

    async def list_processes(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        agent = await self.agent(sb)
        return {"processes": [m.process_info(p) for p in await agent.proc_list()]}

    async def send_input(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.SendInputRequest, msg)
        agent = await self.agent(sb)
        pid = await self._pid(agent, req.process)
        try:  # a PTY's input is typed into its terminal, stdin goes to the pipe
            data = base64.b64decode(req.input.pty or req.input.stdin or "", validate=True)
        except ValueError:
            raise ConnectError("invalid_argument", "the input is not base64") from None
        await agent.proc_input(pid, data)
        return {}

    async def update(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.UpdateRequest, msg)
        if req.pty is None:
            return {}
        agent = await self.agent(sb)
        pid = await self._pid(agent, req.process)
        await agent.proc_resize(pid, req.pty.size.cols, req.pty.size.rows)
        return {}

    async def close_stdin(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.SelectRequest, msg)
        agent = await self.agent(sb)
        await agent.proc_close_stdin(await self._pid(agent, req.process))
        return {}

    async def send_signal(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.SendSignalRequest, msg)
        sig = m.SIGNALS.get(req.signal)
        if sig is None:
            raise ConnectError("invalid_argument", f"unsupported signal {req.signal!r}")
        agent = await self.agent(sb)
        await agent.proc_signal(await self._pid(agent, req.process), sig)
        return {}

    # --- filesystem.Filesystem -------------------------------------------------------------

    async def stat(self, sb: E2BSandbox, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
        req = m.parse(m.PathRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        entry = await agent.stat(resolve(req.path, who.home), user=who.user)
        return {"entry": m.entry_info(entry)}

    async def list_dir(
        self, sb: E2BSandbox, msg: dict[str, Any], user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.ListDirRequest, msg)
        depth = max(1, req.depth)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        root = resolve(req.path, who.home)
        st = await agent.stat(root, user=who.user)
        if st.get("type") != "dir":
            raise ConnectError("invalid_argument", f"path {root} is not a directory")
        entries: list[dict[str, Any]] = []
        level = [root]
        for _ in range(depth):
            below: list[str] = []
            for directory in level:
                for entry in await agent.list_files(directory, user=who.user):
                    if len(entries) >= MAX_LIST_ENTRIES:
                        raise ConnectError(
                            "resource_exhausted", f"more than {MAX_LIST_ENTRIES} entries"
                        )
                    entries.append(m.entry_info(entry))
                    if entry.get("type") == "dir":
                        below.append(str(entry.get("path")))
            level = below
        return {"entries": entries}

    # --- watching (by polling: the net change between two looks) ------------------------------

    async def _snapshot(
        self, agent: AgentClient, root: str, recursive: bool, user: str | None = None
    ) -> Snapshot:
        """What is under ``root``: relative name -> (type, size, mtime, mode)."""
        out: Snapshot = {}
        level = [root]
        for _ in range(WATCH_DEPTH if recursive else 1):
            below: list[str] = []
            for directory in level:
                try:
                    entries = await agent.list_files(directory, user=user)
                except (NotFound, GuestOSError):
                    continue  # removed meanwhile
                for e in entries:
                    if len(out) >= MAX_LIST_ENTRIES:
                        raise ConnectError(
                            "resource_exhausted", f"more than {MAX_LIST_ENTRIES} entries"
                        )
                    path = str(e.get("path", ""))
                    out[os.path.relpath(path, root)] = (
                        str(e.get("type")),
                        e.get("size"),
                        e.get("mtime"),
                        e.get("mode"),
                    )
                    if e.get("type") == "dir":
                        below.append(path)
            level = below
        return out

    async def _watch_start(self, sb: E2BSandbox, msg: dict[str, Any], user: str | None) -> Watcher:
        req = m.parse(m.WatchRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        root = resolve(req.path, who.home)
        if (await agent.stat(root, user=who.user)).get("type") != "dir":
            raise ConnectError("invalid_argument", f"path {root} is not a directory")
        seen = await self._snapshot(agent, root, req.recursive, who.user)
        return Watcher(root, req.recursive, seen, who.user)

    async def _watch_poll(self, sb: E2BSandbox, w: Watcher) -> list[dict[str, Any]]:
        now = await self._snapshot(await self.agent(sb), w.root, w.recursive, w.user)
        events = m.watch_events(w.seen, now)
        w.seen = now
        return events

    async def create_watcher(
        self, sb: E2BSandbox, msg: dict[str, Any], user: str | None
    ) -> dict[str, Any]:
        if len(sb.watchers) >= MAX_WATCHERS:
            raise ConnectError("resource_exhausted", f"at most {MAX_WATCHERS} watchers")
        watcher_id = secrets.token_hex(8)
        sb.watchers[watcher_id] = await self._watch_start(sb, msg, user)
        return {"watcherId": watcher_id}

    def _watcher(self, sb: E2BSandbox, msg: dict[str, Any]) -> tuple[str, Watcher]:
        watcher_id = m.parse(m.WatcherRequest, msg).watcher_id
        w = sb.watchers.get(watcher_id)
        if w is None:
            raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
        return watcher_id, w

    async def get_watcher_events(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        _, w = self._watcher(sb, msg)
        return {"events": await self._watch_poll(sb, w)}

    async def remove_watcher(
        self, sb: E2BSandbox, msg: dict[str, Any], _user: str | None
    ) -> dict[str, Any]:
        watcher_id, _ = self._watcher(sb, msg)
        del sb.watchers[watcher_id]
        return {}

    async def watch_dir(
        self, sb: E2BSandbox, msg: dict[str, Any], _t: float | None, user: str | None
    ) -> Any:
        w = await self._watch_start(sb, msg, user)

        async def events() -> AsyncIterator[bytes]:
            yield envelope({"start": {}})
            idle = 0.0
            try:
                while True:
                    await asyncio.sleep(WATCH_POLL_S)
                    found = await self._watch_poll(sb, w)
                    for event in found:
                        yield envelope({"filesystem": event})
                    idle = 0.0 if found else idle + WATCH_POLL_S
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield envelope({"keepalive": {}})
            except (ConnectError, ForkdError) as e:
                yield end_stream(_connect_error(e))

        return events()

    async def make_dir(
        self, sb: E2BSandbox, msg: dict[str, Any], user: str | None
    ) -> dict[str, Any]:
        req = m.parse(m.PathRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        path = resolve(req.path, who.home)
        if not await agent.mkdir(path, user=who.user):
            raise ConnectError("already_exists", f"directory {path} already exists")
        return {"entry": m.entry_info(await agent.stat(path, user=who.user))}

    async def move(self, sb: E2BSandbox, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
        req = m.parse(m.MoveRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        source, destination = resolve(req.source, who.home), resolve(req.destination, who.home)
        entry = await agent.move(source, destination, user=who.user)
        return {"entry": m.entry_info(entry)}

    async def remove(self, sb: E2BSandbox, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
        req = m.parse(m.PathRequest, msg)
        agent = await self.agent(sb)
        who = await self.who(sb, agent, user)
        await agent.remove_file(resolve(req.path, who.home), recursive=True, user=who.user)
        return {}

    # --- /files ----------------------------------------------------------------------------

    async def read_file(self, sb: E2BSandbox, request: Request) -> Response:
        agent = await self.agent(sb)
        who = await self.who(sb, agent, request_user(request))
        path = resolve(request.query_params.get("path") or "", who.home)
        data = await agent.read_file(path, limit=MAX_FILE_BYTES, user=who.user)
        return Response(data, 200, media_type="application/octet-stream")

    async def write_files(self, sb: E2BSandbox, request: Request) -> Response:
        query_path = request.query_params.get("path")
        ctype = request.headers.get("content-type", "")
        uploads: list[tuple[str, bytes]] = []
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1000)
            try:
                for _, value in form.multi_items():
                    if not isinstance(value, UploadFile):
                        continue
                    name = query_path or value.filename
                    if not name:
                        raise E2BError(400, "a file part needs a filename or ?path=")
                    uploads.append((name, await value.read()))
            finally:
                await form.close()
        else:
            if not query_path:
                raise E2BError(400, "a raw upload needs ?path=")
            data = await request.body()
            if request.headers.get("content-encoding", "").lower() == "gzip":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise E2BError(400, f"body is not valid gzip: {e}") from None
            uploads.append((query_path, data))
        if not uploads:
            raise E2BError(400, "no file in the upload (multipart field 'file')")
        agent = await self.agent(sb)
        who = await self.who(sb, agent, request_user(request))
        written = []
        for name, data in uploads:
            path = resolve(name, who.home)
            await agent.write_file(path, data, user=who.user)
            written.append({"name": os.path.basename(path), "type": "file", "path": path})
        return Response(_dumps(written), 200, media_type="application/json")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# (envd, sandbox, message, the user the call names) and for streams the timeout before the user
Unary = Callable[[Envd, E2BSandbox, dict[str, Any], str | None], Awaitable[dict[str, Any]]]
Streaming = Callable[[Envd, E2BSandbox, dict[str, Any], float | None, str | None], Awaitable[Any]]

UNARY: dict[str, Unary] = {
    "process.Process/List": Envd.list_processes,
    "process.Process/SendInput": Envd.send_input,
    "process.Process/SendSignal": Envd.send_signal,
    "process.Process/CloseStdin": Envd.close_stdin,
    "process.Process/Update": Envd.update,
    "filesystem.Filesystem/Stat": Envd.stat,
    "filesystem.Filesystem/ListDir": Envd.list_dir,
    "filesystem.Filesystem/MakeDir": Envd.make_dir,
    "filesystem.Filesystem/Move": Envd.move,
    "filesystem.Filesystem/Remove": Envd.remove,
    "filesystem.Filesystem/CreateWatcher": Envd.create_watcher,
    "filesystem.Filesystem/GetWatcherEvents": Envd.get_watcher_events,
    "filesystem.Filesystem/RemoveWatcher": Envd.remove_watcher,
}
STREAMING: dict[str, Streaming] = {
    "process.Process/Start": Envd.start,
    "process.Process/Connect": Envd.connect,
    "filesystem.Filesystem/WatchDir": Envd.watch_dir,
}


def _connect_error(exc: Exception) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, E2BError):
        code = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found"}.get(
            exc.status, "unavailable"
        )
        return ConnectError(code, exc.message)
    if isinstance(exc, ForkdError):
        return ConnectError.from_forkd(exc)
    raise exc


def _timeout_s(request: Request) -> float | None:
    raw = request.headers.get("connect-timeout-ms", "")
    return int(raw) / 1000.0 if raw.isdigit() and int(raw) > 0 else None


def envd_router(envd: Envd) -> APIRouter:
    router = APIRouter()

    @router.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        try:
            envd.sandbox(request)
        except E2BError as e:
            return error_response(e.status, e.message)
        return Response(status_code=204)

    @router.get("/files", include_in_schema=False)
    async def get_files(request: Request) -> Response:
        try:
            return await envd.read_file(envd.sandbox(request), request)
        except E2BError as e:
            return error_response(e.status, e.message)
        except ConnectError as e:
            return error_response(e.http_status, e.message)
        except ForkdError as e:
            return error_response(forkd_status(e), str(e) or type(e).__name__)

    @router.post("/files", include_in_schema=False)
    async def post_files(request: Request) -> Response:
        try:
            return await envd.write_files(envd.sandbox(request), request)
        except E2BError as e:
            return error_response(e.status, e.message)
        except ConnectError as e:
            return error_response(e.http_status, e.message)
        except ForkdError as e:
            return error_response(forkd_status(e), str(e) or type(e).__name__)

    @router.post("/{service}/{method}", include_in_schema=False)
    async def rpc(request: Request, service: str, method: str) -> Response:
        name = f"{service}/{method}"
        streaming = STREAMING.get(name)
        if streaming is not None or request.headers.get("content-type", "").startswith(STREAM_TYPE):
            return await _stream(request, name, streaming)
        try:
            sb = envd.sandbox(request)
            handler = UNARY.get(name)
            if handler is None:
                raise ConnectError("unimplemented", f"{name} is not supported by forkd")
            msg = parse_unary(await request.body())
            return unary_response(await handler(envd, sb, msg, request_user(request)))
        except (ConnectError, E2BError, ForkdError) as e:
            return unary_error(_connect_error(e))

    async def _stream(request: Request, name: str, handler: Streaming | None) -> Response:
        try:
            sb = envd.sandbox(request)
            if handler is None:
                raise ConnectError("unimplemented", f"{name} is not supported by forkd")
            msg = parse_stream_request(await request.body())
            events = await handler(envd, sb, msg, _timeout_s(request), request_user(request))
        except (ConnectError, E2BError, ForkdError) as e:
            err = _connect_error(e)

            async def failed() -> AsyncIterator[bytes]:
                yield end_stream(err)

            return StreamingResponse(failed(), 200, media_type=STREAM_TYPE)
        return StreamingResponse(events, 200, media_type=STREAM_TYPE)

    @router.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unknown(request: Request, rest: str) -> Response:
        return error_response(404, f"{request.method} /{rest} is not served by forkd's envd")

    return router
