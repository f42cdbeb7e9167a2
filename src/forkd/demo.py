"""``forkd demo``: build the default image, make a numpy-warm template, fork, run code, time it."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.table import Table

from forkd.config import DEFAULT_IMAGE, Settings
from forkd.images.builder import ImageRequest, build_image
from forkd.runtime.engine import Runtime

DEMO_WARMUP = "import numpy"


async def run_demo(settings: Settings, *, n: int, tag: str) -> int:
    console = Console(highlight=False)
    t0 = time.monotonic()
    with console.status("building image") as status:
        await asyncio.to_thread(
            build_image, settings, ImageRequest.default(DEFAULT_IMAGE, None, None),
            lambda msg: status.update(f"building image: {msg}"),
        )  # fmt: skip
    console.print(f"image {DEFAULT_IMAGE} ready in {time.monotonic() - t0:.1f} s")
    runtime = Runtime(settings)
    await runtime.start()
    try:
        if runtime.registry.get_snapshot(tag) is not None:
            await runtime.delete_snapshot(tag, cascade=True)
        t1 = time.monotonic()
        with console.status("booting parent, importing numpy, saving template") as status:
            await runtime.create_snapshot(
                tag, warmup=DEMO_WARMUP, progress=lambda m: status.update(m)
            )
        cold_s = time.monotonic() - t1
        console.print(f"template {tag!r}: cold boot + numpy warm-up + save took {cold_s:.1f} s")
        t2 = time.monotonic()
        children = await runtime.spawn(tag, n)
        fork_wall = time.monotonic() - t2
        table = Table(title=f"{n} children forked in {fork_wall * 1000:.0f} ms wall")
        for col in (
            "sandbox",
            "qemu up",
            "restore",
            "agent",
            "total",
            "eval numpy.__version__",
            "exec",
        ):
            table.add_column(col)
        for child in children:
            sid = child.sandbox.id
            ev = await runtime.eval(sid, "numpy.__version__")
            ex = await runtime.exec(sid, ["python3", "-c", "import os; print(os.urandom(4).hex())"])
            t = child.timing
            table.add_row(
                sid, f"{t.qemu_up_ms:.0f} ms", f"{t.restore_ms:.0f} ms", f"{t.agent_ms:.0f} ms",
                f"{t.total_ms:.0f} ms", str(ev.result), ex.stdout.strip(),
            )  # fmt: skip
        console.print(table)
        per_child = fork_wall / n
        console.print(
            f"fork is {cold_s / per_child:.0f}x faster per sandbox than booting and warming one"
        )
        for child in children:
            await runtime.kill(child.sandbox.id)
    finally:
        await runtime.close()
    return 0
