"""The pack format: one tar (zstd-compressed when ``zstd`` is installed) holding a template.

Members, in this order: ``forkd-pack.json`` (:class:`PackManifest`), ``forkd-pack.json.sha256``
(its hash), then one member per part
(``memory``, ``devstate``, ``kernel``, ``initrd``, ``rootfs``). A part is stored as its data
extents only: the member holds the bytes of every extent in order, the manifest lists the
extents, so a 512 MiB guest memory file that the guest touched 150 MiB of costs 150 MiB (holes
and all-zero pages are never stored). ``sha256`` is over the member's bytes; with the extents
and the logical size it fixes the file's whole content.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from forkd.images.store import ImageManifest
from forkd.snapshots.manifest import SnapshotManifest

PACK_FORMAT: Literal["forkd-pack"] = "forkd-pack"
PACK_VERSION = 1
MANIFEST_MEMBER = "forkd-pack.json"
DIGEST_MEMBER = "forkd-pack.json.sha256"  # the manifest's sha256, hex: a flipped byte in it shows
PACK_SUFFIX = ".forkd"

PartName = Literal["memory", "devstate", "kernel", "initrd", "rootfs"]
PART_NAMES: tuple[PartName, ...] = ("memory", "devstate", "kernel", "initrd", "rootfs")
IMAGE_PARTS: tuple[PartName, ...] = ("kernel", "initrd", "rootfs")

# OCI artifact media types (push/pull): one layer, the pack file itself.
ARTIFACT_TYPE = "application/vnd.forkd.pack.v1"
LAYER_MEDIA_TYPE = "application/vnd.forkd.pack.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.forkd.pack.config.v1+json"

# Bounds checked before anything is extracted.
MAX_MANIFEST_BYTES = 32 << 20
MAX_PART_BYTES = {
    "memory": 64 << 30,
    "devstate": 256 << 20,
    "kernel": 256 << 20,
    "initrd": 1 << 30,
    "rootfs": 64 << 30,
}
MAX_EXTENTS = 1 << 22


class PackPart(BaseModel):
    """One file of the pack: ``size`` logical bytes, ``extents`` (offset, length) stored."""

    name: PartName
    size: int = Field(ge=0)
    extents: list[tuple[int, int]]
    stored: int = Field(ge=0)  # bytes of the member: the sum of the extent lengths
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class HostFacts(BaseModel):
    """What a template's device state depends on, as recorded where it was made."""

    qemu_version: str
    machine_type: str  # the -machine type, e.g. pc-q35-10.0 (q35: an alias of the QEMU's newest)
    accel: str
    cpu_model: str | None  # the -cpu model: max (TCG), host (KVM: the host CPU's features)
    cpu_flags: list[str] | None = None  # KVM ``-cpu host``: the packing host's CPU flags
    cpu_vendor: str | None = None


class PackManifest(BaseModel):
    format: Literal["forkd-pack"] = PACK_FORMAT
    version: int = PACK_VERSION
    forkd_version: str
    created_at_unix: int
    tag: str
    # a delta branch is flattened into a standalone template: the root it was a delta over
    flattened_from: str | None = None
    host: HostFacts
    # the template's manifest as it was on the packing host (its paths are that host's)
    snapshot: SnapshotManifest
    image: ImageManifest
    parts: list[PackPart]

    def part(self, name: PartName) -> PackPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)
