"""The code interpreter's API (E2B's ``e2b-code-interpreter``: ``/execute``, ``/contexts``) over
the guest agent's warm Python interpreter (its ``eval``, one namespace per context).

``/execute`` answers newline-delimited JSON objects, each with a ``type``: ``stdout``,
``stderr``, ``result`` (``text``, ``is_main_result``), ``error`` (``name``, ``value``,
``traceback``), ``number_of_executions`` and a final ``end_of_execution``; ``keepalive`` lines
while a long cell runs. The value of a trailing expression is the main result (none when it is
``None``); a ``str`` value's text is the string itself. Only Python is served.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response, StreamingResponse

from forkd.api.e2b.control import E2BError, parse_body
from forkd.api.e2b.envd import Envd
from forkd.api.e2b.state import E2BSandbox
from forkd.errors import ForkdError

LANGUAGES = ("python", "python3")
KEEPALIVE_S = 5.0
DEFAULT_CONTEXT = "default"
MAX_CONTEXTS = 32
MAX_QUEUED_CHARS = 16 << 20  # streamed output waiting for a slow client


class ExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    context_id: str | None = None
    language: str | None = None
    env_vars: dict[str, str] | None = None


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    language: str | None = None
    cwd: str | None = None


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _text(message: str) -> Response:
    return Response(message, 200, media_type="text/plain")


class Interpreter:
    def __init__(self, envd: Envd) -> None:
        self.envd = envd
        self.eval_timeout_s = envd.limits.eval_timeout_s

    def _language(self, language: str | None) -> str:
        lang = (language or "python").lower()
        if lang not in LANGUAGES:
            raise E2BError(400, f"language {language!r} is not supported by forkd (only python)")
        return "python"

    def _agent_context(self, sb: E2BSandbox, context_id: str | None) -> str | None:
        if context_id is None or context_id == DEFAULT_CONTEXT:
            return None  # the template's warm namespace
        if context_id not in sb.contexts:
            raise E2BError(404, f"context {context_id!r} not found")
        return "e2b-" + context_id

    async def execute(self, sb: E2BSandbox, request: Request) -> Response:
        req = parse_body(ExecuteRequest, await request.body())
        if req.language is not None and req.context_id is not None:
            raise E2BError(400, "give a context or a language, not both")
        self._language(req.language)
        context = self._agent_context(sb, req.context_id)
        agent = await self.envd.agent(sb)
        key = req.context_id or DEFAULT_CONTEXT
        n = sb.exec_counts[key] = sb.exec_counts.get(key, 0) + 1
        output: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        sent = {"stdout": 0, "stderr": 0}
        queued = [0]

        overflowed = [False]

        def on_output(stream: str, text: str) -> None:
            # Beyond the bound the rest is sent from the answer, after the streamed prefix.
            if overflowed[0] or queued[0] + len(text) > MAX_QUEUED_CHARS:
                overflowed[0] = True
                return
            queued[0] += len(text)
            output.put_nowait((stream, text))

        task = asyncio.ensure_future(
            asyncio.wait_for(
                agent.eval_rich(req.code, context=context, on_output=on_output),
                self.eval_timeout_s,
            )
        )

        def emit(stream: str, text: str) -> bytes:
            queued[0] -= len(text)
            sent[stream] += len(text)
            return _line({"type": stream, "text": text, "timestamp": _now()})

        async def lines() -> AsyncIterator[bytes]:
            getter: asyncio.Future[tuple[str, str]] | None = None
            try:
                idle = 0.0
                while not task.done():
                    if getter is None:
                        getter = asyncio.ensure_future(output.get())
                    waiting: set[asyncio.Future[Any]] = {task, getter}
                    done, _ = await asyncio.wait(
                        waiting, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in done:
                        yield emit(*getter.result())
                        getter = None
                        idle = 0.0
                    elif not done:
                        idle += 1.0
                        if idle >= KEEPALIVE_S:
                            idle = 0.0
                            yield _line({"type": "keepalive"})
                if getter is not None:
                    if getter.done():
                        yield emit(*getter.result())
                    else:
                        getter.cancel()
                    getter = None
                while not output.empty():
                    yield emit(*output.get_nowait())
                try:
                    r = task.result()
                except TimeoutError:
                    yield _line(
                        {
                            "type": "error",
                            "name": "TimeoutError",
                            "value": f"execution did not finish within {self.eval_timeout_s:g} s",
                            "traceback": "",
                        }
                    )
                    yield _line({"type": "end_of_execution"})
                    return
                except ForkdError as e:
                    yield _line(
                        {
                            "type": "error",
                            "name": "UnexpectedEndOfExecution",
                            "value": str(e),
                            "traceback": "",
                        }
                    )
                    yield _line({"type": "end_of_execution"})
                    return
                for stream in ("stdout", "stderr"):
                    rest = str(r.get(stream) or "")[sent[stream] :]  # what was not streamed
                    if rest:
                        yield _line({"type": stream, "text": rest, "timestamp": _now()})
                if r.get("error") is not None:
                    yield _line(
                        {
                            "type": "error",
                            "name": str(r.get("error_type") or "Error"),
                            "value": str(r.get("error_value") or ""),
                            "traceback": str(r.get("traceback") or ""),
                        }
                    )
                elif r.get("result") is not None and not r.get("result_none"):
                    text = r.get("result_str")
                    text = str(r["result"]) if text is None else str(text)
                    yield _line({"type": "result", "text": text, "is_main_result": True})
                yield _line({"type": "number_of_executions", "execution_count": n})
                yield _line({"type": "end_of_execution"})
            finally:
                if getter is not None:
                    getter.cancel()
                if not task.done():
                    task.cancel()

        return StreamingResponse(lines(), 200, media_type="application/x-ndjson")

    async def create_context(self, sb: E2BSandbox, request: Request) -> Response:
        req = parse_body(ContextRequest, await request.body())
        language = self._language(req.language)
        if len(sb.contexts) >= MAX_CONTEXTS:
            raise E2BError(400, f"at most {MAX_CONTEXTS} contexts per sandbox")
        context_id = secrets.token_hex(8)
        cwd = req.cwd or "/home/user"
        sb.contexts[context_id] = {"language": language, "cwd": cwd}
        self.envd.state.save(sb)
        return Response(
            json.dumps({"id": context_id, "language": language, "cwd": cwd}),
            200,
            media_type="application/json",
        )

    async def list_contexts(self, sb: E2BSandbox) -> Response:
        out = [{"id": DEFAULT_CONTEXT, "language": "python", "cwd": "/home/user"}]
        out += [{"id": k, **v} for k, v in sb.contexts.items()]
        return Response(json.dumps(out), 200, media_type="application/json")

    async def drop_context(self, sb: E2BSandbox, context_id: str, *, keep: bool) -> Response:
        name = self._agent_context(sb, context_id)
        if name is not None:
            agent = await self.envd.agent(sb)
            await agent.eval_context_drop(name)
            if not keep:
                del sb.contexts[context_id]
                self.envd.state.save(sb)
        return Response(status_code=204)


def interpreter_router(interp: Interpreter) -> APIRouter:
    router = APIRouter()

    async def guarded(request: Request, call: Any) -> Response:
        # The SDK reports a non-2xx answer as "<status> <reason>: <body>" in its own exceptions.
        try:
            sb = interp.envd.sandbox(request)
            response: Response = await call(sb)
            return response
        except E2BError as e:
            return Response(e.message, e.status, media_type="text/plain")
        except ForkdError as e:
            status = 404 if e.http_status in (404, 410) else 502
            return Response(str(e) or type(e).__name__, status, media_type="text/plain")

    @router.post("/execute", include_in_schema=False)
    async def execute(request: Request) -> Response:
        return await guarded(request, lambda sb: interp.execute(sb, request))

    @router.post("/contexts", include_in_schema=False)
    async def create_context(request: Request) -> Response:
        return await guarded(request, lambda sb: interp.create_context(sb, request))

    @router.get("/contexts", include_in_schema=False)
    async def list_contexts(request: Request) -> Response:
        return await guarded(request, interp.list_contexts)

    @router.delete("/contexts/{context_id}", include_in_schema=False)
    async def drop_context(request: Request, context_id: str) -> Response:
        return await guarded(request, lambda sb: interp.drop_context(sb, context_id, keep=False))

    @router.post("/contexts/{context_id}/restart", include_in_schema=False)
    async def restart_context(request: Request, context_id: str) -> Response:
        return await guarded(request, lambda sb: interp.drop_context(sb, context_id, keep=True))

    return router
