"""What the guest NIC and each egress policy cost a fork: time to first answer and host memory
per child, a template without a NIC and one with it measured side by side in one run.

python bench/network.py [--fork-runs 10] [--fanout 10] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, mem_available_bytes, pss_bytes, scratch_settings, write_results

from forkd import wire
from forkd.net.guard import probe
from forkd.runtime.engine import Runtime

WARMUP = "import numpy"
MiB = 1024 * 1024

# (row label, template, network request)
CASES: list[tuple[str, str, wire.NetworkRequest | None]] = [
    ("no NIC (template made without one)", "nonic", None),
    ("NIC, egress none (default)", "nic", None),
    ("NIC, egress internet (guard installed)", "nic", wire.NetworkRequest(egress="internet")),
    ("NIC, allowlist host:PORT + a domain (guard + proxy)", "nic",
     wire.NetworkRequest(egress="allowlist", allow=["host:9", "index.example.org"])),
]  # fmt: skip


async def fork_to_answer(rt: Runtime, tag: str, network: wire.NetworkRequest | None) -> float:
    await rt.settle()
    t0 = time.monotonic()
    sid = (await rt.spawn(tag, 1, network=network))[0].sandbox.id
    r = await rt.eval(sid, "numpy.__version__")
    elapsed = time.monotonic() - t0
    assert r.error is None
    await rt.kill(sid)
    return elapsed


async def fanout_memory(rt: Runtime, tag: str, n: int) -> tuple[float, float]:
    await rt.settle()
    await asyncio.sleep(1.0)
    avail0 = mem_available_bytes()
    spawned = await rt.spawn(tag, n)
    await asyncio.gather(*(rt.eval(s.sandbox.id, "1+1") for s in spawned))
    await asyncio.sleep(2.0)
    drop = (avail0 - mem_available_bytes()) / n / MiB
    pss = sum(pss_bytes(s.sandbox.pid) for s in spawned) / n / MiB
    for s in spawned:
        await rt.kill(s.sandbox.id)
    return drop, pss


async def main(args: argparse.Namespace) -> None:
    if probe() is not None:
        raise SystemExit(f"the egress guard is unavailable here: {probe()}")
    with scratch_settings() as settings:
        # One long-lived runtime (the daemon's: warm pool, allow-list proxies) and one without
        # a pool, so on-demand QEMU starts are measured too.
        pooled = Runtime(settings, watch=True)
        unpooled = Runtime(dataclasses.replace(settings, warm_pool_size=0), watch=True)
        await pooled.start()
        await unpooled.start()
        times: dict[tuple[str, bool], list[float]] = {}
        memory: dict[str, list[tuple[float, float]]] = {}
        try:
            await pooled.create_snapshot("nic", warmup=WARMUP)
            await pooled.create_snapshot("nonic", warmup=WARMUP, nic=False)
            for _ in range(args.fork_runs):  # interleaved: every row sees the same machine
                for label, tag, net in CASES:
                    for rt, is_pooled in ((pooled, True), (unpooled, False)):
                        times.setdefault((label, is_pooled), []).append(
                            await fork_to_answer(rt, tag, net)
                        )
            for _ in range(args.reps):
                for tag in ("nonic", "nic"):
                    memory.setdefault(tag, []).append(await fanout_memory(pooled, tag, args.fanout))
        finally:
            await unpooled.close(kill_sandboxes=True)
            await pooled.close(kill_sandboxes=True)
    base_pool = median(times[(CASES[0][0], True)])
    base_demand = median(times[(CASES[0][0], False)])
    lines = [
        f"accelerator: {pooled.accel.name}; {args.fork_runs} forks per row, interleaved",
        "",
        "| fork until `eval` answers | daemon (warm pool) | vs no NIC | on demand | vs no NIC |",
        "|---|---|---|---|---|",
    ]
    for label, _, net in CASES:
        pool_med = median(times[(label, True)])
        demand = median(times[(label, False)])
        # Open egress never uses the pool (its backend is fixed at QEMU start): say so.
        pool_cell = f"{pool_med * 1000:.0f} ms" + ("" if net is None else " (no pool)")
        lines.append(
            f"| {label} | {pool_cell} | {pool_med / base_pool:.2f}x | {demand * 1000:.0f} ms | "
            f"{demand / base_demand:.2f}x |"
        )
    lines += [
        "",
        f"| host memory per idle child, N = {args.fanout} | MemAvailable drop | summed PSS |",
        "|---|---|---|",
    ]
    for tag, label in (("nonic", "no NIC"), ("nic", "NIC, egress none")):
        runs = memory[tag]
        lines.append(
            f"| {label} | {median([r[0] for r in runs]):.1f} MiB | "
            f"{median([r[1] for r in runs]):.1f} MiB |"
        )
    lines += ["", f"medians; memory over {args.reps} repetitions; `python bench/network.py`"]
    summary = {
        "fork_s": {f"{label} | {'pool' if p else 'demand'}": v for (label, p), v in times.items()},
        "memory_mib": memory,
    }
    write_results("network", summary, "\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--fork-runs", type=int, default=10)
    p.add_argument("--fanout", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    asyncio.run(main(p.parse_args()))
