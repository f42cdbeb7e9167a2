"""The namespace bridge against a real network namespace the test creates (``unshare --net``):
forwards both ways, bounded connections, big transfers intact, the daemon's namespace untouched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from forkd.net import nsbridge
from forkd.net.nsbridge import Forward, connect_in, netns_id, open_netns, own_netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)

# an echo server on the namespace's loopback (lo is down in a fresh namespace)
ECHO = """
import socket, sys, threading, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("up", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
INNER_PORT = 4567


@pytest.fixture
def netns_echo() -> Iterator[int]:
    """The pid of an echo server in a network namespace of its own."""
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", ECHO, str(INNER_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
async def ns_fd(netns_echo: int) -> AsyncIterator[int]:
    fd = open_netns(netns_echo)
    yield fd
    os.close(fd)


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(nsbridge.LOOPBACK, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return got


async def test_namespaces_are_told_apart(netns_echo: int) -> None:
    assert own_netns(netns_echo)
    assert not own_netns(os.getpid())
    assert netns_id() == netns_id(os.getpid())


async def test_socket_in_leaves_this_thread_where_it_was(ns_fd: int) -> None:
    before = netns_id("thread-self")
    sock = nsbridge.socket_in(ns_fd)
    sock.close()
    assert netns_id("thread-self") == before == netns_id()
    # the echo port exists only in there
    with pytest.raises(OSError), socket.create_connection((nsbridge.LOOPBACK, INNER_PORT), 2):
        pass


async def test_ingress_forward_reaches_the_namespace(ns_fd: int) -> None:
    fwd = Forward(listen_ns=None, target_ns=ns_fd, target_port=INNER_PORT)
    port = await fwd.start()
    try:
        assert await _roundtrip(port, b"hello") == b"hello"
        big = os.urandom(8 * 1024 * 1024)  # far more than any buffer: backpressure holds
        assert await _roundtrip(port, big) == big
        # concurrent connections are independent
        got = await asyncio.gather(*(_roundtrip(port, b"n%d" % i) for i in range(10)))
        assert got == [b"n%d" % i for i in range(10)]
    finally:
        await fwd.close()
    with pytest.raises(OSError):
        await _roundtrip(port, b"after close")


async def test_forward_bounds_its_connections(ns_fd: int) -> None:
    fwd = Forward(listen_ns=None, target_ns=ns_fd, target_port=INNER_PORT, max_connections=1)
    port = await fwd.start()
    try:
        r1, w1 = await asyncio.open_connection(nsbridge.LOOPBACK, port)
        w1.write(b"first")
        assert await r1.readexactly(5) == b"first"
        r2, w2 = await asyncio.open_connection(nsbridge.LOOPBACK, port)
        assert await asyncio.wait_for(r2.read(), 10) == b""  # closed at once
        w2.close()
        w1.close()
        await w1.wait_closed()
        for _ in range(100):  # the slot comes back
            if fwd.connections == 0:
                break
            await asyncio.sleep(0.02)
        assert await _roundtrip(port, b"again") == b"again"
    finally:
        await fwd.close()


async def test_nothing_listening_closes_the_client(ns_fd: int) -> None:
    fwd = Forward(listen_ns=None, target_ns=ns_fd, target_port=INNER_PORT + 1)
    port = await fwd.start()
    try:
        assert await _roundtrip(port, b"x") == b""
    finally:
        await fwd.close()


@contextlib.contextmanager
def _host_echo() -> Iterator[int]:
    srv = socket.create_server((nsbridge.LOOPBACK, 0))

    def run() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                with c:
                    while data := c.recv(65536):
                        c.sendall(data)

    threading.Thread(target=run, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


async def test_reverse_forward_lets_the_namespace_reach_one_host_port(ns_fd: int) -> None:
    with _host_echo() as host_port:
        fwd = Forward(listen_ns=ns_fd, target_ns=None, target_port=host_port)
        inner = await fwd.start(host_port)  # the same number inside
        try:
            assert inner == host_port
            sock = await connect_in(ns_fd, inner)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"out and back")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b"out and back"
            writer.close()
            # any other host port stays out of reach from inside
            with pytest.raises(OSError):
                (await connect_in(ns_fd, host_port + 1)).close()
        finally:
            await fwd.close()
