"""What forkd processes that died mid-work leave behind, found without touching anything.

- child run dirs nobody owns: pre-launched (warm-pool) children whose owning process is gone,
  and forks interrupted before they were recorded (old enough that no fork can still be running);
- snapshot staging entries (on disk and on tmpfs) whose writing process is gone
  (:meth:`~forkd.snapshots.store.SnapshotStore.stale_staging`);
- records of dead sandboxes (their QEMU exited), kept with a reason for ``forkd ls --all``;
- cgroup leaves that hold no QEMU and are older than a couple of minutes (any home's: a leaf
  holds its QEMU from before exec until its end, so an old empty one is nobody's).

The runtime sweeps all but the records at start and close; ``forkd cleanup`` lists them all (a
dry run) and removes them with ``-y``. Nothing that a live process owns is ever listed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forkd.config import Settings
from forkd.runtime import cgroups as cgroup_limits
from forkd.runtime.pool import pool_dir_owner, pool_dir_token
from forkd.runtime.registry import Registry
from forkd.snapshots.store import SnapshotStore
from forkd.vmm.qemu import pid_alive, pid_runs_in
from forkd.vmm.spec import RunPaths

UNRECORDED_GRACE_S = 120.0
"""A run dir named like a sandbox but unknown to the registry is only an orphan once this old."""

LeftoverKind = Literal["run dir", "staging", "dead sandbox", "cgroup"]


@dataclass(frozen=True)
class Leftover:
    kind: LeftoverKind
    path: Path
    why: str
    sandbox_id: str | None = None  # for "dead sandbox": the registry record to drop

    @property
    def size_bytes(self) -> int:
        return 0 if self.kind == "cgroup" else tree_size(self.path)


def orphan_run_dirs(
    run_dir: Path, known: set[str], *, own_pool: str | None = None, now: float | None = None
) -> list[Path]:
    """Child run dirs under ``run_dir`` that no sandbox record and no live process owns; of
    this process's own pools, only those of pool ``own_pool`` (its caller's, after a drain)."""
    stale_before = (time.time() if now is None else now) - UNRECORDED_GRACE_S
    found: list[Path] = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name in known:  # a sandbox, wherever its run dir came from
            continue
        owner = pool_dir_owner(entry.name)
        orphan = False
        if owner is not None:
            if owner == os.getpid():
                orphan = own_pool is not None and pool_dir_token(entry.name) == own_pool
            else:
                orphan = not pid_alive(owner)
        elif entry.name.startswith("sb-"):
            with contextlib.suppress(OSError):
                orphan = entry.stat().st_mtime < stale_before
        if orphan:
            found.append(entry)
    return found


def remove_run_dir(entry: Path) -> None:
    """Kill the QEMU still running from ``entry`` (if any), then remove the dir."""
    paths = RunPaths(entry)
    with contextlib.suppress(OSError, ValueError):
        pid = int(paths.pidfile.read_text().strip())
        if pid_runs_in(pid, paths):
            os.kill(pid, 9)
    shutil.rmtree(entry, ignore_errors=True)


def find(settings: Settings) -> list[Leftover]:
    """Every leftover of the data dir of ``settings``, changing nothing."""
    out: list[Leftover] = []
    known: set[str] = set()
    if settings.db_path.is_file():
        registry = Registry(settings.db_path)
        try:
            rows = registry.list_sandboxes()
        finally:
            registry.close()
        known = {Path(r.run_dir).name for r in rows}
        for r in rows:
            if r.state == "dead":
                why = f"dead sandbox: {r.dead_reason or 'QEMU exited'}"
                out.append(Leftover("dead sandbox", Path(r.run_dir), why, r.id))
    for entry in orphan_run_dirs(settings.run_dir, known):
        owner = pool_dir_owner(entry.name)
        why = (
            f"pre-started child of process {owner}, which is gone"
            if owner is not None
            else "fork interrupted before it was recorded"
        )
        out.append(Leftover("run dir", entry, why))
    for entry in SnapshotStore(settings).stale_staging():
        out.append(Leftover("staging", entry, "half-written snapshot whose writer is gone"))
    if (cgroups := cgroup_limits.available(settings.cgroups)) is not None:
        for leaf in cgroups.stale():
            out.append(Leftover("cgroup", leaf, "cgroup leaf that holds no QEMU"))
    return out


def remove(settings: Settings, leftover: Leftover) -> None:
    """Delete one leftover found by :func:`find`."""
    if leftover.kind == "cgroup":
        with contextlib.suppress(OSError):
            leftover.path.rmdir()
        return
    if leftover.kind == "staging":
        if leftover.path.is_dir():
            shutil.rmtree(leftover.path, ignore_errors=True)
        else:
            leftover.path.unlink(missing_ok=True)
        return
    remove_run_dir(leftover.path)
    if leftover.sandbox_id is not None:
        if (cgroups := cgroup_limits.available(settings.cgroups)) is not None:
            cgroups.remove(leftover.sandbox_id)
        registry = Registry(settings.db_path)
        try:
            registry.delete_sandbox(leftover.sandbox_id)
        finally:
            registry.close()


def tree_size(path: Path) -> int:
    """Bytes allocated under ``path`` (0 when it is gone)."""
    total = 0
    with contextlib.suppress(OSError):
        if not path.is_dir():
            return path.stat().st_blocks * 512
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / name).lstat().st_blocks * 512
    return total
