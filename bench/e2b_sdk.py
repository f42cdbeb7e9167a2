"""Create-to-first-result through the unmodified E2B SDKs vs through forkd's own SDK, against
one daemon and one template: ``Sandbox.create`` then ``commands.run("echo hi")``, and create
then ``run_code("1 + 1")`` (forkd: ``eval``).

    python bench/e2b_sdk.py --e2b-python PATH [--rounds 10]

``PATH`` is a python with ``e2b`` and ``e2b-code-interpreter`` installed (the daemon tests make
one under ~/.cache/forkd/e2b-sdk-*).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, running_daemon, scratch_settings, write_results

from forkd.client import Sandbox

TEMPLATE = "bench"
HERE = Path(__file__).resolve().parent


def forkd_rounds(url: str, rounds: int) -> dict[str, list[float]]:
    command: list[float] = []
    code: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sb = Sandbox.create(TEMPLATE, base_url=url)
        assert sb.commands.run("echo hi").stdout == "hi\n"
        command.append(time.perf_counter() - t0)
        sb.kill()
        t0 = time.perf_counter()
        sb = Sandbox.create(TEMPLATE, base_url=url)
        assert sb.eval("1 + 1") == "2"
        code.append(time.perf_counter() - t0)
        sb.kill()
    return {"command": command, "code": code}


def e2b_rounds(python: str, url: str, rounds: int) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "PYTHON"))}
    env.update(E2B_API_URL=f"{url}/e2b", E2B_SANDBOX_URL=f"{url}/e2b/sandbox", E2B_API_KEY="x")
    r = subprocess.run(
        [python, str(HERE / "e2b_timing.py"), TEMPLATE, str(rounds)],
        capture_output=True, text=True, timeout=1800, env=env, check=True,
    )  # fmt: skip
    data: dict[str, list[float]] = json.loads(r.stdout.strip().splitlines()[-1])
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--e2b-python", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with scratch_settings() as settings, running_daemon(settings) as url:
        r = httpx.post(f"{url}/v1/snapshots", json={"tag": TEMPLATE, "warmup": "import numpy"},
                       timeout=600)  # fmt: skip
        r.raise_for_status()
        forkd_rounds(url, 1)  # warm both paths once
        e2b_rounds(args.e2b_python, url, 1)
        ours = forkd_rounds(url, args.rounds)
        theirs = e2b_rounds(args.e2b_python, url, args.rounds)
    rows = []
    for what, label in (("command", 'create + commands.run("echo hi")'),
                        ("code", 'create + run_code("1 + 1") / eval')):  # fmt: skip
        a, b = median(theirs[what]) * 1000, median(ours[what]) * 1000
        rows.append(f"| {label} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    markdown = (
        f"# Create to first result: E2B SDK vs forkd SDK ({args.rounds} rounds, medians)\n\n"
        "| what | E2B SDK (ms) | forkd SDK (ms) | ratio |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_results("e2b_sdk", {"e2b": theirs, "forkd": ours}, markdown)


if __name__ == "__main__":
    main()
