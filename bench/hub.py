"""Hub: time and size of pack, push, pull and unpack of the default template (``import numpy``,
512 MiB, the default image), through a real local OCI registry (Debian's docker-registry).

Home A makes the template, packs and pushes it; home B (no image, no template) pulls it, then
both are deleted again before the next repetition, so every pull unpacks the image too.

    python bench/hub.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, median, scratch_settings, write_results

from forkd.config import Settings
from forkd.hub.pack import write_pack
from forkd.hub.registry import pull, push
from forkd.hub.unpack import unpack
from forkd.runtime.engine import Runtime
from forkd.snapshots.memfs import release_memory_dir

TAG = "bench"
WARMUP = "import numpy"
MiB = 1 << 20


def start_registry(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = root / "config.yml"
    storage = root / "storage"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {storage}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                return proc, f"127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("docker-registry did not start")


async def run(settings: Settings, reps: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="forkd-bench-hub-"))
    registry, address = start_registry(work)
    home_b = Settings.from_env(home=work / "home-b")
    a = Runtime(settings)
    b = Runtime(home_b)
    await a.start()
    await b.start()
    rows: list[dict[str, float]] = []
    try:
        await a.create_snapshot(TAG, warmup=WARMUP)
        for i in range(reps):
            plain = await write_pack(a, TAG, work / "plain.forkd", compress=False)
            packed = await write_pack(a, TAG, work / "py.forkd", compress=True)
            t0 = time.monotonic()
            await unpack(b, packed.path)
            unpack_s = time.monotonic() - t0
            await b.delete_snapshot(TAG)
            for name, _ in b.images.list():
                b.images.remove(name, in_use_by=[])
            pushed = await push(a, TAG, f"{address}/forkd/bench:r{i}", insecure=True)
            t1 = time.monotonic()
            pulled = await pull(b, f"{address}/forkd/bench:r{i}", insecure=True)
            pull_s = time.monotonic() - t1
            await b.delete_snapshot(TAG)
            for name, _ in b.images.list():
                b.images.remove(name, in_use_by=[])
            rows.append({
                "logical_mib": packed.logical_bytes / MiB, "stored_mib": packed.stored_bytes / MiB,
                "plain_mib": plain.bytes / MiB, "pack_mib": packed.bytes / MiB,
                "pack_plain_s": plain.seconds, "pack_s": packed.seconds, "push_s": pushed.seconds,
                "pull_s": pull_s, "download_s": pulled.download_seconds,
                "pull_unpack_s": pulled.unpacked.seconds, "unpack_file_s": unpack_s,
            })  # fmt: skip
            (work / "plain.forkd").unlink()
            (work / "py.forkd").unlink()
    finally:
        await a.close(kill_sandboxes=True)
        await b.close(kill_sandboxes=True)
        registry.terminate()
        registry.wait()
        release_memory_dir(home_b.memory_dir)
        shutil.rmtree(work, ignore_errors=True)
    return {key: round(median([r[key] for r in rows]), 2) for key in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    reps = ap.parse_args().reps
    with scratch_settings() as settings:
        m = asyncio.run(run(settings, reps))
    md = (
        f"| measure (median of {reps}) | value |\n|---|---|\n"
        f"| template + image, logical | {m['logical_mib']} MiB |\n"
        f"| data extents stored | {m['stored_mib']} MiB |\n"
        f"| pack file, plain tar | {m['plain_mib']} MiB ({m['pack_plain_s']} s) |\n"
        f"| pack file, zstd | {m['pack_mib']} MiB ({m['pack_s']} s) |\n"
        f"| push (pack + hash + skopeo copy) | {m['push_s']} s |\n"
        f"| pull into an empty home (download + verify + unpack) | {m['pull_s']} s |\n"
        f"| of which download | {m['download_s']} s |\n"
        f"| of which verify + unpack (image included) | {m['pull_unpack_s']} s |\n"
        f"| unpack of a local pack file | {m['unpack_file_s']} s |\n"
    )
    write_results("hub", m, md)


if __name__ == "__main__":
    main()
