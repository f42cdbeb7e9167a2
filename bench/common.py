"""Helpers shared by the benchmarks: statistics, memory readings, a scratch forkd home."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image
from forkd.snapshots.memfs import release_memory_dir

RESULTS = Path(__file__).resolve().parent / "results"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return float(ordered[k])


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def scratch_settings(**overrides: object) -> Iterator[Settings]:
    home = Path(tempfile.mkdtemp(prefix="forkd-bench-"))
    settings = Settings.from_env(home=home, **overrides)
    build_image(settings, ImageRequest.default("python", None, None), lambda _: None)
    try:
        yield settings
    finally:
        release_memory_dir(settings.memory_dir)
        shutil.rmtree(home, ignore_errors=True)


def write_results(name: str, data: object, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_daemon(settings: Settings) -> Iterator[str]:
    """A real ``forkd daemon`` process on a free loopback port; yields its base URL."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "FORKD_HOME": str(settings.home),
           "FORKD_HUGE_MEMORY": "1" if settings.huge_memory else "0"}  # fmt: skip
    env.pop("FORKD_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkd", "daemon", "--bind", f"127.0.0.1:{port}", "--kill-on-exit"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"daemon did not start: {err[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=600)  # --kill-on-exit of hundreds of QEMUs on a loaded host
