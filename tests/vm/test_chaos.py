"""A bounded chaos run through the real API (in-process app, real runtime and VMs): concurrent
spawn, eval, exec, branch and kill while QEMUs are killed with SIGKILL at random. Every answer
is a success or a clean 4xx/503 with a reason, never a 500; afterwards every snapshot is ready
or failed, and no QEMU, run dir or cgroup leaf of the run is left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from forkd.api.app import create_app
from forkd.runtime.engine import Runtime
from forkd.vmm.qemu import pid_alive

pytestmark = pytest.mark.vm

RUN_S = 40.0
WORKERS = 3


async def test_chaos_never_answers_500(runtime: Runtime, template: str, tmp_path: Path) -> None:
    app = create_app(runtime, token=None, audit_log=tmp_path / "audit.log")
    transport = httpx.ASGITransport(app=app)
    rng = random.Random(10)
    live: set[str] = set()
    pids: dict[str, int] = {}
    run_dirs: list[Path] = []
    branches: list[str] = []
    seen: Counter[str] = Counter()
    bad: list[str] = []
    deadline = time.monotonic() + RUN_S

    async def one(c: httpx.AsyncClient) -> None:
        op = rng.choice(["spawn", "spawn", "eval", "exec", "branch", "kill", "kill9", "kill9"])
        if op == "spawn" or not live:
            op = "spawn"
            r = await c.post("/v1/sandboxes", json={"snapshot_tag": template, "n": 1})
            if r.status_code == 201:
                for s in r.json():
                    live.add(s["id"])
                    pids[s["id"]] = s["pid"]
                    run_dirs.append(Path(s["run_dir"]))
        else:
            sid = rng.choice(sorted(live))
            if op == "eval":
                r = await c.post(f"/v1/sandboxes/{sid}/eval", json={"code": "6 * 7"})
            elif op == "exec":
                r = await c.post(f"/v1/sandboxes/{sid}/exec", json={"args": ["true"]})
            elif op == "branch":
                mode = rng.choice(["full", "diff", "live"])
                r = await c.post(f"/v1/sandboxes/{sid}/branch", json={"mode": mode})
                if r.status_code == 201:
                    branches.append(r.json()["tag"])
            elif op == "kill":
                live.discard(sid)
                r = await c.delete(f"/v1/sandboxes/{sid}")
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[sid], signal.SIGKILL)
                seen["kill9"] += 1
                return
        seen[f"{op} {r.status_code}"] += 1
        if r.status_code >= 500 and r.status_code not in (502, 503, 504):
            bad.append(f"{op} -> {r.status_code}: {r.text[:300]}")
        elif r.status_code >= 400 and not r.json().get("error"):
            bad.append(f"{op} -> {r.status_code} without a reason: {r.text[:300]}")

    async def worker() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as c:
            while time.monotonic() < deadline:
                await one(c)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    print(dict(sorted(seen.items())))

    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as c:
        for sid in sorted(live):
            r = await c.delete(f"/v1/sandboxes/{sid}")
            assert r.status_code in (204, 404), r.text
        for tag in branches:
            info = runtime.get_snapshot(tag)
            assert info.status in ("ready", "failed"), (tag, info.status)
            await runtime.delete_snapshot(tag)
    assert not bad, bad
    assert sum(n for k, n in seen.items() if k.startswith("spawn 201")) > 0
    leftover = [p for p in pids.values() if pid_alive(p)]
    assert not leftover, f"QEMUs outlived their sandboxes: {leftover}"
    assert run_dirs and not [d for d in run_dirs if d.exists()], "sandbox run dirs left behind"
    await runtime.settle()  # warm-pool refills and discards that may still create or remove dirs
    await asyncio.gather(*runtime._pool._discarding, return_exceptions=True)
    expected = {Path(s.run_dir) for s in runtime.list_sandboxes(include_dead=True) if s.run_dir}
    expected |= {p.paths.dir for entries in runtime._pool._ready.values() for p in entries}
    stray = set(runtime.settings.run_dir.iterdir()) - expected
    assert not stray, f"run dirs nobody owns: {sorted(stray)}"
    if (found := runtime.cgroups) is not None:  # nor cgroup leaves, killed or deleted
        leaves = [d for sid in pids for d in found.dirs(sid) if d.exists()]
        assert not leaves, f"cgroup leaves outlived their sandboxes: {leaves}"
