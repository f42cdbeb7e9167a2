"""Pre-launched children: QEMU processes already started with ``-incoming defer`` against a
template, their QMP session and agent socket open, waiting for a fork to claim them.

QEMU's own start-up (~40-60 ms of process and machine set-up) then happens off the fork's path.
A long-lived runtime (the daemon) keeps ``size`` of them for each template it recently forked
from; a one-shot CLI process keeps none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forkd.snapshots.manifest import SnapshotManifest
from forkd.vmm.agent_client import AgentClient, AgentSocket
from forkd.vmm.qemu import QemuProcess
from forkd.vmm.spec import RunPaths, instance_args, without_boot_files

AGENT_CONNECT_TIMEOUT_S = 10.0
BASE_MANIFEST = "base-manifest.json"


def template_key(manifest: SnapshotManifest) -> tuple[str, str, int]:
    """Identity of a template's files: a recreated tag gets a new key."""
    return (manifest.tag, manifest.memory.path, manifest.created_at_unix)


@dataclass
class Prelaunched:
    """A child QEMU that has not loaded its device state yet."""

    sandbox_id: str
    paths: RunPaths
    qemu: QemuProcess
    sock: AgentSocket
    key: tuple[str, str, int]

    async def discard(self) -> None:
        await self.sock.close()
        await self.qemu.terminate()
        shutil.rmtree(self.paths.dir, ignore_errors=True)


POOL_PREFIX = "pool-"


def pool_dir_owner(name: str) -> int | None:
    """The pid of the process that pre-launched the child in run dir ``name``."""
    if not name.startswith(POOL_PREFIX):
        return None
    try:
        return int(name[len(POOL_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


async def launch_incoming(
    run_root: Path,
    manifest: SnapshotManifest,
    *,
    pooled: bool = False,
    restrict_network: bool = True,
) -> Prelaunched:
    """Start a child QEMU for ``manifest`` up to the point where only the restore is left.

    A pooled child's run dir names its owner (``pool-<pid>-...``) so that only a dead owner's
    leftovers are ever swept by another process.
    """
    sandbox_id = "sb-" + secrets.token_hex(6)
    name = f"{POOL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}" if pooled else sandbox_id
    paths = RunPaths(run_root / name)
    argv = instance_args(
        without_boot_files(manifest.machine_args), mem_mib=manifest.mem_mib,
        memory_path=Path(manifest.memory.path), share=False, paths=paths, incoming=True,
        restrict_network=restrict_network,
    )  # fmt: skip
    qemu = await QemuProcess.launch(argv, paths)
    try:
        (paths.dir / BASE_MANIFEST).write_text(manifest.model_dump_json())
        # Connected before the guest runs: the restored agent is blocked in read() and answers as
        # soon as the VM continues.
        sock = await AgentClient.open(paths.agent, timeout=AGENT_CONNECT_TIMEOUT_S)
        await qemu.qmp()
    except BaseException:
        await qemu.terminate()
        shutil.rmtree(paths.dir, ignore_errors=True)
        raise
    return Prelaunched(sandbox_id, paths, qemu, sock, template_key(manifest))


class WarmPool:
    """Up to ``size`` pre-launched children per template, refilled in the background."""

    def __init__(self, run_root: Path, size: int, gate: asyncio.Semaphore) -> None:
        self.run_root = run_root
        self.size = size
        self._gate = gate
        self._ready: dict[str, list[Prelaunched]] = {}
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._discarding: set[asyncio.Future[None]] = set()
        self.on_error: Callable[[str, BaseException], None] = lambda _tag, _exc: None

    def take(self, manifest: SnapshotManifest) -> Prelaunched | None:
        key = template_key(manifest)
        entries = self._ready.get(manifest.tag, [])
        while entries:
            entry = entries.pop()
            if entry.key == key and entry.qemu.alive():
                return entry
            task = asyncio.ensure_future(entry.discard())
            self._discarding.add(task)
            task.add_done_callback(self._discarding.discard)
        return None

    def refill(self, manifest: SnapshotManifest) -> None:
        """Top the pool of this template up to ``size`` in the background."""
        if self.size <= 0:
            return
        running = self._refills.get(manifest.tag)
        if running is not None and not running.done():
            return
        self._refills[manifest.tag] = asyncio.ensure_future(self._fill(manifest))

    async def _fill(self, manifest: SnapshotManifest) -> None:
        entries = self._ready.setdefault(manifest.tag, [])
        try:
            while len(entries) < self.size:
                async with self._gate:
                    entries.append(await launch_incoming(self.run_root, manifest, pooled=True))
        except Exception as exc:  # a refill failure only costs latency; forks launch directly
            self.on_error(manifest.tag, exc)

    async def drain(self, tag: str | None = None) -> None:
        """Kill the pre-launched children of ``tag`` (or of every template)."""
        tags = [tag] if tag is not None else list(self._ready)
        for t in tags:
            task = self._refills.pop(t, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for entry in self._ready.pop(t, []):
                await entry.discard()

    async def settle(self) -> None:
        """Wait until no refill is running (tests and benchmarks want a quiet machine)."""
        tasks = [t for t in self._refills.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def pooled_ids(self) -> set[str]:
        return {e.sandbox_id for entries in self._ready.values() for e in entries}
