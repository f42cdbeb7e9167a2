"""What a network namespace of its own costs a jailed NIC child: forks (QEMU started on demand,
no pool) with the child in its own namespace vs in the host's, interleaved; for egress none and
for egress internet (own namespace: a pasta per child).

python bench/netns.py [--forks 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, scratch_settings, write_results

from forkd import wire
from forkd.runtime import network
from forkd.runtime.engine import Runtime


async def fork_once(rt: Runtime, tag: str, egress: str, host_netns: bool) -> dict[str, float]:
    real = network.SandboxNetworks.host_netns
    if host_netns:  # what forkd did before: every NIC child in the host's namespace
        network.SandboxNetworks.host_netns = lambda self, policy: True  # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        net = wire.NetworkRequest(egress=egress)  # type: ignore[arg-type]
        spawned = (await rt.spawn(tag, 1, network=net))[0]
        r = await rt.eval(spawned.sandbox.id, "1+1")
        elapsed = time.monotonic() - t0
    finally:
        network.SandboxNetworks.host_netns = real  # type: ignore[method-assign]
    assert r.result == "2"
    t1 = time.monotonic()
    await rt.kill(spawned.sandbox.id)
    t = spawned.timing
    return {"answer_ms": elapsed * 1000, "total_ms": t.total_ms, "qemu_up_ms": t.qemu_up_ms,
            "kill_ms": (time.monotonic() - t1) * 1000}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    keys = [(e, h) for e in ("none", "internet") for h in (False, True)]
    runs: dict[str, list[dict[str, float]]] = {f"{e} {'host' if h else 'own'}": [] for e, h in keys}
    with scratch_settings(warm_pool_size=0, jail="required") as settings:
        rt = Runtime(settings, watch=True)
        await rt.start()
        try:
            await rt.create_snapshot("bench", warmup="import json")
            for e, h in keys:  # first-use costs off
                await fork_once(rt, "bench", e, h)
            for _ in range(args.forks):
                for e, h in keys:
                    runs[f"{e} {'host' if h else 'own'}"].append(await fork_once(rt, "bench", e, h))
        finally:
            await rt.close(kill_sandboxes=True)
    lines = [
        f"accelerator: {rt.accel.name}; {args.forks} forks each, interleaved, jailed, QEMU "
        "started on demand (no pool)",
        "",
        "| egress | network namespace | fork until `eval` answers | spawn (timing.total) "
        "| of which QEMU up + guard | kill |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in runs.items():
        med = {k: median([r[k] for r in rows]) for k in rows[0]}
        egress, ns = name.split()
        lines.append(f"| {egress} | {ns} | {med['answer_ms']:.0f} ms | {med['total_ms']:.0f} ms "
                     f"| {med['qemu_up_ms']:.0f} ms | {med['kill_ms']:.0f} ms |")  # fmt: skip
    lines += ["", "medians; `python bench/netns.py`"]
    write_results("netns", runs, "\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--forks", type=int, default=5)
    asyncio.run(main(p.parse_args()))
