"""The cgroup file logic against temp dirs laid out like cgroup v2, v1 and a hybrid host (the
kernel's own files are exercised by tests/vm/test_limits.py on whatever this host has), the
limit settings, and how a death is explained."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.doctor import check_cgroups
from forkd.errors import InvalidInput
from forkd.runtime import cgroups, deaths, leftovers
from forkd.runtime.cgroups import LeafEvents, LeafLimits
from forkd.vmm import qemu as qemu_mod

MiB = 1024 * 1024
LIMITS = LeafLimits(memory_mib=768, pids=256, cpus=1.5, weight=10)


def _v2(root: Path, offered: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(offered + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "forkd").mkdir(exist_ok=True)
    (root / "forkd" / "cgroup.subtree_control").write_text("")
    return root


def _v1(root: Path, controllers: tuple[str, ...] = ("memory", "pids", "cpu")) -> Path:
    for c in controllers:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("1\n")
    return root


def test_v2_leaf_gets_every_limit_and_the_process(tmp_path: Path) -> None:
    found = cgroups.detect(_v2(tmp_path))
    assert found is not None
    assert {c: h.version for c, h in found.hierarchies.items()} == {
        "memory": "v2", "pids": "v2", "cpu": "v2"
    }  # fmt: skip
    found.place("sb-1", 4242, LIMITS)
    leaf = tmp_path / "forkd" / "sb-1"
    assert found.dirs("sb-1") == [leaf]  # one dir for all v2 controllers (the guard's too)
    assert (leaf / "memory.max").read_text() == str(768 * MiB)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "memory.oom.group").read_text() == "1"
    assert (leaf / "pids.max").read_text() == "256"
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "cpu.weight").read_text() == "10"
    assert (leaf / "cgroup.procs").read_text() == "4242"
    assert found.limits("sb-1") == LIMITS


def test_v2_events_usage_and_retarget(tmp_path: Path) -> None:
    found = cgroups.detect(_v2(tmp_path))
    assert found is not None
    found.place("sb-1", 1, LIMITS)
    leaf = tmp_path / "forkd" / "sb-1"
    assert found.events("sb-1") == LeafEvents(0, 0)
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    (leaf / "pids.events").write_text("max 3\n")
    assert found.events("sb-1") == LeafEvents(oom_kills=1, pids_refused=3)
    (leaf / "memory.current").write_text(str(300 * MiB + 1))
    assert found.memory_usage_mib("sb-1") == 301
    # A pool member already over the limit asked for: refused, its limit left as it was.
    with pytest.raises(InvalidInput, match=r"memory_limit_mib=256 .* \(301 MiB\)"):
        found.retarget("sb-1", 1, 256, what="a started child of 'py'")
    assert (leaf / "memory.max").read_text() == str(768 * MiB)
    found.retarget("sb-1", 1, 400, what="a started child of 'py'")
    assert (leaf / "memory.max").read_text() == str(400 * MiB)
    assert (leaf / "cpu.weight").read_text() == "100"  # handed out: normal weight
    found.retarget("sb-1", 1, None, what="x")
    found.retarget("sb-new", 77, 300, what="x")  # no leaf yet: made now
    assert (tmp_path / "forkd" / "sb-new" / "cgroup.procs").read_text() == "77"
    assert (tmp_path / "forkd" / "sb-new" / "memory.max").read_text() == str(300 * MiB)
    assert (leaf / "memory.max").read_text() == str(400 * MiB)


def test_v2_without_a_controller_falls_back_to_v1(tmp_path: Path) -> None:
    root = _v1(tmp_path, ("cpu",))
    _v2(root, "memory pids")
    found = cgroups.detect(root)
    assert found is not None
    assert {c: h.version for c, h in found.hierarchies.items()} == {
        "memory": "v2", "pids": "v2", "cpu": "v1"
    }  # fmt: skip
    assert sorted(found.dirs("sb-2")) == [tmp_path / "cpu" / "forkd" / "sb-2",
                                          tmp_path / "forkd" / "sb-2"]  # fmt: skip


def test_v1_leaf_gets_every_limit(tmp_path: Path) -> None:
    found = cgroups.detect(_v1(tmp_path))
    assert found is not None
    assert {h.version for h in found.hierarchies.values()} == {"v1"}
    found.place("sb-1", 99, LIMITS)
    mem, pids, cpu = (tmp_path / c / "forkd" / "sb-1" for c in ("memory", "pids", "cpu"))
    assert (mem / "memory.limit_in_bytes").read_text() == str(768 * MiB)
    assert (pids / "pids.max").read_text() == "256"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (cpu / "cpu.shares").read_text() == "102"
    assert all((d / "cgroup.procs").read_text() == "99" for d in (mem, pids, cpu))
    assert found.limits("sb-1") == LIMITS
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (pids / "pids.events").write_text("max 1\n")
    assert found.events("sb-1") == LeafEvents(2, 1)
    (mem / "memory.usage_in_bytes").write_text(str(10 * MiB))
    found.retarget("sb-1", 99, 128, what="x")
    assert (mem / "memory.limit_in_bytes").read_text() == str(128 * MiB)
    assert (cpu / "cpu.shares").read_text() == "1024"


def test_hybrid_host_with_an_empty_unified_hierarchy_uses_v1(tmp_path: Path) -> None:
    root = _v1(tmp_path)
    _v2(root / "unified", "")
    found = cgroups.detect(root)
    assert found is not None
    assert {h.version for h in found.hierarchies.values()} == {"v1"}
    assert cgroups.detect(tmp_path / "nothing") is None


def test_limits_left_unset_are_not_written(tmp_path: Path) -> None:
    found = cgroups.detect(_v2(tmp_path))
    assert found is not None
    found.place("sb-1", 1, LeafLimits())
    leaf = tmp_path / "forkd" / "sb-1"
    assert sorted(p.name for p in leaf.iterdir()) == ["cgroup.procs"]


def test_sweep_removes_only_old_empty_leaves(tmp_path: Path) -> None:
    found = cgroups.detect(_v2(tmp_path))
    assert found is not None
    parent = tmp_path / "forkd"
    old_empty, old_busy, new_empty = (parent / n for n in ("sb-old", "sb-busy", "sb-new"))
    for d in (old_empty, old_busy, new_empty):
        d.mkdir()
    (old_busy / "cgroup.procs").write_text("123\n")
    long_ago = time.time() - 3600
    for d in (old_empty, old_busy):
        os.utime(d, (long_ago, long_ago))
    assert found.stale() == [old_empty]
    assert found.sweep() == [old_empty]
    assert not old_empty.exists() and old_busy.exists() and new_empty.exists()


def test_limits_for_a_vm_follow_the_settings() -> None:
    settings = Settings()
    assert cgroups.for_vm(settings, mem_mib=512, cpus=2) == LeafLimits(1280, 256, 2.0, None)
    assert cgroups.for_vm(settings, mem_mib=512, cpus=1, memory_limit_mib=300, pooled=True) == (
        LeafLimits(300, 256, 1.0, 10)
    )
    off = Settings(cgroup_memory_overhead_mib=None, cgroup_pids_max=None, cgroup_cpus=None,
                   cgroup_pool_weight=None)  # fmt: skip
    assert cgroups.for_vm(off, mem_mib=512, cpus=1, pooled=True) == LeafLimits()
    assert cgroups.for_vm(Settings(cgroup_cpus=0.5), mem_mib=64, cpus=4).cpus == 0.5


def test_limit_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_CGROUP_MEMORY_OVERHEAD_MIB", "128")
    monkeypatch.setenv("FORKD_CGROUP_PIDS_MAX", "off")
    monkeypatch.setenv("FORKD_CGROUP_CPUS", "1.5")
    monkeypatch.setenv("FORKD_CGROUP_POOL_WEIGHT", "50")
    s = Settings.from_env()
    assert (s.cgroup_memory_overhead_mib, s.cgroup_pids_max, s.cgroup_cpus,
            s.cgroup_pool_weight) == (128, None, 1.5, 50)  # fmt: skip
    monkeypatch.setenv("FORKD_CGROUP_CPUS", "auto")
    assert Settings.from_env().cgroup_cpus == "auto"
    for var, bad in (("FORKD_CGROUP_PIDS_MAX", "lots"), ("FORKD_CGROUP_PIDS_MAX", "3"),
                     ("FORKD_CGROUP_CPUS", "-1"), ("FORKD_CGROUP_POOL_WEIGHT", "0")):  # fmt: skip
        monkeypatch.setenv(var, bad)
        with pytest.raises(InvalidInput, match=var):
            Settings.from_env()
        monkeypatch.delenv(var)


def test_a_death_names_the_limit_that_caused_it(tmp_path: Path) -> None:
    found = cgroups.detect(_v2(tmp_path))
    assert found is not None
    found.place("sb-1", 1, LIMITS)
    leaf = tmp_path / "forkd" / "sb-1"
    gone = 0x7FFFFFF0  # no such pid: no exit status, only the counters tell
    assert deaths.explain(gone, found, "sb-1") == deaths.GENERIC
    assert deaths.explain(gone, None, "sb-1") == deaths.GENERIC
    (leaf / "pids.events").write_text("max 4\n")
    said = "qemu_thread_create: Resource temporarily unavailable"
    reason = deaths.explain(gone, found, "sb-1", log_tail=said)
    assert reason.startswith("pids limit of 256 tasks reached") and said in reason
    (leaf / "memory.events").write_text("oom 1\noom_kill 1\n")
    assert deaths.explain(gone, found, "sb-1").startswith("memory limit of 768 MiB exceeded")


@pytest.mark.parametrize(
    ("argv", "seccomp"),
    [(["sleep", "30"], True), (["sh", "-c", "exit 159"], True), (["sh", "-c", "exit 3"], False)],
)
def test_exit_status_of_a_started_process_explains_seccomp(argv: list[str], seccomp: bool) -> None:
    """SIGSYS itself (QEMU unjailed), or bwrap's 128 + 31 for its child (jailed)."""
    proc = subprocess.Popen(argv)
    qemu_mod._launchers[proc.pid] = proc
    if argv[0] == "sleep":
        os.kill(proc.pid, signal.SIGSYS)
    reason = deaths.explain(proc.pid, None, "sb-x")
    assert (reason == deaths.SECCOMP) is seccomp, reason
    if not seccomp:
        assert reason == "QEMU exited with status 3"
    assert proc.pid not in qemu_mod._launchers


def test_doctor_says_which_hierarchy_limits_what(tmp_path: Path) -> None:
    hybrid = cgroups.detect(_v1(tmp_path / "a", ("memory", "pids")))
    check = check_cgroups(Settings(), hybrid)
    assert check.status == "WARN" and check.detail == "memory (v1), pids (v1); no cpu limit"
    full = cgroups.detect(_v2(tmp_path / "b"))
    assert check_cgroups(Settings(), full).detail.endswith("memory (v2), pids (v2), cpu (v2)")
    assert check_cgroups(Settings(cgroups=False)).status == "WARN"


def test_cleanup_lists_and_removes_stale_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = cgroups.detect(_v2(tmp_path / "cg"))
    stale = tmp_path / "cg" / "forkd" / "sb-old"
    stale.mkdir()
    long_ago = time.time() - 3600
    os.utime(stale, (long_ago, long_ago))
    monkeypatch.setattr(leftovers.cgroup_limits, "available", lambda enabled=True: found)
    settings = Settings(home=tmp_path / "h", shm_dir=tmp_path / "shm")
    items = [item for item in leftovers.find(settings) if item.kind == "cgroup"]
    assert [item.path for item in items] == [stale] and items[0].size_bytes == 0
    leftovers.remove(settings, items[0])
    assert not stale.exists()
