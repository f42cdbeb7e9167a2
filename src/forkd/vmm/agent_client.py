"""Host side of the guest agent protocol (docs/agent-protocol.md).

One :class:`AgentClient` is one connection to a VM's ``agent.sock`` (QEMU's chardev for the
virtio-serial port). The connection starts with ``hello`` and a fresh session; responses are
matched to requests by id (``<session>-<n>``) and anything else, including answers the agent gave
to an earlier connection, is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from forkd.errors import AgentError, GuestOSError, InvalidInput, NotFound

# A read_file answer of the default 64 MiB limit is ~90 MB of base64 on one line.
MAX_LINE_BYTES = 256 << 20
EXEC_TIMEOUT_MARGIN_S = 10.0
HELLO_RESEND_S = 1.0
# Output of one tracked process queued on the host before its reader takes it; beyond this the
# output is dropped (counted in ProcStream.dropped_bytes) so a chatty guest cannot grow memory.
PROC_QUEUE_BYTES = 16 << 20
PROC_SUBSCRIBERS_MAX = 16  # readers of one process at once


@dataclass(frozen=True)
class ExecResult:
    """Outcome of an ``exec`` request."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class EvalResult:
    """Outcome of an ``eval`` request; ``error`` is ``"ExcType: message"`` when it raised."""

    result: str | None
    error: str | None
    traceback: str | None
    exit_code: int
    stdout: str

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ProcEvent:
    """One event of a tracked process: output (``stdout``/``stderr``) or its ``exit``."""

    kind: str
    data: bytes = b""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False


class ProcStream:
    """The events of one tracked process as one reader sees them (:meth:`AgentClient.proc_start`).

    Output beyond :data:`PROC_QUEUE_BYTES` not yet taken is dropped and counted; the exit event
    always arrives. :meth:`next` raises :class:`AgentError` when the connection is lost.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.dropped_bytes = 0
        self._queue: asyncio.Queue[ProcEvent | AgentError] = asyncio.Queue()
        self._queued_bytes = 0
        self.exited: ProcEvent | None = None

    def _put(self, event: ProcEvent) -> None:
        if event.kind == "exit":
            self.exited = event
        elif self._queued_bytes + len(event.data) > PROC_QUEUE_BYTES:
            self.dropped_bytes += len(event.data)
            return
        self._queued_bytes += len(event.data)
        self._queue.put_nowait(event)

    def _fail(self, error: AgentError) -> None:
        self._queue.put_nowait(error)

    async def next(self) -> ProcEvent:
        item = await self._queue.get()
        if isinstance(item, AgentError):
            self._queue.put_nowait(item)  # every later call fails the same way
            raise item
        self._queued_bytes -= len(item.data)
        return item


def _proc_event(msg: dict[str, Any]) -> tuple[int, ProcEvent] | None:
    """A well-formed process event from the guest, or None."""
    pid = msg.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    kind = msg.get("event")
    if kind == "proc_output":
        stream = msg.get("stream")
        data = msg.get("data_b64")
        if stream not in ("stdout", "stderr") or not isinstance(data, str):
            return None
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            return None
        return pid, ProcEvent(kind=str(stream), data=raw)
    if kind == "proc_exit":
        code = msg.get("exit_code")
        sig = msg.get("signal")
        return pid, ProcEvent(
            kind="exit",
            exit_code=code if isinstance(code, int) else -1,
            signal=sig if isinstance(sig, int) else None,
            timed_out=msg.get("timed_out") is True,
        )
    return None


def _encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode("utf-8") + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _raise_for(op: str, resp: dict[str, Any]) -> None:
    if resp.get("ok") is True:
        return
    message = str(resp.get("error") or f"agent {op} failed")
    kind = resp.get("kind")
    if kind == "not_found":
        raise NotFound(message)
    if kind == "bad_request":
        raise InvalidInput(message)
    if kind == "os_error":
        code = resp.get("errno")
        raise GuestOSError(message, code if isinstance(code, int) else None)
    raise AgentError(f"agent {op}: {message}")


class AgentClient:
    """One connection to a guest agent; requests may be issued concurrently."""

    def __init__(
        self,
        socket_path: Path,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: str,
        hello: dict[str, Any],
    ) -> None:
        self.socket_path = socket_path
        self.session = session
        self.hello = hello
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._closed = False
        self._close_reason = "agent client closed"
        self._unknown_responses = 0
        self._junk_lines = 0
        self._proc_streams: dict[int, list[ProcStream]] = {}
        self._on_answer: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._listeners: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._reader_task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"agent-reader-{session}"
        )

    # ----------------------------------------------------------------- connecting

    @classmethod
    async def open(cls, socket_path: Path, *, timeout: float = 10.0) -> AgentSocket:
        """Connect the socket only; call :meth:`AgentSocket.handshake` once the guest runs.

        Connecting before a restored VM continues means the agent, which was blocked in read()
        when the template was saved, answers as soon as it runs.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(socket_path), limit=MAX_LINE_BYTES
                )
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if loop.time() >= deadline:
                    raise AgentError(
                        f"cannot connect to agent socket {socket_path} within {timeout:g} s: {e}"
                    ) from e
                await asyncio.sleep(0.05)
            except OSError as e:
                raise AgentError(f"cannot connect to agent socket {socket_path}: {e}") from e

        return AgentSocket(Path(socket_path), reader, writer)

    @classmethod
    async def connect(cls, socket_path: Path, *, timeout: float = 10.0) -> AgentClient:
        """Connect to ``socket_path`` and say hello; :class:`AgentError` if not done in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sock = await cls.open(socket_path, timeout=timeout)
        return await sock.handshake(timeout=max(0.1, deadline - loop.time()))

    # ----------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def unknown_responses(self) -> int:
        """Well-formed responses ignored because this connection did not send their id."""
        return self._unknown_responses

    @property
    def junk_lines(self) -> int:
        """Non-empty lines ignored because they were not JSON objects."""
        return self._junk_lines

    async def close(self) -> None:
        if not self._closed:
            self._shutdown("agent client closed")
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _shutdown(self, reason: str) -> None:
        """Mark closed and fail every pending request at once."""
        self._closed = True
        self._close_reason = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentError(reason))
        streams, self._proc_streams = self._proc_streams, {}
        for subs in streams.values():
            for sub in subs:
                sub._fail(AgentError(reason))
        self._writer.close()

    async def _read_loop(self) -> None:
        reason = "agent connection lost"
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError:  # over-long line, already discarded by the stream
                    self._junk_lines += 1
                    continue
                if not line:
                    break
                msg = _parse(line)
                if msg is None:
                    if line.strip():
                        self._junk_lines += 1
                    continue
                rid = msg.get("id")
                if rid is None and isinstance(msg.get("event"), str):
                    self._deliver_event(msg)
                    continue
                fut = self._pending.pop(rid, None) if isinstance(rid, str) else None
                if fut is None:
                    self._unknown_responses += 1
                    continue
                hook = self._on_answer.pop(rid, None) if isinstance(rid, str) else None
                if hook is not None and msg.get("ok") is True:
                    hook(msg)  # before any later line (an event it enables) is read
                if not fut.done():
                    fut.set_result(msg)
        except asyncio.CancelledError:
            reason = self._close_reason
            raise
        except OSError as e:
            reason = f"agent connection lost: {e}"
        finally:
            if not self._closed:
                self._shutdown(reason)

    # ----------------------------------------------------------------- requests

    async def request(
        self, op: str, *, timeout: float | None = None, **args: Any
    ) -> dict[str, Any]:
        """Send ``op`` with ``args`` and return the successful response.

        ``timeout`` bounds the wait for the answer (None: wait until answered or disconnected).
        An argument literally named ``timeout`` (``exec``'s) must go through :meth:`call`.
        """
        return await self.call(op, args, timeout=timeout)

    async def call(
        self,
        op: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_answer: Callable[[dict[str, Any]], None] | None = None,
        listener: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`request`, with the protocol arguments given as a mapping.

        ``on_answer`` runs in the reader as soon as a successful answer is read, before any
        later line: it is how a caller subscribes to events the answer announces.
        ``listener`` gets the events that name this request (``"ref": <id>``) until it is
        answered.
        """
        if self._closed:
            raise AgentError(self._close_reason)
        rid = f"{self.session}-{self._next_id}"
        self._next_id += 1
        msg: dict[str, Any] = dict(args)
        msg["id"] = rid
        msg["op"] = op
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if on_answer is not None:
            self._on_answer[rid] = on_answer
        if listener is not None:
            self._listeners[rid] = listener
        try:
            try:
                self._writer.write(_encode(msg))
                await self._writer.drain()
            except (OSError, RuntimeError) as e:
                fut.cancel()  # failed here; _shutdown fails the other pending requests
                self._shutdown(f"agent connection lost: {e}")
                raise AgentError(f"agent connection lost: {e}") from e
            try:
                resp = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise AgentError(f"agent {op} timed out after {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
            self._on_answer.pop(rid, None)
            self._listeners.pop(rid, None)
        _raise_for(op, resp)
        return resp

    def _deliver_event(self, msg: dict[str, Any]) -> None:
        ref = msg.get("ref")
        if isinstance(ref, str):
            listener = self._listeners.get(ref)
            if listener is None:
                self._unknown_responses += 1
            else:
                listener(msg)
            return
        parsed = _proc_event(msg)
        if parsed is None:
            self._unknown_responses += 1
            return
        pid, event = parsed
        subs = self._proc_streams.get(pid)
        if not subs:
            return  # nobody reads this process (or it was started by an earlier connection)
        if event.kind == "exit":
            del self._proc_streams[pid]
        for sub in subs:
            sub._put(event)

    # ----------------------------------------------------------------- tracked processes

    async def proc_start(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        tag: str | None = None,
        call_timeout: float | None = 30.0,
    ) -> ProcStream:
        """Start ``argv`` as a tracked process; its output and exit arrive on the stream.

        ``timeout`` (None: none) has the guest kill the process group when it passes.
        """
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("argv must be a non-empty list of strings")
        args: dict[str, Any] = {"argv": list(argv), "stdin": stdin}
        if env is not None:
            args["env"] = dict(env)
        if cwd is not None:
            args["cwd"] = cwd
        if timeout is not None and timeout > 0:
            args["timeout"] = timeout
        if tag is not None:
            args["tag"] = tag
        holder: list[ProcStream] = []

        def subscribe(resp: dict[str, Any]) -> None:
            pid = resp.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool):
                stream = ProcStream(pid)
                self._proc_streams[pid] = [stream]
                holder.append(stream)

        resp = await self.call("proc_start", args, timeout=call_timeout, on_answer=subscribe)
        if not holder:
            raise AgentError(f"agent proc_start: bad answer {resp!r}")
        return holder[0]

    def proc_attach(self, pid: int) -> ProcStream:
        """Another reader of running tracked process ``pid`` (events from now on)."""
        subs = self._proc_streams.get(pid)
        if subs is None:
            raise NotFound(f"no running tracked process with pid {pid} on this connection")
        if len(subs) >= PROC_SUBSCRIBERS_MAX:
            raise InvalidInput(f"process {pid} has {len(subs)} readers already")
        stream = ProcStream(pid)
        subs.append(stream)
        return stream

    def proc_detach(self, stream: ProcStream) -> None:
        subs = self._proc_streams.get(stream.pid)
        if subs is not None and stream in subs:
            subs.remove(stream)

    async def proc_input(self, pid: int, data: bytes, *, timeout: float | None = 30.0) -> None:
        args = {"pid": pid, "data_b64": base64.b64encode(data).decode("ascii")}
        await self.call("proc_input", args, timeout=timeout)

    async def proc_close_stdin(self, pid: int, *, timeout: float | None = 10.0) -> None:
        await self.call("proc_close_stdin", {"pid": pid}, timeout=timeout)

    async def proc_signal(self, pid: int, signal: int, *, timeout: float | None = 10.0) -> None:
        await self.call("proc_signal", {"pid": pid, "signal": signal}, timeout=timeout)

    async def proc_list(self, *, timeout: float | None = 10.0) -> list[dict[str, Any]]:
        """Running tracked processes: pid, argv, env (as given), cwd, tag."""
        resp = await self.call("proc_list", {}, timeout=timeout)
        procs = resp.get("processes", [])
        return [p for p in procs if isinstance(p, dict)] if isinstance(procs, list) else []

    async def ping(self, *, timeout: float | None = 5.0) -> dict[str, Any]:
        return await self.call("ping", {}, timeout=timeout)

    async def exec(
        self,
        argv: list[str] | None = None,
        *,
        cmd: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 30.0,
        max_output: int = 1 << 20,
    ) -> ExecResult:
        """Run ``argv`` (or ``cmd`` through ``/bin/sh -c``) in the guest."""
        if (argv is None) == (cmd is None):
            raise InvalidInput("exec needs exactly one of argv or cmd")
        args: dict[str, Any] = {"timeout": timeout, "max_output": max_output}
        if argv is not None:
            args["argv"] = list(argv)
        else:
            args["cmd"] = cmd
        if env is not None:
            args["env"] = dict(env)
        if cwd is not None:
            args["cwd"] = cwd
        if stdin is not None:
            args["stdin_b64"] = base64.b64encode(stdin).decode("ascii")
        resp = await self.call("exec", args, timeout=timeout + EXEC_TIMEOUT_MARGIN_S)
        return ExecResult(
            stdout=str(resp.get("stdout", "")),
            stderr=str(resp.get("stderr", "")),
            exit_code=int(resp["exit_code"]),
            timed_out=bool(resp.get("timed_out", False)),
            stdout_truncated=bool(resp.get("stdout_truncated", False)),
            stderr_truncated=bool(resp.get("stderr_truncated", False)),
            duration_ms=float(resp.get("duration_ms", 0.0)),
        )

    async def eval_rich(
        self,
        code: str,
        *,
        context: str | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, str], None] | None = None,
    ) -> dict[str, Any]:
        """``eval`` in namespace ``context`` (None: the default one) with the richer answer:
        ``stderr`` apart, ``error_type``/``error_value``, ``result_str``, ``result_none``.

        ``on_output(stream, text)`` gets what the code prints while it runs (the answer still
        carries all of it)."""
        args: dict[str, Any] = {"code": code, "split_stderr": True}
        if context is not None:
            args["context"] = context
        listener = None
        if on_output is not None:
            args["stream"] = True
            callback = on_output

            def listener(msg: dict[str, Any]) -> None:
                stream, text = msg.get("stream"), msg.get("text")
                if stream in ("stdout", "stderr") and isinstance(text, str):
                    callback(str(stream), text)

        return await self.call("eval", args, timeout=timeout, listener=listener)

    async def eval_context_drop(self, context: str, *, timeout: float | None = 10.0) -> bool:
        resp = await self.call("eval_context_drop", {"context": context}, timeout=timeout)
        return resp.get("removed") is True

    async def eval(self, code: str, *, timeout: float | None = None) -> EvalResult:
        """Evaluate Python ``code`` in the agent's persistent namespace."""
        resp = await self.call("eval", {"code": code}, timeout=timeout)
        result = resp.get("result")
        error = resp.get("error")
        tb = resp.get("traceback")
        return EvalResult(
            result=None if result is None else str(result),
            error=None if error is None else str(error),
            traceback=None if tb is None else str(tb),
            exit_code=int(resp.get("exit_code", 0 if error is None else 1)),
            stdout=str(resp.get("stdout", "")),
        )

    async def write_file(
        self,
        path: str,
        data: bytes,
        *,
        append: bool = False,
        mode: int | None = None,
        mkdirs: bool = True,
        timeout: float | None = 60.0,
    ) -> int:
        """Write ``data`` to ``path`` in the guest; returns the file's size afterwards."""
        args: dict[str, Any] = {
            "path": path,
            "data_b64": base64.b64encode(data).decode("ascii"),
            "append": append,
            "mkdirs": mkdirs,
        }
        if mode is not None:
            args["mode"] = mode
        resp = await self.call("write_file", args, timeout=timeout)
        return int(resp["size"])

    async def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        limit: int | None = None,
        timeout: float | None = 60.0,
    ) -> bytes:
        """Read ``path`` from the guest (at most ``limit`` bytes from ``offset``)."""
        args: dict[str, Any] = {"path": path, "offset": offset}
        if limit is not None:
            args["limit"] = limit
        resp = await self.call("read_file", args, timeout=timeout)
        return base64.b64decode(resp["data_b64"])

    async def list_files(self, path: str, *, timeout: float | None = 30.0) -> list[dict[str, Any]]:
        """Entries of directory ``path``: name, path, type, size, mode, mtime."""
        resp = await self.call("list_files", {"path": path}, timeout=timeout)
        entries = resp.get("entries", [])
        return [e for e in entries if isinstance(e, dict)]

    async def stat(self, path: str, *, timeout: float | None = 30.0) -> dict[str, Any]:
        """``lstat`` of ``path``: name, path, type, size, mode, mtime, uid, gid (symlink_target)."""
        resp = await self.call("stat", {"path": path}, timeout=timeout)
        entry = resp.get("entry")
        return entry if isinstance(entry, dict) else {}

    async def mkdir(self, path: str, *, timeout: float | None = 30.0) -> bool:
        """Create ``path`` and its parents; False if it was a directory already."""
        resp = await self.call("mkdir", {"path": path}, timeout=timeout)
        return resp.get("created") is True

    async def move(
        self, source: str, destination: str, *, timeout: float | None = 60.0
    ) -> dict[str, Any]:
        """Rename ``source`` to ``destination`` (parents created); the new entry."""
        args = {"source": source, "destination": destination}
        resp = await self.call("move", args, timeout=timeout)
        entry = resp.get("entry")
        return entry if isinstance(entry, dict) else {}

    async def remove_file(
        self, path: str, *, recursive: bool = False, timeout: float | None = 60.0
    ) -> None:
        await self.call("remove_file", {"path": path, "recursive": recursive}, timeout=timeout)

    async def reseed(self, entropy: bytes, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """Hand the guest fresh entropy (>= 32 bytes): kernel CRNG, ``random``, ``numpy``."""
        if len(entropy) < 32:
            raise InvalidInput("reseed needs at least 32 bytes of entropy")
        args = {"entropy_b64": base64.b64encode(entropy).decode("ascii")}
        return await self.call("reseed", args, timeout=timeout)

    async def set_env(
        self, env: Mapping[str, str | None], *, timeout: float | None = 10.0
    ) -> dict[str, Any]:
        """Set (or with ``None`` unset) variables in the agent's own environment."""
        return await self.call("set_env", {"env": dict(env)}, timeout=timeout)

    async def set_clock(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """Step the guest's wall clock to the host's (``clock_set``, ``clock_step_ms``)."""
        return await self.call("set_clock", {"wall_ns": time.time_ns()}, timeout=timeout)


@dataclass
class AgentSocket:
    """A connected agent socket that has not said hello yet."""

    socket_path: Path
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def handshake(self, *, timeout: float, entropy: bytes | None = None) -> AgentClient:
        """Say hello with a fresh session; :class:`AgentError` if not answered in time.

        ``entropy`` (a fork's first message) reseeds the guest before the hello is answered;
        every hello also sets the guest's wall clock to the host's.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        socket_path, reader, writer = self.socket_path, self.reader, self.writer
        session = secrets.token_hex(8)
        hello_id = f"{session}-0"
        hello: dict[str, Any] = {"id": hello_id, "op": "hello", "session": session}
        if entropy is not None:
            hello["entropy_b64"] = base64.b64encode(entropy).decode("ascii")

        def hello_line() -> bytes:
            # The host's wall clock as of this send (a resent hello carries a fresh one).
            return b"\n" + _encode(dict(hello, wall_ns=time.time_ns()))

        unknown = 0
        junk = 0
        try:
            writer.write(hello_line())
            await writer.drain()
            next_send = loop.time() + HELLO_RESEND_S
            while True:
                now = loop.time()
                if now >= deadline:
                    raise AgentError(f"agent did not answer hello within {timeout:g} s")
                try:
                    line = await asyncio.wait_for(
                        reader.readline(), timeout=min(deadline, next_send) - now
                    )
                except TimeoutError:
                    if loop.time() >= next_send:
                        # The first hello may have been lost (agent not yet listening).
                        writer.write(hello_line())
                        await writer.drain()
                        next_send = loop.time() + HELLO_RESEND_S
                    continue
                except ValueError:  # over-long line, already discarded by the stream
                    junk += 1
                    continue
                if not line:
                    raise AgentError("agent connection closed during hello")
                msg = _parse(line)
                if msg is None:
                    if line.strip():
                        junk += 1
                    continue
                if msg.get("id") != hello_id:
                    unknown += 1
                    continue
                _raise_for("hello", msg)
                if msg.get("session") != session:
                    unknown += 1
                    continue
                break
        except BaseException as e:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if isinstance(e, OSError):
                raise AgentError(f"agent connection failed during hello: {e}") from e
            raise
        client = AgentClient(socket_path, reader, writer, session, msg)
        client._unknown_responses = unknown
        client._junk_lines = junk
        return client

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
