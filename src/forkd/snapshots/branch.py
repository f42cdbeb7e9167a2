"""BRANCH strategies: make a template from a running sandbox while it keeps running.

- ``full``: the VM stays stopped while device state and all of guest RAM are written.
- ``diff``: a *delta* over the memory file the sandbox maps (its root template's): while
  stopped, only the pages the guest holds privately (written since its fork, or applied from its
  own snapshot's delta; found in ``/proc/PID/pagemap``) are copied into a sparse file. Pause and
  storage scale with what differs from the root, not with the memory size; children map the root
  and get the delta written into their RAM before they run.
- ``live``: QEMU ``background-snapshot`` (userfaultfd write-protect) stops the VM only to save
  device state and arm write protection; RAM streams out while the guest runs. The stream is then
  *materialized* by a short-lived QEMU into a memory file plus device state, and only the pages
  the source holds privately are kept, as a delta like ``diff``'s.

Each result is an ordinary template: children fork from it copy-on-write, and can be branched.
The source is always continued, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from forkd.errors import VMError
from forkd.snapshots.delta import delta_from_file, write_delta, write_delta_data
from forkd.snapshots.guestram import (
    PAGE,
    copy_runs,
    find_ram_mapping,
    read_runs,
    sparse_copy,
    written_runs,
)
from forkd.snapshots.manifest import SnapshotManifest
from forkd.snapshots.store import Staging
from forkd.vmm.jail import Jail, reclaim
from forkd.vmm.qemu import QemuProcess, run_dir_for
from forkd.vmm.spec import RunPaths, instance_args

Mode = Literal["full", "diff", "live"]
LIVE_TIMEOUT_S = 600.0
PAUSE_TIMEOUT_S = 60.0
MATERIALIZE_TIMEOUT_S = 600.0
# A diff's pages up to this size are read into memory during the pause and written after it.
INLINE_DELTA_MAX_BYTES = 64 * 1024 * 1024
# A live branch of a source holding at most this much of its own memory is taken while paused.
LIVE_INLINE_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class BranchStats:
    """What a branch measured; times in milliseconds."""

    pause_ms: float | None = None
    total_ms: float | None = None
    bytes_written: int = 0
    diff_ms: float | None = None
    diff_physical_bytes: int | None = None
    diff_logical_bytes: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    # the staged memory file holds only pages over the source's base file (a delta branch)
    delta: bool = False


def _event_time(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


async def _next_event(
    events: asyncio.Queue[dict[str, Any]], name: str, deadline: float
) -> dict[str, Any]:
    try:
        while True:
            event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            if event["event"] == name:
                return event
    except TimeoutError:
        raise VMError(f"QEMU did not report {name} in time") from None


async def _pause_window(events: asyncio.Queue[dict[str, Any]], timeout: float) -> float:
    """Milliseconds between QEMU's STOP and RESUME events (QEMU's own clock)."""
    deadline = time.monotonic() + timeout
    stop = await _next_event(events, "STOP", deadline)
    return await _resumed_after(events, stop, deadline)


async def _resumed_after(
    events: asyncio.Queue[dict[str, Any]], stop: dict[str, Any], deadline: float
) -> float:
    resume = await _next_event(events, "RESUME", deadline)
    return (_event_time(resume) - _event_time(stop)) * 1000


async def pause_and_copy(
    qemu: QemuProcess,
    base: SnapshotManifest,
    staging: Staging,
    *,
    mode: Literal["full", "diff"],
) -> BranchStats:
    """Full or diff branch; the source always continues.

    ``full`` writes a standalone memory file (the base file plus the guest's own pages) while the
    guest is stopped; ``diff`` writes only the guest's own pages, as a delta over the base file.
    The device-state file is handed to QEMU before the stop, and a diff's pages are read while
    QEMU saves its devices, so the pause holds little more than the two.
    """
    stats = BranchStats()
    t0 = time.monotonic()
    size = base.mem_mib * 1024 * 1024
    ram = find_ram_mapping(qemu.pid, base.memory.path, size)
    # map_files reaches the mapped base file even if its template was deleted meanwhile.
    base_file = ram.map_file if os.access(ram.map_file, os.R_OK) else Path(base.memory.path)
    stats.delta = mode == "diff"
    stats.diff_logical_bytes = size

    def capture() -> tuple[list[tuple[int, int]], bytearray | None]:
        """The guest's own pages: into memory when small (written after the guest resumes),
        else straight into the staged file while it is stopped."""
        t1 = time.monotonic()
        runs = written_runs(ram)
        stats.diff_ms = (time.monotonic() - t1) * 1000
        stats.diff_physical_bytes = sum(n for _, n in runs) * PAGE
        if stats.delta and stats.diff_physical_bytes <= INLINE_DELTA_MAX_BYTES:
            return runs, read_runs(ram, runs)
        if stats.delta:
            stats.bytes_written += write_delta(ram, runs, staging.memory)
        else:
            stats.bytes_written += copy_runs(ram, runs, staging.memory)
        return runs, None

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        stats.phases[name] = (now - since) * 1000
        return now

    async with qemu.device_state_target(staging.devstate) as target:
        t = mark("prepare_ms", t0)
        async with qemu.events("STOP", "RESUME") as events:
            await qemu.stop()
            try:
                t = mark("stop_ms", t)
                if mode == "full":
                    await qemu.save_device_state_to(target)
                    stats.bytes_written += await asyncio.to_thread(
                        sparse_copy, base_file, staging.memory, size
                    )
                    captured = await asyncio.to_thread(capture)
                else:
                    saved, read = await asyncio.gather(
                        qemu.save_device_state_to(target),
                        asyncio.to_thread(capture),
                        return_exceptions=True,
                    )
                    for outcome in (saved, read):
                        if isinstance(outcome, BaseException):
                            raise outcome
                    assert not isinstance(read, BaseException)
                    captured = read
                t = mark("stopped_work_ms", t)
            finally:
                await qemu.cont()
            stats.pause_ms = await _pause_window(events, 30.0)
    runs, pages = captured
    if pages is not None:
        stats.bytes_written += await asyncio.to_thread(
            write_delta_data, runs, pages, staging.memory
        )
    stats.bytes_written += staging.devstate.stat().st_size
    stats.total_ms = (time.monotonic() - t0) * 1000
    return stats


@dataclass
class LiveBranch:
    """A live branch whose snapshot instant has passed; ``finish()`` waits for the source to
    resume, completes the copy and materializes."""

    stats: BranchStats
    finish: Callable[[], Awaitable[BranchStats]]
    # the source now has QEMU's background-snapshot capability on (it stays on)
    armed: bool = True


async def start_live(
    qemu: QemuProcess,
    base: SnapshotManifest,
    staging: Staging,
    run_root: Path,
    *,
    armed: bool = False,
    inline_max_bytes: int = LIVE_INLINE_MAX_BYTES,
    on_materializer: Callable[[int], None] = lambda _pid: None,
    jail: Jail | None = None,
    leaf: tuple[Callable[[int], None], Callable[[], None]] | None = None,
) -> LiveBranch:
    """Start a background snapshot; return as soon as the source is stopped at the snapshot
    instant (it resumes milliseconds later, on its own). ``armed``: the caller knows this QEMU
    already has the background-snapshot capability on.

    A source holding at most ``inline_max_bytes`` of its own pages is branched as ``diff`` is
    instead: reading a few MiB during the pause costs about what arming write protection over
    all guest RAM does, and it spares streaming that RAM and materializing it (seconds)."""
    t0 = time.monotonic()
    ram = find_ram_mapping(qemu.pid, base.memory.path, base.mem_mib * 1024 * 1024)
    own = sum(n for _, n in await asyncio.to_thread(written_runs, ram)) * PAGE
    if own <= inline_max_bytes:
        stats = await pause_and_copy(qemu, base, staging, mode="diff")
        stats.total_ms = (time.monotonic() - t0) * 1000

        async def done() -> BranchStats:
            return stats

        return LiveBranch(stats, done, armed=armed)
    stats = BranchStats()
    stream = staging.dir / "live.stream"
    # Enabled once and left on: QEMU re-tests userfaultfd over all guest RAM each time it is
    # set (~15 ms), and sources never run any other outgoing migration. x-ignore-shared stays
    # off (QEMU's default): it would leave RAM out of the stream.
    if not armed:
        caps = await qemu.execute("query-migrate-capabilities")
        if not any(c["capability"] == "background-snapshot" and c["state"] for c in caps):
            await qemu.set_capabilities(background_snapshot=True)
    events_cm = qemu.events("STOP", "RESUME")
    events = await events_cm.__aenter__()
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    copied: asyncio.Future[int] | None = None
    uri = ""
    try:
        # through a pipe this process drains: the stream holds all guest RAM, far past QEMU's
        # file-size limit
        uri, copied = await qemu.pipe_uri(stream)
        await qemu.execute("migrate", {"uri": uri})
        # The snapshot instant: once the guest is stopped, nothing it does later can reach the
        # snapshot, so the caller may go on while QEMU saves devices, arms write protection and
        # resumes. finish() records the pause when RESUME arrives.
        stop = await _next_event(events, "STOP", deadline)
    except BaseException:
        await events_cm.__aexit__(None, None, None)
        with contextlib.suppress(Exception):
            await qemu.execute("migrate_cancel")
        if copied is not None:
            with contextlib.suppress(Exception):  # the unused descriptor, if QEMU still has it
                await qemu.execute("closefd", {"fdname": uri.removeprefix("fd:")})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(copied), 10.0)
        raise
    stats.phases["stop_return_ms"] = (time.monotonic() - t0) * 1000

    async def finish() -> BranchStats:
        try:
            try:
                stats.pause_ms = await _resumed_after(events, stop, deadline)
            finally:
                await events_cm.__aexit__(None, None, None)
            await qemu.wait_migration(timeout=LIVE_TIMEOUT_S, what="live snapshot")
            # QEMU closed its end: the copy ends with the stream (ENOSPC and the like raise)
            await asyncio.wait_for(asyncio.shield(copied), LIVE_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(copied), 10.0)
            raise
        stats.phases["stream_ms"] = (time.monotonic() - t0) * 1000
        stats.bytes_written = stream.stat().st_size
        full = staging.memory.with_name(staging.memory.name + ".full")
        try:
            await materialize(stream, base, staging, run_root, memory=full,
                              on_materializer=on_materializer, jail=jail, leaf=leaf)  # fmt: skip
            stream.unlink(missing_ok=True)
            stats.bytes_written += full.stat().st_size
            await _keep_only_the_delta(qemu, base, full, staging.memory, stats)
        finally:
            full.unlink(missing_ok=True)
        stats.bytes_written += staging.devstate.stat().st_size
        stats.total_ms = (time.monotonic() - t0) * 1000
        return stats

    return LiveBranch(stats, finish)


async def _keep_only_the_delta(
    source: QemuProcess, base: SnapshotManifest, full: Path, dest: Path, stats: BranchStats
) -> None:
    """Turn a materialized live snapshot into a delta over the source's base file.

    Every page that differs from the base at the snapshot instant was the source's own
    (anonymous) page then and still is, so scanning the source now finds a superset of them.
    If the source is gone the full file is kept: a standalone branch, never a wrong delta."""
    size = base.mem_mib * 1024 * 1024
    try:
        ram = find_ram_mapping(source.pid, base.memory.path, size)
        runs = written_runs(ram)
    except (VMError, OSError):
        os.replace(full, dest)
        return
    await asyncio.to_thread(delta_from_file, full, runs, dest)
    stats.delta = True
    stats.diff_physical_bytes = sum(n for _, n in runs) * PAGE
    stats.diff_logical_bytes = size


async def materialize(
    stream: Path,
    base: SnapshotManifest,
    staging: Staging,
    run_root: Path,
    *,
    memory: Path,
    on_materializer: Callable[[int], None] = lambda _pid: None,
    jail: Jail | None = None,
    leaf: tuple[Callable[[int], None], Callable[[], None]] | None = None,
) -> None:
    """Load a full migration stream into a fresh shared memory file ``memory``, then save
    device state only (``staging.devstate``). ``leaf``: the materializer's cgroup placement
    (``before_exec(pid)``) and its removal once it is gone."""
    paths = RunPaths(run_dir_for(run_root, f"materialize-{staging.tag}"))
    argv = instance_args(
        base.machine_args, mem_mib=base.mem_mib, memory_path=memory, share=True,
        paths=paths, incoming=True,
    )  # fmt: skip
    # No network: its guest never runs (a NIC's user-mode stack needs no host network).
    try:
        qemu = await QemuProcess.launch(argv, paths, jail=jail, new_netns=True,
                                        before_exec=None if leaf is None else leaf[0])  # fmt: skip
    except BaseException:
        if leaf is not None:
            leaf[1]()
        raise
    on_materializer(qemu.pid)
    try:
        await qemu.migrate_incoming(stream, timeout=MATERIALIZE_TIMEOUT_S)
        await qemu.save_device_state(staging.devstate)
    except VMError as exc:
        raise VMError(f"materializing the live snapshot failed: {exc}") from exc
    finally:
        await qemu.terminate()
        if leaf is not None:
            leaf[1]()
        reclaim(memory)
        shutil.rmtree(paths.dir, ignore_errors=True)
