"""The on-disk manifest of a snapshot (``snapshots/<tag>/manifest.json``).

Written last and atomically: a directory without a manifest is never a usable snapshot.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from forkd.vmm.netdev import GuestNetwork

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class Artifact(BaseModel):
    """One file of a snapshot with its size and content hash."""

    path: str
    bytes: int
    sha256: str | None = None


class SnapshotManifest(BaseModel):
    version: int = MANIFEST_VERSION
    tag: str
    created_at_unix: int
    kind: Literal["template", "branch"] = "template"
    # where memory is authoritative. "tmpfs": only the tmpfs file (lost on a host reboot);
    # "disk": ``memory_disk`` is a complete, fsynced copy of ``memory`` (and a delta branch's
    # delta and device state are on disk), so the tmpfs file is a cache restored from it
    memory_authoritative: Literal["tmpfs", "disk"] = "tmpfs"
    # the file children map copy-on-write (a delta branch's: its root template's memory file)
    memory: Artifact
    # the on-disk copy of ``memory`` (sparse; ``sha256`` of the whole content, as ``memory``'s)
    memory_disk: Artifact | None = None
    # a delta branch: only the guest pages that differ from ``memory`` (a sparse file whose data
    # extents are those pages), written into each child's RAM before it runs
    delta: Artifact | None = None
    root_tag: str | None = None  # the template a delta's lineage started from
    devstate: Artifact
    mem_mib: int
    cpus: int = 1  # part of machine_args (-smp); children have the same
    machine_args: list[str]
    accel: str
    qemu_version: str
    image_name: str | None = None
    image_digest: str | None = None
    kernel: str
    initrd: str
    rootfs: str
    warmup: str | None = None
    # the guest NIC's addresses (None: a template made without a NIC, e.g. before networking)
    network: GuestNetwork | None = None
    # a branch's egress policy ({"egress", "allow"}), inherited by its children unless overridden
    egress: dict[str, object] | None = None
    # lineage (branches)
    branched_from: str | None = None
    parent_tag: str | None = None
    mode: Literal["full", "diff", "live"] | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
