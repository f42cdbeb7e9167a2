"""The Connect protocol (connectrpc.com/docs/protocol) as E2B's envd speaks it: JSON codec only.

Unary calls carry the bare JSON message (``application/json``); server-streaming calls carry
5-byte envelopes (flags, big-endian length) of JSON messages (``application/connect+json``), the
last one flagged end-of-stream with ``{}`` or ``{"error": {...}}``. Errors are
``{"code": "<connect code>", "message": "..."}``.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from starlette.responses import Response

from forkd.errors import (
    ForkdError,
    GatewayTimeout,
    GuestOSError,
    InvalidInput,
    NotFound,
    SandboxDead,
    Unavailable,
)

UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"
FLAG_END_STREAM = 0x02
FLAG_COMPRESSED = 0x01
MAX_MESSAGE_BYTES = 16 << 20

# Connect error codes and the HTTP status of each (the protocol's own table).
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class ConnectError(Exception):
    """An RPC failure with its Connect ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in HTTP_STATUS else "unknown"
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_forkd(cls, exc: ForkdError) -> ConnectError:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, SandboxDead):
            return cls("unavailable", message)
        if isinstance(exc, NotFound):
            return cls("not_found", message)
        if isinstance(exc, InvalidInput):
            return cls("invalid_argument", message)
        if isinstance(exc, GatewayTimeout):
            return cls("deadline_exceeded", message)
        if isinstance(exc, Unavailable):
            return cls("unavailable", message)
        if isinstance(exc, GuestOSError) and exc.errno in (errno.EACCES, errno.EPERM):
            return cls("permission_denied", message)
        if exc.http_status == 409:
            return cls("already_exists", message)
        if exc.http_status == 501:
            return cls("unimplemented", message)
        return cls("unavailable", message)


def unary_response(message: dict[str, Any]) -> Response:
    return Response(_dump(message), 200, media_type=UNARY_TYPE)


def unary_error(err: ConnectError) -> Response:
    return Response(_dump(err.body()), err.http_status, media_type=UNARY_TYPE)


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    payload = _dump(message)
    return struct.pack(">BI", flags, len(payload)) + payload


def end_stream(err: ConnectError | None = None) -> bytes:
    return envelope({} if err is None else {"error": err.body()}, FLAG_END_STREAM)


def parse_unary(body: bytes) -> dict[str, Any]:
    return _load(body)


def parse_stream_request(body: bytes) -> dict[str, Any]:
    """The single message of a server-streaming request's body (one envelope)."""
    if len(body) < 5:
        raise ConnectError("invalid_argument", "request body is not a Connect envelope")
    flags, length = struct.unpack(">BI", body[:5])
    if flags & FLAG_COMPRESSED:
        raise ConnectError("unimplemented", "compressed messages are not supported")
    if length > MAX_MESSAGE_BYTES or len(body) < 5 + length:
        raise ConnectError("invalid_argument", "truncated or oversized Connect envelope")
    return _load(body[5 : 5 + length])


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ConnectError("resource_exhausted", "message too large")
    if not data.strip():
        return {}
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ConnectError("invalid_argument", f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConnectError("invalid_argument", "message must be a JSON object")
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
