"""The audit log: one JSON line per HTTP request, rejected ones (401, 413, ...) included.

Fields: ``ts`` (unix seconds), ``method``, ``path``, ``status``, ``latency_us``, ``user_agent``,
``remote``. The file is opened once in append mode (mode 0600) and each line is written with a
single ``write`` call, so lines from one daemon never interleave and a crash loses at most the
line being written. The middleware is plain ASGI: it wraps ``send`` to see the status code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkd.private import private_dir, private_file

MAX_USER_AGENT = 256


class AuditLog:
    """Append-only JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dir(path.parent, "audit log directory")
        private_file(path, "audit log")
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        self._warned = False

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            os.write(self._fd, line.encode("utf-8", "replace"))
        except OSError as exc:  # a full disk must not take the API down with it
            if not self._warned:
                self._warned = True
                print(f"forkd: warning: cannot write audit log {self.path}: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _remote(scope: Scope) -> str:
    client = scope.get("client")
    if client:
        return f"{client[0]}:{client[1]}"
    return "unix"  # a unix-socket peer has no address


class AuditMiddleware:
    """Outermost middleware: times the request and records it once its response is complete."""

    def __init__(self, app: ASGIApp, log: AuditLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0
        logged = False

        def record(code: int) -> None:
            nonlocal logged
            logged = True
            user_agent = ""
            for name, value in scope["headers"]:
                if name == b"user-agent":
                    user_agent = value.decode("latin-1")[:MAX_USER_AGENT]
                    break
            self.log.write({
                "ts": round(time.time(), 6),
                "method": scope["method"],
                "path": scope["path"],
                "status": code,
                "latency_us": int((time.perf_counter() - t0) * 1e6),
                "user_agent": user_agent,
                "remote": _remote(scope),
            })  # fmt: skip

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record(status)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not logged:
                record(status or 500)
            raise
        if not logged:
            record(status or 500)  # the app returned without finishing a response
