"""The forkd engine: snapshots and sandboxes, spawn (fork) / kill / agent calls / reconcile.

One ``Runtime`` per process. The daemon keeps one for its lifetime (``watch=True``: QEMU exits
are noticed at once through pidfds); a local CLI command makes one per invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from forkd import wire
from forkd.config import DEFAULT_IMAGE, DEFAULT_MEM_MIB, Settings
from forkd.errors import (
    AgentError,
    Conflict,
    ForkdError,
    HostSetupError,
    InvalidInput,
    NotFound,
    QemuGone,
    SandboxDead,
    Unavailable,
    VMError,
)
from forkd.images.store import Image, ImageStore
from forkd.net.policy import EgressPolicy
from forkd.private import private_dir
from forkd.runtime import cgroups as cgroup_limits
from forkd.runtime import deaths, leftovers
from forkd.runtime.network import SandboxNetworks, template_key
from forkd.runtime.pool import (
    AGENT_CONNECT_TIMEOUT_S,
    BASE_MANIFEST,
    WARM_SNIPPETS,
    Prelaunched,
    WarmPool,
    launch_incoming,
    set_priority,
)
from forkd.runtime.registry import Registry, SandboxRow, SnapshotRow, now_unix
from forkd.snapshots.branch import BranchStats, pause_and_copy, start_live
from forkd.snapshots.delta import apply_delta, overlay
from forkd.snapshots.guestram import PAGE, find_ram_mapping, sparse_copy
from forkd.snapshots.manifest import Artifact, SnapshotManifest
from forkd.snapshots.store import DEVSTATE_NAME, SnapshotStore, Staging
from forkd.snapshots.template import TemplateRequest, artifact, make_template
from forkd.validate import (
    validate_branch_request,
    validate_count,
    validate_cpus,
    validate_image_name,
    validate_mem_mib,
    validate_sandbox_id,
    validate_tag,
)
from forkd.vmm import jail as jails
from forkd.vmm.accel import AccelChoice, detect_accel
from forkd.vmm.agent_client import AgentClient
from forkd.vmm.machine import (
    MACHINE_FAMILY,
    QemuBuild,
    incompatibility,
    probe_qemu,
    require_supported,
)
from forkd.vmm.netdev import GuestNetwork
from forkd.vmm.qemu import QemuProcess, pid_alive, pid_runs_in, qemu_binary
from forkd.vmm.spec import RunPaths

ADOPT_QMP_TIMEOUT_S = 5.0
CHILD_HANDSHAKE_TIMEOUT_S = 60.0
MAX_PARALLEL_LAUNCHES = 16


def launch_parallelism(cpus: int | None = None) -> int:
    """Forks that start, restore and greet at once: one more than the host's CPUs, at most
    ``MAX_PARALLEL_LAUNCHES``. More only interleaves QEMU start-ups and first guest code on the
    same cores (on 2 cores, N = 100 took 8-10% longer with 16 in flight than with 3)."""
    n = cpus if cpus is not None else os.cpu_count() or 1
    return max(2, min(MAX_PARALLEL_LAUNCHES, n + 1))


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ForkTiming:
    """Per-phase times of one child, in milliseconds."""

    qemu_up_ms: float
    restore_ms: float
    agent_ms: float
    total_ms: float
    pooled: bool = False


@dataclass(frozen=True)
class Spawned:
    sandbox: wire.SandboxInfo
    timing: ForkTiming
    warning: str | None = None  # e.g. a memory limit no cgroup can enforce


class Runtime:
    """Registry plus the operations on snapshots and sandboxes."""

    def __init__(self, settings: Settings, *, watch: bool = False) -> None:
        self.settings = settings
        self.registry = Registry(settings.db_path)
        self.snapshots = SnapshotStore(settings)
        self.images = ImageStore(settings)
        self.accel: AccelChoice = detect_accel(settings.accel)
        self._qemu: QemuBuild | None = None
        self.jail: jails.Jail | None = jails.configure(
            settings.jail, settings.home / "jail", id_base=settings.jail_id_base
        )
        self._watch = watch
        self._agents: dict[str, AgentClient] = {}
        self._agent_locks: dict[str, asyncio.Lock] = {}
        self._pidfds: dict[str, int] = {}
        self._launch_gate = asyncio.Semaphore(launch_parallelism())
        self._background: set[asyncio.Future[None]] = set()
        # disk copies being written, by tag (awaited before a delete and at close)
        self._persisting: dict[str, asyncio.Future[None]] = {}
        self._restore_locks: dict[str, asyncio.Lock] = {}
        self.leaves = cgroup_limits.Leaves(lambda: self.settings)
        self._pool = WarmPool(
            settings.run_dir, settings.warm_pool_size, self._launch_gate,
            make_hot=self._make_hot if watch else None, jail=self.jail,
            place=lambda m: self.leaves.placement(m.mem_mib, m.cpus, pooled=True),
            unplace=self.leaves.remove,
        )  # fmt: skip
        self._branching: set[str] = set()
        self._source_locks: dict[str, asyncio.Lock] = {}
        # Sources whose QEMU has background-snapshot on (a sandbox id is one QEMU process).
        self._live_armed: set[str] = set()
        self.networks = SandboxNetworks(
            self.registry,
            default="internet" if settings.default_egress == "internet" else "none",
            long_lived=watch,
            scope=settings.home_key,
        )
        self.on_sandbox_death: Callable[[str, str], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Sweep unfinished snapshots, adopt what still runs, mark the rest dead."""
        private_dir(self.settings.home, "forkd home")
        private_dir(self.settings.run_dir, "run dir")
        self.snapshots.sweep_staging()
        self.snapshots.sweep_disk_copies()
        known = {row.tag for row in self.registry.list_snapshots()}
        for row in self.registry.list_snapshots():
            writer = row.extra.get("writer_pid")
            writer_gone = (
                not isinstance(writer, int) or writer == os.getpid() or not pid_alive(writer)
            )
            if row.status == "writing" and writer_gone:
                self._fail_snapshot(row, "forkd stopped while this snapshot was being written")
        for tag in self.snapshots.tags_on_disk():
            if tag not in known:
                manifest = self.snapshots.load(tag)
                self.registry.put_snapshot(_row_from_manifest(manifest))
        self._sweep_orphan_run_dirs()
        if self._watch:
            self._persist_backlog()
        alive = [sb for sb in self.registry.list_sandboxes() if sb.state != "dead"]
        await asyncio.gather(*(self._adopt(sb) for sb in alive))
        self.leaves.sweep()  # after adopting: a leaf left by a death told its reason first
        running = {sb.id for sb in self.registry.list_sandboxes() if sb.state != "dead"}
        await self.networks.sweep(running)
        if self._watch:
            for sandbox_id in running:
                await self.networks.readopt(sandbox_id)

    def _persist_backlog(self) -> None:
        """Write the disk copies a previous process did not get to (a branch whose background
        copy was cut off, snapshots made before disk copies existed), in the background."""
        for row in self.registry.list_snapshots():
            if row.status != "ready" or not self.snapshots.exists(row.tag):
                continue
            with contextlib.suppress(ForkdError, OSError, ValueError):
                manifest = self.snapshots.load(row.tag)
                if manifest.memory_authoritative != "disk" and self.snapshots.memory_cached(
                    manifest
                ):
                    self._persist_soon(row.tag, hash_first=False)

    def _persist_soon(self, tag: str, *, hash_first: bool) -> None:
        """Hash a new snapshot's small files, then write its disk copy, off the caller's path;
        serialized per tag."""
        previous = self._persisting.get(tag)

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(BaseException):
                    await previous
            if hash_first:
                await self._hash_artifacts(tag)
            try:
                await asyncio.to_thread(self.snapshots.persist, tag)
            except (ForkdError, OSError, ValueError) as exc:  # it stays tmpfs-only, and says so
                self.snapshots.persist_errors[tag] = str(exc) or type(exc).__name__

        task = asyncio.ensure_future(run())
        self._persisting[tag] = task

        def done(t: asyncio.Future[None]) -> None:
            if self._persisting.get(tag) is t:
                del self._persisting[tag]

        task.add_done_callback(done)

    async def wait_persisted(self, tag: str | None = None) -> None:
        """Wait for the background disk copies of ``tag`` (or of every snapshot)."""
        tasks = [self._persisting[tag]] if tag in self._persisting else []
        if tag is None:
            tasks = list(self._persisting.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _adopt(self, sb: SandboxRow) -> None:
        """Keep a recorded sandbox only if its QEMU is verifiably ours: the pid runs with this
        run dir on its command line and (in the daemon) answers QMP."""
        paths = RunPaths(Path(sb.run_dir))
        if not pid_runs_in(sb.pid, paths):
            why = self._death(sb.id, QemuProcess(sb.pid, paths))
            self._mark_dead(sb.id, "QEMU process is gone (found at start-up)"
                            if why == deaths.GENERIC else f"{why} (found at start-up)")  # fmt: skip
            return
        if not self._watch:
            # A one-shot CLI process must not probe QMP: QEMU serves one monitor client at a
            # time, and a daemon mid-branch holds it.
            return
        qemu = QemuProcess(sb.pid, paths)
        try:
            await asyncio.wait_for(qemu.execute("query-status"), ADOPT_QMP_TIMEOUT_S)
        except (ForkdError, TimeoutError) as exc:
            # Not killed: it may be another client's; `forkd kill` stops it for good.
            self._mark_dead(sb.id, f"QEMU pid {sb.pid} does not answer QMP: {exc or 'timeout'}")
            return
        finally:
            await qemu.close_qmp()
        self._watch_pid(sb.id, sb.pid)

    def _sweep_orphan_run_dirs(self) -> None:
        """Kill and remove child run dirs nobody owns: pre-launched children whose owning process
        is gone, and forks interrupted before they were recorded (old enough that no fork can
        still be in progress). Other live pools (of other processes, or of another runtime in
        this one) are left alone."""
        known = {Path(r.run_dir).name for r in self.registry.list_sandboxes()}
        swept = leftovers.orphan_run_dirs(self.settings.run_dir, known, own_pool=self._pool.token)
        for entry in swept:
            leftovers.remove_run_dir(entry)

    async def settle(self) -> None:
        """Wait for background work that starts processes (warm-pool refills) to finish."""
        await self._pool.settle()

    def pooled_sandbox_ids(self) -> set[str]:
        return self._pool.pooled_ids()

    async def close(self, *, kill_sandboxes: bool = False) -> None:
        await self._pool.drain()
        self._sweep_orphan_run_dirs()
        self.leaves.sweep()  # leaves no QEMU holds (left by a process that died mid-work)
        # A disk copy cut off here would leave its snapshot tmpfs-only: finish it (seconds).
        await self.wait_persisted()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for sandbox_id in list(self._agents):
            await self._drop_agent(sandbox_id)
        for sandbox_id in list(self._pidfds):
            self._unwatch(sandbox_id)
        if kill_sandboxes:
            for sb in self.registry.list_sandboxes():
                await self.kill(sb.id)
        self.registry.close()

    # --- snapshots -------------------------------------------------------------------------

    def list_snapshots(self) -> list[wire.SnapshotInfo]:
        return [self._snapshot_info(row) for row in self.registry.list_snapshots()]

    def get_snapshot(self, tag: str) -> wire.SnapshotInfo:
        return self._snapshot_info(self._snapshot_row(tag))

    def snapshot_detail(self, tag: str) -> wire.SnapshotDetail:
        row = self._snapshot_row(tag)
        info = self._snapshot_info(row)
        ancestors: list[str] = []
        parent = row.parent_tag
        while parent and parent not in ancestors:
            ancestors.append(parent)
            prow = self.registry.get_snapshot(parent)
            parent = prow.parent_tag if prow else None
        detail = wire.SnapshotDetail(
            **info.model_dump(),
            chain_depth=len(ancestors),
            ancestors=ancestors[::-1],  # root -> parent, as forkd v0.5 documents
            dependents=self._dependents(tag),
        )
        if self.snapshots.exists(tag):
            m = self.snapshots.load(tag)
            owned = m.delta if m.delta is not None else m.memory
            detail.memory_logical_bytes = m.mem_mib * 1024 * 1024
            detail.memory_physical_bytes = _physical_bytes(Path(owned.path))
            detail.vmstate_bytes = detail.devstate_bytes = m.devstate.bytes
            detail.memory_bytes = m.memory.bytes
            detail.memory_path = m.memory.path
            detail.memory_authoritative = m.memory_authoritative
            if m.memory_disk is not None:
                detail.memory_disk_path = m.memory_disk.path
            if m.delta is not None:
                detail.delta_path, detail.root_tag = m.delta.path, m.root_tag
                detail.parent_content_hash = m.memory.sha256
        return detail

    async def create_snapshot(
        self,
        tag: str,
        *,
        image: str = DEFAULT_IMAGE,
        mem_mib: int = DEFAULT_MEM_MIB,
        warmup: str | None = None,
        network: wire.NetworkRequest | None = None,
        progress: Progress = _quiet,
        nic: bool = True,
        cpus: int | None = None,
    ) -> wire.SnapshotInfo:
        """Boot a parent from ``image``, warm it with ``warmup`` (with ``network``'s egress), and
        save template ``tag`` (with a NIC when the image supports one, unless ``nic`` is off).
        ``cpus``: its vCPUs (children have the same), default per accelerator."""
        validate_tag(tag)
        validate_image_name(image)
        validate_mem_mib(mem_mib)
        cpus = self.accel.default_cpus if cpus is None else validate_cpus(cpus)
        built = self.images.get(image)
        machine_nic = GuestNetwork() if nic and built.manifest.network else None
        policy = self.networks.check(tag, machine_nic, network, None)
        row = SnapshotRow(tag=tag, status="writing", created_at_unix=now_unix(),
                          extra={"image": image, "mem_mib": mem_mib, "cpus": cpus,
                                 "writer_pid": os.getpid()})  # fmt: skip
        if self.snapshots.exists(tag) or not self.registry.reserve_snapshot(row):
            raise Conflict(
                f"snapshot {tag!r} already exists: delete it first or choose another tag"
            )
        key = template_key()
        # the parent's cgroup leaf has the guard's name: on cgroup v2 they are one dir
        place = self.leaves.placement(mem_mib, cpus)
        try:
            req = dataclasses.replace(
                self._template_request(tag, image, built, mem_mib, warmup, machine_nic, policy,
                                       key),
                cpus=cpus, machine_type=self.qemu.resolve(MACHINE_FAMILY), jail=self.jail,
                before_exec=None if place is None else (lambda pid: place(key, pid)),
            )  # fmt: skip
            await self.networks.prepare(key, policy, machine_nic)
            manifest = await make_template(self.snapshots, self.settings.run_dir, req, progress)
        except BaseException:
            self.registry.delete_snapshot(tag)
            raise
        finally:
            if place is not None:
                place.undo()
            await self.networks.release(key)
        ready = _row_from_manifest(manifest)
        self.registry.put_snapshot(ready)
        return self._snapshot_info(ready)

    def _template_request(
        self,
        tag: str,
        image: str,
        built: Image,
        mem_mib: int,
        warmup: str | None,
        nic: GuestNetwork | None,
        policy: EgressPolicy,
        key: str,
    ) -> TemplateRequest:
        """A template whose warm-up has open egress is guarded like a sandbox (under ``key``)
        and reset to the neutral guest configuration before it is saved."""
        if nic is None or (policy.restricted and not policy.host_ca):
            return TemplateRequest(tag, image, built, mem_mib, warmup, self.accel, network=nic)
        networks = self.networks

        async def on_launch(pid: int) -> None:
            networks.enter(key, policy, pid)

        async def on_agent(agent: AgentClient) -> None:
            await networks.configure_guest(key, agent, nic, policy)

        return TemplateRequest(
            tag, image, built, mem_mib, warmup, self.accel, network=nic,
            warmup_unrestricted=not policy.restricted,
            warmup_host_netns=networks.host_netns(policy), on_launch=on_launch, on_agent=on_agent,
            after_warmup=networks.neutralize_guest,
        )  # fmt: skip

    async def delete_snapshot(
        self, tag: str, *, cascade: bool = False, force: bool = False
    ) -> None:
        validate_tag(tag)
        if cascade and force:
            raise InvalidInput("use either cascade or force, not both")
        row = self.registry.get_snapshot(tag)
        if row is None and not self.snapshots.exists(tag):
            raise NotFound(f"snapshot {tag!r} not found")
        if row is not None and row.status == "writing":
            raise Conflict(f"snapshot {tag!r} is still being written; wait for it to finish")
        # No snapshot needs another's tag to boot: branches are standalone or deltas over a
        # memory file the store keeps while any manifest names it. So deleting a template with
        # branches just works (``force`` is accepted, and changes nothing); ``cascade`` also
        # deletes everything branched from it.
        if cascade:
            for dep in self._dependents(tag):
                await self.delete_snapshot(dep, cascade=True)
        await self._pool.drain(tag)
        await self.wait_persisted(tag)
        self.snapshots.delete(tag)
        self.registry.delete_snapshot(tag)

    @property
    def qemu(self) -> QemuBuild:
        """The installed QEMU (asked once), refused with the fix when too old."""
        if self._qemu is None:
            build = probe_qemu(qemu_binary())
            require_supported(build)
            self._qemu = build
        return self._qemu

    def _unbootable(self, tag: str, manifest: SnapshotManifest) -> str | None:
        """None if children can fork from ``tag`` on this host, else the reason."""
        reason = self.snapshots.bootability(manifest)
        if reason is not None:
            return reason
        try:
            build = self.qemu
        except HostSetupError as exc:
            return str(exc)
        return incompatibility(manifest.machine_args, manifest.qemu_version, build)

    def _dependents(self, tag: str) -> list[str]:
        return [r.tag for r in self.registry.list_snapshots() if r.parent_tag == tag]

    def _snapshot_row(self, tag: str) -> SnapshotRow:
        validate_tag(tag)
        row = self.registry.get_snapshot(tag)
        if row is None:
            raise NotFound(f"snapshot {tag!r} not found")
        return row

    def _snapshot_info(self, row: SnapshotRow) -> wire.SnapshotInfo:
        bootable, error, warning = False, row.error, None
        if row.status == "ready" and self.snapshots.exists(row.tag):
            manifest = self.snapshots.load(row.tag)
            reason = self._unbootable(row.tag, manifest)
            bootable = reason is None
            if reason is not None and error is None:
                error = f"not bootable: {reason}"
            why = self.snapshots.persist_errors.get(row.tag)
            if manifest.memory_authoritative != "disk" and why is not None:
                warning = f"no disk copy written ({why}): this snapshot is lost on a host reboot"
        extra = dict(row.extra)
        return wire.SnapshotInfo(
            tag=row.tag,
            dir=str(self.snapshots.dir_of(row.tag)),
            created_at_unix=row.created_at_unix,
            branched_from=row.branched_from,
            parent_tag=row.parent_tag,
            mode=row.mode,  # type: ignore[arg-type]
            status=row.status,  # type: ignore[arg-type]
            bootable=bootable,
            error=error,
            warning=warning,
            **{k: v for k, v in extra.items() if k in wire.SnapshotInfo.model_fields},
        )

    def _fail_snapshot(self, row: SnapshotRow, reason: str) -> None:
        row.status, row.error = "failed", reason
        self.registry.put_snapshot(row)
        self.snapshots.delete(row.tag)

    def _ready_manifest(self, tag: str) -> SnapshotManifest:
        row = self._snapshot_row(tag)
        if row.status != "ready":
            detail = f": {row.error}" if row.error else ""
            raise Conflict(f"snapshot {tag!r} is not ready (status {row.status}{detail})")
        manifest = self.snapshots.load(tag)
        reason = self._unbootable(tag, manifest)
        if reason is not None:
            raise Conflict(f"snapshot {tag!r} is not bootable: {reason}")
        return manifest

    async def _memory_ready(self, manifest: SnapshotManifest) -> None:
        """Make sure the tmpfs memory file children map is there: after a host reboot it is
        restored from its disk copy (sha256 checked) by the first fork that needs it; a delta
        is checked against its sha256 once per process."""
        if not self.snapshots.memory_cached(manifest):
            lock = self._restore_locks.setdefault(manifest.memory.path, asyncio.Lock())
            async with lock:
                await asyncio.to_thread(self.snapshots.restore_memory, manifest)
        if manifest.delta is not None:
            await asyncio.to_thread(self.snapshots.check_delta, manifest)

    # --- sandboxes -------------------------------------------------------------------------

    def list_sandboxes(self, *, include_dead: bool = False) -> list[wire.SandboxInfo]:
        out = []
        for row in self.registry.list_sandboxes():
            row = self._refresh(row)
            if include_dead or row.state != "dead":
                out.append(self._info(row))
        return out

    def get_sandbox(self, sandbox_id: str) -> wire.SandboxInfo:
        return self._info(self._refresh(self._sandbox_row(sandbox_id)))

    async def spawn(
        self,
        tag: str,
        n: int = 1,
        *,
        memory_limit_mib: int | None = None,
        network: wire.NetworkRequest | None = None,
        allow_internet_access: bool | None = None,
    ) -> list[Spawned]:
        """Fork ``n`` children from template ``tag``: all start, or none is left running."""
        validate_tag(tag)
        validate_count(n)
        if memory_limit_mib is not None and (
            isinstance(memory_limit_mib, bool) or not 64 <= memory_limit_mib <= 1 << 20
        ):
            raise InvalidInput(
                f"memory_limit_mib must be between 64 and 1048576, got {memory_limit_mib}"
            )
        manifest = self._ready_manifest(tag)
        policy = self.networks.policy_for(manifest, network, allow_internet_access)
        await self._memory_ready(manifest)
        cgroups, warning = self.cgroups, None
        if memory_limit_mib is not None and (cgroups is None or not cgroups.has("memory")):
            # accepted, not enforced (forkd v0.5 did the same)
            warning = cgroup_limits.not_enforced(memory_limit_mib, self.settings.cgroups)
            memory_limit_mib = None
        running = sum(1 for r in self.registry.list_sandboxes() if r.state != "dead")
        if running + n > self.settings.max_sandboxes:
            raise Unavailable(
                f"sandbox limit reached: {running} running + {n} requested > max "
                f"{self.settings.max_sandboxes} (--max-sandboxes)"
            )
        results = await asyncio.gather(
            *(self._fork_one(tag, manifest, memory_limit_mib, cgroups, policy) for _ in range(n)),
            return_exceptions=True,
        )
        self._pool.refill(manifest)
        spawned = [r for r in results if isinstance(r, Spawned)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in spawned:
                await self.kill(s.sandbox.id)
            raise errors[0]
        return [dataclasses.replace(s, warning=warning) for s in spawned] if warning else spawned

    async def _fork_one(
        self,
        tag: str,
        manifest: SnapshotManifest,
        memory_limit_mib: int | None,
        cgroups: cgroup_limits.Cgroups | None,
        policy: EgressPolicy,
    ) -> Spawned:
        try:
            return await self._fork_attempt(tag, manifest, memory_limit_mib, cgroups, policy, True)
        except QemuGone:
            # The QEMU died under us, silently (killed from outside): once more, on a fresh
            # QEMU, so a pool member's death never fails the spawn.
            return await self._fork_attempt(tag, manifest, memory_limit_mib, cgroups, policy, False)

    async def _fork_attempt(
        self,
        tag: str,
        manifest: SnapshotManifest,
        memory_limit_mib: int | None,
        cgroups: cgroup_limits.Cgroups | None,
        policy: EgressPolicy,
        use_pool: bool,
    ) -> Spawned:
        agent: AgentClient | None = None
        async with self._launch_gate:
            t0 = time.monotonic()
            # Pooled children run a restricted backend (fixed at launch): only for egress none.
            child = self._pool.take(manifest) if use_pool and policy.restricted else None
            pooled = child is not None
            if child is None:
                # In its cgroup before it runs: QEMU's own start-up is charged there too.
                hook = self.leaves.placement(manifest.mem_mib, manifest.cpus, memory_limit_mib)
                try:
                    child = await launch_incoming(
                        self.settings.run_dir, manifest, restrict_network=policy.restricted,
                        host_netns=self.networks.host_netns(policy), jail=self.jail,
                        before_exec=hook,
                    )  # fmt: skip
                except BaseException as exc:
                    if hook is not None:
                        hook.undo()
                    if isinstance(exc, ForkdError) or not isinstance(exc, Exception):
                        raise
                    raise VMError(f"fork from {tag!r} failed to start QEMU: {exc}") from exc
            sandbox_id, qemu = child.sandbox_id, child.qemu
            try:
                self.registry.put_sandbox(SandboxRow(
                    id=sandbox_id, snapshot_tag=tag, pid=qemu.pid, run_dir=str(child.paths.dir),
                    created_at_unix=now_unix(), state="starting", memory_limit_mib=memory_limit_mib,
                ))  # fmt: skip
                if pooled and cgroups is not None:  # the limit asked for, normal CPU weight
                    cgroups.retarget(sandbox_id, qemu.pid, memory_limit_mib,
                                     what=f"a started child of {tag!r}")  # fmt: skip
                # The guard is in place before the guest runs a single instruction.
                await self.networks.prepare(sandbox_id, policy, manifest.network)
                self.networks.enter(sandbox_id, policy, qemu.pid)
                t1 = time.monotonic()
                net = None
                if manifest.network is not None:
                    template_open = (manifest.egress or {}).get("egress", "none") != "none"
                    net = self.networks.guest_config(
                        sandbox_id, manifest.network, policy, template_open=template_open
                    )
                if child.agent is not None:
                    # Hot: already restored and running; what its hello gave, given afresh.
                    agent = child.agent
                    t2 = time.monotonic()
                    set_priority(qemu.pid, 0)  # before its first round trip, not after
                    try:
                        renewed = await agent.renew(os.urandom(64), net=net)
                    except ForkdError as exc:  # died in the pool: a fresh QEMU takes its place
                        raise QemuGone(f"a pooled child of {tag!r} was unusable: {exc}") from exc
                    _check_hello(renewed, net)
                else:
                    await self._restore(child, manifest)
                    t2 = time.monotonic()
                    # Entropy, clock and network all arrive with the hello: one round trip.
                    agent = await child.sock.handshake(
                        timeout=CHILD_HANDSHAKE_TIMEOUT_S, entropy=os.urandom(64), net=net
                    )
                    _check_hello(agent.hello, net)
                await self.networks.give_host_ca(agent, policy)
                t3 = time.monotonic()
            except BaseException as exc:
                gone = not qemu.alive()
                qemu_said = qemu.log_tail() if gone else ""
                if agent is not None:
                    await agent.close()
                await child.discard()
                self.leaves.remove(sandbox_id, wait_s=cgroup_limits.REMOVE_WAIT_S)
                await self.networks.release(sandbox_id)
                self.registry.delete_sandbox(sandbox_id)
                if not isinstance(exc, Exception):
                    raise
                if pooled and isinstance(exc, QemuGone):
                    raise
                if qemu_said:
                    raise VMError(f"fork from {tag!r} failed, QEMU exited: {qemu_said}") from exc
                if gone:
                    raise QemuGone(
                        f"fork from {tag!r} failed: its QEMU exited without a word (killed or "
                        f"crashed) during {type(exc).__name__}: {exc}"
                    ) from exc
                if isinstance(exc, ForkdError):
                    raise
                raise AgentError(f"fork from {tag!r} failed: {exc}") from exc
        row = self._sandbox_row(sandbox_id)
        row.state = "running"
        self.registry.put_sandbox(row)
        self._agents[sandbox_id] = agent
        if self._watch:
            self._watch_pid(sandbox_id, qemu.pid)
        timing = ForkTiming(
            qemu_up_ms=(t1 - t0) * 1000, restore_ms=(t2 - t1) * 1000,
            agent_ms=(t3 - t2) * 1000, total_ms=(t3 - t0) * 1000, pooled=pooled,
        )  # fmt: skip
        return Spawned(self._info(row), timing)

    async def _restore(self, child: Prelaunched, manifest: SnapshotManifest) -> None:
        """Load a launched child's memory delta and device state, and let it run."""
        qemu = child.qemu
        if manifest.delta is not None:
            # Before the device state loads: devices read their rings from guest RAM.
            ram = find_ram_mapping(qemu.pid, manifest.memory.path, manifest.mem_mib * 1024 * 1024)
            await asyncio.to_thread(apply_delta, ram, Path(manifest.delta.path))
        await qemu.restore_and_run(self.snapshots.devstate_path(manifest.tag))
        await qemu.close_qmp()

    async def _make_hot(self, child: Prelaunched, manifest: SnapshotManifest) -> AgentClient:
        """A pool member restored, greeted and warmed before anyone asks for it; it waits at
        low CPU priority, and its take gives it fresh entropy, clock and network."""
        await self._restore(child, manifest)
        agent = await child.sock.handshake(timeout=CHILD_HANDSHAKE_TIMEOUT_S,
                                           entropy=os.urandom(64))  # fmt: skip
        try:
            await agent.warm(list(WARM_SNIPPETS))
        except BaseException:
            await agent.close()
            raise
        return agent

    def _info(self, row: SandboxRow) -> wire.SandboxInfo:
        info = _sandbox_info(row)
        if row.state != "dead" and (net := self.networks.info(row.id)) is not None:
            info.network, info.guest_addr = net, net.guest_ip
        return info

    # --- ports -----------------------------------------------------------------------------

    async def expose_port(self, sandbox_id: str, port: int) -> wire.PortInfo:
        """Forward guest TCP ``port`` to the host's 127.0.0.1 (idempotent per port)."""
        row = self._running_row(sandbox_id)
        agent = await self.agent(sandbox_id)
        async with self._source_locks.setdefault(sandbox_id, asyncio.Lock()):
            qemu = QemuProcess(row.pid, RunPaths(Path(row.run_dir)))
            try:
                return await self.networks.expose(sandbox_id, qemu, agent, port)
            except VMError as exc:
                raise self._dead_if_gone(sandbox_id, qemu, exc) from exc
            finally:
                await qemu.close_qmp()

    def list_ports(self, sandbox_id: str) -> list[wire.PortInfo]:
        self._running_row(sandbox_id)
        return self.networks.ports(sandbox_id)

    async def unexpose_port(self, sandbox_id: str, port: int) -> None:
        row = self._running_row(sandbox_id)
        async with self._source_locks.setdefault(sandbox_id, asyncio.Lock()):
            qemu = QemuProcess(row.pid, RunPaths(Path(row.run_dir)))
            try:
                await self.networks.unexpose(sandbox_id, qemu, port)
            except VMError as exc:
                raise self._dead_if_gone(sandbox_id, qemu, exc) from exc
            finally:
                await qemu.close_qmp()

    def _dead_if_gone(self, sandbox_id: str, qemu: QemuProcess, exc: ForkdError) -> ForkdError:
        """A QMP failure because the VM just died is a 410, not a host fault."""
        if qemu.alive():
            return exc
        reason = self._death(sandbox_id, qemu)
        self._mark_dead(sandbox_id, reason)
        return SandboxDead(f"sandbox {sandbox_id} is dead: {reason}")

    def _running_row(self, sandbox_id: str) -> SandboxRow:
        row = self._refresh(self._sandbox_row(sandbox_id))
        if row.state == "dead":
            raise SandboxDead(f"sandbox {sandbox_id} is dead: {row.dead_reason}")
        return row

    async def kill(self, sandbox_id: str) -> None:
        """Stop the sandbox's QEMU and remove its run dir and record."""
        row = self._sandbox_row(sandbox_id)
        # First, so a request whose agent call this kill cuts off is told why (410, not 500).
        self.registry.mark_dead(sandbox_id, "killed: the sandbox is being deleted")
        await self._drop_agent(sandbox_id)
        self._unwatch(sandbox_id)
        paths = RunPaths(Path(row.run_dir))
        if pid_runs_in(row.pid, paths):
            await QemuProcess(row.pid, paths).terminate()
        shutil.rmtree(paths.dir, ignore_errors=True)
        self.leaves.remove(sandbox_id, wait_s=cgroup_limits.REMOVE_WAIT_S)
        await self.networks.release(sandbox_id)
        self.registry.delete_sandbox(sandbox_id)

    # --- branch ----------------------------------------------------------------------------

    @property
    def branches_in_flight(self) -> int:
        return len(self._branching)

    async def branch(
        self,
        sandbox_id: str,
        *,
        tag: str | None = None,
        mode: str | None = None,
        diff: bool = False,
        measure_diff: bool = False,
        wait: bool = True,
        parent_tag: str | None = None,
    ) -> wire.SnapshotInfo:
        """Snapshot a running sandbox into template ``tag``; the sandbox keeps running.

        Returns with status ``ready``, or ``writing`` for a live branch with ``wait=False`` (its
        copy then finishes in the background and the status moves to ``ready`` or ``failed``).
        """
        resolved = validate_branch_request(mode, diff, wait)
        validate_sandbox_id(sandbox_id)
        if tag is None:
            tag = f"branch-{sandbox_id}-{int(time.time())}-{secrets.token_hex(6)}"
        validate_tag(tag)
        if parent_tag is not None:
            self._snapshot_row(parent_tag)
        row = self._refresh(self._sandbox_row(sandbox_id))
        if row.state == "dead":
            raise SandboxDead(f"sandbox {sandbox_id} is dead: {row.dead_reason}")
        if parent_tag is not None and (parent_tag != row.snapshot_tag or resolved != "diff"):
            # forkd v0.5: a diff layer names the template its source was forked from, nothing else
            raise InvalidInput(
                f"parent_tag must be the source's template {row.snapshot_tag!r} with mode diff "
                f"(got {parent_tag!r}, mode {resolved})"
            )
        base = self._base_manifest(row)
        cap = self.settings.branch_concurrency
        if len(self._branching) >= cap:
            raise Unavailable(
                f"{len(self._branching)} branches in flight: the cap is {cap} "
                "(--branch-concurrency); retry when one finishes"
            )
        snapshot_row = SnapshotRow(
            tag=tag, status="writing", created_at_unix=now_unix(), branched_from=sandbox_id,
            parent_tag=parent_tag or row.snapshot_tag, mode=resolved,
            extra={"image": base.image_name, "mem_mib": base.mem_mib, "cpus": base.cpus,
                   "writer_pid": os.getpid()},
        )  # fmt: skip
        if self.snapshots.exists(tag) or not self.registry.reserve_snapshot(snapshot_row):
            raise Conflict(f"snapshot {tag!r} already exists or is being written")
        self._branching.add(tag)
        try:
            staging = self.snapshots.begin(tag)
        except BaseException:
            self._branching.discard(tag)
            self.registry.delete_snapshot(tag)
            raise
        lock = self._source_locks.setdefault(sandbox_id, asyncio.Lock())
        qemu = QemuProcess(row.pid, RunPaths(Path(row.run_dir)))
        finishing = False
        try:
            await lock.acquire()
            if resolved == "live":
                live = await start_live(
                    qemu, base, staging, self.settings.run_dir,
                    armed=sandbox_id in self._live_armed, jail=self.jail,
                    inline_max_bytes=self.settings.live_inline_mib << 20,
                    leaf=self.leaves.of_materializer(base.mem_mib, base.cpus),
                )  # fmt: skip
                if live.armed:
                    self._live_armed.add(sandbox_id)
                if not wait:
                    finishing = True
                    task = asyncio.ensure_future(
                        self._finish_branch(
                            live.finish(),
                            snapshot_row,
                            staging,
                            base,
                            row,
                            qemu,
                            lock,
                            measure_diff,
                        )
                    )
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                    return self._snapshot_info(snapshot_row)
                stats = await live.finish()
            else:
                stats = await pause_and_copy(qemu, base, staging, mode=resolved)  # type: ignore[arg-type]
        except BaseException as exc:
            if finishing:
                raise
            reason = self._branch_failed(snapshot_row, staging, exc)
            await qemu.close_qmp()
            lock.release()
            if isinstance(exc, Exception) and not qemu.alive():
                died = self._death(sandbox_id, qemu)
                self._mark_dead(sandbox_id, died)
                raise SandboxDead(
                    f"sandbox {sandbox_id} died during the branch ({died}): {reason}"
                ) from exc
            if isinstance(exc, ForkdError) or not isinstance(exc, Exception):
                raise
            raise VMError(f"branch {tag!r} failed: {reason}") from exc
        finally:
            if not finishing:
                self._branching.discard(tag)
        try:
            return self._branch_done(snapshot_row, staging, base, row, stats, measure_diff)
        finally:
            await qemu.close_qmp()
            lock.release()
            self._resync_clock_soon(sandbox_id)

    async def _finish_branch(
        self,
        finish: Awaitable[BranchStats],
        snapshot_row: SnapshotRow,
        staging: Staging,
        base: SnapshotManifest,
        source: SandboxRow,
        qemu: QemuProcess,
        lock: asyncio.Lock,
        measure_diff: bool,
    ) -> None:
        try:
            stats = await finish
            self._branch_done(snapshot_row, staging, base, source, stats, measure_diff)
        except BaseException as exc:
            self._branch_failed(snapshot_row, staging, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._branching.discard(snapshot_row.tag)
            await qemu.close_qmp()
            lock.release()
            self._resync_clock_soon(source.id)

    def _resync_clock_soon(self, sandbox_id: str) -> None:
        """Step a branch source's clock forward by its pause, off the caller's path.

        QEMU's virtual clock stands still while the guest is stopped, so each pause would
        otherwise leave the source's wall clock that much behind the host's.
        """

        async def resync() -> None:
            with contextlib.suppress(ForkdError, OSError):
                await (await self.agent(sandbox_id)).set_clock(timeout=AGENT_CONNECT_TIMEOUT_S)

        task = asyncio.ensure_future(resync())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _branch_done(
        self,
        snapshot_row: SnapshotRow,
        staging: Staging,
        base: SnapshotManifest,
        source: SandboxRow,
        stats: BranchStats,
        measure_diff: bool,
    ) -> wire.SnapshotInfo:
        timings = {k: v for k, v in (("pause_ms", stats.pause_ms), ("total_ms", stats.total_ms),
                                     ("diff_ms", stats.diff_ms)) if v is not None}  # fmt: skip
        staged = Artifact(path=str(staging.memory), bytes=staging.memory.stat().st_size)
        if stats.delta:
            # Pages over the file the source maps: that file stays the children's base.
            layout = {"memory": base.memory, "delta": staged,
                      "root_tag": base.root_tag or base.tag}  # fmt: skip
        else:
            layout = {"memory": staged, "delta": None, "root_tag": None}
        manifest = base.model_copy(update={
            "tag": snapshot_row.tag, "created_at_unix": snapshot_row.created_at_unix,
            "kind": "branch", "branched_from": snapshot_row.branched_from,
            "parent_tag": snapshot_row.parent_tag, "mode": snapshot_row.mode, **layout,
            "devstate": Artifact(path=DEVSTATE_NAME, bytes=staging.devstate.stat().st_size),
            "timings_ms": {**timings, **stats.phases},
            "egress": self.networks.policy_of(source.id).to_wire(),
        })  # fmt: skip
        # The disk copy comes after, in the background: never on a branch's round trip.
        manifest = self.snapshots.commit(staging, manifest, durable=False)
        extra = dict(snapshot_row.extra)
        owned = manifest.delta if manifest.delta is not None else manifest.memory
        stored = _physical_bytes(Path(owned.path)) + manifest.devstate.bytes
        extra.update(pause_ms=stats.pause_ms, total_ms=stats.total_ms,
                     bytes_written=stats.bytes_written, stored_bytes=stored)  # fmt: skip
        if measure_diff or snapshot_row.mode == "diff":
            extra.update(diff_ms=stats.diff_ms, diff_physical_bytes=stats.diff_physical_bytes,
                         diff_logical_bytes=stats.diff_logical_bytes)  # fmt: skip
        snapshot_row.status, snapshot_row.extra = "ready", extra
        self.registry.put_snapshot(snapshot_row)
        current = self.registry.get_sandbox(source.id)
        if current is not None:
            current.branch_count += 1
            current.last_branch_memory_path = manifest.memory.path
            self.registry.put_sandbox(current)
        self._persist_soon(snapshot_row.tag, hash_first=True)
        return self._snapshot_info(snapshot_row)

    def _branch_failed(
        self, snapshot_row: SnapshotRow, staging: Staging, exc: BaseException
    ) -> str:
        self.snapshots.abort(staging)
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = f"no space left for the snapshot ({exc.filename or 'tmpfs'} is full)"
        elif isinstance(exc, asyncio.CancelledError):
            reason = "forkd stopped while this snapshot was being written"
        snapshot_row.status, snapshot_row.error = "failed", reason
        self.registry.put_snapshot(snapshot_row)
        return reason

    async def _hash_artifacts(self, tag: str) -> None:
        """Fill in sha256 of a branch's small files after the fact, off the caller's path (a
        standalone memory file is hashed by the disk copy, which reads it anyway)."""
        with contextlib.suppress(ForkdError, OSError, ValueError):
            manifest = self.snapshots.load(tag)
            update: dict[str, object] = {
                "devstate": await artifact(self.snapshots.devstate_path(tag), name=DEVSTATE_NAME)
            }
            if manifest.delta is not None:  # the shared root file is its template's to hash
                update["delta"] = await artifact(Path(manifest.delta.path))
            self.snapshots.rewrite_manifest(manifest.model_copy(update=update))

    def _base_manifest(self, row: SandboxRow) -> SnapshotManifest:
        saved = Path(row.run_dir) / BASE_MANIFEST
        if saved.is_file():
            return SnapshotManifest.model_validate_json(saved.read_text())
        return self.snapshots.load(row.snapshot_tag)

    async def compact_snapshot(self, tag: str, to: str) -> wire.SnapshotInfo:
        """Write a standalone copy of ``tag`` as ``to`` (every forkd snapshot is already flat, so
        this is a sparse copy; kept for API compatibility)."""
        validate_tag(to)
        manifest = self._ready_manifest(tag)
        if to == tag:
            raise InvalidInput("compact needs a new tag: 'to' equals the source tag")
        # Parentless, as forkd v0.5's: the copy depends on nothing, the source may go.
        row = SnapshotRow(tag=to, status="writing", created_at_unix=now_unix(),
                          branched_from=f"compact:{tag}",
                          extra={"image": manifest.image_name, "mem_mib": manifest.mem_mib,
                                 "writer_pid": os.getpid()})  # fmt: skip
        if self.snapshots.exists(to) or not self.registry.reserve_snapshot(row):
            raise Conflict(f"snapshot {to!r} already exists")
        try:
            await self._memory_ready(manifest)
            staging = self.snapshots.begin(to)
        except BaseException:
            self.registry.delete_snapshot(to)
            raise
        try:
            size = manifest.mem_mib * 1024 * 1024
            source = self.snapshots.memory_source(manifest)
            await asyncio.to_thread(sparse_copy, source, staging.memory, size)
            if manifest.delta is not None:  # standalone: the root's pages with the delta's over
                await asyncio.to_thread(overlay, Path(manifest.delta.path), staging.memory,
                                        max_pages=size // PAGE)  # fmt: skip
            shutil.copyfile(self.snapshots.devstate_path(tag), staging.devstate)
            os.chmod(staging.devstate, 0o600)
            new = manifest.model_copy(update={
                "tag": to, "created_at_unix": row.created_at_unix, "parent_tag": None,
                "branched_from": f"compact:{tag}",
                "memory": Artifact(path=str(staging.memory), bytes=size),
                "delta": None, "root_tag": None,
            })  # fmt: skip
            await asyncio.to_thread(self.snapshots.commit, staging, new)
        except BaseException:
            self.snapshots.abort(staging)
            self.registry.delete_snapshot(to)
            raise
        row.status = "ready"
        self.registry.put_snapshot(row)
        return self._snapshot_info(row)

    # --- agent calls -----------------------------------------------------------------------

    async def ping(self, sandbox_id: str) -> dict[str, object]:
        return await (await self.agent(sandbox_id)).ping()

    async def exec(
        self,
        sandbox_id: str,
        args: list[str],
        *,
        timeout_s: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        user: str | None = None,
    ) -> wire.ExecResponse:
        if not args or not all(isinstance(a, str) for a in args):
            raise InvalidInput("args must be a non-empty list of strings")
        if not args[0]:
            raise InvalidInput("args[0] (the program) must not be empty")
        timeout = self.settings.default_exec_timeout_s if timeout_s is None else timeout_s
        if not 0 < timeout <= self.settings.max_exec_timeout_s:
            raise InvalidInput(
                f"timeout must be in (0, {self.settings.max_exec_timeout_s:g}] seconds, "
                f"got {timeout:g}"
            )
        agent = await self.agent(sandbox_id)
        r = await agent.exec(
            args, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
            max_output=self.settings.exec_output_cap_bytes, user=user,
        )  # fmt: skip
        return wire.ExecResponse(**dataclasses.asdict(r))

    async def eval(self, sandbox_id: str, code: str) -> wire.EvalResponse:
        if not isinstance(code, str):
            raise InvalidInput("code must be a string")
        r = await (await self.agent(sandbox_id)).eval(code)
        return wire.EvalResponse(**dataclasses.asdict(r))

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        return await (await self.agent(sandbox_id)).read_file(_guest_path(path))

    async def write_file(self, sandbox_id: str, path: str, data: bytes) -> int:
        return await (await self.agent(sandbox_id)).write_file(_guest_path(path), data)

    async def list_files(self, sandbox_id: str, path: str) -> list[dict[str, object]]:
        return await (await self.agent(sandbox_id)).list_files(_guest_path(path))

    async def remove_file(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        await (await self.agent(sandbox_id)).remove_file(_guest_path(path), recursive=recursive)

    async def agent(self, sandbox_id: str) -> AgentClient:
        """The (cached) agent connection of a running sandbox."""
        client = self._agents.get(sandbox_id)
        if self._watch and client is not None and not client.closed:
            # The hot path: with pidfd watching, a dead sandbox's connection is already gone.
            return client
        row = self._refresh(self._sandbox_row(sandbox_id))
        if row.state == "dead":
            raise SandboxDead(f"sandbox {sandbox_id} is dead: {row.dead_reason}")
        client = self._agents.get(sandbox_id)
        if client is not None and not client.closed:
            return client
        lock = self._agent_locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            client = self._agents.get(sandbox_id)
            if client is None or client.closed:
                try:
                    client = await AgentClient.connect(
                        RunPaths(Path(row.run_dir)).agent, timeout=AGENT_CONNECT_TIMEOUT_S
                    )
                except AgentError as exc:
                    raise AgentError(
                        f"agent of sandbox {sandbox_id} not reachable ({exc}); is another forkd "
                        "process (a daemon?) connected to it?"
                    ) from exc
                self._agents[sandbox_id] = client
        return client

    async def _drop_agent(self, sandbox_id: str) -> None:
        client = self._agents.pop(sandbox_id, None)
        if client is not None:
            await client.close()

    # --- liveness --------------------------------------------------------------------------

    def _sandbox_row(self, sandbox_id: str) -> SandboxRow:
        validate_sandbox_id(sandbox_id)
        row = self.registry.get_sandbox(sandbox_id)
        if row is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return row

    def _refresh(self, row: SandboxRow) -> SandboxRow:
        """Notice a QEMU that died behind our back (cheap: one /proc read)."""
        if row.state != "dead" and not pid_runs_in(row.pid, RunPaths(Path(row.run_dir))):
            reason = self._death(row.id, QemuProcess(row.pid, RunPaths(Path(row.run_dir))))
            self._mark_dead(row.id, reason)
            row.state, row.dead_reason = "dead", reason
        return row

    def _mark_dead(self, sandbox_id: str, reason: str) -> None:
        self.registry.mark_dead(sandbox_id, reason)
        client = self._agents.pop(sandbox_id, None)
        if client is not None:
            # Fails every pending request at once instead of letting it hang.
            task = asyncio.ensure_future(client.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._unwatch(sandbox_id)
        self.leaves.remove(sandbox_id)  # its leaf, once its counters gave the reason
        # Its QEMU is gone: the guard, proxy and forwards go too (the record stays, dead).
        with contextlib.suppress(RuntimeError):  # no loop: start-up's sweep releases it
            release = asyncio.get_running_loop().create_task(self.networks.release(sandbox_id))
            self._background.add(release)
            release.add_done_callback(self._background.discard)
        if self.on_sandbox_death is not None:
            self.on_sandbox_death(sandbox_id, reason)

    def _watch_pid(self, sandbox_id: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            row = self.registry.get_sandbox(sandbox_id)
            run_dir = Path(row.run_dir) if row is not None else self.settings.run_dir / sandbox_id
            self._mark_dead(
                sandbox_id, self._death(sandbox_id, QemuProcess(pid, RunPaths(run_dir)))
            )
            return
        self._pidfds[sandbox_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._qemu_exited, sandbox_id)

    def _qemu_exited(self, sandbox_id: str) -> None:
        """A watched QEMU is gone: dead, with the most telling reason known."""
        row = self.registry.get_sandbox(sandbox_id)
        reason = deaths.GENERIC
        if row is not None:
            reason = self._death(sandbox_id, QemuProcess(row.pid, RunPaths(Path(row.run_dir))))
        self._mark_dead(sandbox_id, reason)

    def _death(self, sandbox_id: str, qemu: QemuProcess) -> str:
        """Why the sandbox's QEMU is gone (:mod:`forkd.runtime.deaths`), read before its leaf
        goes."""
        return deaths.explain(qemu.pid, self.leaves.made, sandbox_id, log_tail=qemu.log_tail(2))

    @property
    def cgroups(self) -> cgroup_limits.Cgroups | None:
        """This host's writable cgroup controllers (None when off or none)."""
        return self.leaves.host

    def _unwatch(self, sandbox_id: str) -> None:
        fd = self._pidfds.pop(sandbox_id, None)
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)


def _check_hello(answer: dict[str, object], net: object) -> None:
    if not answer.get("reseeded"):
        raise AgentError(f"the child's agent could not reseed: {answer}")
    if net is not None and not answer.get("net_set"):
        raise AgentError(f"the child's agent could not set its network: {answer}")


def _physical_bytes(path: Path) -> int:
    """Bytes a (possibly sparse) file occupies."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _guest_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidInput(f"path must be an absolute path inside the sandbox, got {path!r}")
    return path


def _sandbox_info(row: SandboxRow) -> wire.SandboxInfo:
    return wire.SandboxInfo(
        id=row.id,
        snapshot_tag=row.snapshot_tag,
        created_at_unix=row.created_at_unix,
        pid=row.pid,
        memory_limit_mib=row.memory_limit_mib,
        has_branched=row.branch_count > 0,
        last_branch_memory_path=row.last_branch_memory_path,
        branch_count=row.branch_count,
        state="dead" if row.state == "dead" else "running",
        dead_reason=row.dead_reason,
        run_dir=row.run_dir,
    )


def _row_from_manifest(m: SnapshotManifest) -> SnapshotRow:
    extra: dict[str, object] = {"image": m.image_name, "mem_mib": m.mem_mib, "cpus": m.cpus}
    for key in ("pause_ms", "total_ms", "diff_ms"):
        if key in m.timings_ms:
            extra[key] = m.timings_ms[key]
    return SnapshotRow(
        tag=m.tag,
        status="ready",
        created_at_unix=m.created_at_unix,
        branched_from=m.branched_from,
        parent_tag=m.parent_tag,
        mode=m.mode,
        extra=extra,
    )
