"""Fan-out as a user sees it: N sandboxes, each answering a first call, against N bubblewrap
sandboxes of the host's own Python (the usual choice where KVM is missing), side by side.

    python bench/fanout.py [--n 1,10,30,100,300] [--reps 3]

forkd: one ``POST /v1/sandboxes`` with ``n=N`` to a real daemon, then every child evaluates
``numpy.zeros(5).tolist()`` (concurrently); the wall time until the last answer. bwrap: N
``bwrap --unshare-all ... python3 -c 'import numpy; print(numpy.zeros(5).tolist())'`` started
at once; the wall time until the last exits. Plain ``python3 -c`` (no sandbox) is the floor.
Repetitions interleave the three. Needs ``bwrap`` (Debian's bubblewrap) and a host Python with
numpy (``--python``; default the first of this interpreter and ``python3`` that has it).
Writes bench/results/fanout.{csv,md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RESULTS,
    cpu_seconds,
    median,
    mem_available_bytes,
    pss_bytes,
    running_daemon,
    scratch_settings,
    write_results,
)

from forkd.vmm.accel import detect_accel

CODE = "numpy.zeros(5).tolist()"
NATIVE = "import numpy; print(numpy.zeros(5).tolist())"
TEMPLATE = "fanout"
LOOP_TIMEOUT_S = 900.0
MiB = 1024 * 1024
IDLE_WINDOW_S = 10.0
POOL_SETTLE_S = 3.0  # refills run at low priority: give them time before a pool-hit sample
MEMORY_N = 100  # the N whose idle children's memory is measured (or the largest below it)


def bwrap_argv(python: str) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SystemExit("bwrap not found: apt-get install bubblewrap")
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            python, "-c", NATIVE]  # fmt: skip


async def run_processes(argv: list[str], n: int) -> float:
    t0 = time.monotonic()
    procs = [
        await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(n)
    ]
    outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), LOOP_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert all(p.returncode == 0 for p in procs), "a native sandbox failed"
    assert all(out.strip() == b"[0.0, 0.0, 0.0, 0.0, 0.0]" for out, _ in outs)
    return elapsed


async def run_forkd(
    api: httpx.AsyncClient,
    n: int,
    memory: dict[str, list[float]] | None = None,
    pooled: list[bool] | None = None,
) -> float:
    """Wall time until every one of ``n`` children answered; with ``memory``, also record the
    idle children's mean PSS and the host's MemAvailable drop per child (MiB)."""
    available = mem_available_bytes()
    t0 = time.monotonic()
    r = await api.post("/v1/sandboxes", json={"snapshot_tag": TEMPLATE, "n": n})
    r.raise_for_status()
    ids = [s["id"] for s in r.json()]
    answers = await asyncio.wait_for(
        asyncio.gather(*(api.post(f"/v1/sandboxes/{i}/eval", json={"code": CODE}) for i in ids)),
        LOOP_TIMEOUT_S,
    )
    elapsed = time.monotonic() - t0
    assert all(a.json()["result"] == "[0.0, 0.0, 0.0, 0.0, 0.0]" for a in answers)
    if pooled is not None:
        pooled += [bool(s["fork_timing_ms"].get("pooled")) for s in r.json()]
    if memory is not None:
        await asyncio.sleep(3.0)  # idle: the pool refilled, nothing in flight
        pids = [s["pid"] for s in r.json()]
        memory.setdefault("pss_mib", []).append(sum(map(pss_bytes, pids)) / n / MiB)
        drop = (available - mem_available_bytes()) / n / MiB
        memory.setdefault("available_drop_mib", []).append(drop)
        before = sum(map(cpu_seconds, pids))
        await asyncio.sleep(IDLE_WINDOW_S)
        idle = (sum(map(cpu_seconds, pids)) - before) / n / IDLE_WINDOW_S * 1000
        memory.setdefault("idle_cpu_ms_per_s", []).append(idle)
    await asyncio.gather(*(api.delete(f"/v1/sandboxes/{i}") for i in ids))
    return elapsed


async def one_child_from_the_pool(api: httpx.AsyncClient, reps: int) -> list[float]:
    """N = 1 spawn-to-first-result, each time from a settled (full) hot pool; only hits count."""
    hits: list[float] = []
    for _ in range(reps * 3):
        await asyncio.sleep(POOL_SETTLE_S)
        pooled: list[bool] = []
        elapsed = await run_forkd(api, 1, pooled=pooled)
        if all(pooled):
            hits.append(elapsed)
        if len(hits) >= reps * 2:
            break
    if not hits:
        raise SystemExit("the hot pool never handed out a child (FORKD_WARM_POOL=0?)")
    return hits


def host_python(given: str | None) -> str:
    """A host Python that imports numpy (the native arm needs it)."""
    import subprocess

    for candidate in (given, sys.executable, shutil.which("python3")):
        if not candidate:
            continue
        probe = subprocess.run([candidate, "-c", "import numpy"], capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    raise SystemExit("no host Python with numpy: pass --python PATH")


async def main(args: argparse.Namespace) -> None:
    python = host_python(args.python)
    rows: dict[int, dict[str, list[float]]] = {}
    memory: dict[str, list[float]] = {}
    memory_n = max((n for n in args.n if n <= MEMORY_N), default=min(args.n))
    os.environ["FORKD_MAX_SANDBOXES"] = str(max(args.n) + 16)
    limits = httpx.Limits(max_connections=64)
    with scratch_settings() as settings, running_daemon(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=LOOP_TIMEOUT_S, limits=limits) as api:
            r = await api.post("/v1/snapshots", json={"tag": TEMPLATE, "warmup": "import numpy"})
            r.raise_for_status()
            for _ in range(args.reps):  # interleaved: each arm sees the same machine
                for n in args.n:
                    row = rows.setdefault(n, {"forkd": [], "bwrap": [], "python": []})
                    await asyncio.sleep(2.0)  # let the previous round's processes go
                    row["forkd"].append(await run_forkd(api, n, memory if n == memory_n else None))
                    row["bwrap"].append(await run_processes(bwrap_argv(python), n))
                    row["python"].append(await run_processes([python, "-c", NATIVE], n))
            hits = await one_child_from_the_pool(api, args.reps)
        # Misses: the same template through a daemon that keeps no pool.
        os.environ["FORKD_WARM_POOL"] = "0"
        with running_daemon(settings) as cold_url:
            async with httpx.AsyncClient(base_url=cold_url, timeout=LOOP_TIMEOUT_S) as api:
                misses = [await run_forkd(api, 1) for _ in range(args.reps)]
    accel = detect_accel(settings.accel)
    lines = [
        f"accelerator: {accel.name} ({accel.reason}); {os.cpu_count()} host CPUs; medians of "
        f"{args.reps} interleaved repetitions",
        "",
        "| N | forkd (REST, first result) | bwrap + host python | plain python | bwrap / forkd |",
        "|---|---|---|---|---|",
    ]
    table: list[list[object]] = [["n", "forkd_s", "bwrap_s", "python_s"]]
    for n, row in rows.items():
        f, b, p = median(row["forkd"]), median(row["bwrap"]), median(row["python"])
        table.append([n, f, b, p])
        lines.append(f"| {n} | {_t(f)} | {_t(b)} | {_t(p)} | {b / f:.2f}x |")
    lines += [
        "",
        f"N = 1 from the hot pool: {_t(median(hits))} (p50 of {len(hits)}); pool miss (a daemon "
        f"with no pool, QEMU started on demand): {_t(median(misses))} (p50 of {len(misses)})",
        "",
        f"per child at the largest N: forkd {_t(f / n)}, bwrap {_t(b / n)}",
    ]
    if memory:
        lines.append(
            f"idle children at N = {memory_n}: PSS {median(memory['pss_mib']):.1f} MiB per child, "
            f"host MemAvailable drop {median(memory['available_drop_mib']):.1f} MiB per child, "
            f"host CPU {median(memory['idle_cpu_ms_per_s']):.1f} ms per second per idle child"
        )
    lines += ["", "`python bench/fanout.py`"]
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "fanout.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(table)
    data = {"accel": accel.name, "rows": rows, "memory": memory, "pool_hit_s": hits,
            "pool_miss_s": misses}  # fmt: skip
    write_results("fanout", data, "\n".join(lines) + "\n")
    _chart(rows)  # last: the numbers are kept even where the bench extra is missing


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _chart(rows: dict[int, dict[str, list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, label in (("forkd", "forkd"), ("bwrap", "bwrap + python"), ("python", "python")):
        ax.plot(ns, [median(rows[n][arm]) for n in ns], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sandboxes (N)")
    ax.set_ylabel("wall time to the last first result (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fanout.png", dpi=120)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 10, 30, 100, 300])  # fmt: skip
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--python", help="host Python with numpy for the native arms")
    asyncio.run(main(p.parse_args()))
