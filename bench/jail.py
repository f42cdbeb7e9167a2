"""What the jail costs per fork: QEMU started on demand, jailed vs FORKD_JAIL=off, interleaved.

python bench/jail.py [--forks 10]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, pss_bytes, scratch_settings, write_results

from forkd.runtime.engine import Runtime

MiB = 1024 * 1024


async def fork_once(rt: Runtime, tag: str) -> dict[str, float]:
    t0 = time.monotonic()
    spawned = (await rt.spawn(tag, 1))[0]
    r = await rt.eval(spawned.sandbox.id, "1+1")
    elapsed = time.monotonic() - t0
    assert r.result == "2"
    pss = pss_bytes(spawned.sandbox.pid)
    await rt.kill(spawned.sandbox.id)
    return {"answer_ms": elapsed * 1000, "qemu_up_ms": spawned.timing.qemu_up_ms,
            "pss_mib": pss / MiB}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    with scratch_settings(warm_pool_size=0) as settings:
        jailed = Runtime(dataclasses.replace(settings, jail="required"))
        free = Runtime(dataclasses.replace(settings, jail="off"))
        await jailed.start()
        await free.start()
        runs: dict[str, list[dict[str, float]]] = {"jailed": [], "off": []}
        try:
            await jailed.create_snapshot("bench", warmup="import numpy")
            await fork_once(jailed, "bench")  # first-use costs (template group, ldd) off
            for _ in range(args.forks):
                runs["jailed"].append(await fork_once(jailed, "bench"))
                runs["off"].append(await fork_once(free, "bench"))
        finally:
            await free.close()
            await jailed.close(kill_sandboxes=True)
    lines = [
        f"accelerator: {jailed.accel.name}; {args.forks} forks each way, interleaved, QEMU "
        "started on demand (no pool)",
        "",
        "| jail | fork until `eval` answers | QEMU up (launch to QMP ready) | PSS of the child |",
        "|---|---|---|---|",
    ]
    for name, rows in runs.items():
        med = {k: median([r[k] for r in rows]) for k in rows[0]}
        lines.append(f"| {name} | {med['answer_ms']:.0f} ms | {med['qemu_up_ms']:.0f} ms | "
                     f"{med['pss_mib']:.1f} MiB |")  # fmt: skip
    lines += ["", "medians; `python bench/jail.py`"]
    write_results("jail", runs, "\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--forks", type=int, default=10)
    asyncio.run(main(p.parse_args()))
