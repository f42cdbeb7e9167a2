"""Snapshot layout on disk and the atomic commit that makes a snapshot exist.

``snapshots/<tag>/`` holds ``manifest.json``, ``devstate`` and, for a delta branch, ``delta``
(the guest pages that differ from its root's memory). Guest memory lives on tmpfs at
``<memory_dir>/<tag>.<unique>.mem`` (shmem is required for copy-on-write mapping and live BRANCH)
with a durable copy at ``snapshots/.memory/<same name>`` (snapshots/durable.py): tmpfs is a cache,
restored from the disk copy on first use after a host reboot. A memory file (both copies) is
shared by its template and every delta branch over it: deleting the template keeps it while any
manifest still names it, and the last snapshot that names it removes it. Unique names mean a
recreated tag never replaces a file that branches still apply their deltas over.
A snapshot is built in a staging dir and renamed into place only once the manifest is written, so
a crash mid-way leaves staging debris (swept on start), never a half snapshot that looks usable;
the manifest says ``memory_authoritative: "disk"`` only once the disk copy is complete and fsynced.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from forkd.config import Settings
from forkd.errors import Conflict, ForkdError, NotFound, VMError
from forkd.private import private_dir
from forkd.snapshots.durable import (
    durable_copy,
    fsync_path,
    hash_file,
    sparse_hashed_copy,
    temp_name,
)
from forkd.snapshots.manifest import MANIFEST_NAME, Artifact, SnapshotManifest
from forkd.snapshots.memfs import prepare_memory_dir
from forkd.validate import validate_tag
from forkd.vmm.qemu import pid_alive

DEVSTATE_NAME = "devstate"
DELTA_NAME = "delta"
STAGING_PREFIX = ".staging-"
DISK_MEMORY_DIR = ".memory"
# a disk copy (or delta) that failed its sha256 check is kept under this suffix, never used
CORRUPT_SUFFIX = ".corrupt"
# a disk copy younger than this is never swept as unused: its manifest may be being written
SWEEP_GRACE_S = 300.0


@dataclass(frozen=True)
class Staging:
    """Where a snapshot under construction writes its files."""

    tag: str
    dir: Path
    memory: Path

    @property
    def devstate(self) -> Path:
        return self.dir / DEVSTATE_NAME


class SnapshotStore:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.snapshots_dir
        self.memory_root = settings.memory_dir
        self.disk_root = self.root / DISK_MEMORY_DIR
        self._mount_huge = settings.mounts_huge_memory
        self._memory_prepared = False
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # deltas whose sha256 was checked by this process: (path, inode, size, mtime)
        self._verified: set[tuple[str, int, int, int]] = set()
        # why the last durable copy of a tag failed (the snapshot then stays tmpfs-only)
        self.persist_errors: dict[str, str] = {}

    def dir_of(self, tag: str) -> Path:
        return self.root / validate_tag(tag)

    def new_memory_path(self, tag: str, suffix: str) -> Path:
        return self.memory_root / f"{validate_tag(tag)}.{secrets.token_hex(4)}.{suffix}"

    def disk_copy_path(self, memory_path: str) -> Path:
        """Where the durable copy of tmpfs memory file ``memory_path`` is (named after it)."""
        return self.disk_root / Path(memory_path).name

    def exists(self, tag: str) -> bool:
        return (self.dir_of(tag) / MANIFEST_NAME).is_file()

    def load(self, tag: str) -> SnapshotManifest:
        path = self.dir_of(tag) / MANIFEST_NAME
        if not path.is_file():
            raise NotFound(f"snapshot {tag!r} not found")
        return SnapshotManifest.model_validate_json(path.read_text())

    def devstate_path(self, tag: str) -> Path:
        return self.dir_of(tag) / DEVSTATE_NAME

    def prepare_memory(self) -> None:
        """Create (and, as root, mount) the memory dir: after a host reboot it is gone."""
        private_dir(self.root.parent, "forkd home")
        private_dir(self.root, "snapshot dir")
        if not self._memory_prepared:
            prepare_memory_dir(self.memory_root, mount_huge=self._mount_huge)
            self._memory_prepared = True
        private_dir(self.memory_root, "memory dir")

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def begin(self, tag: str) -> Staging:
        """Reserve a staging area for ``tag``; refuse if the tag already exists."""
        if self.exists(tag):
            raise Conflict(
                f"snapshot {tag!r} already exists: delete it first or choose another tag"
            )
        self.prepare_memory()
        suffix = secrets.token_hex(4)
        # The writer's pid is in the name: only a dead writer's leftovers are ever swept.
        name = f"{STAGING_PREFIX}{os.getpid()}-{tag}-{suffix}"
        staging_dir = self.root / name
        staging_dir.mkdir(mode=0o700)
        memory = self.memory_root / f"{name}.mem"
        # Created here, 0600: a daemonized QEMU would create it with its own umask (027).
        os.close(os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return Staging(tag, staging_dir, memory)

    def commit(
        self, staging: Staging, manifest: SnapshotManifest, *, durable: bool = True
    ) -> SnapshotManifest:
        """Move memory and the staging dir into place; the manifest is written last.

        ``staging.memory`` holds the full guest memory, or a delta branch's delta when
        ``manifest.delta`` is set (``manifest.memory`` then names the shared root file). With
        ``durable`` the disk copy is written before this returns (``persist``); without, the
        snapshot is usable at once from tmpfs and the caller persists it later. A failed disk
        copy never fails the commit: the manifest stays ``tmpfs``-authoritative and
        ``persist_errors[tag]`` says why."""
        final_dir = self.dir_of(staging.tag)
        if final_dir.exists():
            raise Conflict(f"snapshot {staging.tag!r} already exists")
        reset: dict[str, object] = {"memory_authoritative": "tmpfs", "memory_disk": None}
        if manifest.delta is not None:
            # A delta branch owns only its pages: small, so they live on disk, durable by
            # themselves; ``memory`` stays the shared root file.
            _copy_private(staging.memory, staging.dir / DELTA_NAME)
            staging.memory.unlink()
            delta = manifest.delta.model_copy(update={"path": str(final_dir / DELTA_NAME)})
            update: dict[str, object] = {**reset, "delta": delta}
        else:
            final = self.new_memory_path(staging.tag, "mem")
            os.replace(staging.memory, final)
            update = {**reset, "memory": manifest.memory.model_copy(update={"path": str(final)})}
        manifest = manifest.model_copy(update=update)
        _write_manifest(staging.dir / MANIFEST_NAME, manifest, durable=False)
        os.rename(staging.dir, final_dir)
        if durable:
            try:
                manifest = self.persist(staging.tag)
            except (ForkdError, OSError) as exc:
                self.persist_errors[staging.tag] = str(exc) or type(exc).__name__
        return manifest

    def persist(self, tag: str) -> SnapshotManifest:
        """Give snapshot ``tag`` its durable copy (idempotent) and only then mark the manifest
        ``memory_authoritative: "disk"``. The memory copy is shared by name with every other
        snapshot over the same file; a delta branch's own files are fsynced where they are."""
        manifest = self.load(tag)
        size = manifest.memory.bytes
        tmpfs = Path(manifest.memory.path)
        disk = self.disk_copy_path(manifest.memory.path)
        private_dir(self.root, "snapshot dir")
        private_dir(self.disk_root, "durable memory dir")
        with self._lock(disk.name):
            known = manifest.memory.sha256 or (
                manifest.memory_disk.sha256 if manifest.memory_disk is not None else None
            )
            if _complete(disk, size):
                sha = known or hash_file(disk, size)
            elif _complete(tmpfs, size):
                sha = durable_copy(tmpfs, disk, size).sha256
                if known is not None and sha != known:
                    disk.unlink(missing_ok=True)
                    raise VMError(
                        f"memory file {tmpfs} no longer matches its manifest's sha256: "
                        "no disk copy written"
                    )
            else:
                raise NotFound(
                    f"snapshot {tag!r} has neither its memory file {tmpfs} nor a disk copy"
                )
        directory = self.dir_of(tag)
        updates: dict[str, object] = {}
        if manifest.delta is not None:
            delta = Path(manifest.delta.path)
            if delta.parent != directory:  # made before deltas lived on disk: move it there
                durable_copy(delta, directory / DELTA_NAME, manifest.delta.bytes)
                updates["delta"] = manifest.delta.model_copy(
                    update={"path": str(directory / DELTA_NAME)}
                )
            else:
                fsync_path(delta)
        fsync_path(self.devstate_path(tag))
        fsync_path(directory)
        fsync_path(self.root)
        current = self.load(tag)  # a hash pass may have rewritten it meanwhile
        memory = current.memory
        if memory.sha256 is None and current.delta is None:
            memory = memory.model_copy(update={"sha256": sha})
        durable = current.model_copy(update={
            **updates, "memory": memory, "memory_authoritative": "disk",
            "memory_disk": Artifact(path=str(disk), bytes=size, sha256=sha),
        })  # fmt: skip
        self.rewrite_manifest(durable, durable=True)
        if "delta" in updates and manifest.delta is not None:
            Path(manifest.delta.path).unlink(missing_ok=True)
        self.persist_errors.pop(tag, None)
        return durable

    def memory_cached(self, manifest: SnapshotManifest) -> bool:
        """Whether the tmpfs memory file children map is there (complete)."""
        return _complete(Path(manifest.memory.path), manifest.memory.bytes)

    def memory_source(self, manifest: SnapshotManifest) -> Path:
        """A complete copy of ``manifest``'s memory to read: the tmpfs file, else its disk copy.
        (Children must map the tmpfs file: ``restore_memory`` first.)"""
        tmpfs = Path(manifest.memory.path)
        if _complete(tmpfs, manifest.memory.bytes):
            return tmpfs
        disk = self.disk_copy_path(manifest.memory.path)
        if _complete(disk, manifest.memory.bytes):
            return disk
        raise NotFound(_memory_reason(manifest.memory, disk) or f"memory of {manifest.tag} gone")

    def delta_source(self, manifest: SnapshotManifest) -> Path | None:
        """A delta branch's delta file (None for a snapshot with no delta)."""
        return None if manifest.delta is None else Path(manifest.delta.path)

    def restore_memory(self, manifest: SnapshotManifest) -> bool:
        """Put the tmpfs memory file back from its disk copy if it is gone (a host reboot);
        True if it was restored. The copy's sha256 is checked on the way: a copy that fails
        it is set aside as ``<name>.corrupt`` and the snapshot reported unbootable."""
        tmpfs = Path(manifest.memory.path)
        size = manifest.memory.bytes
        if _complete(tmpfs, size):
            return False
        disk = self.disk_copy_path(manifest.memory.path)
        with self._lock(disk.name):
            if _complete(tmpfs, size):  # restored by someone else meanwhile
                return False
            reason = _memory_reason(manifest.memory, disk)
            if reason is not None:
                raise Conflict(f"snapshot {manifest.tag!r} is not bootable: {reason}")
            if tmpfs.parent != self.memory_root:
                raise Conflict(
                    f"snapshot {manifest.tag!r} maps {tmpfs}, outside this home's memory dir "
                    f"{self.memory_root}: not restored"
                )
            self.prepare_memory()
            tmp = temp_name(tmpfs)
            try:
                got = sparse_hashed_copy(disk, tmp, size).sha256
                expected = manifest.memory.sha256 or (
                    manifest.memory_disk.sha256 if manifest.memory_disk is not None else None
                )
                if expected is not None and got != expected:
                    os.replace(disk, _corrupt(disk))
                    raise Conflict(
                        f"snapshot {manifest.tag!r} is not bootable: its memory's disk copy "
                        f"{disk} has sha256 {got[:16]}..., the manifest says {expected[:16]}... "
                        f"(kept as {_corrupt(disk).name})"
                    )
                os.replace(tmp, tmpfs)
            finally:
                tmp.unlink(missing_ok=True)
        return True

    def check_delta(self, manifest: SnapshotManifest) -> None:
        """Check a delta branch's delta against its sha256 (once per file per process); a delta
        that fails is set aside as ``delta.corrupt`` and the branch reported unbootable."""
        if manifest.delta is None or manifest.delta.sha256 is None:
            return
        path = Path(manifest.delta.path)
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in self._verified:
            return
        got = hash_file(path, st.st_size)
        if got != manifest.delta.sha256:
            os.replace(path, _corrupt(path))
            raise Conflict(
                f"snapshot {manifest.tag!r} is not bootable: its delta {path} has sha256 "
                f"{got[:16]}..., the manifest says {manifest.delta.sha256[:16]}..."
            )
        self._verified.add(key)

    def bootability(self, manifest: SnapshotManifest) -> str | None:
        """None if children can fork from this snapshot (perhaps after ``restore_memory``),
        else the reason they cannot."""
        return bootability(
            manifest, self.devstate_path(manifest.tag), self.disk_copy_path(manifest.memory.path)
        )

    def rewrite_manifest(self, manifest: SnapshotManifest, *, durable: bool = False) -> None:
        """Atomically replace the manifest of an existing snapshot (``durable``: fsynced)."""
        final = self.dir_of(manifest.tag) / MANIFEST_NAME
        if not final.is_file():
            raise NotFound(f"snapshot {manifest.tag!r} not found")
        _write_manifest(final, manifest, durable=durable)

    def abort(self, staging: Staging) -> None:
        shutil.rmtree(staging.dir, ignore_errors=True)
        staging.memory.unlink(missing_ok=True)

    def delete(self, tag: str) -> None:
        """Remove a snapshot's files (its own pages first, so a half-deleted one is
        unbootable); a memory file other snapshots still name is kept for them, both copies."""
        try:
            manifest: SnapshotManifest | None = self.load(tag)
        except (NotFound, ValueError):
            manifest = None
        if manifest is not None:
            if manifest.delta is not None:
                Path(manifest.delta.path).unlink(missing_ok=True)
            memory = Path(manifest.memory.path)
            if str(memory) not in self.memory_in_use(tag):
                disk = self.disk_copy_path(manifest.memory.path)
                with self._lock(disk.name):
                    disk.unlink(missing_ok=True)
                    _corrupt(disk).unlink(missing_ok=True)
                if memory.parent == self.memory_root:
                    memory.unlink(missing_ok=True)
        shutil.rmtree(self.dir_of(tag), ignore_errors=True)
        self.persist_errors.pop(tag, None)

    def memory_in_use(self, except_tag: str | None = None) -> set[str]:
        """Memory files named by any snapshot's manifest (but ``except_tag``'s)."""
        used: set[str] = set()
        for other in self.tags_on_disk():
            if other == except_tag:
                continue
            try:
                used.add(self.load(other).memory.path)
            except (NotFound, ValueError):
                continue
        return used

    def unused_disk_copies(self, *, now: float | None = None) -> list[Path]:
        """Disk copies no manifest names (a delete interrupted mid-way); nothing removed.
        Empty when any manifest is unreadable: then nobody can tell which are unused."""
        if not self.disk_root.is_dir():
            return []
        names: set[str] = set()
        for tag in self.tags_on_disk():
            try:
                names.add(Path(self.load(tag).memory.path).name)
            except (NotFound, ValueError):
                return []
        old = (time.time() if now is None else now) - SWEEP_GRACE_S
        found: list[Path] = []
        for entry in sorted(self.disk_root.iterdir()):
            name = entry.name.removesuffix(CORRUPT_SUFFIX)
            if entry.name.startswith(STAGING_PREFIX) or name in names:
                continue
            try:
                if entry.stat().st_mtime < old:
                    found.append(entry)
            except FileNotFoundError:
                continue
        return found

    def sweep_disk_copies(self) -> list[str]:
        removed: list[str] = []
        for entry in self.unused_disk_copies():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def stale_staging(self) -> list[Path]:
        """Leftovers of snapshots whose writer died before finishing them (nothing removed)."""
        found: list[Path] = []
        for root in (self.root, self.memory_root, self.disk_root):
            for entry in sorted(root.iterdir()) if root.is_dir() else []:
                if not entry.name.startswith(STAGING_PREFIX):
                    continue
                writer = staging_writer(entry.name)
                if writer is not None and writer != os.getpid() and pid_alive(writer):
                    continue
                found.append(entry)
        return found

    def sweep_staging(self) -> list[str]:
        """Delete leftovers of snapshots whose writer died before finishing them."""
        removed: list[str] = []
        for entry in self.stale_staging():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def tags_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )


def _complete(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def _corrupt(path: Path) -> Path:
    return path.with_name(path.name + CORRUPT_SUFFIX)


def _copy_private(src: Path, dest: Path) -> None:
    """Copy a (dense) file into a new 0600 file."""
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 4 * 1024 * 1024)


def _write_manifest(path: Path, manifest: SnapshotManifest, *, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        f.write(manifest.model_dump_json(indent=2))
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def staging_writer(name: str) -> int | None:
    """The pid that is writing the staging entry ``name`` (None for an unreadable name)."""
    try:
        return int(name[len(STAGING_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def _memory_reason(memory: Artifact, disk_copy: Path | None) -> str | None:
    """None if the memory children map is on tmpfs or restorable from its disk copy."""
    mem = Path(memory.path)
    if _complete(mem, memory.bytes):
        return None
    if disk_copy is not None and _complete(disk_copy, memory.bytes):
        return None
    if mem.is_file():
        tmpfs = f"memory file {mem} has {mem.stat().st_size} bytes, manifest says {memory.bytes}"
    else:
        tmpfs = f"memory file {mem} is gone (tmpfs cleared by a reboot?)"
    if disk_copy is None:
        return tmpfs
    if _corrupt(disk_copy).exists():
        return f"{tmpfs} and its disk copy {disk_copy} failed its sha256 check"
    if disk_copy.is_file():
        got = disk_copy.stat().st_size
        return f"{tmpfs} and its disk copy {disk_copy} has {got} bytes (truncated?)"
    return f"{tmpfs} and it has no disk copy"


def bootability(
    manifest: SnapshotManifest, devstate: Path, disk_copy: Path | None = None
) -> str | None:
    """None if children can fork from this snapshot, else the reason they cannot.
    ``disk_copy``: where the memory's durable copy would be (tmpfs may then be restored)."""
    if not devstate.is_file():
        return f"device-state file {devstate} is gone"
    reason = _memory_reason(manifest.memory, disk_copy)
    if reason is not None:
        return reason
    if manifest.delta is not None:
        delta = Path(manifest.delta.path)
        if _corrupt(delta).exists():
            return f"delta file {delta} failed its sha256 check"
        if not delta.is_file():
            return f"delta file {delta} is gone"
        if delta.stat().st_size != manifest.delta.bytes:
            size = delta.stat().st_size
            return f"delta file {delta} has {size} bytes, manifest says {manifest.delta.bytes}"
    for label, path in (
        ("kernel", manifest.kernel),
        ("initrd", manifest.initrd),
        ("root image", manifest.rootfs),
    ):
        if not Path(path).is_file():
            return f"{label} {path} is gone (image removed?)"
    return None
