"""Bounds on real VMs: every QEMU's cgroup leaf (memory, pids, cpu) from before it runs, the
reason shown when a limit or the seccomp filter ends a sandbox, and the sandbox cap."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from forkd.api.app import create_app
from forkd.errors import ForkdError, InvalidInput, SandboxDead, Unavailable
from forkd.runtime import cgroups
from forkd.runtime.engine import Runtime
from forkd.runtime.network import TEMPLATE_KEY_PREFIX

pytestmark = pytest.mark.vm

FORBIDDEN_CALL = Path(__file__).with_name("forbidden_call.py")
SYS_SETUID = 105  # x86-64


def _cgroups(runtime: Runtime) -> cgroups.Cgroups:
    found = runtime.cgroups
    if found is None or not all(found.has(c) for c in cgroups.CONTROLLERS):
        pytest.skip("this host offers no writable memory, pids and cpu cgroup controllers")
    return found


def _leaf_of(pid: int, controller: str, found: cgroups.Cgroups) -> str:
    """The leaf name ``pid`` is in, for ``controller`` (from /proc/<pid>/cgroup)."""
    h = found.hierarchies[controller]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (h.version == "v2" and names == "") or controller in names.split(","):
            assert path.startswith(f"/{cgroups.LEAF_PARENT}/"), line
            return path.rsplit("/", 1)[1]
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


async def _wait_dead(runtime: Runtime, sandbox_id: str) -> str:
    deadline = time.monotonic() + 30
    while (info := runtime.get_sandbox(sandbox_id)).state != "dead":
        assert time.monotonic() < deadline, "the sandbox did not die"
        await asyncio.sleep(0.1)
    assert info.dead_reason is not None
    return info.dead_reason


async def _api_says(runtime: Runtime, sandbox_id: str, reason: str, audit: Path) -> None:
    """GET shows the dead sandbox with ``reason``; a later request answers 410 with it."""
    app = create_app(runtime, token=None, audit_log=audit)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        info = (await c.get(f"/v1/sandboxes/{sandbox_id}")).json()
        assert info["state"] == "dead" and reason in info["dead_reason"], info
        r = await c.post(f"/v1/sandboxes/{sandbox_id}/eval", json={"code": "1+1"})
        assert r.status_code == 410 and reason in r.json()["error"], r.text


async def test_a_pool_member_is_in_its_leaf_before_it_is_taken(
    runtime: Runtime, template: str
) -> None:
    found = _cgroups(runtime)
    [first] = await runtime.spawn(template, 1)
    await runtime.settle()
    members = runtime._pool._ready.get(template, [])
    assert members, "the pool did not fill"
    member = members[-1]
    pid, name = member.qemu.pid, member.sandbox_id
    manifest = runtime.snapshots.load(template)
    for controller in cgroups.CONTROLLERS:
        assert _leaf_of(pid, controller, found) == name
    held = found.limits(name)
    overhead = runtime.settings.cgroup_memory_overhead_mib
    assert overhead is not None and held.memory_mib == 2 * manifest.mem_mib + overhead
    assert held.pids == runtime.settings.cgroup_pids_max == 256
    assert held.cpus == float(manifest.cpus)
    assert held.weight == runtime.settings.cgroup_pool_weight  # waits at low priority
    tasks = len(os.listdir(f"/proc/{pid}/task"))
    assert tasks < 64 <= held.pids, tasks  # a wide margin below the default
    [taken] = await runtime.spawn(template, 1)
    try:
        assert taken.timing.pooled and taken.sandbox.id == name
        assert found.limits(name).weight == cgroups.NORMAL_WEIGHT
        assert (await runtime.eval(name, "1+1")).result == "2"
    finally:
        await runtime.kill(taken.sandbox.id)
        await runtime.kill(first.sandbox.id)
    assert not any(d.exists() for d in found.dirs(name))  # no leaf outlives its sandbox


async def test_an_on_demand_child_has_the_default_limits(runtime: Runtime, template: str) -> None:
    found = _cgroups(runtime)
    cold = Runtime(dataclasses.replace(runtime.settings, warm_pool_size=0))
    await cold.start()
    try:
        [child] = await cold.spawn(template, 1, memory_limit_mib=900)
        sb = child.sandbox
        assert not child.timing.pooled
        for controller in cgroups.CONTROLLERS:
            assert _leaf_of(sb.pid, controller, found) == sb.id
        manifest = runtime.snapshots.load(template)
        assert found.limits(sb.id) == cgroups.LeafLimits(900, 256, float(manifest.cpus), 100)
        await cold.kill(sb.id)
        assert not any(d.exists() for d in found.dirs(sb.id))
    finally:
        await cold.close()


def _throttled(found: cgroups.Cgroups, name: str) -> int:
    """How often the kernel held the leaf's tasks back for its CPU quota."""
    h = found.hierarchies["cpu"]
    key = "nr_throttled"
    for line in (h.leaf(name) / "cpu.stat").read_text().splitlines():
        k, _, value = line.partition(" ")
        if k == key:
            return int(value)
    raise AssertionError("no nr_throttled in cpu.stat")


async def test_the_cpu_quota_holds_a_spinning_guest(runtime: Runtime, template: str) -> None:
    found = _cgroups(runtime)
    sb = (await runtime.spawn(template, 1))[0].sandbox
    try:
        assert found.limits(sb.id).cpus == float(runtime.snapshots.load(template).cpus)
        # a fifth of a CPU: below what one spinning vCPU takes even on this shared host
        h = found.hierarchies["cpu"]
        if h.version == "v2":
            (h.leaf(sb.id) / "cpu.max").write_text("20000 100000")
        else:
            (h.leaf(sb.id) / "cpu.cfs_quota_us").write_text("20000")
        assert found.limits(sb.id).cpus == 0.2
        before = _throttled(found, sb.id)
        spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass"
        await runtime.eval(sb.id, spin)
        assert _throttled(found, sb.id) > before  # QEMU's threads are held to the quota
    finally:
        await runtime.kill(sb.id)


async def test_memory_limit_kills_and_says_so(
    runtime: Runtime, template: str, tmp_path: Path
) -> None:
    found = _cgroups(runtime)
    sb = (await runtime.spawn(template, 1, memory_limit_mib=300))[0].sandbox
    assert sb.memory_limit_mib == 300
    assert found.limits(sb.id).memory_mib == 300  # a pool member's limit rewritten when taken
    assert str(sb.pid) in (found.dirs(sb.id)[0] / "cgroup.procs").read_text().split()
    # The guest asks for more than the limit allows: the kernel stops the QEMU, forkd says so.
    with pytest.raises(ForkdError):  # the agent connection dies with the VM
        await runtime.eval(sb.id, "import numpy; HOG = numpy.ones(400 << 17)")
    reason = await _wait_dead(runtime, sb.id)
    assert reason.startswith("memory limit of 300 MiB exceeded"), reason
    with pytest.raises(SandboxDead, match="memory limit of 300 MiB exceeded"):
        await runtime.eval(sb.id, "1+1")
    await _api_says(runtime, sb.id, "memory limit of 300 MiB exceeded", tmp_path / "audit.log")
    assert not any(d.exists() for d in found.dirs(sb.id))  # gone with its QEMU
    await runtime.kill(sb.id)


async def test_a_limit_below_a_pool_members_use_is_refused(runtime: Runtime, template: str) -> None:
    found = _cgroups(runtime)
    [first] = await runtime.spawn(template, 1)
    await runtime.settle()
    try:
        members = runtime._pool._ready.get(template, [])
        assert members, "the pool did not fill"
        member = members[-1]
        assert member.agent is not None  # hot: its guest runs, so it can grow
        await member.agent.eval("FILL = b'x' * (120 << 20)")
        used = found.memory_usage_mib(member.sandbox_id)
        assert used is not None and used > 120
        before = {s.id for s in runtime.list_sandboxes()}
        with pytest.raises(InvalidInput, match=r"memory_limit_mib=100 is below what a started"):
            await runtime.spawn(template, 1, memory_limit_mib=100)
        assert {s.id for s in runtime.list_sandboxes()} == before
        assert not any(d.exists() for d in found.dirs(member.sandbox_id))
    finally:
        await runtime.kill(first.sandbox.id)


def _qemus_matching(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            qemu = entry.name.isdigit() and (entry / "comm").read_text().startswith("qemu-")
            if qemu and text.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


async def test_a_materializer_runs_in_a_leaf_of_its_own(runtime: Runtime, template: str) -> None:
    found = _cgroups(runtime)
    [src] = await runtime.spawn(template, 1)
    tag = "limits-live"
    try:
        saved = runtime.settings  # a just-forked source is otherwise branched in its pause
        runtime.settings = dataclasses.replace(saved, live_inline_mib=0)
        try:
            await runtime.branch(src.sandbox.id, tag=tag, mode="live", wait=False)
        finally:
            runtime.settings = saved
        deadline = time.monotonic() + 120
        leaf = None
        while leaf is None and runtime.get_snapshot(tag).status == "writing":
            for pid in _qemus_matching(f"materialize-{tag}"):
                with contextlib.suppress(OSError, AssertionError):
                    leaf = _leaf_of(pid, "pids", found)
                    held = found.limits(leaf)
            assert time.monotonic() < deadline, "the materializer never started"
            await asyncio.sleep(0.01)
        assert leaf is not None and leaf.startswith("materialize-"), leaf
        assert held.pids == 256 and held.memory_mib is not None
        while runtime.get_snapshot(tag).status == "writing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert runtime.get_snapshot(tag).status == "ready"
        assert not any(d.exists() for d in found.dirs(leaf))  # gone with the materializer
    finally:
        await runtime.kill(src.sandbox.id)
        with contextlib.suppress(ForkdError):
            await runtime.delete_snapshot(tag)


async def test_a_template_parent_runs_in_a_leaf_of_its_own(runtime: Runtime) -> None:
    found = _cgroups(runtime)
    tag = "limits-parent"
    making = asyncio.ensure_future(runtime.create_snapshot(tag, mem_mib=256))
    try:
        leaf = None
        deadline = time.monotonic() + 300
        while leaf is None and not making.done():
            for pid in _qemus_matching(f"parent-{tag}"):
                with contextlib.suppress(OSError, AssertionError):
                    leaf = _leaf_of(pid, "memory", found)
                    held = found.limits(leaf)
            assert time.monotonic() < deadline, "the parent never started"
            await asyncio.sleep(0.01)
        await making
        assert leaf is not None and leaf.startswith(TEMPLATE_KEY_PREFIX), leaf
        assert held.memory_mib == 2 * 256 + 256 and held.pids == 256
        assert not any(d.exists() for d in found.dirs(leaf))  # gone with the parent
    finally:
        with contextlib.suppress(BaseException):
            await making
        with contextlib.suppress(ForkdError):
            await runtime.delete_snapshot(tag)


# Eight readers at once, past the page cache: QEMU's block layer starts a worker thread for
# each request no idle worker takes.
DIRECT_READS = (
    "import subprocess\n"
    "ps = [subprocess.Popen(['dd', 'if=/dev/vda', 'of=/dev/null', 'bs=64k', 'count=200',"
    " f'skip={i * 200}', 'iflag=direct'], stderr=subprocess.DEVNULL) for i in range(8)]\n"
    "[p.wait() for p in ps]"
)


async def test_pids_limit_kills_and_says_so(
    runtime: Runtime, template: str, tmp_path: Path
) -> None:
    found = _cgroups(runtime)
    sb = (await runtime.spawn(template, 1))[0].sandbox
    leaf = found.leaf("pids", sb.id)
    assert leaf is not None
    current = int((leaf / "pids.current").read_text())
    (leaf / "pids.max").write_text(str(current))  # not one thread more
    with contextlib.suppress(ForkdError):
        for _ in range(5):
            await runtime.eval(sb.id, DIRECT_READS)
    reason = await _wait_dead(runtime, sb.id)
    assert reason.startswith(f"pids limit of {current} tasks reached"), reason
    with pytest.raises(SandboxDead, match="pids limit"):
        await runtime.eval(sb.id, "1+1")
    await _api_says(runtime, sb.id, f"pids limit of {current} tasks", tmp_path / "audit.log")
    await runtime.kill(sb.id)
    assert not any(d.exists() for d in found.dirs(sb.id))


async def test_a_later_seccomp_kill_is_explained(
    runtime: Runtime, template: str, tmp_path: Path
) -> None:
    sb = (await runtime.spawn(template, 1))[0].sandbox
    assert (await runtime.eval(sb.id, "1+1")).result == "2"
    # A forbidden call made by the running QEMU itself, as a QEMU taken over by its guest
    # would: setuid(0) (elevateprivileges=deny kills the process). A plain SIGSYS from outside
    # is no stand-in: QEMU is pid 1 of its own namespace, which ignores it.
    call = [sys.executable, str(FORBIDDEN_CALL), str(sb.pid), str(SYS_SETUID), "0"]
    done = await asyncio.to_thread(subprocess.run, call, capture_output=True, text=True,
                                   timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    reason = await _wait_dead(runtime, sb.id)
    assert "seccomp filter" in reason and "SIGSYS" in reason, reason
    with pytest.raises(SandboxDead, match="seccomp filter"):
        await runtime.eval(sb.id, "1+1")
    await _api_says(runtime, sb.id, "killed by its seccomp filter", tmp_path / "audit.log")
    await runtime.kill(sb.id)


async def test_sandbox_cap_answers_unavailable(runtime: Runtime, template: str) -> None:
    saved = runtime.settings
    running = len(runtime.list_sandboxes())
    runtime.settings = dataclasses.replace(saved, max_sandboxes=running + 1)
    try:
        with pytest.raises(Unavailable, match=r"max .* \(--max-sandboxes\)"):
            await runtime.spawn(template, 2)
    finally:
        runtime.settings = saved


async def test_memory_limit_without_cgroups_is_accepted_with_a_warning(
    runtime: Runtime, template: str
) -> None:
    """forkd v0.5 (and its MCP server, which asks for 256 MiB on every spawn) only warns."""
    saved = runtime.settings
    runtime.settings = dataclasses.replace(saved, cgroups=False)
    try:
        spawned = (await runtime.spawn(template, 1, memory_limit_mib=256))[0]
    finally:
        runtime.settings = saved
    assert spawned.warning is not None and "memory_limit_mib=256 is not enforced" in spawned.warning
    assert spawned.sandbox.memory_limit_mib is None
    assert (await runtime.eval(spawned.sandbox.id, "1+1")).result == "2"
    await runtime.kill(spawned.sandbox.id)


async def test_memory_limit_is_validated(runtime: Runtime, template: str) -> None:
    with pytest.raises(InvalidInput, match="memory_limit_mib"):
        await runtime.spawn(template, 1, memory_limit_mib=8)
