"""The request-body cap (413); the bounds themselves are ``forkd.config.Limits``."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkd.api.asgi import error_messages
from forkd.config import MiB


def _too_large(limit: int) -> tuple[Message, Message]:
    message = f"request body too large: the limit is {limit} bytes ({limit // MiB} MiB)"
    return error_messages(413, message, ((b"connection", b"close"),))


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes.

    A declared ``Content-Length`` is checked before anything is read. A body without one
    (chunked) is buffered up to the limit and replayed to the app; beyond it, 413.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        # routes that stream their body to disk under a cap of their own (pack uploads)
        self.exempt = frozenset(exempt)
        self._reply = _too_large(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
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
