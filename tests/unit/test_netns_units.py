"""Pure parts of the per-sandbox network namespace: pasta's command line, route detection, which
policies need the host's namespace, when the jail binds the host's resolvers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from forkd.net import pasta
from forkd.net.guard import cgroup2_root
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


needs_pasta = pytest.mark.skipif(
    pasta.probe() is not None or cgroup2_root() is None or shutil.which("unshare") is None,
    reason=f"needs root, pasta, unshare and cgroup v2: {pasta.probe()}",
)


@needs_pasta
def test_pasta_configures_a_namespace_from_inside_its_cgroup() -> None:
    """Against a namespace the test creates: pasta gives it a route out, runs in the leaf (so
    the guard's ``socket cgroupv2`` match covers every socket it makes) and goes with stop()."""
    root = cgroup2_root()
    assert root is not None
    leaf = root / "forkd" / f"test-pasta-{os.getpid()}"
    leaf.mkdir(parents=True)
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.01)
        assert not pasta.has_default_route(holder.pid)
        ns = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)
        try:
            proc = pasta.start(ns, holder.pid, leaf)
        finally:
            os.close(ns)
        try:
            assert pasta.has_default_route(holder.pid)
            # pasta may still have a short-lived helper of its own in the leaf (it configures
            # the namespace from a child); once that is gone, pasta alone is left there
            for _ in range(200):
                procs = (leaf / "cgroup.procs").read_text().split()
                if procs == [str(proc.pid)]:
                    break
                assert str(proc.pid) in procs
                time.sleep(0.01)
            assert procs == [str(proc.pid)]
            for _ in range(200):  # it seals itself right after configuring the namespace
                status = Path(f"/proc/{proc.pid}/status").read_text()
                if "Seccomp:\t2" in status:
                    break
                time.sleep(0.01)
            assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
        finally:
            pasta.stop(proc)
        assert proc.poll() is not None
        assert (leaf / "cgroup.procs").read_text().split() == []
    finally:
        holder.kill()
        holder.wait()
        _remove_leaf(leaf)


@pytest.mark.skipif(os.geteuid() != 0, reason="kills by pid")
def test_leftover_pastas_of_a_leaf_are_killed_and_nothing_else(tmp_path: Path) -> None:
    fake = tmp_path / "pasta-like"
    shutil.copy("/bin/sleep", fake)  # its comm starts with "pasta"
    pastaish = subprocess.Popen([str(fake), "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "cgroup.procs").write_text(f"{pastaish.pid}\n{other.pid}\n")
        for _ in range(100):  # until exec has given it its name
            if Path(f"/proc/{pastaish.pid}/comm").read_text().startswith("pasta"):
                break
            time.sleep(0.01)
        pasta.kill_leftovers(tmp_path)
        assert pastaish.wait(5) == -9
        assert other.poll() is None
    finally:
        for p in (pastaish, other):
            p.kill()
            p.wait()


def test_doctor_says_where_open_egress_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd import doctor
    from forkd.config import Settings
    from forkd.net import guard

    settings = Settings()
    monkeypatch.setattr(doctor.jails, "probe", lambda: None)
    monkeypatch.setattr(pasta, "probe", lambda: "pasta not found: install the passt package")
    check = doctor.check_open_egress_netns(settings)
    assert check.status == "WARN" and "host's network namespace" in check.detail
    monkeypatch.setattr(pasta, "probe", lambda: None)
    monkeypatch.setattr(guard, "host_nameservers", lambda: ["127.0.0.53"])
    check = doctor.check_open_egress_netns(settings)
    assert check.status == "WARN" and "127.0.0.53" in check.detail
    monkeypatch.setattr(guard, "host_nameservers", lambda: ["10.9.9.9"])
    assert doctor.check_open_egress_netns(settings).status == "PASS"


def _remove_leaf(leaf: Path) -> None:
    """rmdir a cgroup leaf whose last task just exited (the kernel may hold it a moment)."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            leaf.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
