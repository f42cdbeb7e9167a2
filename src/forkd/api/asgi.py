"""Raw ASGI responses for middleware that answers before the app runs."""

from __future__ import annotations

import json

from starlette.types import Message


def error_messages(
    status: int, message: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[Message, Message]:
    """The start and body messages of a ``{"error": message}`` JSON response."""
    body = json.dumps({"error": message}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *extra_headers,
        ],
    }
    return start, {"type": "http.response.body", "body": body}
