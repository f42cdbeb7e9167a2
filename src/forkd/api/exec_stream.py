"""``POST /v1/sandboxes/{id}/exec/stream``: run a command and stream its output as produced.

The answer is newline-delimited JSON, one object per line with a ``type``: ``start`` (``pid``),
then ``stdout`` / ``stderr`` (``data``: UTF-8 text, invalid bytes replaced) as the process
writes, then ``exit`` (``exit_code``, ``timed_out``, ``duration_ms``), or ``error`` (``error``)
if the sandbox went away meanwhile. Errors before the command starts are the usual JSON errors.
Built on the guest agent's tracked processes (docs/agent-protocol.md).
"""

from __future__ import annotations

import codecs
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response, StreamingResponse

from forkd import wire
from forkd.config import Limits
from forkd.errors import AgentError, InvalidInput
from forkd.runtime.engine import Runtime
from forkd.vmm.agent_client import AgentClient, ProcStream

NDJSON = "application/x-ndjson"
_ERRORS = (
    (400, "Invalid input"),
    (401, "Missing or invalid bearer token"),
    (404, "No such sandbox, program or working directory"),
    (409, "Conflicts with the sandbox's state"),
    (410, "The sandbox is dead"),
    (413, "Request body too large"),
    (500, "The guest agent or VM failed"),
    (504, "The agent did not answer in time"),
)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _check(req: wire.ExecRequest, max_timeout_s: float) -> None:
    if not req.args:
        raise InvalidInput("args must be a non-empty list of strings")
    if not req.args[0]:
        raise InvalidInput("args[0] (the program) must not be empty")
    for i, arg in enumerate(req.args):
        if "\0" in arg:
            raise InvalidInput(f"args[{i}] must not contain NUL characters")
    for key, value in (req.env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidInput(f"env name {key!r} is not valid (empty, '=' or NUL)")
    if req.cwd is not None and "\0" in req.cwd:
        raise InvalidInput("cwd must not contain NUL characters")
    t = req.timeout_secs
    if not (math.isfinite(t) and 0 < t <= max_timeout_s):
        raise InvalidInput(f"timeout_secs must be in (0, {max_timeout_s:g}], got {t:g}")


async def _events(agent: AgentClient, stream: ProcStream, started: float) -> AsyncIterator[bytes]:
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
    try:
        yield _line({"type": "start", "pid": stream.pid})
        while True:
            ev = await stream.next()
            if ev.kind == "exit":
                for name, dec in decoders.items():
                    tail = dec.decode(b"", final=True)
                    if tail:
                        yield _line({"type": name, "data": tail})
                yield _line(
                    {
                        "type": "exit",
                        "exit_code": -9 if ev.timed_out else ev.exit_code,
                        "timed_out": ev.timed_out,
                        "duration_ms": round((time.monotonic() - started) * 1000.0, 3),
                        "dropped_bytes": stream.dropped_bytes,
                    }
                )
                return
            text = decoders[ev.kind].decode(ev.data)
            if text:
                yield _line({"type": ev.kind, "data": text})
    except AgentError as e:
        yield _line({"type": "error", "error": str(e)})
    finally:
        agent.proc_detach(stream)


def exec_stream_router(runtime: Runtime, limits: Limits) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/sandboxes/{sandbox_id}/exec/stream",
        response_class=Response,
        responses={
            200: {"content": {NDJSON: {"schema": {"type": "string"}}}},
            **{code: {"model": wire.ErrorBody, "description": why} for code, why in _ERRORS},
        },
        tags=["sandboxes"],
    )
    async def exec_stream(sandbox_id: str, req: wire.ExecRequest) -> Response:
        """Run ``args`` (argv, no shell) and stream stdout/stderr as NDJSON while it runs."""
        _check(req, runtime.settings.max_exec_timeout_s)
        agent = await runtime.agent(sandbox_id)
        started = time.monotonic()
        stream = await agent.proc_start(
            list(req.args),
            env=req.env,
            cwd=req.cwd,
            stdin=req.stdin is not None,
            timeout=req.timeout_secs,
            user=req.user,
            call_timeout=limits.agent_call_timeout_s,
        )
        if req.stdin is not None:
            try:
                if req.stdin:
                    await agent.proc_input(stream.pid, req.stdin.encode("utf-8", "surrogatepass"))
                await agent.proc_close_stdin(stream.pid)
            except InvalidInput:
                pass  # it exited before reading its input: its exit event still arrives
        return StreamingResponse(_events(agent, stream, started), media_type=NDJSON)

    return router
