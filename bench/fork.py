"""Cold boot + warm-up vs fork, and fan-out N = 1, 10, 30 with host memory per child.

python bench/fork.py [--cold-runs 3] [--fork-runs 10] [--fanout 1,10,30] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    median,
    mem_available_bytes,
    pss_bytes,
    scratch_settings,
    write_results,
)

from forkd.runtime.engine import Runtime

WARMUP = "import numpy"
MiB = 1024 * 1024


async def cold_boot(rt: Runtime, i: int) -> float:
    """Seconds from QEMU start until the warmed interpreter answered (boot + agent + warm-up)."""
    tag = f"cold{i}"
    await rt.create_snapshot(tag, warmup=WARMUP)
    timings = rt.snapshots.load(tag).timings_ms
    await rt.delete_snapshot(tag)
    return (timings["boot_ms"] + timings["warmup_ms"]) / 1000


async def fork_to_answer(rt: Runtime, tag: str) -> float:
    await rt.settle()  # a pooled runtime gets its pre-launched children back between forks
    t0 = time.monotonic()
    sid = (await rt.spawn(tag, 1))[0].sandbox.id
    r = await rt.eval(sid, "numpy.__version__")
    elapsed = time.monotonic() - t0
    assert r.error is None
    await rt.kill(sid)
    return elapsed


async def fanout(rt: Runtime, tag: str, n: int) -> dict[str, float]:
    await asyncio.sleep(1.0)
    avail0 = mem_available_bytes()
    t0 = time.monotonic()
    spawned = await rt.spawn(tag, n)
    results = await asyncio.gather(*(rt.eval(s.sandbox.id, "1+1") for s in spawned))
    wall = time.monotonic() - t0
    assert all(r.result == "2" for r in results)
    await asyncio.sleep(2.0)  # let the children settle idle before reading memory
    avail1 = mem_available_bytes()
    pss = sum(pss_bytes(s.sandbox.pid) for s in spawned)
    for s in spawned:
        await rt.kill(s.sandbox.id)
    return {
        "wall_s": wall,
        "per_child_ms": wall / n * 1000,
        "mem_available_drop_per_child_mib": (avail0 - avail1) / n / MiB,
        "pss_per_child_mib": pss / n / MiB,
    }


async def main(args: argparse.Namespace) -> None:
    with scratch_settings() as settings:
        rt = Runtime(settings)  # the daemon's configuration: a warm pool of pre-launched QEMUs
        unpooled = Runtime(dataclasses.replace(settings, warm_pool_size=0))
        await rt.start()
        await unpooled.start()
        try:
            await rt.create_snapshot("bench", warmup=WARMUP)
            cold, fork, fork_nopool = [], [], []
            # Interleaved so all three see the same machine conditions.
            for i in range(max(args.cold_runs, args.fork_runs)):
                if i < args.cold_runs:
                    cold.append(await cold_boot(unpooled, i))
                if i < args.fork_runs:
                    fork.append(await fork_to_answer(rt, "bench"))
                    fork_nopool.append(await fork_to_answer(unpooled, "bench"))
            fan: dict[int, list[dict[str, float]]] = {}
            await rt.settle()
            for _ in range(args.reps):
                for n in args.fanout:
                    fan.setdefault(n, []).append(await fanout(rt, "bench", n))
        finally:
            await unpooled.close()
            await rt.close(kill_sandboxes=True)
    cold_med, fork_med, nopool_med = median(cold), median(fork), median(fork_nopool)
    lines = [
        f"accelerator: {rt.accel.name} ({rt.accel.reason})",
        "",
        "| measure | median |",
        "|---|---|",
        f"| cold boot + `import numpy` until eval answers ({len(cold)} runs) | {cold_med:.2f} s |",
        f"| fork one child until eval answers, warm pool ({len(fork)} runs) | "
        f"{fork_med * 1000:.0f} ms |",
        f"| fork one child until eval answers, QEMU started on demand | "
        f"{nopool_med * 1000:.0f} ms |",
        f"| ratio cold / fork (pool) | **{cold_med / fork_med:.0f}x** |",
        f"| ratio cold / fork (no pool) | **{cold_med / nopool_med:.0f}x** |",
        "",
        "| N | wall | per child | MemAvailable drop / child | PSS / child |",
        "|---|---|---|---|---|",
    ]
    summary: dict[str, object] = {
        "cold_s": cold, "fork_s": fork, "fork_nopool_s": fork_nopool, "fanout": {},
    }  # fmt: skip
    for n, runs in fan.items():
        med = {k: median([r[k] for r in runs]) for k in runs[0]}
        summary["fanout"][n] = runs  # type: ignore[index]
        lines.append(
            f"| {n} | {med['wall_s']:.2f} s | {med['per_child_ms']:.0f} ms | "
            f"{med['mem_available_drop_per_child_mib']:.1f} MiB | "
            f"{med['pss_per_child_mib']:.1f} MiB |"
        )
    lines.append("")
    lines.append(f"medians of {args.reps} repetitions; `python bench/fork.py`")
    write_results("fork", summary, "\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--fork-runs", type=int, default=10)
    p.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 30])
    p.add_argument("--reps", type=int, default=3)
    asyncio.run(main(p.parse_args()))
