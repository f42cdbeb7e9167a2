"""The allow-list proxy: one small HTTP(S) proxy per sandbox whose policy lists domain names.

The guest's agent exports ``HTTP(S)_PROXY`` pointing at it (through the NIC's host alias), and
the egress guard lets that QEMU reach nothing else by name. ``CONNECT host:443`` and
absolute-URI ``http://host/...`` requests pass when ``host`` is listed; the proxy resolves the
name itself and refuses loopback, private and other internal results, so a listed name that
points inward does not open the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from urllib.parse import urlsplit

import h11

from forkd.net.policy import BLOCKED_V4, EgressPolicy

MAX_HEAD_BYTES = 32 * 1024
MAX_CONNECTIONS = 64
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
IDLE_TIMEOUT_S = 300.0
ALLOWED_PORTS = (80, 443)
CHUNK = 64 * 1024


class Refused(Exception):
    """A request the policy does not allow (answered 403 with the reason)."""


def _internal(address: str, policy: EgressPolicy) -> bool:
    ip = ipaddress.ip_address(address)
    if not isinstance(ip, ipaddress.IPv4Address):
        return True  # guests are IPv4-only; never hand out a route the guard does not check
    if any(ip in net for net in policy.cidrs):
        return False
    return any(ip in net for net in BLOCKED_V4)


class AllowListProxy:
    """Serves one sandbox on 127.0.0.1:``port`` until :meth:`close`."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.port = 0
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0: any free port); the port actually bound."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._slots.locked():
                await self._answer(writer, 503, "too many proxy connections for this sandbox")
                return
            async with self._slots:
                await self._handle(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            await self._answer(writer, 431, "request head too large")
            return
        if len(head) > MAX_HEAD_BYTES:
            await self._answer(writer, 431, "request head too large")
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await self._answer(writer, 400, f"bad request: {exc}")
            return
        if not isinstance(event, h11.Request):
            await self._answer(writer, 400, "bad request")
            return
        method = event.method.decode("ascii", "replace").upper()
        target = event.target.decode("ascii", "replace")
        try:
            if method == "CONNECT":
                host, port = _split_authority(target, 443)
                upstream = await self._open(host, port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await _splice(reader, writer, *upstream)
                return
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                raise Refused("only CONNECT and absolute http:// URLs go through this proxy")
            upstream = await self._open(url.hostname, url.port or 80)
        except Refused as exc:
            await self._answer(writer, 403, str(exc))
            return
        up_reader, up_writer = upstream
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [f"{method} {path} HTTP/1.1".encode()]
        for name, value in event.headers:
            if name.lower() in (b"proxy-connection", b"proxy-authorization", b"connection"):
                continue
            lines.append(name + b": " + value)
        lines.append(b"Connection: close")
        # Whatever body bytes already arrived stay in ``reader`` and are pumped on.
        up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        await _splice(reader, writer, up_reader, up_writer)

    async def _open(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port not in ALLOWED_PORTS:
            raise Refused(f"port {port} is not allowed: only 80 and 443 pass by name")
        if not self.policy.domain_allowed(host):
            raise Refused(f"{host} is not in this sandbox's allow-list")
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM),
                CONNECT_TIMEOUT_S,
            )
        except (TimeoutError, OSError) as exc:
            raise Refused(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or any(_internal(a, self.policy) for a in addresses):
            raise Refused(f"{host} resolves to an internal address; refused")
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(addresses[0], port), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError) as exc:
            raise Refused(f"cannot connect to {host}:{port}: {exc}") from exc

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = (reason + "\n").encode()
        writer.write(
            f"HTTP/1.1 {status} forkd egress\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(OSError):
            await writer.drain()


def _split_authority(target: str, default_port: int) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep:
        return target, default_port
    if not port.isdigit():
        raise Refused(f"bad CONNECT target {target!r}")
    return host.strip("[]"), int(port)


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while data := await asyncio.wait_for(src.read(CHUNK), IDLE_TIMEOUT_S):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()

    try:
        await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))
    finally:
        b_writer.close()
