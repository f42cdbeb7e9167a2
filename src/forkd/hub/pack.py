"""``forkd pack``: write one template, flattened, with the image it boots, into one file."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from forkd import __version__
from forkd.errors import Conflict, HostSetupError
from forkd.hub.compat import facts_of
from forkd.hub.extents import ExtentReader, Scan, scan_extents
from forkd.hub.format import DIGEST_MEMBER, MANIFEST_MEMBER, PackManifest, PackPart, PartName
from forkd.runtime.engine import Runtime
from forkd.snapshots.delta import overlay
from forkd.snapshots.guestram import PAGE, sparse_copy
from forkd.snapshots.manifest import SnapshotManifest
from forkd.snapshots.store import STAGING_PREFIX, bootability

Progress = Callable[[str], None]
ZSTD = "zstd"


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class PackResult:
    path: Path
    bytes: int  # size of the pack file
    logical_bytes: int  # sum of the parts' sizes
    stored_bytes: int  # sum of the parts' data extents (before compression)
    compressed: bool
    seconds: float
    manifest: PackManifest


def zstd_available() -> bool:
    return shutil.which(ZSTD) is not None


async def write_pack(
    runtime: Runtime,
    tag: str,
    dest: Path,
    *,
    compress: bool | None = None,
    progress: Progress = _quiet,
) -> PackResult:
    """Pack template ``tag`` into ``dest`` (written under a temporary name, renamed at the end).

    A delta branch is flattened (its root's pages with its own over them), so the pack holds a
    standalone template; the image's kernel, initrd and root image go with it."""
    t0 = time.monotonic()
    info = runtime.get_snapshot(tag)
    if info.status != "ready":
        raise Conflict(f"snapshot {tag!r} is not ready (status {info.status})")
    manifest = runtime.snapshots.load(tag)
    reason = bootability(manifest, runtime.snapshots.devstate_path(tag))
    if reason is not None:
        raise Conflict(f"snapshot {tag!r} cannot be packed: {reason}")
    if not info.bootable:
        raise Conflict(f"snapshot {tag!r} cannot be packed: it is not bootable on this host")
    image = runtime.images.load_digest(manifest.image_digest or "")
    if image is None:
        raise Conflict(f"snapshot {tag!r} cannot be packed: its image "
                       f"{manifest.image_name or manifest.image_digest!r} is gone")  # fmt: skip
    compress = zstd_available() if compress is None else compress
    if compress and not zstd_available():
        raise HostSetupError("zstd is not installed (apt-get install zstd): pack without it")
    with ExitStack() as cleanup:
        memory = Path(manifest.memory.path)
        if manifest.delta is not None:
            progress("flattening the delta branch over its root's memory")
            memory = await asyncio.to_thread(_flatten, runtime, manifest)
            cleanup.callback(memory.unlink, missing_ok=True)
        files: dict[PartName, Path] = {
            "memory": memory,
            "devstate": runtime.snapshots.devstate_path(tag),
            "kernel": Path(manifest.kernel),
            "initrd": Path(manifest.initrd),
            "rootfs": Path(manifest.rootfs),
        }
        progress("finding the data extents of every part")
        scans = {name: await asyncio.to_thread(scan_extents, p) for name, p in files.items()}
        pack = PackManifest(
            forkd_version=__version__,
            created_at_unix=int(time.time()),
            tag=tag,
            flattened_from=manifest.root_tag if manifest.delta is not None else None,
            host=facts_of(manifest),
            snapshot=manifest,
            image=image.manifest,
            parts=[_part(name, scan) for name, scan in scans.items()],
        )
        progress(f"writing {dest}" + (" (zstd)" if compress else ""))
        await asyncio.to_thread(_write, pack, files, dest, compress)
    return PackResult(
        path=dest,
        bytes=dest.stat().st_size,
        logical_bytes=sum(p.size for p in pack.parts),
        stored_bytes=sum(p.stored for p in pack.parts),
        compressed=compress,
        seconds=time.monotonic() - t0,
        manifest=pack,
    )


def _part(name: PartName, scan: Scan) -> PackPart:
    return PackPart(name=name, size=scan.size, extents=scan.extents, stored=scan.stored,
                    sha256=scan.sha256)  # fmt: skip


def _flatten(runtime: Runtime, manifest: SnapshotManifest) -> Path:
    """A standalone copy of a delta branch's memory, on tmpfs next to the others (named like
    staging, so a crash mid-way leaves debris the start-up sweep removes)."""
    assert manifest.delta is not None
    root = runtime.snapshots.memory_root
    dest = root / f"{STAGING_PREFIX}{os.getpid()}-pack-{manifest.tag}-{secrets.token_hex(4)}.mem"
    size = manifest.mem_mib * 1024 * 1024
    try:
        sparse_copy(Path(manifest.memory.path), dest, size)
        overlay(Path(manifest.delta.path), dest, max_pages=size // PAGE)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _write(pack: PackManifest, files: dict[PartName, Path], dest: Path, compress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        # 0600: guest memory may hold secrets.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            if compress:
                zstd = subprocess.Popen(
                    [ZSTD, "-q", "-T0", "-3", "-c"], stdin=subprocess.PIPE, stdout=out
                )
                assert zstd.stdin is not None
                try:
                    _tar(pack, files, zstd.stdin)
                finally:
                    zstd.stdin.close()
                    code = zstd.wait()
                if code != 0:
                    raise OSError(f"zstd exited {code} while writing {dest}")
            else:
                _tar(pack, files, out)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tar(pack: PackManifest, files: dict[PartName, Path], stream: IO[bytes]) -> None:
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        head = pack.model_dump_json().encode()
        tar.addfile(_member(MANIFEST_MEMBER, len(head), pack.created_at_unix), io.BytesIO(head))
        digest = hashlib.sha256(head).hexdigest().encode()
        tar.addfile(_member(DIGEST_MEMBER, len(digest), pack.created_at_unix), io.BytesIO(digest))
        for part in pack.parts:
            reader = ExtentReader(files[part.name], part.extents)
            try:
                tar.addfile(_member(part.name, part.stored, pack.created_at_unix), reader)
            finally:
                reader.close()
            if reader.sha256.hexdigest() != part.sha256:
                raise OSError(f"{files[part.name]} changed while it was packed")


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o600, tarfile.REGTYPE
    return info
