"""Guest networking with real VMs: egress policies against a real host server, private NAT per
child, ingress forwards, and pip from the package index (when the host itself reaches it)."""

from __future__ import annotations

import ast
import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pip._internal.models.index import PyPI

from forkd import wire
from forkd.errors import Conflict, InvalidInput
from forkd.net import pasta
from forkd.net.guard import cgroup2_root, probe
from forkd.runtime.engine import Runtime

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(probe() is not None, reason=f"egress guard unavailable: {probe()}"),
]

FETCH = """
import urllib.request
try:
    _r = urllib.request.urlopen({url!r}, timeout=20).read().decode()
except Exception as _e:
    _r = "ERROR " + type(_e).__name__ + ": " + str(_e)
_r
"""
INDEX_PACKAGE = "iniconfig"  # small, pure Python, no dependencies


class HostServer:
    """A real HTTP server on the host's 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = f"host answer for {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host_server() -> Iterator[HostServer]:
    server = HostServer()
    yield server
    server.close()


async def _spawn(runtime: Runtime, template: str, **network: object) -> str:
    req = wire.NetworkRequest(**network) if network else None  # type: ignore[arg-type]
    [child] = await runtime.spawn(template, 1, network=req)
    return child.sandbox.id


async def _fetch(runtime: Runtime, sandbox_id: str, url: str) -> str:
    answer = await runtime.eval(sandbox_id, FETCH.format(url=url))
    assert answer.error is None and answer.result is not None, answer
    return str(ast.literal_eval(answer.result))


async def test_allowlisted_host_port_only(
    runtime: Runtime, template: str, host_server: HostServer
) -> None:
    url = f"http://10.0.2.2:{host_server.port}"
    allowed = await _spawn(
        runtime, template, egress="allowlist", allow=[f"host:{host_server.port}"]
    )
    default = await _spawn(runtime, template)
    internet = await _spawn(runtime, template, egress="internet")
    try:
        info = runtime.get_sandbox(allowed).network
        assert info is not None and info.egress == "allowlist" and info.host_alias == "10.0.2.2"
        assert runtime.get_sandbox(default).network.egress == "none"  # type: ignore[union-attr]
        assert await _fetch(runtime, allowed, f"{url}/allowed") == "host answer for /allowed"
        for sandbox_id in (default, internet):
            t0 = time.monotonic()
            got = await _fetch(runtime, sandbox_id, f"{url}/{sandbox_id}")
            # refused by a reset, not left to time out
            assert got.startswith("ERROR") and "refused" in got.lower(), got
            assert time.monotonic() - t0 < 15
        assert host_server.requests == ["/allowed"]
    finally:
        for sandbox_id in (allowed, default, internet):
            await runtime.kill(sandbox_id)


async def test_siblings_have_private_nat_and_the_same_address(
    runtime: Runtime, template: str, host_server: HostServer
) -> None:
    allow = [f"host:{host_server.port}"]
    [a, b] = [
        s.sandbox.id
        for s in await runtime.spawn(
            template, 2, network=wire.NetworkRequest(egress="allowlist", allow=allow)
        )
    ]
    try:
        url = f"http://10.0.2.2:{host_server.port}"
        got_a, got_b = await asyncio.gather(
            _fetch(runtime, a, f"{url}/{a}"), _fetch(runtime, b, f"{url}/{b}")
        )
        assert (got_a, got_b) == (f"host answer for /{a}", f"host answer for /{b}")
        ips = []
        for sandbox_id in (a, b):
            r = await runtime.exec(sandbox_id, ["python3", "-c", _GUEST_IP])
            ips.append(r.stdout.strip())
        assert ips == ["10.0.2.15", "10.0.2.15"]
        assert {runtime.get_sandbox(i).guest_addr for i in (a, b)} == {"10.0.2.15"}
    finally:
        await runtime.kill(a)
        await runtime.kill(b)


_GUEST_IP = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "s.connect(('10.0.2.2', 9)); print(s.getsockname()[0])"
)


async def test_names_do_not_resolve_without_egress(runtime: Runtime, template: str) -> None:
    sandbox_id = await _spawn(runtime, template)
    try:
        code = (
            "import socket, time\nt = time.monotonic()\ntry:\n"
            f"    socket.getaddrinfo({PyPI.netloc!r}, 443); r = 'resolved'\n"
            "except OSError as e:\n    r = 'failed'\nr + ' %.1f' % (time.monotonic() - t)"
        )
        answer = await runtime.eval(sandbox_id, code)
        verdict, seconds = str(ast.literal_eval(str(answer.result))).split()
        assert verdict == "failed" and float(seconds) < 5, answer
    finally:
        await runtime.kill(sandbox_id)


async def _wait_listening(runtime: Runtime, sandbox_id: str, port: int) -> None:
    needle = f":{port:04X} "
    for _ in range(100):
        tcp = (await runtime.read_file(sandbox_id, "/proc/net/tcp")).decode()
        if any(needle in line and " 0A " in line for line in tcp.splitlines()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"nothing listens on guest port {port}")


async def test_ingress_forward(runtime: Runtime, template: str) -> None:
    sandbox_id = await _spawn(runtime, template)
    try:
        await runtime.write_file(sandbox_id, "/srv/hello.txt", b"from the guest\n")
        serve = "cd /srv && nohup python3 -m http.server 8000 --bind 0.0.0.0 >/tmp/h.log 2>&1 &"
        await runtime.exec(sandbox_id, ["sh", "-c", serve])
        await _wait_listening(runtime, sandbox_id, 8000)
        info = await runtime.expose_port(sandbox_id, 8000)
        assert info.host == "127.0.0.1" and info.port == 8000
        assert info.url == f"http://127.0.0.1:{info.host_port}"
        listing = await asyncio.to_thread(_get, info.url + "/")
        assert "hello.txt" in listing
        assert await asyncio.to_thread(_get, info.url + "/hello.txt") == "from the guest\n"
        assert await runtime.expose_port(sandbox_id, 8000) == info  # idempotent
        assert runtime.list_ports(sandbox_id) == [info]

        # A service bound to the guest's loopback only: the error says how to bind.
        loop_only = "nohup python3 -m http.server 8001 --bind 127.0.0.1 >/tmp/l.log 2>&1 &"
        await runtime.exec(sandbox_id, ["sh", "-c", loop_only])
        await _wait_listening(runtime, sandbox_id, 8001)
        with pytest.raises(Conflict, match=r"bind it to 0\.0\.0\.0"):
            await runtime.expose_port(sandbox_id, 8001)

        await runtime.unexpose_port(sandbox_id, 8000)
        assert runtime.list_ports(sandbox_id) == []
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(_get, info.url + "/")
    finally:
        await runtime.kill(sandbox_id)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, info.url + "/")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=20) as r:
        return str(r.read().decode())


async def test_policy_errors_leave_nothing(runtime: Runtime, template: str) -> None:
    before = {s.id for s in runtime.list_sandboxes()}
    with pytest.raises(InvalidInput, match="'bad entry!'"):
        await runtime.spawn(
            template, 1, network=wire.NetworkRequest(egress="allowlist", allow=["bad entry!"])
        )
    with pytest.raises(InvalidInput, match="disagree"):
        await runtime.spawn(
            template, 1, network=wire.NetworkRequest(egress="none"), allow_internet_access=True
        )
    assert {s.id for s in runtime.list_sandboxes()} == before


def _host_reaches_index() -> str | None:
    """None if this host can fetch from the package index, else why not."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d",
             "/tmp/forkd-index-probe", "--index-url", PyPI.simple_url, INDEX_PACKAGE],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if out.returncode == 0 else out.stderr.strip()[-300:]


async def test_pip_install_from_the_index(runtime: Runtime, template: str) -> None:
    why = await asyncio.to_thread(_host_reaches_index)
    if why is not None:
        pytest.skip(f"this host cannot reach the package index itself: {why}")
    net = wire.NetworkRequest(egress="internet", host_ca=True)
    [child] = await runtime.spawn(template, 1, network=net)
    sandbox_id = child.sandbox.id
    try:
        r = await runtime.exec(
            sandbox_id, ["pip", "install", "--no-cache-dir", INDEX_PACKAGE], timeout_s=300
        )
        assert r.exit_code == 0, r.stderr[-2000:]
        answer = await runtime.eval(sandbox_id, f"import {INDEX_PACKAGE}\n{INDEX_PACKAGE}.__name__")
        assert answer.result == repr(INDEX_PACKAGE), answer
    finally:
        await runtime.kill(sandbox_id)


async def test_snapshot_diff_with_network(
    runtime: Runtime, template: str, forkd_home: Path
) -> None:
    why = await asyncio.to_thread(_host_reaches_index)
    if why is not None:
        pytest.skip(f"this host cannot reach the package index itself: {why}")
    tag = "pip-layer"
    command = f"pip install --no-cache-dir {INDEX_PACKAGE}"
    cli = [sys.executable, "-m", "forkd", "--home", str(forkd_home), "--local", "snapshot-diff",
           "--from", template, "--tag", tag, "--exec", command, "--exec-timeout-secs", "300",
           "--egress", "internet", "--host-ca", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = await asyncio.to_thread(
        subprocess.run, cli, capture_output=True, text=True, timeout=900, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    made = json.loads(done.stdout)
    assert made["status"] == "ready"
    # the fork that ran the command is gone
    assert made["branched_from"] not in {s.id for s in runtime.list_sandboxes(include_dead=True)}
    [child] = await runtime.spawn(tag, 1, network=wire.NetworkRequest(egress="none"))
    try:
        answer = await runtime.eval(
            child.sandbox.id, f"import {INDEX_PACKAGE}\n{INDEX_PACKAGE}.__name__"
        )
        assert answer.result == repr(INDEX_PACKAGE), answer
        assert child.sandbox.network is not None and child.sandbox.network.egress == "none"
    finally:
        await runtime.kill(child.sandbox.id)
        await runtime.delete_snapshot(tag)


async def test_warmup_with_network_and_neutral_children(runtime: Runtime) -> None:
    why = await asyncio.to_thread(_host_reaches_index)
    if why is not None:
        pytest.skip(f"this host cannot reach the package index itself: {why}")
    tag = "warm-net"
    warmup = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', "
        f"{INDEX_PACKAGE!r}], check=True, capture_output=True)\nimport {INDEX_PACKAGE}"
    )
    net = wire.NetworkRequest(egress="internet", host_ca=True)
    await runtime.create_snapshot(tag, warmup=warmup, network=net)
    try:
        [child] = await runtime.spawn(tag, 1)
        sid = child.sandbox.id
        try:
            answer = await runtime.eval(sid, f"{INDEX_PACKAGE}.__name__")
            assert answer.result == repr(INDEX_PACKAGE), answer
            # the warm-up's egress is not inherited: the child is closed and says so
            assert child.sandbox.network is not None and child.sandbox.network.egress == "none"
            resolv = (await runtime.read_file(sid, "/etc/resolv.conf")).decode()
            assert resolv == "nameserver 127.0.0.1\n"
            env = await runtime.eval(sid, "__import__('os').environ.get('HTTPS_PROXY')")
            assert env.result == "None"
        finally:
            await runtime.kill(sid)
    finally:
        await runtime.delete_snapshot(tag)


async def test_another_homes_start_leaves_this_homes_guard(
    runtime: Runtime, template: str, host_server: HostServer, tmp_path: Path
) -> None:
    """nftables tables are host-wide: a forkd on another home sweeping its leftovers must not
    remove the guard of a sandbox here (its egress would run unfiltered)."""
    import dataclasses

    from forkd.net.guard import table_name

    sandbox_id = await _spawn(runtime, template, egress="internet")
    try:
        other = Runtime(dataclasses.replace(runtime.settings, home=tmp_path / "other-home"))
        await other.start()
        await other.close()
        table = table_name(runtime.settings.home_key, sandbox_id)
        listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True)
        assert listed.returncode == 0, listed.stderr
        got = await _fetch(runtime, sandbox_id, f"http://10.0.2.2:{host_server.port}/x")
        assert got.startswith("ERROR") and host_server.requests == []
    finally:
        await runtime.kill(sandbox_id)


# --- jailed NIC children: network namespaces of their own (docs/security.md) ---------------


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


async def test_egress_none_child_has_its_own_netns_and_a_working_forward(
    runtime: Runtime, template: str, host_server: HostServer
) -> None:
    if runtime.jail is None:
        pytest.skip("QEMU is not jailed here")
    sandbox_id = await _spawn(runtime, template)
    try:
        assert _netns(runtime.get_sandbox(sandbox_id).pid) != _netns("self")
        serve = "cd /etc && nohup python3 -m http.server 8000 --bind 0.0.0.0 >/tmp/h.log 2>&1 &"
        await runtime.exec(sandbox_id, ["sh", "-c", serve])
        await _wait_listening(runtime, sandbox_id, 8000)
        info = await runtime.expose_port(sandbox_id, 8000)
        assert "hostname" in await asyncio.to_thread(_get, info.url + "/")
        # and the guest reaches nothing of the host
        got = await _fetch(runtime, sandbox_id, f"http://10.0.2.2:{host_server.port}/x")
        assert got.startswith("ERROR"), got
        assert host_server.requests == []
    finally:
        await runtime.kill(sandbox_id)


async def test_allowlisted_host_port_is_bridged_into_the_netns(
    runtime: Runtime, template: str, host_server: HostServer
) -> None:
    if runtime.jail is None:
        pytest.skip("QEMU is not jailed here")
    other = HostServer()
    allowed = await _spawn(
        runtime, template, egress="allowlist", allow=[f"host:{host_server.port}"]
    )
    internet = await _spawn(runtime, template, egress="internet")
    try:
        assert _netns(runtime.get_sandbox(allowed).pid) != _netns("self")
        # open routes: its own namespace too, with a pasta (else the host's; docs/security.md)
        shared = _netns(runtime.get_sandbox(internet).pid) == _netns("self")
        assert shared == (pasta.probe() is not None)
        if not shared:  # pasta's sockets are the guard's: it runs in the sandbox's cgroup
            root = cgroup2_root()
            assert root is not None
            procs = (root / "forkd" / internet / "cgroup.procs").read_text().split()
            names = {Path(f"/proc/{p}/comm").read_text().strip() for p in procs}
            assert any(n.startswith(("pasta", "passt")) for n in names), names
            t0 = time.monotonic()
            got = await _fetch(runtime, internet, "http://169.254.169.254/latest/meta-data/")
            assert got.startswith("ERROR") and "refused" in got.lower(), got
            assert time.monotonic() - t0 < 15
        url = f"http://10.0.2.2:{host_server.port}/allowed"
        assert await _fetch(runtime, allowed, url) == "host answer for /allowed"
        got = await _fetch(runtime, allowed, f"http://10.0.2.2:{other.port}/no")
        assert got.startswith("ERROR") and other.requests == [], got
        assert host_server.requests == ["/allowed"]
    finally:
        other.close()
        await runtime.kill(allowed)
        await runtime.kill(internet)
