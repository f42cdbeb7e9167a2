"""Faults answer cleanly: a QMP call or memory-map read racing a QEMU's death, or a QEMU that
dies silently while it starts, is QemuGone (503), never a bare VMError (500)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from forkd.errors import HostSetupError, QemuGone, VMError
from forkd.snapshots.guestram import find_ram_mapping
from forkd.vmm.qemu import QemuProcess, qemu_binary
from forkd.vmm.spec import RunPaths


def _argv(paths: RunPaths) -> list[str]:
    return [
        "-machine", "none", "-S", "-nodefaults", "-display", "none",
    ]  # fmt: skip


@pytest.fixture
def have_qemu() -> None:
    try:
        qemu_binary()
    except HostSetupError:
        pytest.skip("no QEMU on this host")


async def test_qmp_racing_a_kill_is_qemu_gone(tmp_path: Path, have_qemu: None) -> None:
    paths = RunPaths(tmp_path / "vm")
    qemu = await QemuProcess.launch(_argv(paths), paths, timeout=30)
    assert (await qemu.execute("query-status"))["status"] == "prelaunch"
    os.kill(qemu.pid, signal.SIGKILL)
    assert await qemu.wait_exit(10)
    with pytest.raises(QemuGone, match=f"QEMU pid {qemu.pid} exited during QMP query-status"):
        await qemu.execute("query-status")
    await qemu.close_qmp()
    with pytest.raises(QemuGone, match="exited while forkd connected"):
        await qemu.execute("query-status")
    assert QemuGone("x").http_status == 503
    with pytest.raises(QemuGone, match="before its memory map was read"):
        find_ram_mapping(qemu.pid, "/nowhere.mem", 1 << 20)


async def test_silent_start_failure_is_qemu_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    paths = RunPaths(tmp_path / "vm")
    with pytest.raises(QemuGone, match=r"status 1\) before it finished starting and said nothing"):
        await QemuProcess.launch([], paths, timeout=10)
    assert not paths.dir.exists(), "a failed start left its run dir behind"
    fake.write_text("#!/bin/sh\necho 'qemu: bad option' >&2\nexit 1\n")
    with pytest.raises(VMError, match="QEMU failed to start: qemu: bad option") as info:
        await QemuProcess.launch([], paths, timeout=10)
    assert not isinstance(info.value, QemuGone)
