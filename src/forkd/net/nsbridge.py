"""TCP between the daemon's network namespace and a jailed QEMU's private one.

A jailed QEMU with a NIC runs in a network namespace of its own (only ``lo``), so its user-mode
stack's port forwards listen on that namespace's loopback and its guest reaches nothing outside.
The daemon bridges the two: a :class:`Forward` listens in one namespace and, per connection,
connects to a port in the other and pumps bytes both ways. Ingress (``forkd port``) listens on
the host's loopback and connects into the sandbox; a policy's loopback ports (``host:PORT``, the
allow-list proxy) listen inside the sandbox and connect to the host.

A socket stays in the namespace it was created in, so :func:`socket_in` creates it in a
short-lived thread that has entered the namespace (``setns`` changes only that thread, which
then ends: no pooled thread is ever left in a sandbox's namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024
MAX_CONNECTIONS = 128  # per forward
CONNECT_TIMEOUT_S = 10.0
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """``setns(fd, CLONE_NEWNET)`` for the calling thread (``os.setns`` is Python 3.12+)."""
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_netns(pid: int) -> int:
    """A descriptor of ``pid``'s network namespace (keeps naming it if ``pid`` is reused)."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def netns_id(pid: int | str = "self") -> int:
    """The inode that names ``pid``'s network namespace."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def own_netns(pid: int) -> bool:
    """True when ``pid`` is in a network namespace other than this process's."""
    return netns_id(pid) != netns_id()


def socket_in(ns_fd: int | None, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket created in namespace ``ns_fd`` (None: this process's own)."""
    if ns_fd is None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            _setns(ns_fd)  # this thread only; it ends right after
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=enter_and_make, name="forkd-netns", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    made[0].setblocking(False)
    return made[0]


def listener_in(ns_fd: int | None, port: int, host: str = LOOPBACK) -> socket.socket:
    """A listening socket on ``host:port`` in namespace ``ns_fd`` (port 0: any free one)."""
    sock = socket_in(ns_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_in(ns_fd: int | None, port: int, host: str = LOOPBACK) -> socket.socket:
    """A socket in namespace ``ns_fd`` connected to ``host:port`` there."""
    sock = socket_in(ns_fd)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


class Forward:
    """Listens on 127.0.0.1:``listen_port`` in ``listen_ns`` and joins every connection to
    127.0.0.1:``target_port`` in ``target_ns`` (None: the daemon's own namespace), until
    :meth:`close`. At most ``max_connections`` at once; more are closed at accept."""

    def __init__(
        self,
        *,
        listen_ns: int | None,
        target_ns: int | None,
        target_port: int,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.listen_ns = listen_ns
        self.target_ns = target_ns
        self.target_port = target_port
        self.port = 0
        self._max = max_connections
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, listen_port: int = 0) -> int:
        """Listen (port 0: any free one) and serve; the port actually bound."""
        port = self.bind(listen_port)
        await self.serve()
        return port

    def bind(self, listen_port: int = 0) -> int:
        """Listen without serving yet: connections wait in the kernel's backlog until
        :meth:`serve` (for callers that must hold the port before they may await)."""
        self._sock = listener_in(self.listen_ns, listen_port)
        self.port = self._sock.getsockname()[1]
        return self.port

    async def serve(self) -> None:
        assert self._sock is not None, "bind() first"
        try:
            self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=CHUNK)
        except BaseException:
            self._sock.close()
            raise

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._tasks) >= self._max:
            writer.close()
            return
        self._tasks.add(task)
        try:
            sock = await connect_in(self.target_ns, self.target_port)
            up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            try:
                await splice(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
        except (OSError, TimeoutError):
            pass  # nothing listens there (yet): the client sees its connection closed
        finally:
            self._tasks.discard(task)
            writer.close()


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    *,
    idle_timeout: float | None = None,
) -> None:
    """Pump both ways until both sides ended; a write waits for its peer to drain (at most one
    chunk in flight per direction), an EOF is passed on as a half-close, an error ends both.
    No idle limit by default (as QEMU's own forwards): a forward's connections are bounded in
    number instead."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await asyncio.wait_for(src.read(CHUNK), idle_timeout):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    pumps = [asyncio.ensure_future(pump(a_reader, b_writer)),
             asyncio.ensure_future(pump(b_reader, a_writer))]  # fmt: skip
    try:
        for done in asyncio.as_completed(pumps):
            try:
                await done
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                break  # one side broke: the other is cut too
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        with contextlib.suppress(OSError):
            a_writer.close()
            b_writer.close()
