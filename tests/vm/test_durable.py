"""Durable templates: after a simulated host reboot (every QEMU gone, the tmpfs memory dir
released) a new runtime forks from every template and branch with the state they were made
with, including a delta branch whose root template was deleted; a corrupt disk copy is refused
with a reason, never mapped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import Conflict
from forkd.hub.pack import write_pack
from forkd.hub.unpack import unpack
from forkd.images.builder import ImageRequest, build_image
from forkd.images.store import Image
from forkd.runtime.engine import Runtime
from forkd.snapshots.memfs import release_memory_dir

pytestmark = pytest.mark.vm

ROOT = "dur-root"
BRANCHES = {"dur-diff": "diff", "dur-full": "full", "dur-live": "live"}


@pytest.fixture
async def home(tmp_path: Path, built_image: Image) -> AsyncIterator[Settings]:
    """A home of its own: releasing its memory dir touches no other test's templates."""
    # no warm pool: its hot children would only compete for this host's two cores
    settings = Settings.from_env(home=tmp_path / "home", warm_pool_size=0)
    build_image(settings, ImageRequest.default("python", None, None), lambda _: None)  # cached
    yield settings
    release_memory_dir(settings.memory_dir)


async def _boot(settings: Settings) -> Runtime:
    rt = Runtime(settings, watch=True)
    await rt.start()
    return rt


async def _reboot(rt: Runtime) -> Runtime:
    """Every QEMU gone and tmpfs empty, as after a host reboot; then a fresh runtime."""
    settings = rt.settings
    await rt.close(kill_sandboxes=True)
    release_memory_dir(settings.memory_dir)
    assert not settings.memory_dir.exists()
    return await _boot(settings)


async def _state(rt: Runtime, tag: str) -> tuple[str | None, str | None, str]:
    child = (await rt.spawn(tag, 1))[0].sandbox.id
    warm = (await rt.eval(child, "WARM")).result
    gen = (await rt.eval(child, "globals().get('GEN')")).result
    try:
        text = (await rt.read_file(child, "/root/gen.txt")).decode()
    except Exception:
        text = ""
    return warm, gen, text


async def test_templates_and_branches_survive_a_reboot(home: Settings, tmp_path: Path) -> None:
    rt = await _boot(home)
    try:
        info = await rt.create_snapshot(ROOT, warmup="WARM = 41")
        assert info.bootable and info.warning is None
        root = rt.snapshots.load(ROOT)
        assert root.memory_authoritative == "disk" and root.memory_disk is not None
        disk = Path(root.memory_disk.path)
        assert disk.is_relative_to(home.home) and disk.stat().st_size == root.memory.bytes
        # sparse: the copy stores what the guest used, not its 512 MiB
        assert disk.stat().st_blocks * 512 < root.memory.bytes

        source = (await rt.spawn(ROOT, 1))[0].sandbox.id
        for gen, (tag, mode) in enumerate(BRANCHES.items(), start=1):
            assert (await rt.eval(source, f"GEN = {gen}")).error is None
            await rt.write_file(source, "/root/gen.txt", str(gen).encode())
            branch = await rt.branch(source, tag=tag, mode=mode, wait=mode != "live")
            # a live branch with wait=false still answers at the snapshot instant
            assert branch.status == ("writing" if mode == "live" else "ready")
        deadline = time.monotonic() + 600
        while rt.get_snapshot("dur-live").status == "writing" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        live = rt.get_snapshot("dur-live")
        assert live.status == "ready", live.error
        await rt.wait_persisted()
        for tag in BRANCHES:
            m = rt.snapshots.load(tag)
            assert m.memory_authoritative == "disk", tag
            assert m.memory_disk is not None and Path(m.memory_disk.path).is_file()
        diff = rt.snapshots.load("dur-diff")
        assert diff.delta is not None and Path(diff.delta.path).is_relative_to(home.home)
        assert diff.memory.path == root.memory.path  # a delta over the root's memory

        rt = await _reboot(rt)
        for tag in (ROOT, *BRANCHES):
            info = rt.get_snapshot(tag)
            assert info.bootable, (tag, info.error)
        # Packing reads the disk copies (tmpfs is still empty); an unpacked template is durable
        # as soon as it exists.
        pack = await write_pack(rt, "dur-diff", tmp_path / "diff.forkd", compress=False)
        assert not Path(root.memory.path).exists()
        await unpack(rt, pack.path, tag="dur-unpacked")
        assert rt.snapshots.load("dur-unpacked").memory_authoritative == "disk"
        assert await _state(rt, "dur-unpacked") == ("41", "1", "1")
        assert await _state(rt, ROOT) == ("41", "None", "")
        for gen, tag in enumerate(BRANCHES, start=1):
            assert await _state(rt, tag) == ("41", str(gen), str(gen)), tag
        assert Path(root.memory.path).is_file()  # tmpfs is filled again: a cache

        # The root goes while a delta branch still needs its memory: the branch keeps both
        # copies alive and forks after another reboot.
        await rt.delete_snapshot(ROOT)
        assert disk.is_file()
        rt = await _reboot(rt)
        assert rt.get_snapshot("dur-diff").bootable
        assert await _state(rt, "dur-diff") == ("41", "1", "1")

        # A corrupt disk copy (one flipped byte) is refused with a reason, never mapped.
        full = rt.snapshots.load("dur-full")
        assert full.memory_disk is not None
        rt = await _reboot(rt)
        flip = Path(full.memory_disk.path)
        with open(flip, "r+b") as f:
            f.seek(4096 * 10)
            byte = f.read(1)
            f.seek(4096 * 10)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(Conflict, match="sha256"):
            await rt.spawn("dur-full", 1)
        info = rt.get_snapshot("dur-full")
        assert not info.bootable and info.error and "sha256" in info.error
        assert not Path(full.memory.path).exists()
        # the others are untouched by it
        assert await _state(rt, "dur-live") == ("41", "3", "3")
    finally:
        await rt.close(kill_sandboxes=True)
