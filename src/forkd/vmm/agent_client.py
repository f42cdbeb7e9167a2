"""Host side of the guest agent protocol (docs/agent-protocol.md).

One :class:`AgentClient` is one connection to a VM's ``agent.sock`` (QEMU's chardev for the
virtio-serial port). The connection starts with ``hello`` and a fresh session; responses are
matched to requests by id (``<session>-<n>``) and anything else, including answers the agent gave
to an earlier connection, is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from forkd.errors import (
    AgentError,
    AgentProtocolError,
    GuestOSError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from forkd.vmm import agent_wire
from forkd.vmm.agent_wire import MAX_LINE_BYTES, clip, peek_id

EXEC_TIMEOUT_MARGIN_S = 10.0
HELLO_RESEND_S = 1.0
# read_file/write_file move at most this many raw bytes per message (~1.4 MiB of base64).
FILE_CHUNK_BYTES = 1 << 20
READ_FILE_LIMIT = 64 << 20  # what read_file returns at most unless asked otherwise
# Lines nobody asked for (junk, stale or unknown ids): this many, or this many bytes, and the
# connection is closed as abusive. A fork leaves at most a line or two behind.
MAX_STRAY_LINES = 1000
MAX_STRAY_BYTES = 64 << 20
# Requests awaiting an answer on one connection (the agent runs 64 at a time); more answer 503.
MAX_IN_FLIGHT = 256
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
    """One event of a tracked process: output (``stdout``/``stderr``, or ``pty`` for one on a
    terminal) or its ``exit``."""

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
        if stream not in ("stdout", "stderr", "pty") or not isinstance(data, str):
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


# Events (docs/agent-protocol.md) begin with their name and then the pid or the request id they
# concern (the agent writes them in this order), so they are routed before being parsed.
_EVENT = re.compile(
    rb'\{"event":"(proc_output|proc_exit|eval_output)",'
    rb'(?:"pid":(\d{1,10})|"ref":"([^"\\]{1,64})")'
)


def _parse_event(line: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def _encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass
class _Strays:
    """Counts lines nobody asked for; says when they amount to abuse."""

    unknown: int = 0  # well-formed ids this connection did not send
    junk: int = 0  # lines without an id
    nbytes: int = 0

    def note(self, line: bytes, has_id: bool) -> str | None:
        if has_id:
            self.unknown += 1
        else:
            self.junk += 1
        self.nbytes += len(line)
        if self.unknown + self.junk > MAX_STRAY_LINES or self.nbytes > MAX_STRAY_BYTES:
            return (
                f"agent flooded the channel with {self.unknown + self.junk} unsolicited lines "
                f"({self.nbytes} bytes): connection closed"
            )
        return None


def _overlong() -> str:
    return f"agent sent a line longer than {MAX_LINE_BYTES} bytes: connection closed"


def _raise_for(op: str, resp: Mapping[str, Any]) -> None:
    if resp.get("ok") is True:
        return
    message = clip(str(resp.get("error") or f"agent {op} failed"))
    kind = resp.get("kind")
    if kind == "not_found":
        raise NotFound(message)
    if kind == "bad_request":
        raise InvalidInput(message)
    if kind == "too_large":
        raise PayloadTooLarge(f"agent {op}: {message}")
    if kind == "os_error":
        code = resp.get("errno")
        raise GuestOSError(message, code if isinstance(code, int) else None)
    raise AgentError(f"agent {op}: {message}")


def _as(user: str | None, **args: Any) -> dict[str, Any]:
    """Request arguments, with ``user`` when one is named."""
    return args if user is None else {**args, "user": user}


def _missing(op: str, name: str) -> AgentProtocolError:
    return AgentProtocolError(f"agent {op}: reply lacks {name!r}")


class AgentClient:
    """One connection to a guest agent; requests may be issued concurrently."""

    def __init__(
        self,
        socket_path: Path,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: str,
        hello: dict[str, Any],
        strays: _Strays | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.session = session
        self.hello = hello
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._closed = False
        self._close_reason = "agent client closed"
        self._close_error: type[AgentError] = AgentError
        self._strays = strays if strays is not None else _Strays()
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
                # The stream buffers at most ~2 lines of the cap; a longer line raises.
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
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def unknown_responses(self) -> int:
        """Well-formed responses ignored because this connection did not send their id."""
        return self._strays.unknown

    @property
    def junk_lines(self) -> int:
        """Non-empty lines ignored because they carried no id."""
        return self._strays.junk

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

    def _shutdown(self, reason: str, error: type[AgentError] = AgentError) -> None:
        """Mark closed and fail every pending request at once."""
        self._closed = True
        self._close_reason = reason
        self._close_error = error
        pending, self._pending = self._pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(error(reason))
        streams, self._proc_streams = self._proc_streams, {}
        for subs in streams.values():
            for sub in subs:
                sub._fail(error(reason))
        self._writer.close()

    async def _read_loop(self) -> None:
        reason = "agent connection lost"
        error: type[AgentError] = AgentError
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError:  # longer than MAX_LINE_BYTES: the stream stopped buffering
                    reason, error = _overlong(), AgentProtocolError
                    break
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                abuse = self._dispatch(line)
                if abuse is not None:
                    reason, error = abuse, AgentProtocolError
                    break
        except asyncio.CancelledError:
            reason = self._close_reason
            raise
        except OSError as e:
            reason = f"agent connection lost: {e}"
        finally:
            if not self._closed:
                self._shutdown(reason, error)

    def _dispatch(self, line: bytes) -> str | None:
        """Hand ``line`` to the request that sent its id; a reason when the guest is abusive.

        A line is parsed only when its id is one this connection is waiting for, so junk and
        floods cost one regex search each.
        """
        event = _EVENT.match(line)
        if event is not None:
            return self._event(line, event)
        rid = peek_id(line)
        if rid is None:
            return self._strays.note(line, False)
        entry = self._pending.get(rid)
        if entry is None:
            return self._strays.note(line, True)
        op, fut = entry
        try:
            reply = agent_wire.decode(op, line)
        except AgentProtocolError as e:
            del self._pending[rid]
            if not fut.done():
                fut.set_exception(e)
            return self._strays.note(line, True)
        if reply.id != rid:  # the regex found a decoy: nobody asked for the real id
            return self._strays.note(line, True)
        del self._pending[rid]
        answer = agent_wire.as_dict(reply)
        hook = self._on_answer.pop(rid, None)
        if hook is not None and answer.get("ok") is True:
            hook(answer)  # before any later line (an event it enables) is read
        if not fut.done():
            fut.set_result(answer)
        return None

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

        The answer has been checked against the op's reply model (``agent_wire``).
        ``on_answer`` runs in the reader as soon as a successful answer is read, before any
        later line: it is how a caller subscribes to events the answer announces.
        ``listener`` gets the events that name this request (``"ref": <id>``) until it is
        answered.
        """
        if self._closed:
            raise self._close_error(self._close_reason)
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise Unavailable(
                f"{len(self._pending)} requests are already waiting for this sandbox's agent "
                f"(the cap is {MAX_IN_FLIGHT}); retry when some finish"
            )
        rid = f"{self.session}-{self._next_id}"
        self._next_id += 1
        msg: dict[str, Any] = dict(args)
        msg["id"] = rid
        msg["op"] = op
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (op, fut)
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

    def _event(self, line: bytes, match: re.Match[bytes]) -> str | None:
        """Hand an event to whoever reads its process or request; a reason when abusive.

        An event nobody reads (a process started before this connection, output of a request
        already answered) is dropped unparsed and is not abuse: forks inherit processes.
        """
        pid_raw, ref = match.group(2), match.group(3)
        if ref is not None:
            listener = self._listeners.get(ref.decode("ascii", "replace"))
            if listener is None:
                return None
            msg = _parse_event(line)
            if msg is None:
                return self._strays.note(line, False)
            listener(msg)
            return None
        subs = self._proc_streams.get(int(pid_raw))
        if not subs:
            return None
        msg = _parse_event(line)
        parsed = _proc_event(msg) if msg is not None else None
        if parsed is None:
            return self._strays.note(line, False)
        pid, event = parsed
        if event.kind == "exit":
            self._proc_streams.pop(pid, None)
        for sub in subs:
            sub._put(event)
        return None

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
        user: str | None = None,
        pty: tuple[int, int] | None = None,
        call_timeout: float | None = 30.0,
    ) -> ProcStream:
        """Start ``argv`` as a tracked process; its output and exit arrive on the stream.

        ``timeout`` (None: none) has the guest kill the process group when it passes; ``user``
        (None: the agent's, root) runs it as that guest user; ``pty`` (columns, rows) runs it
        on a terminal of that size, its output arriving as ``pty`` events and its input
        (:meth:`proc_input`) typed into the terminal.
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
        if user is not None:
            args["user"] = user
        if pty is not None:
            args["pty"] = {"cols": pty[0], "rows": pty[1]}
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

    async def proc_resize(
        self, pid: int, cols: int, rows: int, *, timeout: float | None = 10.0
    ) -> None:
        """Resize the terminal of process ``pid`` (started with ``pty``)."""
        args = {"pid": pid, "size": {"cols": cols, "rows": rows}}
        await self.call("proc_resize", args, timeout=timeout)

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
        user: str | None = None,
    ) -> ExecResult:
        """Run ``argv`` (or ``cmd`` through ``/bin/sh -c``) in the guest (as ``user``: None is
        the agent's own, root)."""
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
        if user is not None:
            args["user"] = user
        resp = await self.call("exec", args, timeout=timeout + EXEC_TIMEOUT_MARGIN_S)
        if resp["exit_code"] is None:
            raise _missing("exec", "exit_code")
        for stream in ("stdout", "stderr"):
            # Output is decoded with replacement: never more characters than bytes read.
            if len(resp[stream]) > max_output:
                raise AgentProtocolError(
                    f"agent exec: {stream} of {len(resp[stream])} chars exceeds the requested "
                    f"cap of {max_output} bytes"
                )
        return ExecResult(
            stdout=resp["stdout"],
            stderr=resp["stderr"],
            exit_code=resp["exit_code"],
            timed_out=resp["timed_out"],
            stdout_truncated=resp["stdout_truncated"],
            stderr_truncated=resp["stderr_truncated"],
            duration_ms=resp["duration_ms"],
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
        error = resp["error"]
        exit_code = resp["exit_code"]
        return EvalResult(
            result=resp["result"],
            error=error,
            traceback=resp["traceback"],
            exit_code=(0 if error is None else 1) if exit_code is None else exit_code,
            stdout=resp["stdout"],
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
        user: str | None = None,
    ) -> int:
        """Write ``data`` to ``path`` in the guest; returns the file's size afterwards.

        Sent in messages of :data:`FILE_CHUNK_BYTES` (the first one creates or truncates, the
        rest append), so no line comes near the cap; ``timeout`` bounds each message.
        """
        size: int | None = None
        view = memoryview(data)
        first = True
        while first or view:
            chunk, view = view[:FILE_CHUNK_BYTES], view[FILE_CHUNK_BYTES:]
            args: dict[str, Any] = {
                "path": path,
                "data_b64": base64.b64encode(chunk).decode("ascii"),
                "append": append or not first,
                "mkdirs": mkdirs and first,
            }
            if mode is not None and first:
                args["mode"] = mode
            if user is not None:
                args["user"] = user
            resp = await self.call("write_file", args, timeout=timeout)
            size = resp["size"]
            if size is None:
                raise _missing("write_file", "size")
            first = False
        assert size is not None
        return int(size)

    async def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        limit: int | None = None,
        timeout: float | None = 60.0,
        user: str | None = None,
    ) -> bytes:
        """Read ``path`` from the guest (at most ``limit`` bytes from ``offset``; default
        :data:`READ_FILE_LIMIT`), in messages of :data:`FILE_CHUNK_BYTES`; ``timeout`` bounds
        each message."""
        total = READ_FILE_LIMIT if limit is None else limit
        parts: list[bytes] = []
        got = 0
        while True:
            want = min(FILE_CHUNK_BYTES, total - got)
            args: dict[str, Any] = {"path": path, "offset": offset + got, "limit": want}
            if user is not None:
                args["user"] = user
            resp = await self.call("read_file", args, timeout=timeout)
            encoded = resp["data_b64"]
            if encoded is None:
                raise _missing("read_file", "data_b64")
            if len(encoded) > (want + 2) // 3 * 4:
                raise AgentProtocolError(
                    f"agent read_file: {len(encoded)} chars of base64 for at most {want} bytes"
                )
            try:
                chunk = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise AgentProtocolError("agent read_file: data_b64 is not base64") from None
            parts.append(chunk)
            got += len(chunk)
            if not resp["truncated"] or not chunk or got >= total:
                return b"".join(parts)

    async def list_files(
        self, path: str, *, timeout: float | None = 30.0, user: str | None = None
    ) -> list[dict[str, Any]]:
        """Entries of directory ``path``: name, path, type, size, mode, mtime, uid, gid.

        The file ops' ``user`` (None: root) is whose permissions the guest checks; what they
        create belongs to that user."""
        resp = await self.call("list_files", _as(user, path=path), timeout=timeout)
        entries: list[dict[str, Any]] = resp["entries"]
        return entries

    async def stat(
        self, path: str, *, timeout: float | None = 30.0, user: str | None = None
    ) -> dict[str, Any]:
        """``lstat`` of ``path``: name, path, type, size, mode, mtime, uid, gid (symlink_target)."""
        resp = await self.call("stat", _as(user, path=path), timeout=timeout)
        entry = resp.get("entry")
        return entry if isinstance(entry, dict) else {}

    async def mkdir(
        self, path: str, *, timeout: float | None = 30.0, user: str | None = None
    ) -> bool:
        """Create ``path`` and its parents; False if it was a directory already."""
        resp = await self.call("mkdir", _as(user, path=path), timeout=timeout)
        return resp.get("created") is True

    async def move(
        self,
        source: str,
        destination: str,
        *,
        timeout: float | None = 60.0,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Rename ``source`` to ``destination`` (parents created); the new entry."""
        args = _as(user, source=source, destination=destination)
        resp = await self.call("move", args, timeout=timeout)
        entry = resp.get("entry")
        return entry if isinstance(entry, dict) else {}

    async def remove_file(
        self,
        path: str,
        *,
        recursive: bool = False,
        timeout: float | None = 60.0,
        user: str | None = None,
    ) -> None:
        args = _as(user, path=path, recursive=recursive)
        await self.call("remove_file", args, timeout=timeout)

    async def reseed(self, entropy: bytes, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """Hand the guest fresh entropy (>= 32 bytes): kernel CRNG, ``random``, ``numpy``."""
        if len(entropy) < 32:
            raise InvalidInput("reseed needs at least 32 bytes of entropy")
        args = {"entropy_b64": base64.b64encode(entropy).decode("ascii")}
        return await self.call("reseed", args, timeout=timeout)

    async def set_net(
        self, net: Mapping[str, Any], *, timeout: float | None = 10.0
    ) -> dict[str, Any]:
        """Apply a guest network configuration (``nameserver``, ``env`` with ``None`` to unset),
        as a fork's hello does."""
        return await self.call("set_net", {"net": dict(net)}, timeout=timeout)

    async def renew(
        self,
        entropy: bytes,
        *,
        net: Mapping[str, Any] | None = None,
        timeout: float | None = 10.0,
    ) -> dict[str, Any]:
        """What a fork's hello does, on this open session: reseed with ``entropy``, set the
        clock and (optionally) the network; for a pre-restored child handed out by a pool."""
        args: dict[str, Any] = {"entropy_b64": base64.b64encode(entropy).decode("ascii"),
                                "wall_ns": time.time_ns()}  # fmt: skip
        if net is not None:
            args["net"] = dict(net)
        return await self.call("renew", args, timeout=timeout)

    async def warm(self, snippets: list[str], *, timeout: float | None = 60.0) -> dict[str, Any]:
        """Run ``snippets`` through eval's path in a throw-away namespace (pool warm-up)."""
        return await self.call("warm", {"code": list(snippets)}, timeout=timeout)

    async def set_clock(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """Step the guest's wall clock to the host's (``clock_set``, ``clock_step_ms``)."""
        return await self.call("set_clock", {"wall_ns": time.time_ns()}, timeout=timeout)


@dataclass
class AgentSocket:
    """A connected agent socket that has not said hello yet."""

    socket_path: Path
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    strays: _Strays = field(default_factory=_Strays)

    async def handshake(
        self,
        *,
        timeout: float,
        entropy: bytes | None = None,
        net: Mapping[str, Any] | None = None,
    ) -> AgentClient:
        """Say hello with a fresh session; :class:`AgentError` if not answered in time.

        ``entropy`` (a fork's first message) reseeds the guest and ``net`` configures its
        network (see :meth:`AgentClient.set_net`) before the hello is answered; every hello also
        sets the guest's wall clock to the host's and tells the agent the line cap
        (``max_line``) its replies must keep to.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        socket_path, reader, writer = self.socket_path, self.reader, self.writer
        session = secrets.token_hex(8)
        hello_id = f"{session}-0"
        hello: dict[str, Any] = {
            "id": hello_id,
            "op": "hello",
            "session": session,
            "max_line": MAX_LINE_BYTES,
        }
        if entropy is not None:
            hello["entropy_b64"] = base64.b64encode(entropy).decode("ascii")
        if net is not None:
            hello["net"] = dict(net)

        def hello_line() -> bytes:
            # The host's wall clock as of this send (a resent hello carries a fresh one).
            return b"\n" + _encode(dict(hello, wall_ns=time.time_ns()))

        strays = self.strays
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
                except ValueError:  # longer than MAX_LINE_BYTES
                    raise AgentProtocolError(_overlong()) from None
                if not line:
                    raise AgentError("agent connection closed during hello")
                line = line.strip()
                if not line:
                    continue
                rid = peek_id(line)
                if rid != hello_id:
                    abuse = strays.note(line, rid is not None)
                    if abuse is not None:
                        raise AgentProtocolError(abuse)
                    continue
                try:
                    reply = agent_wire.decode("hello", line)
                except AgentProtocolError:
                    reply = None
                if reply is None or reply.id != hello_id:
                    abuse = strays.note(line, True)
                    if abuse is not None:
                        raise AgentProtocolError(abuse)
                    continue
                msg = agent_wire.as_dict(reply)
                _raise_for("hello", msg)
                if msg.get("session") != session:
                    strays.note(line, True)
                    continue
                break
        except BaseException as e:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if isinstance(e, OSError):
                raise AgentError(f"agent connection failed during hello: {e}") from e
            raise
        return AgentClient(socket_path, reader, writer, session, msg, strays)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
