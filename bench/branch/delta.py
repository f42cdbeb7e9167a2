"""Branches as deltas, through the REST API: a fresh source branched at once, the speculative
recipe (spawn, branch, fan out 3, first result), storage after many branches of one sandbox, and
PSS of children of different branches against children of the template itself.

    python bench/branch/delta.py [--iterations 10] [--many 100]

The default 512 MiB numpy template. Writes bench/results/branch_delta.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import median, percentile, pss_bytes, running_daemon, scratch_settings, write_results

MiB = 1024 * 1024
TEMPLATE = "bench"
WARMUP = "import numpy"


def ok(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
    return r.json() if r.content else None


def spawn(api: httpx.Client, tag: str, n: int = 1) -> list[str]:
    return [s["id"] for s in ok(api.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": n}))]


def fresh_branch(api: httpx.Client, mode: str) -> dict[str, float]:
    """Spawn, change a little, branch at once; the branch's pause, round trip and storage."""
    [sid] = spawn(api, TEMPLATE)
    ok(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": "X = numpy.arange(1000).sum()"}))
    t0 = time.monotonic()
    info = ok(api.post(f"/v1/sandboxes/{sid}/branch", json={"mode": mode}))
    rtt = (time.monotonic() - t0) * 1000
    ok(api.delete(f"/v1/sandboxes/{sid}"))
    ok(api.delete(f"/v1/snapshots/{info['tag']}"))
    return {"pause_ms": info["pause_ms"], "rtt_ms": rtt,
            "stored_mib": (info.get("stored_bytes") or 0) / MiB,
            "written_mib": (info.get("bytes_written") or 0) / MiB}  # fmt: skip


def speculative(api: httpx.Client) -> float:
    """The original forkd's recipe: spawn, diff branch, fan out 3, first result."""
    t0 = time.monotonic()
    [sid] = spawn(api, TEMPLATE)
    ok(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": "PLAN = [1, 2, 3]"}))
    info = ok(api.post(f"/v1/sandboxes/{sid}/branch", json={"diff": True}))
    kids = spawn(api, info["tag"], 3)
    ok(api.post(f"/v1/sandboxes/{kids[0]}/eval", json={"code": "sum(PLAN)"}))
    elapsed = (time.monotonic() - t0) * 1000
    for k in [sid, *kids]:
        ok(api.delete(f"/v1/sandboxes/{k}"))
    ok(api.delete(f"/v1/snapshots/{info['tag']}"))
    return elapsed


def memory_dir_mib(memory_dir: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in memory_dir.iterdir() if p.is_file()) / MiB


def delta_files_mib(snapshots_dir: Path) -> float:
    """Delta branches keep their pages on disk, in their snapshot dirs."""
    return sum(p.stat().st_blocks * 512 for p in snapshots_dir.glob("*/delta")) / MiB


def many_branches(
    api: httpx.Client, memory_dir: Path, snapshots_dir: Path, count: int
) -> dict[str, float]:
    before = memory_dir_mib(memory_dir)
    deltas_before = delta_files_mib(snapshots_dir)
    [sid] = spawn(api, TEMPLATE)
    tags = []
    for i in range(count):
        ok(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": f"STEP = {i}"}))
        tags.append(ok(api.post(f"/v1/sandboxes/{sid}/branch", json={"mode": "diff"}))["tag"])
    used = memory_dir_mib(memory_dir) - before
    deltas = delta_files_mib(snapshots_dir) - deltas_before
    ok(api.delete(f"/v1/sandboxes/{sid}"))
    for t in tags:
        ok(api.delete(f"/v1/snapshots/{t}"))
    return {"branches": count, "memory_files_mib": used, "delta_files_mib": deltas}


def pss_children(api: httpx.Client) -> dict[str, float]:
    """PSS per child: 4 children of the template vs 2 children each of two branches."""
    [src] = spawn(api, TEMPLATE)
    branches = []
    for i in range(2):
        ok(api.post(f"/v1/sandboxes/{src}/eval", json={"code": f"B = {i}"}))
        branches.append(ok(api.post(f"/v1/sandboxes/{src}/branch", json={"mode": "diff"}))["tag"])
    plain = spawn(api, TEMPLATE, 4)
    mixed = [k for tag in branches for k in spawn(api, tag, 2)]
    for k in plain + mixed:
        ok(api.post(f"/v1/sandboxes/{k}/eval", json={"code": "1+1"}))
    time.sleep(2.0)
    pids = {s["id"]: s["pid"] for s in ok(api.get("/v1/sandboxes"))}
    out = {
        "template_children_pss_mib": median([pss_bytes(pids[k]) / MiB for k in plain]),
        "branch_children_pss_mib": median([pss_bytes(pids[k]) / MiB for k in mixed]),
    }
    for k in [src, *plain, *mixed]:
        ok(api.delete(f"/v1/sandboxes/{k}"))
    for t in branches:
        ok(api.delete(f"/v1/snapshots/{t}"))
    return out


def main(args: argparse.Namespace) -> None:
    with (
        scratch_settings() as settings,
        running_daemon(settings) as url,
        httpx.Client(base_url=url, timeout=900) as api,
    ):
        if True:
            ok(api.post("/v1/snapshots", json={"tag": TEMPLATE, "warmup": WARMUP}))
            rows: dict[str, list[dict[str, float]]] = {"diff": [], "live": []}
            spec: list[float] = []
            for _ in range(args.iterations):  # interleaved: every row sees the same machine
                for mode in ("diff", "live"):
                    rows[mode].append(fresh_branch(api, mode))
                spec.append(speculative(api))
            storage = many_branches(api, settings.memory_dir, settings.snapshots_dir, args.many)
            pss = pss_children(api)
    lines = [
        f"{args.iterations} interleaved iterations; default 512 MiB numpy template; REST API",
        "",
        "| fresh source, branched at once | pause p50 | pause p90 | round trip p50 | "
        "round trip p90 | stored p50 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, runs in rows.items():
        pause = [r["pause_ms"] for r in runs]
        rtt = [r["rtt_ms"] for r in runs]
        lines.append(
            f"| {mode} | {median(pause):.1f} ms | {percentile(pause, 90):.1f} ms | "
            f"{median(rtt):.0f} ms | {percentile(rtt, 90):.0f} ms | "
            f"{median([r['stored_mib'] for r in runs]):.1f} MiB |"
        )
    lines += [
        "",
        f"speculative (spawn, diff branch, fan out 3, first result): p50 {median(spec):.0f} ms, "
        f"p90 {percentile(spec, 90):.0f} ms",
        "",
        f"{storage['branches']:.0f} diff branches of one sandbox (a small change before each): "
        f"{storage['memory_files_mib']:.0f} MiB of memory files on tmpfs and "
        f"{storage['delta_files_mib']:.1f} MiB of delta files on disk in all",
        "",
        f"PSS per idle child: of the template {pss['template_children_pss_mib']:.1f} MiB, of two "
        f"different branches {pss['branch_children_pss_mib']:.1f} MiB",
        "",
        "`python bench/branch/delta.py`",
    ]
    write_results("branch_delta", {"rows": rows, "speculative_ms": spec, "storage": storage,
                                   "pss": pss}, "\n".join(lines) + "\n")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--many", type=int, default=100)
    main(p.parse_args())
