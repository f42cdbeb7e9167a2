"""Durable templates: what the disk copy of a numpy-warm template costs, how long a fork takes
after a (simulated) host reboot, and whether compression or mapping the disk copy directly
would pay.

python bench/durable.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, scratch_settings, write_results

from forkd.runtime.engine import Runtime
from forkd.snapshots.manifest import SnapshotManifest

TAG = "dur"
WARMUP = "import numpy"
MiB = 1024 * 1024


def drop_cache(path: Path) -> None:
    """Evict one file's clean pages from the page cache (a cold read after a reboot) without
    touching the rest of a shared host's cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def physical(path: Path) -> int:
    return path.stat().st_blocks * 512


async def fork_answer(rt: Runtime, tag: str, manifest: SnapshotManifest | None = None) -> float:
    """Seconds from the fork call until the child's eval answered."""
    t0 = time.perf_counter()
    if manifest is None:
        sid = (await rt.spawn(tag, 1))[0].sandbox.id
    else:  # the alternative: children map the disk copy itself (engine internals, bench only)
        policy = rt.networks.policy_for(manifest, None, None)
        sid = (await rt._fork_one(tag, manifest, None, None, policy)).sandbox.id
    assert (await rt.eval(sid, "numpy.arange(3).sum()")).result == "3"
    took = time.perf_counter() - t0
    await rt.kill(sid)
    return took


def compress_zlib(path: Path, level: int) -> tuple[int, float]:
    """Compressed size of the file's whole content and seconds taken."""
    comp = zlib.compressobj(level)
    size = 0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            size += len(comp.compress(block))
    size += len(comp.flush())
    return size, time.perf_counter() - t0


def compress_cli(path: Path, argv: list[str], out: Path) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    with open(path, "rb") as fin, open(out, "wb") as fout:
        subprocess.run(argv, stdin=fin, stdout=fout, check=True)
    took = time.perf_counter() - t0
    t1 = time.perf_counter()
    with open(out, "rb") as fin:
        subprocess.run([argv[0], "-d", "-c"], stdin=fin, stdout=subprocess.DEVNULL, check=True)
    size = out.stat().st_size
    out.unlink()
    return size, took, time.perf_counter() - t1


async def main(args: argparse.Namespace) -> None:
    with scratch_settings(warm_pool_size=0) as settings:
        rt = Runtime(settings, watch=True)
        await rt.start()
        try:
            await rt.create_snapshot(TAG, warmup=WARMUP)
            m = rt.snapshots.load(TAG)
            assert m.memory_disk is not None and m.memory_authoritative == "disk"
            tmpfs, disk = Path(m.memory.path), Path(m.memory_disk.path)
            tmpfs_bytes, disk_bytes = physical(tmpfs), physical(disk)
            persist: list[float] = []
            restore_cold: list[float] = []
            restore_warm: list[float] = []
            for _ in range(args.reps):
                disk.unlink()
                t0 = time.perf_counter()
                rt.snapshots.persist(TAG)
                persist.append(time.perf_counter() - t0)
            for cold in [True] * args.reps + [False] * args.reps:
                tmpfs.unlink()
                if cold:
                    drop_cache(disk)
                t0 = time.perf_counter()
                rt.snapshots.restore_memory(m)
                (restore_cold if cold else restore_warm).append(time.perf_counter() - t0)
            hot: list[float] = []
            after_reboot: list[float] = []
            direct: list[float] = []
            direct_manifest = m.model_copy(
                update={"memory": m.memory.model_copy(update={"path": str(disk)})}
            )
            for _ in range(args.reps):
                hot.append(await fork_answer(rt, TAG))
                tmpfs.unlink()
                drop_cache(disk)
                after_reboot.append(await fork_answer(rt, TAG))
                drop_cache(disk)
                direct.append(await fork_answer(rt, TAG, direct_manifest))
            zl1 = compress_zlib(disk, 1)
            zstd = (
                compress_cli(disk, ["zstd", "-1", "-T1", "-c"], settings.home / "z")
                if shutil.which("zstd")
                else None
            )
        finally:
            await rt.close(kill_sandboxes=True)
    data = {
        "memory_logical_bytes": m.memory.bytes,
        "tmpfs_physical_bytes": tmpfs_bytes,
        "disk_physical_bytes": disk_bytes,
        "persist_s": persist,
        "restore_cold_s": restore_cold,
        "restore_warm_s": restore_warm,
        "fork_tmpfs_s": hot,
        "fork_after_reboot_s": after_reboot,
        "fork_direct_disk_map_cold_s": direct,
        "zlib1": {"bytes": zl1[0], "s": zl1[1]},
        "zstd1_cli": None if zstd is None else {"bytes": zstd[0], "s": zstd[1], "dec_s": zstd[2]},
    }
    rows = [
        ("guest memory (logical)", f"{m.memory.bytes / MiB:.0f} MiB"),
        ("tmpfs file (physical)", f"{tmpfs_bytes / MiB:.0f} MiB"),
        ("disk copy (sparse, zero blocks skipped)", f"{disk_bytes / MiB:.0f} MiB"),
        ("write the disk copy (copy + sha256 + fsync)", f"{median(persist):.2f} s"),
        ("restore tmpfs from it, cold page cache", f"{median(restore_cold):.2f} s"),
        ("restore tmpfs from it, warm page cache", f"{median(restore_warm):.2f} s"),
        ("fork until eval answers, tmpfs there", f"{median(hot) * 1000:.0f} ms"),
        ("first fork after a reboot (restore + fork)", f"{median(after_reboot) * 1000:.0f} ms"),
        ("alt: child maps the disk copy, cold cache", f"{median(direct) * 1000:.0f} ms"),
        ("zlib level 1 of the copy", f"{zl1[0] / MiB:.0f} MiB in {zl1[1]:.1f} s"),
    ]
    if zstd is not None:
        z = f"{zstd[0] / MiB:.0f} MiB in {zstd[1]:.1f} s, decompress {zstd[2]:.1f} s"
        rows.append(("zstd -1 (CLI, for reference)", z))
    md = "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    write_results("durable", data, md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
