"""Pure parts of guest networking: policy parsing, the guard's rules, port parsing, the proxy."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from forkd.errors import InvalidInput
from forkd.net import guard, ports
from forkd.net.policy import EgressPolicy, parse_policy, policy_from_wire, resolve_policy
from forkd.net.proxy import AllowListProxy
from forkd.vmm.netdev import GuestNetwork
from forkd.vmm.spec import MachineSpec, RunPaths, has_nic, instance_args


def test_parse_each_kind_of_entry() -> None:
    p = parse_policy(
        "allowlist", ["Index.Example.org", "*.example.com", "203.0.113.7/24", "host:8080"]
    )
    assert p.domains == ("index.example.org", "*.example.com")
    assert [str(c) for c in p.cidrs] == ["203.0.113.0/24"]
    assert p.host_ports == (8080,)
    assert p.allow == ("index.example.org", "*.example.com", "203.0.113.0/24", "host:8080")
    assert p.domain_allowed("files.example.com") and p.domain_allowed("example.com")
    assert not p.domain_allowed("example.org") and not p.domain_allowed("badexample.com")
    assert policy_from_wire(p.to_wire()) == p


@pytest.mark.parametrize(
    ("egress", "allow", "needle"),
    [
        ("open", None, "must be one of"),
        ("allowlist", [], "at least one entry"),
        ("none", ["host:80"], "needs egress"),
        ("allowlist", ["host:70000"], "'host:70000'"),
        ("allowlist", ["not a domain"], "'not a domain'"),
        ("allowlist", ["300.1.2.3"], "'300.1.2.3'"),
        ("allowlist", ["::1"], "IPv4 only"),
        ("internet", ["example.com"], "every public name"),
        ("allowlist", "host:80", "list of strings"),
    ],
)
def test_bad_entries_are_named(egress: str, allow: Any, needle: str) -> None:
    with pytest.raises(InvalidInput, match=None) as info:
        parse_policy(egress, allow)
    assert needle in str(info.value)


def test_resolve_order_and_shorthand() -> None:
    inherited = parse_policy("internet", None)
    assert resolve_policy(None, None, inherited=inherited, default="none") == inherited
    assert resolve_policy(None, None, inherited=None, default="none").egress == "none"
    assert resolve_policy(None, True, inherited=None, default="none").egress == "internet"
    assert resolve_policy(None, False, inherited=inherited, default="none").egress == "none"
    explicit = resolve_policy({"egress": "none"}, None, inherited=inherited, default="internet")
    assert explicit.egress == "none"
    with pytest.raises(InvalidInput, match="disagree"):
        resolve_policy({"egress": "none"}, True, inherited=None, default="none")
    with pytest.raises(InvalidInput, match="unknown field"):
        resolve_policy({"egres": "none"}, None, inherited=None, default="none")


def test_guard_rules_allow_only_the_policy() -> None:
    allow = parse_policy("allowlist", ["host:8080", "198.51.100.0/24", "example.com"])
    rules = guard.ruleset("forkd_sb_1", "unified/forkd/sb-1", 2, allow, proxy_port=4000,
                          nameservers=["10.9.9.9"], host_addrs=["192.0.2.2"])  # fmt: skip
    assert 'socket cgroupv2 level 2 "unified/forkd/sb-1" jump egress' in rules
    assert "ip daddr 127.0.0.1 tcp dport { 4000, 8080 } accept" in rules
    assert "ip daddr { 198.51.100.0/24 } accept" in rules
    assert "10.9.9.9" not in rules  # no DNS for an allow-list
    assert "meta nfproto ipv4 accept" not in rules
    internet = guard.ruleset("t", "forkd/x", 2, parse_policy("internet", None), proxy_port=None,
                             nameservers=["10.9.9.9"], host_addrs=["192.0.2.2"])  # fmt: skip
    blocked = internet.index("goto refuse")
    assert internet.index("th dport 53 accept") < blocked < internet.index("nfproto ipv4 accept")
    assert "169.254.0.0/16" in internet and "192.0.2.2" in internet and "127.0.0.0/8" in internet
    assert guard.table_name("h1", "sb-ab.c") == "forkd_h1_sb_ab_c"
    # inside a sandbox's own namespace: every socket's output, loopback (the bridges) aside
    inner = guard.ruleset("t", "", 0, parse_policy("internet", None), proxy_port=None,
                          nameservers=["10.9.9.9"], host_addrs=[], inside=True)  # fmt: skip
    assert "cgroupv2" not in inner
    assert inner.index('oif "lo" accept') < inner.index("jump egress")
    assert inner.split("chain egress")[1] == internet.split("chain egress")[1].replace(
        ", 192.0.2.2", ""
    )


def test_cgroup2_root_from_mountinfo(tmp_path: Any) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "35 25 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert str(guard.cgroup2_root(info)) == "/sys/fs/cgroup/unified"


PROC_TCP = """  sl  local_address rem_address   st
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000
   1: 00000000:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000
   2: 0F02000A:1F42 0202000A:0050 01 00000000:00000000 00:00000000 00000000
"""


def test_loopback_only_listener_is_told() -> None:
    assert ports.listeners(PROC_TCP, 8000) == ["127.0.0.1"]
    assert ports.loopback_only(PROC_TCP, "", 8000)
    assert not ports.loopback_only(PROC_TCP, "", 8001)  # 0.0.0.0
    assert not ports.loopback_only(PROC_TCP, "", 8002)  # established, not listening
    assert not ports.loopback_only(PROC_TCP, "", 9999)  # nothing yet: let it through
    assert ports.hostfwd_add(4000, 80) == "hostfwd_add net0 tcp:127.0.0.1:4000-:80"


def test_nic_only_in_machines_that_have_one(tmp_path: Any) -> None:
    base = {"kernel": tmp_path / "k", "initrd": tmp_path / "i", "rootfs": tmp_path / "r",
            "mem_mib": 256, "accel_args": ("-accel", "tcg")}  # fmt: skip
    plain = MachineSpec(**base).machine_args()  # type: ignore[arg-type]
    nic = MachineSpec(**base, nic=GuestNetwork()).machine_args()  # type: ignore[arg-type]
    assert not has_nic(plain) and has_nic(nic)
    assert any("forkd.net=10.0.2.15/24,10.0.2.2" in a for a in nic)
    common = {"mem_mib": 256, "memory_path": tmp_path / "m", "share": False,
              "paths": RunPaths(tmp_path), "incoming": True}  # fmt: skip
    assert not any("netdev" in a for a in instance_args(plain, **common))  # type: ignore[arg-type]
    closed = instance_args(nic, **common)  # type: ignore[arg-type]
    opened = instance_args(nic, **common, restrict_network=False)  # type: ignore[arg-type]
    assert any("restrict=on" in a for a in closed) and any("restrict=off" in a for a in opened)


def _connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


async def _proxy_request(proxy: AllowListProxy, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    return data


async def test_proxy_refuses_unlisted_and_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listed name that resolves to the host's loopback must not open it.
    async def fake_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    proxy = AllowListProxy(parse_policy("allowlist", ["allowed.example"]))
    await proxy.start()
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    try:
        denied = await _proxy_request(proxy, _connect("other.example:443"))
        assert denied.startswith(b"HTTP/1.1 403") and b"not in this sandbox's allow-list" in denied
        inward = await _proxy_request(proxy, _connect("allowed.example:443"))
        assert inward.startswith(b"HTTP/1.1 403") and b"internal address" in inward
        port = await _proxy_request(proxy, _connect("allowed.example:22"))
        assert b"port 22 is not allowed" in port
        junk = await _proxy_request(proxy, b"\x00\x01garbage\r\n\r\n")
        assert junk.startswith(b"HTTP/1.1 400")
    finally:
        await proxy.close()


async def test_proxy_forwards_a_listed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b"origin saw " + head.split(b"\r\n", 1)[0]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    origin_port = server.sockets[0].getsockname()[1]

    async def fake_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    # Listing the CIDR is what makes an inward address acceptable.
    proxy = AllowListProxy(parse_policy("allowlist", ["allowed.example", "127.0.0.0/8"]))
    await proxy.start()
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr("forkd.net.proxy.ALLOWED_PORTS", (origin_port,))
    try:
        got = await _proxy_request(
            proxy, b"GET http://allowed.example:%d/a?b=1 HTTP/1.1\r\nHost: allowed.example\r\n"
            b"Proxy-Connection: keep-alive\r\n\r\n" % origin_port,
        )  # fmt: skip
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"origin saw GET /a?b=1 HTTP/1.1")
    finally:
        await proxy.close()
        server.close()


def test_default_policy_is_closed() -> None:
    assert EgressPolicy().restricted and not EgressPolicy().needs_proxy


def test_policy_checks_against_the_machine(tmp_path: Any) -> None:
    from forkd import wire
    from forkd.errors import Conflict, Unavailable
    from forkd.runtime.network import SandboxNetworks
    from forkd.runtime.registry import Registry

    nets = SandboxNetworks(Registry(tmp_path / "db"), default="none", long_lived=False)
    internet = wire.NetworkRequest(egress="internet")
    with pytest.raises(Conflict, match="no network card"):
        nets.check("old", None, internet, None)
    assert nets.check("old", None, None, None).egress == "none"  # NIC-less: none still fine
    domains = wire.NetworkRequest(egress="allowlist", allow=["example.com"])
    if guard.probe() is None:
        with pytest.raises(Unavailable, match="needs the daemon"):
            nets.check("t", GuestNetwork(), domains, None)
    else:
        with pytest.raises(Unavailable, match="egress guard"):
            nets.check("t", GuestNetwork(), internet, None)
    config = nets.guest_config("sb-x", GuestNetwork(), parse_policy("internet", None))
    assert config is not None and config["nameserver"] == "10.0.2.3"
    assert nets.guest_config("sb-x", GuestNetwork(), EgressPolicy()) is None
