"""Pooled children, ready before a fork asks: per template recently forked from, up to ``size``.

Pre-launched: QEMU started with ``-incoming defer``, QMP and agent socket open, so QEMU's own
start-up (~40-60 ms) is off the fork's path. Hot (the daemon's, ``make_hot``): also restored,
greeted and warmed (eval's guest code run once in a throw-away namespace, so it is translated
already), then left idle at low CPU priority; taking one costs one agent round trip that gives
it fresh entropy, clock and network. Refills wait until takes pause (so the child just handed
out has the machine) and stop while the host is short of memory. A one-shot CLI process keeps
no pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from forkd.runtime.cgroups import Placement
from forkd.snapshots.manifest import SnapshotManifest
from forkd.vmm.agent_client import AgentClient, AgentSocket
from forkd.vmm.jail import Jail
from forkd.vmm.qemu import QemuProcess
from forkd.vmm.spec import RunPaths, has_nic, instance_args, without_boot_files

AGENT_CONNECT_TIMEOUT_S = 10.0
BASE_MANIFEST = "base-manifest.json"
# run once in a hot child before it is handed out (a throw-away namespace: nothing stays)
WARM_SNIPPETS = ("1+1", "x = [0.0] * 5\nx", "None")
POOL_NICE = 10
MiB = 1024 * 1024
# refills stop below this much available host memory (plus the template's own size)
POOL_MIN_AVAILABLE_BYTES = 1 << 30
# A refill launches only this long after the last take: a QEMU start-up (and the daemon's own
# work for it) competing with the child just handed out doubled that child's first round trip.
REFILL_QUIET_S = 0.4


def set_priority(pid: int, nice: int) -> None:
    """Set the nice value of every thread of ``pid`` (QEMU's vCPUs are threads of their own)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    agent: AgentClient | None = None  # set once hot: restored, greeted, running
    on_discard: Callable[[str], None] | None = None  # removes its cgroup leaf

    async def discard(self) -> None:
        if self.agent is not None:
            await self.agent.close()
        await self.sock.close()
        await self.qemu.terminate()
        shutil.rmtree(self.paths.dir, ignore_errors=True)
        if self.on_discard is not None:
            self.on_discard(self.sandbox_id)


POOL_PREFIX = "pool-"


def _pool_dir_fields(name: str) -> list[str]:
    """``pool-<pid>-<token>-<random>`` (older names: ``pool-<pid>-<random>``) split up."""
    return name[len(POOL_PREFIX) :].split("-") if name.startswith(POOL_PREFIX) else []


def pool_dir_owner(name: str) -> int | None:
    """The pid of the process that pre-launched the child in run dir ``name``."""
    fields = _pool_dir_fields(name)
    return int(fields[0]) if fields and fields[0].isdigit() else None


def pool_dir_token(name: str) -> str | None:
    """The token of the pool (within its owner process) whose child is in run dir ``name``;
    older names have none."""
    fields = _pool_dir_fields(name)
    return fields[1] if len(fields) == 3 else None


async def launch_incoming(
    run_root: Path,
    manifest: SnapshotManifest,
    *,
    pool_token: str | None = None,
    restrict_network: bool = True,
    host_netns: bool = False,
    jail: Jail | None = None,
    before_exec: Callable[[str, int], None] | None = None,
) -> Prelaunched:
    """Start a child QEMU for ``manifest`` up to the point where only the restore is left.

    A pooled child (``pool_token`` given) has a run dir naming its owner process and pool
    (``pool-<pid>-<token>-...``): only a dead owner's leftovers, or the pool's own, are ever
    swept, never those of another live pool (another runtime in the same process included).
    ``before_exec(sandbox_id, pid)`` runs before QEMU runs (cgroup placement). Every jailed QEMU
    gets a network namespace of its own, unless ``host_netns`` (a NIC whose egress needs the
    host's routes; see ``SandboxNetworks``).
    """
    sandbox_id = "sb-" + secrets.token_hex(6)
    name = (
        sandbox_id
        if pool_token is None
        else f"{POOL_PREFIX}{os.getpid()}-{pool_token}-{secrets.token_hex(4)}"
    )
    paths = RunPaths(run_root / name)
    argv = instance_args(
        without_boot_files(manifest.machine_args), mem_mib=manifest.mem_mib,
        memory_path=Path(manifest.memory.path), share=False, paths=paths, incoming=True,
        restrict_network=restrict_network,
    )  # fmt: skip
    hook = None if before_exec is None else (lambda pid: before_exec(sandbox_id, pid))
    new_netns = not (host_netns and has_nic(manifest.machine_args))
    qemu = await QemuProcess.launch(argv, paths, jail=jail, new_netns=new_netns, before_exec=hook)
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

    def __init__(
        self,
        run_root: Path,
        size: int,
        gate: asyncio.Semaphore,
        *,
        make_hot: Callable[[Prelaunched, SnapshotManifest], Awaitable[AgentClient]] | None = None,
        jail: Jail | None = None,
        place: Callable[[SnapshotManifest], Placement | None] | None = None,
        unplace: Callable[[str], None] | None = None,
    ) -> None:
        """``place(manifest)``: the ``before_exec`` of a member (its cgroup leaf, at low CPU
        weight); ``unplace(sandbox_id)`` removes that leaf when a member is discarded."""
        self.jail = jail
        self._place = place
        self._unplace = unplace
        self.run_root = run_root
        self.size = size
        self._gate = gate
        self._make_hot = make_hot
        self._ready: dict[str, list[Prelaunched]] = {}
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._discarding: set[asyncio.Future[None]] = set()
        self._last_take = 0.0  # time.monotonic() of the last take, hit or miss
        self.token = secrets.token_hex(3)  # names this pool's run dirs (see launch_incoming)
        self.on_error: Callable[[str, BaseException], None] = lambda _tag, _exc: None

    def take(self, manifest: SnapshotManifest) -> Prelaunched | None:
        self._last_take = time.monotonic()
        key = template_key(manifest)
        entries = self._ready.get(manifest.tag, [])
        while entries:
            entry = entries.pop()
            hot_ok = entry.agent is None or not entry.agent.closed
            if entry.key == key and hot_ok and entry.qemu.alive():
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
                while (quiet := time.monotonic() - self._last_take) < REFILL_QUIET_S:
                    await asyncio.sleep(REFILL_QUIET_S - quiet)
                if mem_available_bytes() < POOL_MIN_AVAILABLE_BYTES + manifest.mem_mib * MiB:
                    return
                async with self._gate:
                    hook = None if self._place is None else self._place(manifest)
                    try:
                        entry = await launch_incoming(
                            self.run_root,
                            manifest,
                            pool_token=self.token,
                            jail=self.jail,
                            before_exec=hook,
                        )
                    except BaseException:
                        if hook is not None:
                            hook.undo()
                        raise
                entry.on_discard = self._unplace
                set_priority(entry.qemu.pid, POOL_NICE)  # refills yield to user work
                if self._make_hot is not None:
                    try:
                        entry.agent = await self._make_hot(entry, manifest)
                    except BaseException:
                        await entry.discard()
                        raise
                entries.append(entry)
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
