"""Checks of an untrusted pack, run before any of its bytes is written anywhere.

Every message names the problem; every failure is :class:`~forkd.errors.InvalidInput` (400).
"""

from __future__ import annotations

import re
import tarfile

from pydantic import ValidationError

from forkd.errors import InvalidInput
from forkd.hub.compat import machine_type
from forkd.hub.extents import check_extents
from forkd.hub.format import (
    MANIFEST_MEMBER,
    MAX_EXTENTS,
    MAX_MANIFEST_BYTES,
    MAX_PART_BYTES,
    PACK_FORMAT,
    PACK_VERSION,
    PART_NAMES,
    PackManifest,
)
from forkd.validate import validate_cpus, validate_image_name, validate_mem_mib, validate_tag

_DIGEST_RE = re.compile(r"^[0-9a-f]{16,64}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be extracted (None: a plain file with a plain relative name)."""
    name = info.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"member {name!r} has an absolute path"
    if "\\" in name or "\0" in name or any(p in ("..", ".", "") for p in name.split("/")):
        return f"member {name!r} has a path that leaves or escapes the pack"
    if info.issym() or info.islnk():
        return f"member {name!r} is a link (to {info.linkname!r})"
    if info.isdev() or info.isfifo():
        return f"member {name!r} is a device or fifo"
    if not info.isreg():
        return f"member {name!r} is not a regular file"
    return None


def check_member(info: tarfile.TarInfo, expected: str, size: int) -> None:
    """``info`` is the next member a pack must have: ``expected``, ``size`` bytes, a plain file."""
    problem = member_problem(info)
    if problem is not None:
        raise InvalidInput(f"refusing the pack: {problem}")
    if info.name != expected:
        raise InvalidInput(f"refusing the pack: member {info.name!r} where {expected!r} belongs")
    if info.size != size:
        raise InvalidInput(f"refusing the pack: member {expected!r} has {info.size} bytes, its "
                           f"manifest says {size}")  # fmt: skip


def check_manifest_member(info: tarfile.TarInfo | None) -> None:
    if info is None:
        raise InvalidInput("refusing the pack: it is empty")
    problem = member_problem(info)
    if problem is not None:
        raise InvalidInput(f"refusing the pack: {problem}")
    if info.name != MANIFEST_MEMBER:
        raise InvalidInput(f"refusing the pack: its first member is {info.name!r}, not "
                           f"{MANIFEST_MEMBER!r} (not a forkd pack?)")  # fmt: skip
    if info.size > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"refusing the pack: its manifest has {info.size} bytes (limit "
                           f"{MAX_MANIFEST_BYTES})")  # fmt: skip


def parse_manifest(raw: bytes) -> PackManifest:
    """The pack manifest, with every field that later becomes a path or size checked."""
    try:
        pack = PackManifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "manifest"
        raise InvalidInput(f"refusing the pack: its manifest is invalid at {where}: "
                           f"{first.get('msg')}") from None  # fmt: skip
    check_manifest(pack)
    return pack


def check_manifest(pack: PackManifest) -> None:
    if pack.format != PACK_FORMAT:
        raise InvalidInput(f"refusing the pack: format {pack.format!r} is not {PACK_FORMAT!r}")
    if pack.version > PACK_VERSION:
        raise InvalidInput(f"refusing the pack: format version {pack.version} is newer than this "
                           f"forkd reads ({PACK_VERSION}); upgrade forkd")  # fmt: skip
    try:
        validate_tag(pack.tag)
        validate_tag(pack.snapshot.tag)
        validate_mem_mib(pack.snapshot.mem_mib)
        validate_cpus(pack.snapshot.cpus)
        if pack.snapshot.image_name is not None:
            validate_image_name(pack.snapshot.image_name)
    except InvalidInput as exc:
        raise InvalidInput(f"refusing the pack: {exc}") from None
    names = [p.name for p in pack.parts]
    if sorted(names) != sorted(PART_NAMES):
        raise InvalidInput(f"refusing the pack: its parts are {names}, expected {list(PART_NAMES)}")
    for part in pack.parts:
        if part.size > MAX_PART_BYTES[part.name]:
            raise InvalidInput(f"refusing the pack: part {part.name} has {part.size} bytes "
                               f"(limit {MAX_PART_BYTES[part.name]})")  # fmt: skip
        if len(part.extents) > MAX_EXTENTS:
            raise InvalidInput(f"refusing the pack: part {part.name} has too many extents")
        try:
            check_extents(part.extents, part.size, part.stored, part.name)
        except InvalidInput as exc:
            raise InvalidInput(f"refusing the pack: {exc}") from None
    memory = pack.part("memory").size
    if memory != pack.snapshot.mem_mib * 1024 * 1024:
        raise InvalidInput(f"refusing the pack: memory has {memory} bytes for a "
                           f"{pack.snapshot.mem_mib} MiB guest")  # fmt: skip
    image = pack.image
    if not _DIGEST_RE.fullmatch(image.digest):
        raise InvalidInput(f"refusing the pack: image digest {image.digest!r} is malformed")
    if pack.snapshot.image_digest not in (None, image.digest):
        raise InvalidInput("refusing the pack: the template names another image than it holds")
    files = (image.kernel, image.initrd, image.rootfs)
    for name in files:
        if not _FILE_NAME_RE.fullmatch(name) or name == "image.json":
            raise InvalidInput(f"refusing the pack: image file name {name!r} is not a plain name")
    if len(set(files)) != len(files):
        raise InvalidInput("refusing the pack: image file names repeat")
    if pack.host.machine_type != machine_type(pack.snapshot.machine_args):
        raise InvalidInput("refusing the pack: its host facts and machine arguments disagree "
                           "on the machine type")  # fmt: skip
    if pack.host.accel != pack.snapshot.accel:
        raise InvalidInput("refusing the pack: its host facts and template disagree on the "
                           "accelerator")  # fmt: skip
    if pack.host.qemu_version != pack.snapshot.qemu_version:
        raise InvalidInput("refusing the pack: its host facts and template disagree on the QEMU "
                           "version")  # fmt: skip
