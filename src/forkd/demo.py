"""``forkd demo``: build the default image, make a numpy-warm template, fork, run code, time it.

``forkd quickstart`` (forkd v0.5's first-run verb): check the host first (the FAIL rows of
``forkd doctor`` stop it), ask before the one slow download (building the guest image), then the
demo, reusing its template when a ready one exists, so running it again is quick and harmless.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from forkd.config import DEFAULT_IMAGE, Settings
from forkd.doctor import run_checks
from forkd.images.builder import ImageRequest, build_image
from forkd.images.store import ImageStore
from forkd.runtime.engine import Runtime

DEMO_WARMUP = "import numpy"


async def run_demo(settings: Settings, *, n: int, tag: str, reuse: bool = False) -> int:
    """Build (cached), make template ``tag`` (with ``reuse``: keep a ready, bootable one), fork
    ``n`` children, run code in each, print the timings, kill them."""
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
        usable = [s for s in runtime.list_snapshots() if s.tag == tag]
        cold_s: float | None = None
        if reuse and usable and usable[0].status == "ready" and usable[0].bootable:
            console.print(f"template {tag!r} exists: reusing it (forkd rmi {tag} to remake it)")
        else:
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
        if cold_s is not None:
            console.print(
                f"fork is {cold_s / per_child:.0f}x faster per sandbox than booting and warming one"
            )
        for child in children:
            await runtime.kill(child.sandbox.id)
    finally:
        await runtime.close()
    return 0


def run_quickstart(
    settings: Settings,
    *,
    n: int,
    tag: str,
    assume_yes: bool,
    ask: Callable[[str], str] = input,
) -> int:
    """Preflight, consent, then :func:`run_demo` with ``reuse``. Exit status: 0 done, 1 the host
    is not ready (the FAIL rows say why), 2 the build was declined or could not be asked."""
    console = Console(highlight=False)
    checks = run_checks(settings)
    colors = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    for c in checks:
        if c.status != "PASS":
            hint = f"  [dim]({c.hint})[/dim]" if c.hint else ""
            console.print(f"[{colors[c.status]}]{c.status}[/] {c.name}: {c.detail}{hint}")
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        console.print(
            f"preflight failed ({', '.join(failed)}): fix the FAIL rows above ('forkd doctor' "
            "lists every check), then run 'forkd quickstart' again"
        )
        return 1
    console.print(f"preflight: {len(checks)} checks, none failed")
    built = any(name == DEFAULT_IMAGE for name, _ in ImageStore(settings).list())
    if not built and not assume_yes:
        question = (
            f"build the guest image {DEFAULT_IMAGE!r} now? It downloads Debian packages and "
            "takes a few minutes. [y/N] "
        )
        if ask is input and not sys.stdin.isatty():
            console.print("the guest image is not built yet: run with -y to build it unasked")
            return 2
        if ask(question).strip().lower() not in ("y", "yes"):
            console.print("nothing done")
            return 2
    return asyncio.run(run_demo(settings, n=n, tag=tag, reuse=True))
