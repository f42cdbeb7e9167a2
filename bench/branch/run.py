"""BRANCH benchmark through the REST API: pause and HTTP round trip per mode.

One source with 1 GiB of guest RAM, >= 512 MiB resident (numpy plus a 512 MiB buffer made in the
template's warm-up); in the source a thread keeps dirtying a 16 MiB hot region of the buffer.
Iterations interleave live-sync, live-async, diff and full; each records QEMU's pause (STOP to
RESUME) and the HTTP round trip, waits until the snapshot is ready, then deletes it. By default the
whole protocol runs twice in one invocation, guest memory on forkd's huge-page tmpfs (the default
as root) and on plain /dev/shm (``FORKD_HUGE_MEMORY=0``), so the two are compared side by side.

    python bench/branch/run.py [--iterations 10] [--memory both|huge|plain]

Writes bench/results/branch.{csv,md,json,png}.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, median, percentile, running_daemon, scratch_settings, write_results

from forkd.snapshots.memfs import access_samplers, free_page_reporting

WARMUP = "import numpy\nBUF = numpy.ones(64 << 20)  # 512 MiB resident\n"
DIRTY = """
import threading, time
def _dirty():
    hot = BUF[: 2 << 20]  # 16 MiB hot region
    i = 0
    while True:
        hot[(i * 4099) % hot.size] += 1.0
        i += 1
        if i % 512 == 0:
            time.sleep(0.01)
threading.Thread(target=_dirty, daemon=True).start()
"""
SETTLE_S = 1.0
MEMORY_KINDS = ("huge", "plain")
MEMORY_LABELS = {
    "huge": "forkd's huge-page tmpfs (the default as root)",
    "plain": "plain /dev/shm (FORKD_HUGE_MEMORY=0)",
}
KINDS = (("live-sync", "live", True), ("live-async", "live", False), ("diff", "diff", True),
         ("full", "full", True))  # fmt: skip


def wait_ready(c: httpx.Client, tag: str) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = c.get(f"/v1/snapshots/{tag}/info").json()
        if info["status"] != "writing":
            return info
        time.sleep(0.05)


def main(args: argparse.Namespace) -> None:
    rows: list[dict[str, object]] = []
    for memory in MEMORY_KINDS if args.memory == "both" else (args.memory,):
        rows += run(memory, args.iterations)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "branch.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report(rows, args.iterations)


def run(memory: str, iterations: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    settings_cm = scratch_settings(huge_memory=memory == "huge")
    with settings_cm as settings, running_daemon(settings) as url:
        c = httpx.Client(base_url=url, timeout=1800)
        r = c.post("/v1/snapshots", json={"tag": "src", "mem_mib": 1024, "warmup": WARMUP})
        r.raise_for_status()
        sid = c.post("/v1/sandboxes", json={"snapshot_tag": "src"}).json()[0]["id"]
        c.post(f"/v1/sandboxes/{sid}/eval", json={"code": DIRTY}).raise_for_status()
        time.sleep(2)
        for i in range(iterations):
            for kind, mode, wait in KINDS:
                tag = f"b{i}-{kind}"
                body: dict[str, object] = {"tag": tag, "mode": mode}
                if not wait:
                    body["wait"] = False
                t0 = time.perf_counter()
                resp = c.post(f"/v1/sandboxes/{sid}/branch", json=body)
                rtt_ms = (time.perf_counter() - t0) * 1000
                resp.raise_for_status()
                info = wait_ready(c, tag)
                assert info["status"] == "ready", info
                rows.append({
                    "memory": memory, "iteration": i, "kind": kind, "http_status": resp.status_code,
                    "pause_ms": round(info["pause_ms"], 2), "http_rtt_ms": round(rtt_ms, 2),
                    "total_ms": round(info["total_ms"], 1), "bytes_written": info["bytes_written"],
                })  # fmt: skip
                print(rows[-1], flush=True)
                c.delete(f"/v1/snapshots/{tag}").raise_for_status()
                # The daemon hashes a finished snapshot in the background: let that end so each
                # measurement starts on a quiet machine.
                time.sleep(SETTLE_S)
        alive = c.post(f"/v1/sandboxes/{sid}/eval", json={"code": "float(BUF[:16].sum())"})
        assert alive.status_code == 200
    return rows


def report(rows: list[dict[str, object]], iterations: int) -> None:
    table: list[str] = []
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for memory in MEMORY_KINDS:
        mine = [r for r in rows if r.get("memory", "plain") == memory]
        if not mine:
            continue
        stats[memory] = summarize(mine)
        table += [f"guest memory: {MEMORY_LABELS[memory]}", "", *markdown(stats[memory]), ""]
    samplers = access_samplers()
    table.append(
        f"{iterations} interleaved iterations per memory kind, 1 GiB source, >= 512 MiB "
        "resident, both kinds in one run; `python bench/branch/run.py`. Host facts that change "
        "huge-page costs (docs/branch.md): DAMON access sampling "
        + (", ".join(s.label for s in samplers) if samplers else "none")
        + "; free page reporting to a hypervisor "
        + ("on" if free_page_reporting() else "off")
    )
    chart(rows)
    write_results("branch", stats, "\n".join(table) + "\n")


def summarize(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for kind, _, _ in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        pause = [float(r["pause_ms"]) for r in sel]  # type: ignore[arg-type]
        rtt = [float(r["http_rtt_ms"]) for r in sel]  # type: ignore[arg-type]
        total = [float(r["total_ms"]) for r in sel]  # type: ignore[arg-type]
        stats[kind] = {"pause_p50": median(pause), "pause_p90": percentile(pause, 90),
                       "rtt_p50": median(rtt), "rtt_p90": percentile(rtt, 90),
                       "total_p50": median(total)}  # fmt: skip
    return stats


def markdown(stats: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| mode | pause p50 | pause p90 | HTTP round trip p50 | round trip p90 | total p50 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for kind, s in stats.items():
        lines.append(
            f"| {kind} | {s['pause_p50']:.1f} ms | {s['pause_p90']:.1f} ms | "
            f"{s['rtt_p50']:.0f} ms | {s['rtt_p90']:.0f} ms | {s['total_p50']:.0f} ms |"
        )
    live, full = stats["live-sync"]["pause_p50"], stats["full"]["pause_p50"]
    lines += ["", f"full pause / live pause: {full / live:.0f}x; "
              f"diff pause / full pause: {stats['diff']['pause_p50'] / full:.2f}"]  # fmt: skip
    return lines


def chart(rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memories = [m for m in MEMORY_KINDS if any(r.get("memory", "plain") == m for r in rows)]
    fig, axes = plt.subplots(len(memories), 2, figsize=(10, 4 * len(memories)), squeeze=False)
    kinds = [k for k, _, _ in KINDS]
    for (ax1, ax2), memory in zip(axes, memories, strict=True):
        mine = [r for r in rows if r.get("memory", "plain") == memory]
        for ax, key, title in ((ax1, "pause_ms", "guest pause (ms, log)"),
                               (ax2, "http_rtt_ms", "HTTP round trip (ms, log)")):  # fmt: skip
            data = [[float(r[key]) for r in mine if r["kind"] == k] for k in kinds]  # type: ignore[arg-type]
            ax.boxplot(data, tick_labels=kinds)
            ax.set_yscale("log")
            ax.set_title(f"{title}, {memory} memory")
    fig.suptitle("forkd BRANCH on a 1 GiB source (QEMU TCG)")
    fig.tight_layout()
    fig.savefig(RESULTS / "branch.png", dpi=110)


def report_from_csv() -> None:
    with (RESULTS / "branch.csv").open() as f:
        rows: list[dict[str, object]] = list(csv.DictReader(f))
    report(rows, len({r["iteration"] for r in rows}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--memory", choices=("both", *MEMORY_KINDS), default="both")
    p.add_argument("--report-only", action="store_true", help="redraw from results/branch.csv")
    parsed = p.parse_args()
    report_from_csv() if parsed.report_only else main(parsed)
