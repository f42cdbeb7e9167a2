"""Faults answer cleanly on real VMs: a QEMU killed under a spawn is replaced, and calls on a
sandbox whose QEMU was killed are SandboxDead (410), not VMError (500)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from forkd.errors import SandboxDead
from forkd.runtime.engine import Runtime
from forkd.vmm.qemu import QemuProcess, pid_alive

pytestmark = pytest.mark.vm


async def test_spawn_survives_its_qemu_dying_mid_restore(
    runtime: Runtime, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = QemuProcess.restore_and_run
    victims: list[int] = []

    async def die_once(self: QemuProcess, devstate: object) -> None:
        if not victims:  # the first child (pooled or not) is killed from outside right now
            victims.append(self.pid)
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await original(self, devstate)  # type: ignore[arg-type]

    monkeypatch.setattr(QemuProcess, "restore_and_run", die_once)
    sb = (await runtime.spawn(template, 1))[0].sandbox
    monkeypatch.undo()
    assert victims and sb.pid != victims[0]
    assert (await runtime.eval(sb.id, "6 * 7")).result == "42"
    await runtime.kill(sb.id)


async def test_calls_on_a_killed_sandbox_are_sandbox_dead(runtime: Runtime, template: str) -> None:
    sb = (await runtime.spawn(template, 1))[0].sandbox
    os.kill(sb.pid, signal.SIGKILL)
    for mode in ("full", "diff", "live"):
        with pytest.raises(SandboxDead):
            await runtime.branch(sb.id, mode=mode)
    with pytest.raises(SandboxDead):
        await runtime.exec(sb.id, ["true"])
    with pytest.raises(SandboxDead):
        await runtime.eval(sb.id, "1")
    assert runtime.get_sandbox(sb.id).state == "dead"
    await runtime.kill(sb.id)


async def test_branch_whose_source_dies_midway_is_sandbox_dead(
    runtime: Runtime, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The QEMU is killed between the branch's checks and its QMP calls (a 'getfd' race)."""
    sb = (await runtime.spawn(template, 1))[0].sandbox
    original = QemuProcess.stop

    async def killed_first(self: QemuProcess) -> None:
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(self.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await original(self)

    monkeypatch.setattr(QemuProcess, "stop", killed_first)
    with pytest.raises(SandboxDead, match=r"died during the branch|is dead"):
        await runtime.branch(sb.id, mode="full")
    monkeypatch.undo()
    assert runtime.get_sandbox(sb.id).state == "dead"
    await runtime.kill(sb.id)
