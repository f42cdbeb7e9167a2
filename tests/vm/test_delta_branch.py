"""Diff and live branches are deltas over their root template: three generations keep their
state, store only what differs, share the root's memory file, survive the root's deletion, and
compact into a standalone copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkd.runtime.engine import Runtime

pytestmark = pytest.mark.vm

ROOT = "delta-root"


async def _state(runtime: Runtime, sandbox_id: str) -> tuple[str | None, str]:
    gen = (await runtime.eval(sandbox_id, "GEN")).result
    text = (await runtime.read_file(sandbox_id, "/root/gen.txt")).decode()
    return gen, text


async def _set(runtime: Runtime, sandbox_id: str, gen: int) -> None:
    answer = await runtime.eval(sandbox_id, f"GEN = {gen}")
    assert answer.error is None, answer
    await runtime.write_file(sandbox_id, "/root/gen.txt", str(gen).encode())


async def test_three_generations_of_delta_branches(runtime: Runtime) -> None:
    await runtime.create_snapshot(ROOT, warmup="GEN = 0")
    root = runtime.snapshots.load(ROOT)
    root_memory = Path(root.memory.path)
    kids: list[str] = []
    tags: list[str] = []
    try:
        source = (await runtime.spawn(ROOT, 1))[0].sandbox.id
        kids.append(source)
        for gen, mode in ((1, "diff"), (2, "live"), (3, "diff")):
            await _set(runtime, source, gen)
            tag = f"delta-gen{gen}"
            info = await runtime.branch(source, tag=tag, mode=mode)
            tags.append(tag)
            m = runtime.snapshots.load(tag)
            # flattened: every generation is a delta over the root template itself
            assert m.delta is not None and m.root_tag == ROOT and m.memory.path == str(root_memory)
            stored = info.stored_bytes or 0
            assert 0 < stored < root.mem_mib * 1024 * 1024 // 8, f"{tag} stored {stored} bytes"
            assert info.bootable
            source = (await runtime.spawn(tag, 1))[0].sandbox.id
            kids.append(source)
            assert await _state(runtime, source) == (str(gen), str(gen))

        # Deleting the root template keeps what its branches map; they still fork.
        await runtime.delete_snapshot(ROOT)
        assert root_memory.is_file()
        child = (await runtime.spawn("delta-gen3", 1))[0].sandbox.id
        kids.append(child)
        assert await _state(runtime, child) == ("3", "3")

        # compact makes a standalone template with the same state
        await runtime.compact_snapshot("delta-gen3", "delta-flat")
        tags.append("delta-flat")
        flat = runtime.snapshots.load("delta-flat")
        assert flat.delta is None and flat.memory.path != str(root_memory)
        flat_info = runtime.get_snapshot("delta-flat")  # parentless, as forkd v0.5's
        assert (flat_info.branched_from, flat_info.parent_tag) == ("compact:delta-gen3", None)
        detail = runtime.snapshot_detail("delta-gen3")
        assert detail.ancestors == [ROOT, "delta-gen1", "delta-gen2"]  # root -> parent
        assert detail.memory_logical_bytes == root.mem_mib * 1024 * 1024
        assert 0 < (detail.memory_physical_bytes or 0) < detail.memory_logical_bytes
        assert detail.vmstate_bytes and detail.root_tag == ROOT
        assert detail.parent_content_hash == root.memory.sha256
        flat_child = (await runtime.spawn("delta-flat", 1))[0].sandbox.id
        kids.append(flat_child)
        assert await _state(runtime, flat_child) == ("3", "3")
    finally:
        for sid in kids:
            await runtime.kill(sid)
        for tag in tags:
            await runtime.delete_snapshot(tag)
        if runtime.registry.get_snapshot(ROOT) is not None:
            await runtime.delete_snapshot(ROOT)
    # the last snapshot naming the root's memory file took it with it
    assert not root_memory.exists()


async def test_a_broken_delta_is_never_bootable(runtime: Runtime, template: str) -> None:
    source = (await runtime.spawn(template, 1))[0].sandbox.id
    try:
        await runtime.eval(source, "BROKEN = 1")
        info = await runtime.branch(source, tag="delta-broken", mode="diff")
        assert info.bootable
        delta = Path(runtime.snapshots.load("delta-broken").delta.path)  # type: ignore[union-attr]
        with delta.open("r+b") as f:
            f.truncate(delta.stat().st_size - 1)
        assert not runtime.get_snapshot("delta-broken").bootable
        with pytest.raises(Exception, match="bytes, manifest says"):
            await runtime.spawn("delta-broken", 1)
    finally:
        await runtime.kill(source)
        await runtime.delete_snapshot("delta-broken")
    assert not delta.exists()
