"""Agent round trip: ``eval("1+1")`` direct to the agent vs through the daemon's REST API, and
a concurrency run of 20 sandboxes x 10 concurrent execs through the daemon.

    python bench/agent_rtt.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, percentile, running_daemon, scratch_settings, write_results

from forkd.config import Settings
from forkd.runtime.engine import Runtime

WARMUP = "import numpy"


async def direct(settings: Settings, calls: int) -> list[float]:
    rt = Runtime(dataclasses.replace(settings, warm_pool_size=0))
    await rt.start()
    try:
        sid = (await rt.spawn("bench", 1))[0].sandbox.id
        agent = await rt.agent(sid)
        for _ in range(20):
            await agent.eval("1+1")
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await agent.eval("1+1")
            out.append((time.perf_counter() - t0) * 1000)
        await rt.kill(sid)
        return out
    finally:
        await rt.close()


def via_daemon(url: str, calls: int) -> list[float]:
    """Round trips over one keep-alive connection with the stdlib client: what the daemon adds,
    not what a heavier HTTP client costs on the caller's side."""
    host, port = url.removeprefix("http://").split(":")
    with httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/sandboxes", json={"snapshot_tag": "bench"}).json()[0]["id"]
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"code": "1+1"})
    headers = {"Content-Type": "application/json"}

    def one() -> float:
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/sandboxes/{sid}/eval", body=body, headers=headers)
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        elapsed = (time.perf_counter() - t0) * 1000
        assert payload["result"] == "2"
        return elapsed

    for _ in range(20):
        one()
    out = [one() for _ in range(calls)]
    conn.close()
    with httpx.Client(base_url=url, timeout=60) as c:
        c.delete(f"/v1/sandboxes/{sid}")
    return out


async def concurrency(url: str, sandboxes: int, per_sandbox: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        spawned = await c.post("/v1/sandboxes", json={"snapshot_tag": "bench", "n": sandboxes})
        ids = [s["id"] for s in spawned.json()]

        async def one(sid: str, k: int) -> bool:
            r = await c.post(f"/v1/sandboxes/{sid}/exec",
                             json={"args": ["sh", "-c", f"echo {k}"]})  # fmt: skip
            return r.status_code == 200 and r.json()["stdout"] == f"{k}\n"

        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(one(sid, k) for sid in ids for k in range(per_sandbox)), return_exceptions=True
        )
        wall = time.perf_counter() - t0
        for sid in ids:
            await c.delete(f"/v1/sandboxes/{sid}")
    ok = sum(1 for r in results if r is True)
    return {"execs": len(results), "ok": ok, "errors": len(results) - ok, "wall_s": wall,
            "execs_per_s": len(results) / wall}  # fmt: skip


def main(args: argparse.Namespace) -> None:
    with scratch_settings() as settings, running_daemon(settings) as url:
        httpx.post(url + "/v1/snapshots", json={"tag": "bench", "warmup": WARMUP},
                   timeout=600).raise_for_status()  # fmt: skip
        # Side by side, alternating blocks, so both see the same machine.
        d, h = [], []
        for _ in range(3):
            d += asyncio.run(direct(settings, args.calls // 3))
            h += via_daemon(url, args.calls // 3)
        conc = asyncio.run(concurrency(url, 20, 10))
    added = median(h) - median(d)
    md = "\n".join([
        "| eval(\"1+1\") round trip | p50 | p99 |",
        "|---|---|---|",
        f"| direct to the agent | {median(d):.2f} ms | {percentile(d, 99):.2f} ms |",
        f"| through the daemon (HTTP keep-alive) | {median(h):.2f} ms | "
        f"{percentile(h, 99):.2f} ms |",
        f"| added by the daemon | {added:.2f} ms | |",
        "",
        f"20 sandboxes x 10 concurrent execs: {conc['ok']:.0f}/{conc['execs']:.0f} ok, "
        f"{conc['errors']:.0f} errors, {conc['execs_per_s']:.0f} execs/s "
        f"({conc['wall_s']:.1f} s wall)",
        "",
        f"{len(d)} calls each; `python bench/agent_rtt.py`",
    ]) + "\n"  # fmt: skip
    write_results("agent_rtt", {"direct_ms": d, "daemon_ms": h, "concurrency": conc}, md)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=300)
    main(p.parse_args())
