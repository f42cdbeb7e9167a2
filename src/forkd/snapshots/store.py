"""Snapshot layout on disk and the atomic commit that makes a snapshot exist.

``snapshots/<tag>/`` holds ``manifest.json`` and ``devstate``; guest memory lives on tmpfs at
``<memory_dir>/<tag>.<unique>.mem`` (shmem is required for copy-on-write mapping and live BRANCH),
a delta branch's pages at ``<tag>.<unique>.delta``. A memory file is shared by its template and
every delta branch over it: deleting the template keeps it while any manifest still names it, and
the last snapshot that names it removes it. Unique names mean a recreated tag never replaces a
file that branches still apply their deltas over.
A snapshot is built in a staging dir and renamed into place only once the manifest is written, so
a crash mid-way leaves staging debris (swept on start), never a half snapshot that looks usable.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from forkd.config import Settings
from forkd.errors import Conflict, NotFound
from forkd.private import private_dir
from forkd.snapshots.manifest import MANIFEST_NAME, SnapshotManifest
from forkd.snapshots.memfs import prepare_memory_dir
from forkd.validate import validate_tag
from forkd.vmm.qemu import pid_alive

DEVSTATE_NAME = "devstate"
STAGING_PREFIX = ".staging-"


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
        self._mount_huge = settings.mounts_huge_memory
        self._memory_prepared = False

    def dir_of(self, tag: str) -> Path:
        return self.root / validate_tag(tag)

    def new_memory_path(self, tag: str, suffix: str) -> Path:
        return self.memory_root / f"{validate_tag(tag)}.{secrets.token_hex(4)}.{suffix}"

    def exists(self, tag: str) -> bool:
        return (self.dir_of(tag) / MANIFEST_NAME).is_file()

    def load(self, tag: str) -> SnapshotManifest:
        path = self.dir_of(tag) / MANIFEST_NAME
        if not path.is_file():
            raise NotFound(f"snapshot {tag!r} not found")
        return SnapshotManifest.model_validate_json(path.read_text())

    def devstate_path(self, tag: str) -> Path:
        return self.dir_of(tag) / DEVSTATE_NAME

    def begin(self, tag: str) -> Staging:
        """Reserve a staging area for ``tag``; refuse if the tag already exists."""
        if self.exists(tag):
            raise Conflict(
                f"snapshot {tag!r} already exists: delete it first or choose another tag"
            )
        private_dir(self.root.parent, "forkd home")
        private_dir(self.root, "snapshot dir")
        if not self._memory_prepared:
            prepare_memory_dir(self.memory_root, mount_huge=self._mount_huge)
            self._memory_prepared = True
        private_dir(self.memory_root, "memory dir")
        suffix = secrets.token_hex(4)
        # The writer's pid is in the name: only a dead writer's leftovers are ever swept.
        name = f"{STAGING_PREFIX}{os.getpid()}-{tag}-{suffix}"
        staging_dir = self.root / name
        staging_dir.mkdir(mode=0o700)
        memory = self.memory_root / f"{name}.mem"
        # Created here, 0600: a daemonized QEMU would create it with its own umask (027).
        os.close(os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return Staging(tag, staging_dir, memory)

    def commit(self, staging: Staging, manifest: SnapshotManifest) -> SnapshotManifest:
        """Move memory and the staging dir into place; the manifest is written last."""
        final_dir = self.dir_of(staging.tag)
        if final_dir.exists():
            raise Conflict(f"snapshot {staging.tag!r} already exists")
        if manifest.delta is not None:
            # A delta branch owns only its pages; ``memory`` stays the shared root file.
            final = self.new_memory_path(staging.tag, "delta")
            os.replace(staging.memory, final)
            update = {"delta": manifest.delta.model_copy(update={"path": str(final)})}
        else:
            final = self.new_memory_path(staging.tag, "mem")
            os.replace(staging.memory, final)
            update = {"memory": manifest.memory.model_copy(update={"path": str(final)})}
        manifest = manifest.model_copy(update=update)
        tmp = staging.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, staging.dir / MANIFEST_NAME)
        os.rename(staging.dir, final_dir)
        return manifest

    def rewrite_manifest(self, manifest: SnapshotManifest) -> None:
        """Atomically replace the manifest of an existing snapshot."""
        final = self.dir_of(manifest.tag) / MANIFEST_NAME
        if not final.is_file():
            raise NotFound(f"snapshot {manifest.tag!r} not found")
        tmp = final.with_suffix(".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, final)

    def abort(self, staging: Staging) -> None:
        shutil.rmtree(staging.dir, ignore_errors=True)
        staging.memory.unlink(missing_ok=True)

    def delete(self, tag: str) -> None:
        """Remove a snapshot's files (its own pages first, so a half-deleted one is
        unbootable); a memory file other snapshots still name is kept for them."""
        try:
            manifest: SnapshotManifest | None = self.load(tag)
        except (NotFound, ValueError):
            manifest = None
        if manifest is not None:
            if manifest.delta is not None:
                Path(manifest.delta.path).unlink(missing_ok=True)
            memory = Path(manifest.memory.path)
            if memory.parent == self.memory_root and str(memory) not in self.memory_in_use(tag):
                memory.unlink(missing_ok=True)
        shutil.rmtree(self.dir_of(tag), ignore_errors=True)

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

    def stale_staging(self) -> list[Path]:
        """Leftovers of snapshots whose writer died before finishing them (nothing removed)."""
        found: list[Path] = []
        for root in (self.root, self.memory_root):
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
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file())


def staging_writer(name: str) -> int | None:
    """The pid that is writing the staging entry ``name`` (None for an unreadable name)."""
    try:
        return int(name[len(STAGING_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def bootability(manifest: SnapshotManifest, devstate: Path) -> str | None:
    """None if children can fork from this snapshot, else the reason they cannot."""
    if not devstate.is_file():
        return f"device-state file {devstate} is gone"
    files = [manifest.memory] + ([manifest.delta] if manifest.delta is not None else [])
    for artifact in files:
        mem = Path(artifact.path)
        if not mem.is_file():
            return f"memory file {mem} is gone (tmpfs cleared by a reboot?)"
        if mem.stat().st_size != artifact.bytes:
            size = mem.stat().st_size
            return f"memory file {mem} has {size} bytes, manifest says {artifact.bytes}"
    for label, path in (
        ("kernel", manifest.kernel),
        ("initrd", manifest.initrd),
        ("root image", manifest.rootfs),
    ):
        if not Path(path).is_file():
            return f"{label} {path} is gone (image removed?)"
    return None
