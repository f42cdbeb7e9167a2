"""``forkd unpack``: verify a pack completely, then make its template (and image) exist.

Order: the manifest is read and checked (paths, sizes, tag, host compatibility) before any part
is written; every part is written into staging and its sha256 checked; only then is the image
published and the template committed through the snapshot store. Any failure removes what this
call staged or published, so a refused pack leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from forkd.errors import Conflict, HostSetupError, InvalidInput, NotFound
from forkd.hub import compat
from forkd.hub.checks import check_manifest_member, check_member, parse_manifest
from forkd.hub.extents import CHUNK, ExtentWriter
from forkd.hub.format import DIGEST_MEMBER, MAX_MANIFEST_BYTES, PackManifest, PackPart
from forkd.images.store import Image
from forkd.private import private_dir
from forkd.runtime.engine import Runtime
from forkd.runtime.registry import SnapshotRow, now_unix
from forkd.snapshots.manifest import Artifact, SnapshotManifest
from forkd.snapshots.memfs import prepare_memory_dir
from forkd.snapshots.store import DEVSTATE_NAME, STAGING_PREFIX, Staging
from forkd.validate import validate_tag
from forkd.vmm.spec import MachineSpec

Progress = Callable[[str], None]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SLACK = 1 << 20  # tarfile's read-ahead past a member


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class UnpackResult:
    tag: str
    image_name: str
    image_reused: bool
    seconds: float


class _Budget:
    """A read-only stream that refuses to deliver more than ``limit`` bytes in total: a pack
    whose headers claim huge sizes (or a compression bomb) cannot make us read without end."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.pos = 0
        self.limit = 0

    def read(self, n: int = -1) -> bytes:
        room = self.limit - self.pos
        if room <= 0:
            raise InvalidInput("refusing the pack: it holds more data than its manifest declares")
        data = self._raw.read(room if n is None or n < 0 else min(n, room))
        self.pos += len(data)
        return data


async def unpack(
    runtime: Runtime,
    path: Path,
    *,
    tag: str | None = None,
    force: bool = False,
    progress: Progress = _quiet,
) -> UnpackResult:
    """Unpack the pack file at ``path`` as template ``tag`` (default: the tag it was packed as)."""
    if tag is not None:
        validate_tag(tag)
    if not path.is_file():
        raise NotFound(f"no pack file at {path}")
    t0 = time.monotonic()
    job = _Job(runtime, tag, force, progress)
    try:
        await asyncio.to_thread(job.extract, path)
        return await job.commit(t0)
    finally:
        job.cleanup()


class _Job:
    """One unpack: staging paths, and what to undo if it fails."""

    def __init__(self, runtime: Runtime, tag: str | None, force: bool, progress: Progress) -> None:
        self.rt = runtime
        self.tag = tag
        self.force = force
        self.progress = progress
        self.pack: PackManifest | None = None
        suffix = f"{os.getpid()}-hub-{secrets.token_hex(4)}"
        self.snap_dir = runtime.snapshots.root / f"{STAGING_PREFIX}{suffix}"
        self.memory = runtime.snapshots.memory_root / f"{STAGING_PREFIX}{suffix}.mem"
        self.image_dir = runtime.images.root / f"{STAGING_PREFIX}{suffix}"

    # --- reading (in a worker thread: nothing here touches the registry) ----------------------

    def extract(self, path: Path) -> None:
        with open(path, "rb") as f:
            compressed = f.read(4) == ZSTD_MAGIC
        if compressed and shutil.which("zstd") is None:
            raise HostSetupError("the pack is zstd-compressed and zstd is not installed "
                                 "(apt-get install zstd)")  # fmt: skip
        proc: subprocess.Popen[bytes] | None = None
        raw: IO[bytes]
        if compressed:
            proc = subprocess.Popen(["zstd", "-dcq", str(path)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)  # fmt: skip
            assert proc.stdout is not None
            raw = proc.stdout
        else:
            raw = open(path, "rb")  # noqa: SIM115 (closed below, with the process's pipe)
        try:
            self._read(_Budget(raw))
            if proc is not None:
                _finish_zstd(proc, raw)
        except tarfile.TarError as exc:
            raise InvalidInput(f"refusing the pack: it is not a readable tar ({exc})") from None
        finally:
            raw.close()
            if proc is not None:
                proc.kill()
                proc.wait()
                if proc.stderr is not None:
                    proc.stderr.close()

    def _read(self, stream: _Budget) -> None:
        stream.limit = MAX_MANIFEST_BYTES + _SLACK
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            self._members(tar, stream)

    def _members(self, tar: tarfile.TarFile, stream: _Budget) -> None:
        first = tar.next()
        check_manifest_member(first)
        assert first is not None
        head = tar.extractfile(first)
        assert head is not None
        raw = head.read()
        stream.limit = stream.pos + _SLACK
        digest = tar.next()
        if digest is None:
            raise InvalidInput("refusing the pack: it ends after its manifest")
        check_member(digest, DIGEST_MEMBER, 64)
        recorded = tar.extractfile(digest)
        assert recorded is not None
        if recorded.read() != hashlib.sha256(raw).hexdigest().encode():
            raise InvalidInput("refusing the pack: its manifest fails its sha256 check "
                               "(corrupted or altered)")  # fmt: skip
        pack = parse_manifest(raw)
        self._admit(pack)
        self.pack = pack
        settings = self.rt.settings
        private_dir(settings.home, "forkd home")
        private_dir(self.rt.snapshots.root, "snapshot dir")
        # Before the first file lands there: a huge-page tmpfs is never mounted over files.
        prepare_memory_dir(self.rt.snapshots.memory_root, mount_huge=settings.mounts_huge_memory)
        self.rt.images.root.mkdir(parents=True, exist_ok=True)
        self.snap_dir.mkdir(mode=0o700)
        self.image_dir.mkdir(mode=0o700)
        for part in pack.parts:
            stream.limit = stream.pos + part.stored + _SLACK
            info = tar.next()
            if info is None:
                raise InvalidInput(f"refusing the pack: it ends before part {part.name!r}")
            check_member(info, part.name, part.stored)
            self.progress(f"verifying {part.name} ({part.stored / (1 << 20):.0f} MiB stored)")
            self._write_part(tar, info, part)
        stream.limit = stream.pos + _SLACK
        extra = tar.next()
        if extra is not None:
            raise InvalidInput(f"refusing the pack: unexpected member {extra.name!r} after the "
                               "last part")  # fmt: skip

    def _admit(self, pack: PackManifest) -> None:
        """Refuse a pack this host cannot run, or whose tag is taken, before writing anything."""
        reason = compat.check_here(pack.host, self.rt)
        if reason is not None:
            raise InvalidInput(f"refusing the pack of {pack.tag!r}: it cannot run on this host: "
                               f"{reason}")  # fmt: skip
        expected = self._machine_args(pack, Path("/k"), Path("/i"), Path("/r"))
        theirs = _relocate(pack.snapshot.machine_args, pack.snapshot, Path("/k"), Path("/i"),
                           Path("/r"))  # fmt: skip
        if theirs != expected:
            raise InvalidInput(f"refusing the pack of {pack.tag!r}: its machine arguments are "
                               "not the ones this forkd gives such a machine (made by another "
                               "forkd version?)")  # fmt: skip
        tag = self.tag or pack.tag
        if self.rt.snapshots.exists(tag) and not self.force:
            raise Conflict(f"snapshot {tag!r} already exists: unpack with --force to replace "
                           "it, or --tag NEW")  # fmt: skip

    def _machine_args(self, pack: PackManifest, kernel: Path, initrd: Path, rootfs: Path
                      ) -> list[str]:  # fmt: skip
        """What this forkd builds for the pack's machine (accelerator and machine type from the
        pack, which the compatibility check accepted)."""
        s = pack.snapshot
        spec = MachineSpec(kernel=kernel, initrd=initrd, rootfs=rootfs, mem_mib=s.mem_mib,
                           accel_args=tuple(self.rt.accel.qemu_args()), cpus=s.cpus,
                           nic=s.network, machine_type=pack.host.machine_type)  # fmt: skip
        return spec.machine_args()

    def _target(self, part: PackPart) -> Path:
        assert self.pack is not None
        image = self.pack.image
        names = {"kernel": image.kernel, "initrd": image.initrd, "rootfs": image.rootfs}
        if part.name == "memory":
            return self.memory
        if part.name == "devstate":
            return self.snap_dir / DEVSTATE_NAME
        return self.image_dir / names[part.name]

    def _write_part(self, tar: tarfile.TarFile, info: tarfile.TarInfo, part: PackPart) -> None:
        src = tar.extractfile(info)
        assert src is not None
        out = ExtentWriter(self._target(part), part.size, part.extents)
        try:
            left = part.stored
            while left:
                data = src.read(min(CHUNK, left))
                if not data:
                    raise InvalidInput(f"refusing the pack: part {part.name!r} is truncated")
                out.write(data)
                left -= len(data)
        finally:
            out.close()
        if out.sha256.hexdigest() != part.sha256:
            raise InvalidInput(f"refusing the pack: part {part.name!r} fails its sha256 check "
                               "(corrupted or altered)")  # fmt: skip
        if part.name in ("kernel", "initrd", "rootfs"):
            # As a built image's files: a jailed QEMU runs as its own uid and opens them by name.
            self._target(part).chmod(0o644)

    # --- committing (on the event loop: registry and stores) ----------------------------------

    async def commit(self, t0: float) -> UnpackResult:
        pack = self.pack
        assert pack is not None
        tag = self.tag or pack.tag
        images = self.rt.images
        names_before = {n for n, _ in images.list()}
        image, image_name, reused, made_dir = self._publish_image(pack)
        try:
            manifest = await self._commit_snapshot(pack, tag, image, image_name)
        except BaseException:
            # Undo exactly what this call added: a new name, and the image dir it published.
            if image_name not in names_before:
                (images.names / image_name).unlink(missing_ok=True)
            if made_dir and not any(i.digest == image.digest for _, i in images.list()):
                shutil.rmtree(image.dir, ignore_errors=True)
            raise
        self.progress(f"template {manifest.tag!r} is ready")
        return UnpackResult(tag, image_name, reused, time.monotonic() - t0)

    def _publish_image(self, pack: PackManifest) -> tuple[Image, str, bool, bool]:
        """(image, its name here, whether it was here already, whether this call made its dir).
        The pack's image name is used unless it names another image here."""
        images = self.rt.images
        wanted = pack.snapshot.image_name or f"hub-{pack.image.digest[:12]}"
        taken = {n: i.digest for n, i in images.list()}
        name = wanted if taken.get(wanted, pack.image.digest) == pack.image.digest else (
            f"hub-{pack.image.digest[:12]}")  # fmt: skip
        existing = images.load_digest(pack.image.digest)
        if existing is not None:
            return images.point(name, existing), name, True, False
        image = images.publish(name, self.image_dir, pack.image)
        return image, name, False, True

    async def _commit_snapshot(
        self, pack: PackManifest, tag: str, image: Image, image_name: str
    ) -> SnapshotManifest:
        store, registry = self.rt.snapshots, self.rt.registry
        if store.exists(tag) or registry.get_snapshot(tag) is not None:
            if not self.force:
                raise Conflict(f"snapshot {tag!r} already exists: unpack with --force to "
                               "replace it, or --tag NEW")  # fmt: skip
            # The pack is verified: only now is the old template given up.
            await self.rt.delete_snapshot(tag)
        s = pack.snapshot
        row = SnapshotRow(tag=tag, status="writing", created_at_unix=now_unix(),
                          branched_from=f"pack:{pack.tag}",
                          extra={"image": image_name, "mem_mib": s.mem_mib, "cpus": s.cpus,
                                 "writer_pid": os.getpid()})  # fmt: skip
        if not registry.reserve_snapshot(row):
            raise Conflict(f"snapshot {tag!r} already exists")
        try:
            staging = store.begin(tag)
            try:
                os.replace(self.memory, staging.memory)
                os.replace(self.snap_dir / DEVSTATE_NAME, staging.devstate)
                manifest = self._manifest(pack, tag, staging, image, image_name)
                # In a thread: the commit writes the template's durable disk copy (seconds).
                committed = await asyncio.to_thread(store.commit, staging, manifest)
            except BaseException:
                store.abort(staging)
                raise
        except BaseException:
            registry.delete_snapshot(tag)
            raise
        row.status = "ready"
        row.extra.pop("writer_pid", None)
        registry.put_snapshot(row)
        return committed

    def _manifest(self, pack: PackManifest, tag: str, staging: Staging, image: Image,
                  image_name: str) -> SnapshotManifest:  # fmt: skip
        s = pack.snapshot
        memory = pack.part("memory")
        devstate = pack.part("devstate")
        return s.model_copy(update={
            "tag": tag,
            "kind": "template",
            "memory": Artifact(path=str(staging.memory), bytes=memory.size,
                               sha256=None if pack.flattened_from else s.memory.sha256),
            "devstate": Artifact(path=DEVSTATE_NAME, bytes=devstate.size,
                                 sha256=s.devstate.sha256),
            "delta": None, "root_tag": None, "parent_tag": None,
            "branched_from": f"pack:{pack.tag}",
            "machine_args": self._machine_args(pack, image.kernel, image.initrd, image.rootfs),
            "image_name": image_name, "image_digest": image.digest,
            "kernel": str(image.kernel), "initrd": str(image.initrd), "rootfs": str(image.rootfs),
            # Egress is this host's to grant: a pack never opens the network for its children.
            "egress": None,
        })  # fmt: skip

    def cleanup(self) -> None:
        shutil.rmtree(self.snap_dir, ignore_errors=True)
        shutil.rmtree(self.image_dir, ignore_errors=True)
        self.memory.unlink(missing_ok=True)


def _finish_zstd(proc: subprocess.Popen[bytes], out: IO[bytes]) -> None:
    """Read what zstd has left (the tar's end padding) and require a clean exit: its frame
    checksum covers every byte, padding included."""
    left = _SLACK * 16
    while chunk := out.read(1 << 16):
        left -= len(chunk)
        if left < 0:
            raise InvalidInput("refusing the pack: it has data after the end of its tar")
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    if proc.wait() != 0:
        raise InvalidInput(f"refusing the pack: its zstd stream is corrupt ({err[-200:]})")


def _relocate(args: list[str], s: SnapshotManifest, kernel: Path, initrd: Path, rootfs: Path
              ) -> list[str]:  # fmt: skip
    """``args`` with the packing host's image paths replaced by ``kernel``/``initrd``/``rootfs``."""
    out: list[str] = []
    for arg in args:
        if arg == s.kernel:
            arg = str(kernel)
        elif arg == s.initrd:
            arg = str(initrd)
        else:
            arg = arg.replace(f"file={s.rootfs},", f"file={rootfs},")
        out.append(arg)
    return out
