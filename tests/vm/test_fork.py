"""Engine acceptance on real VMs: template, copy-on-write children, isolation, entropy, kill."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from forkd.hostcmd import sha256_file
from forkd.runtime.engine import Runtime
from forkd.snapshots.memfs import mount_of
from forkd.vmm.qemu import pid_alive

pytestmark = pytest.mark.vm


def _template_files(runtime: Runtime, tag: str) -> tuple[Path, Path]:
    manifest = runtime.snapshots.load(tag)
    return Path(manifest.memory.path), runtime.snapshots.devstate_path(tag)


async def test_children_are_warm_isolated_and_reseeded(runtime: Runtime, template: str) -> None:
    memory, devstate = _template_files(runtime, template)
    before = (sha256_file(memory), sha256_file(devstate))
    manifest = runtime.snapshots.load(template)
    assert manifest.memory.sha256 == before[0]
    assert manifest.devstate.sha256 == before[1]

    children = [s.sandbox.id for s in await runtime.spawn(template, 3)]
    assert len(set(children)) == 3

    for sid in children:
        # The warm-up's names are already there: numpy was imported before the fork.
        warm = await runtime.eval(sid, "WARM_MARKER, 'numpy' in globals()")
        assert warm.result == "('warm', True)"
        version = await runtime.eval(sid, "numpy.__version__")
        assert version.error is None and version.result and version.result.startswith("'1.")
        run = await runtime.exec(sid, ["python3", "-c", "print(6 * 7)"])
        assert (run.exit_code, run.stdout) == (0, "42\n")

    first, *others = children
    await runtime.write_file(first, "/root/only-in-first.txt", b"child one\n")
    assert await runtime.read_file(first, "/root/only-in-first.txt") == b"child one\n"
    fresh = (await runtime.spawn(template, 1))[0].sandbox.id
    for sid in [*others, fresh]:
        probe = await runtime.exec(sid, ["test", "-e", "/root/only-in-first.txt"])
        assert probe.exit_code == 1, f"file leaked into {sid}"

    randoms = set()
    for sid in children:
        r = await runtime.exec(sid, ["python3", "-c", "import os; print(os.urandom(32).hex())"])
        randoms.add(r.stdout.strip())
    assert len(randoms) == 3
    # The warm interpreter's own PRNG was reseeded too, not just the kernel's.
    py_randoms = {(await runtime.eval(sid, "random.random()")).result for sid in children}
    assert len(py_randoms) == 3

    assert (sha256_file(memory), sha256_file(devstate)) == before
    for sid in [*children, fresh]:
        await runtime.kill(sid)


async def test_kill_removes_process_and_run_dir(runtime: Runtime, template: str) -> None:
    a, b = (s.sandbox for s in await runtime.spawn(template, 2))
    assert a.run_dir is not None
    run_dir = Path(a.run_dir)
    assert run_dir.is_dir() and pid_alive(a.pid)
    await runtime.kill(a.id)
    assert not pid_alive(a.pid)
    assert not run_dir.exists()
    assert a.id not in {s.id for s in runtime.list_sandboxes(include_dead=True)}
    pong = await runtime.ping(b.id)
    assert pong["pong"] is True
    await runtime.kill(b.id)


async def test_qemu_killed_behind_our_back_is_reported_dead(
    runtime: Runtime, template: str
) -> None:
    victim, survivor = (s.sandbox for s in await runtime.spawn(template, 2))
    os.kill(victim.pid, 9)
    deadline = time.monotonic() + 5
    while (info := runtime.get_sandbox(victim.id)).state != "dead":
        assert time.monotonic() < deadline, "a killed sandbox must be reported dead promptly"
        await asyncio.sleep(0.05)
    assert info.dead_reason
    from forkd.errors import SandboxDead

    with pytest.raises(SandboxDead):
        await runtime.eval(victim.id, "1+1")
    assert (await runtime.eval(survivor.id, "1+1")).result == "2"
    await runtime.kill(victim.id)
    await runtime.kill(survivor.id)


@pytest.mark.skipif(os.geteuid() != 0, reason="forkd mounts its huge-page tmpfs only as root")
async def test_guest_memory_is_backed_by_huge_pages_as_root(
    runtime: Runtime, template: str
) -> None:
    where = mount_of(runtime.settings.memory_dir)
    assert where is not None and where.owned_by_forkd and where.huge == "within_size"
    child = (await runtime.spawn(template, 1))[0].sandbox
    try:
        memory = runtime.snapshots.load(template).memory.path
        smaps = Path(f"/proc/{child.pid}/smaps").read_text().split("\n")
        start = next(i for i, line in enumerate(smaps) if line.endswith(memory))
        entry = smaps[start : start + 40]
        # 2 MiB aligned by QEMU (align=2M), so the kernel may back it with huge pages.
        assert int(smaps[start].split("-")[0], 16) % (2 << 20) == 0
        eligible = next(line for line in entry if line.startswith("THPeligible:"))
        assert eligible.split()[1] == "1", entry
    finally:
        await runtime.kill(child.id)
