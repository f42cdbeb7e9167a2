"""Pure parts of the per-sandbox network namespace: pasta's command line, route detection, which
policies need the host's namespace, when the jail binds the host's resolvers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forkd.net import pasta
from forkd.net.policy import parse_policy
from forkd.runtime.network import SandboxNetworks
from forkd.runtime.registry import Registry
from forkd.vmm import jail as jails
from forkd.vmm.netdev import backend_args


def test_pasta_forwards_nothing_and_keeps_the_gateway_unmapped() -> None:
    argv = pasta.argv("/usr/bin/pasta", 9)
    assert argv[0] == "/usr/bin/pasta"
    for flag in ("--foreground", "--ipv4-only", "--config-net", "--no-map-gw", "--no-dhcp"):
        assert flag in argv, flag
    for opt in ("-t", "-u", "-T", "-U"):  # no port forwarded either way (its default: auto)
        assert argv[argv.index(opt) + 1] == "none", opt
    assert argv[argv.index("--netns") + 1] == "/proc/self/fd/9"


def test_default_route_is_read_from_the_namespaces_route_table(tmp_path: Path) -> None:
    assert pasta.has_default_route(os.getpid()) in (True, False)
    assert not pasta.has_default_route(2**22 + 12345)  # no such pid: no route


def test_which_policies_need_the_host_namespace(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "forkd.db")
    daemon = SandboxNetworks(reg, default="none", long_lived=True)
    one_shot = SandboxNetworks(reg, default="none", long_lived=False)
    none = parse_policy("none", [])
    names = parse_policy("allowlist", ["example.org"])
    host_port = parse_policy("allowlist", ["host:8000"])
    cidr = parse_policy("allowlist", ["203.0.113.0/24"])
    internet = parse_policy("internet", [])
    routes_shared = pasta.probe() is not None
    for nets in (daemon, one_shot):
        assert not nets.host_netns(none) and not nets.host_netns(names)
        assert nets.host_netns(cidr) == nets.host_netns(internet) == routes_shared
    assert not daemon.host_netns(host_port)
    assert one_shot.host_netns(host_port)  # its bridge would end with the process


@pytest.mark.parametrize(("restrict", "bound"), [(True, False), (False, True)])
def test_resolvers_only_for_an_open_user_mode_stack(restrict: bool, bound: bool) -> None:
    argv = ["-machine", "q35", *backend_args(restrict=restrict)]
    assert jails._unrestricted_nic(argv) == bound
