"""Making a template: boot a parent, warm it, pause, save device state, keep its memory file."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import InvalidInput
from forkd.hostcmd import sha256_file
from forkd.images.store import Image
from forkd.snapshots.manifest import Artifact, SnapshotManifest
from forkd.snapshots.store import DEVSTATE_NAME, SnapshotStore
from forkd.vmm.accel import AccelChoice
from forkd.vmm.agent_client import AgentClient
from forkd.vmm.jail import Jail, reclaim
from forkd.vmm.netdev import GuestNetwork
from forkd.vmm.qemu import QemuProcess, run_dir_for
from forkd.vmm.spec import MachineSpec, RunPaths, instance_args

BOOT_TIMEOUT_S = 300.0
WARMUP_TIMEOUT_S = 1800.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TemplateRequest:
    tag: str
    image_name: str
    image: Image
    mem_mib: int
    warmup: str | None
    accel: AccelChoice
    network: GuestNetwork | None = None
    cpus: int = 1
    machine_type: str = "q35"  # the installed QEMU's exact type behind the alias
    # warm-up egress: an unrestricted backend, guarded by the hooks (QEMU's pid before the guest
    # runs any user code; the agent before the warm-up, and again after it, to reset the guest)
    warmup_unrestricted: bool = False
    warmup_host_netns: bool = False  # its egress needs the host's routes (else its own netns)
    on_launch: Callable[[int], Awaitable[None]] | None = None
    on_agent: Callable[[AgentClient], Awaitable[None]] | None = None
    after_warmup: Callable[[AgentClient], Awaitable[None]] | None = None
    jail: Jail | None = None
    before_exec: Callable[[int], None] | None = None  # the parent's cgroup leaf


async def qemu_version(qemu: QemuProcess) -> str:
    v = (await qemu.execute("query-version"))["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']}"


async def artifact(path: Path, *, name: str | None = None, hash_it: bool = True) -> Artifact:
    digest = await asyncio.to_thread(sha256_file, path) if hash_it else None
    return Artifact(path=name or str(path), bytes=path.stat().st_size, sha256=digest)


async def make_template(
    store: SnapshotStore, run_root: Path, req: TemplateRequest, progress: Progress
) -> SnapshotManifest:
    """Boot, warm and snapshot a parent into template ``req.tag``; the parent is stopped after."""
    staging = store.begin(req.tag)
    paths = RunPaths(run_dir_for(run_root, f"parent-{req.tag}-{secrets.token_hex(3)}"))
    spec = MachineSpec(
        kernel=req.image.kernel,
        initrd=req.image.initrd,
        rootfs=req.image.rootfs,
        mem_mib=req.mem_mib,
        accel_args=tuple(req.accel.qemu_args()),
        nic=req.network,
        cpus=req.cpus,
        machine_type=req.machine_type,
    )
    machine = spec.machine_args()
    qemu: QemuProcess | None = None
    agent: AgentClient | None = None
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        progress("booting parent VM")
        argv = instance_args(
            machine, mem_mib=req.mem_mib, memory_path=staging.memory, share=True, paths=paths,
            incoming=False, restrict_network=not req.warmup_unrestricted,
        )  # fmt: skip
        new_netns = req.network is None or not req.warmup_host_netns
        qemu = await QemuProcess.launch(argv, paths, jail=req.jail, new_netns=new_netns,
                                        before_exec=req.before_exec)  # fmt: skip
        if req.on_launch is not None:
            await req.on_launch(qemu.pid)
        agent = await AgentClient.connect(paths.agent, timeout=BOOT_TIMEOUT_S)
        timings["boot_ms"] = (time.monotonic() - t0) * 1000
        if req.on_agent is not None:
            await req.on_agent(agent)
        if req.warmup:
            progress("running warm-up in the guest")
            t1 = time.monotonic()
            result = await agent.eval(req.warmup, timeout=WARMUP_TIMEOUT_S)
            if result.error:
                raise InvalidInput(f"warm-up failed in the guest: {result.error}")
            timings["warmup_ms"] = (time.monotonic() - t1) * 1000
        if req.after_warmup is not None:
            await req.after_warmup(agent)
        progress("saving template")
        t2 = time.monotonic()
        # The agent stays connected while the state is saved: restored agents then sit blocked in
        # read() and wake the moment a child's host connects, instead of polling.
        await qemu.stop()
        await qemu.save_device_state(staging.devstate)
        version = await qemu_version(qemu)
        timings["save_ms"] = (time.monotonic() - t2) * 1000
        await qemu.terminate()
        await agent.close()
        reclaim(staging.memory)
        progress("hashing artifacts")
        manifest = SnapshotManifest(
            tag=req.tag,
            created_at_unix=int(time.time()),
            memory=await artifact(staging.memory),
            devstate=await artifact(staging.devstate, name=DEVSTATE_NAME),
            mem_mib=req.mem_mib,
            machine_args=machine,
            accel=req.accel.name,
            qemu_version=version,
            image_name=req.image_name,
            image_digest=req.image.digest,
            kernel=str(req.image.kernel),
            initrd=str(req.image.initrd),
            rootfs=str(req.image.rootfs),
            warmup=req.warmup,
            network=req.network,
            cpus=req.cpus,
            timings_ms=timings,
        )
        # In a thread: the commit writes the template's durable disk copy (seconds).
        return await asyncio.to_thread(store.commit, staging, manifest)
    except BaseException:
        if qemu is not None:
            await qemu.terminate()
        store.abort(staging)
        raise
    finally:
        if agent is not None:
            await agent.close()
        shutil.rmtree(paths.dir, ignore_errors=True)
