"""Request bounds: body size cap (413) and per-operation timeouts (504)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkd.errors import ForkdError, InvalidInput

MiB = 1024 * 1024


class GatewayTimeout(ForkdError):
    """A runtime operation did not finish within the daemon's bound for it."""

    http_status = 504


class PayloadTooLarge(ForkdError):
    """The request body (or the file it carries) does not fit."""

    http_status = 413


@dataclass(frozen=True)
class Limits:
    """Bounds the daemon puts on each request (seconds unless stated).

    Every runtime call is wrapped in the matching timeout; when it expires the call is cancelled
    (the runtime cleans up on cancellation) and the client gets 504 instead of a hang.
    """

    max_body_bytes: int = 64 * MiB
    exec_margin_s: float = 30.0
    eval_timeout_s: float = 300.0
    agent_call_timeout_s: float = 120.0  # ping, files
    spawn_timeout_s: float = 300.0
    spawn_per_child_s: float = 2.0
    kill_timeout_s: float = 60.0
    snapshot_timeout_s: float = 1800.0  # create, compact, delete
    branch_timeout_s: float = 900.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        """Defaults, overridden by ``FORKD_<FIELD>`` variables (e.g. ``FORKD_EVAL_TIMEOUT_S``)."""
        env = os.environ if environ is None else environ
        limits = cls()
        for f in fields(cls):
            raw = env.get(f"FORKD_{f.name.upper()}")
            if raw is None:
                continue
            name = f"FORKD_{f.name.upper()}"
            try:
                value: float = int(raw) if f.type in (int, "int") else float(raw)
            except ValueError:
                raise InvalidInput(f"{name} must be a number, got {raw!r}") from None
            if not value > 0:
                raise InvalidInput(f"{name} must be positive, got {raw!r}")
            changes: dict[str, Any] = {f.name: value}
            limits = replace(limits, **changes)
        return limits


def _too_large(limit: int) -> tuple[Message, Message]:
    body = json.dumps(
        {"error": f"request body too large: the limit is {limit} bytes ({limit // MiB} MiB)"}
    ).encode()
    start: Message = {
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes.

    A declared ``Content-Length`` is checked before anything is read. A body without one
    (chunked) is buffered up to the limit and replayed to the app; beyond it, 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._reply = _too_large(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False  # the HTTP server rejects a malformed length itself
            if too_big:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # disconnected: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send(self._reply[0])
        await send(self._reply[1])
