"""Templates record the exact QEMU machine type; one the installed QEMU lacks is refused."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from forkd.errors import Conflict
from forkd.runtime.engine import Runtime
from forkd.vmm.machine import MACHINE_FAMILY, machine_type_of

pytestmark = pytest.mark.vm


def _qemu_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_template_records_exact_machine_and_children_map_it_read_only(
    runtime: Runtime, template: str
) -> None:
    manifest = runtime.snapshots.load(template)
    recorded = machine_type_of(manifest.machine_args)
    assert recorded == runtime.qemu.resolve(MACHINE_FAMILY)
    assert recorded is not None and recorded != MACHINE_FAMILY and recorded.startswith("pc-q35-")

    child = (await runtime.spawn(template, 1))[0].sandbox
    try:
        assert child.pid is not None
        cmdline = _qemu_cmdline(child.pid)
        assert f"-machine {recorded}," in cmdline
        assert f"mem-path={manifest.memory.path},share=off,readonly=on,rom=off" in cmdline
        # The guest still writes its own (private) pages.
        assert (await runtime.eval(child.id, "len(bytearray(8 << 20))")).result == str(8 << 20)
    finally:
        await runtime.kill(child.id)


async def test_machine_type_missing_from_this_qemu_is_refused_with_the_reason(
    runtime: Runtime, template: str
) -> None:
    source = (await runtime.spawn(template, 1))[0].sandbox.id
    try:
        info = await runtime.branch(source, tag="from-future-qemu", mode="full")
    finally:
        await runtime.kill(source)
    manifest = runtime.snapshots.load(info.tag)
    recorded = machine_type_of(manifest.machine_args)
    assert recorded is not None
    manifest.machine_args = [a.replace(recorded, "pc-q35-99.0") for a in manifest.machine_args]
    manifest.qemu_version = "99.0.0"
    runtime.snapshots.rewrite_manifest(manifest)
    try:
        assert runtime.get_snapshot(info.tag).bootable is False
        with pytest.raises(Conflict, match=r"pc-q35-99\.0.*make the template again"):
            await runtime.spawn(info.tag, 1)
    finally:
        await runtime.delete_snapshot(info.tag)


async def test_idle_child_has_no_periodic_hpet(runtime: Runtime, template: str) -> None:
    """Without an HPET the guest's timekeeping is the TSC and its LAPIC timer, and an idle
    child's QEMU sleeps instead of emulating a comparator the guest left running at HZ."""
    child = (await runtime.spawn(template, 1))[0].sandbox
    try:
        base = "/sys/devices/system/clocksource/clocksource0/"
        seen = await runtime.eval(
            child.id,
            f"(open({base + 'available_clocksource'!r}).read().split(), "
            f"open({base + 'current_clocksource'!r}).read().strip())",
        )
        available, current = ast.literal_eval(seen.result)
        assert "hpet" not in available
        assert current == "tsc"
        assert child.pid is not None
        assert "hpet=off" in _qemu_cmdline(child.pid)
    finally:
        await runtime.kill(child.id)


async def test_an_idle_guest_has_no_needless_timers(runtime: Runtime, template: str) -> None:
    """Under TCG every guest wake-up is emulated: the kernel a template boots has no proactive
    compaction, folds vmstat every 10 s and runs no lockup watchdog (children inherit it)."""
    child = (await runtime.spawn(template, 1))[0].sandbox
    try:
        names = ("vm/compaction_proactiveness", "vm/stat_interval", "kernel/watchdog")
        seen = await runtime.eval(
            child.id, f"tuple(open('/proc/sys/' + n).read().strip() for n in {names!r})"
        )
        assert seen.error is None, seen
        assert ast.literal_eval(seen.result) == ("0", "10", "0")
    finally:
        await runtime.kill(child.id)
