"""Capacity: how many idle children fit on this host, spawned in batches through the REST API.

    python bench/capacity.py [--max 700] [--batch 50] [--reserve-mib 2048] [--minutes 20]

Batches of ``--batch`` children of the default numpy template, each child answering one
``eval``, until ``--max`` children run, host MemAvailable falls under ``--reserve-mib``, or the
time bound passes. After every batch: MemAvailable, the mean PSS of a sample of children and
the host CPU the idle children use. Reports the children reached, the MemAvailable drop per
child, and how many would fit down to the reserve at that rate. Every child is deleted at the
end. Writes bench/results/capacity.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    cpu_seconds,
    mem_available_bytes,
    pss_bytes,
    running_daemon,
    scratch_settings,
    write_results,
)

TEMPLATE = "capacity"
MiB = 1024 * 1024
PSS_SAMPLE = 20
IDLE_WINDOW_S = 5.0


async def main(args: argparse.Namespace) -> None:
    os.environ["FORKD_MAX_SANDBOXES"] = str(args.max + 16)
    os.environ["FORKD_WARM_POOL"] = "0"  # every child counted is a user's child
    deadline = time.monotonic() + args.minutes * 60
    batches: list[dict[str, float]] = []
    ids: list[str] = []
    pids: list[int] = []
    with scratch_settings() as settings, running_daemon(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=1800) as api:
            r = await api.post("/v1/snapshots", json={"tag": TEMPLATE, "warmup": "import numpy"})
            r.raise_for_status()
            start_available = mem_available_bytes()
            reason = f"reached --max {args.max}"
            try:
                while len(ids) < args.max:
                    if time.monotonic() > deadline:
                        reason = f"time bound of {args.minutes} min"
                        break
                    # room for two more batches at the rate measured so far (64 MiB a child
                    # before the first measurement), so a batch never eats into the reserve
                    per_child = batches[-1]["drop_per_child_mib"] if batches else 64.0
                    room = (args.reserve_mib + 2 * args.batch * per_child) * MiB
                    if mem_available_bytes() < room:
                        reason = f"MemAvailable near the {args.reserve_mib} MiB reserve"
                        break
                    n = min(args.batch, args.max - len(ids))
                    t0 = time.monotonic()
                    r = await api.post("/v1/sandboxes", json={"snapshot_tag": TEMPLATE, "n": n})
                    if r.status_code >= 400:
                        reason = f"spawn answered {r.status_code}: {r.text[:200]}"
                        break
                    new = r.json()
                    answers = await asyncio.gather(*(
                        api.post(f"/v1/sandboxes/{s['id']}/eval", json={"code": "1+1"})
                        for s in new
                    ))  # fmt: skip
                    assert all(a.json().get("result") == "2" for a in answers)
                    spawn_s = time.monotonic() - t0
                    ids += [s["id"] for s in new]
                    pids += [s["pid"] for s in new]
                    await asyncio.sleep(2.0)
                    before = sum(map(cpu_seconds, pids))
                    await asyncio.sleep(IDLE_WINDOW_S)
                    idle_ms = (sum(map(cpu_seconds, pids)) - before) / len(pids) / IDLE_WINDOW_S
                    sample = random.sample(pids, min(PSS_SAMPLE, len(pids)))
                    batch = {
                        "children": len(ids),
                        "spawn_s": spawn_s,
                        "available_mib": mem_available_bytes() / MiB,
                        "drop_per_child_mib": (start_available - mem_available_bytes())
                        / len(ids)
                        / MiB,
                        "pss_mib": sum(map(pss_bytes, sample)) / len(sample) / MiB,
                        "idle_cpu_ms_per_s": idle_ms * 1000,
                    }
                    batches.append(batch)
                    print(batch, flush=True)
            finally:
                for i in range(0, len(ids), 50):
                    await asyncio.gather(
                        *(api.delete(f"/v1/sandboxes/{s}") for s in ids[i : i + 50])
                    )
    if not batches:
        raise SystemExit(f"no batch completed: {reason}")
    last = batches[-1]
    fit = int(len(ids) + (last["available_mib"] - args.reserve_mib) / last["drop_per_child_mib"])
    lines = [
        "| children | spawn of the batch | MemAvailable | drop per child | PSS per child | "
        "idle CPU per child |",
        "|---|---|---|---|---|---|",
        *(
            f"| {b['children']:.0f} | {b['spawn_s']:.1f} s | {b['available_mib'] / 1024:.1f} GiB | "
            f"{b['drop_per_child_mib']:.1f} MiB | {b['pss_mib']:.1f} MiB | "
            f"{b['idle_cpu_ms_per_s']:.1f} ms/s |"
            for b in batches
        ),
        "",
        f"stopped: {reason}. At the last batch's rate, {fit} idle children fit down to a "
        f"{args.reserve_mib} MiB reserve.",
        "",
        "`python bench/capacity.py`",
    ]
    write_results(
        "capacity", {"batches": batches, "reason": reason, "fit": fit}, "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--max", type=int, default=700)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--reserve-mib", type=int, default=2048)
    p.add_argument("--minutes", type=float, default=20.0)
    asyncio.run(main(p.parse_args()))
