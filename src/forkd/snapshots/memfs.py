"""The tmpfs that holds guest memory files, and its transparent huge pages.

A live BRANCH write-protects all of guest RAM while the guest is paused. The kernel does that per
folio, so memory files whose page cache is made of 2 MiB folios cut that pause to about a third
(see bench/results/branch.md). ``/dev/shm`` is normally mounted without huge pages, so when forkd
runs as root and uses its default memory dir, it mounts its own small tmpfs there with
``huge=within_size`` before the first memory file is written. Anything else (an explicit
``FORKD_SHM_DIR``, no privilege, a failed mount) keeps the plain directory: correct, only slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MOUNT_SOURCE = "forkd-mem"
HUGE_OPTION = "within_size"


@dataclass(frozen=True)
class MountInfo:
    """The mount a path lives on, from ``/proc/self/mountinfo``."""

    mountpoint: Path
    fstype: str
    source: str
    options: dict[str, str]

    @property
    def huge(self) -> str:
        """tmpfs ``huge=`` policy (``never`` when not given)."""
        return self.options.get("huge", "never")

    @property
    def owned_by_forkd(self) -> bool:
        return self.fstype == "tmpfs" and self.source == MOUNT_SOURCE


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo; everything else is verbatim.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts: list[MountInfo] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        options: dict[str, str] = {}
        for opt in (tail[2] if len(tail) > 2 else "").split(","):
            key, _, value = opt.partition("=")
            if key:
                options[key] = value
        mounts.append(MountInfo(Path(_unescape(fields[4])), tail[0], _unescape(tail[1]), options))
    return mounts


def mount_of(path: Path) -> MountInfo | None:
    """The innermost mount containing ``path`` (or its nearest existing ancestor)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    resolved = probe.resolve()
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    best: MountInfo | None = None
    for mount in mounts:
        contains = resolved == mount.mountpoint or mount.mountpoint in resolved.parents
        # ">=": a later line is mounted on top of an earlier one at the same point.
        if contains and (best is None or len(mount.mountpoint.parts) >= len(best.mountpoint.parts)):
            best = mount
    return best


def prepare_memory_dir(path: Path, *, mount_huge: bool) -> None:
    """Create ``path``; with ``mount_huge``, put a huge-page tmpfs there if forkd may and should."""
    path.mkdir(parents=True, exist_ok=True)
    if not mount_huge or os.geteuid() != 0:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Two forkd processes sharing a home must not stack two mounts.
        fcntl.flock(fd, fcntl.LOCK_EX)
        where = mount_of(path)
        if where is None or where.fstype != "tmpfs" or where.huge != "never":
            return  # already huge, forkd's own mount, or not tmpfs (doctor reports that)
        if where.mountpoint == path.resolve() or any(path.iterdir()):
            return  # never hide files that are already there
        st = os.statvfs(where.mountpoint)
        size = st.f_blocks * st.f_frsize
        options = f"huge={HUGE_OPTION},size={size},mode=0700"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # A failed mount leaves the plain directory, which works (slower live BRANCH).
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, MOUNT_SOURCE, str(path)],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
    finally:
        os.close(fd)


def release_memory_dir(path: Path) -> None:
    """Delete ``path`` with everything in it, unmounting forkd's own tmpfs there first."""
    where = mount_of(path)
    if where is not None and where.owned_by_forkd and where.mountpoint == path.resolve():
        # Lazy: a QEMU that is still exiting may hold a mapping for a moment; the tmpfs (and
        # every file in it) goes away with it instead of failing with EBUSY.
        subprocess.run(
            ["umount", "--lazy", str(path)], check=False, capture_output=True, timeout=30
        )
    shutil.rmtree(path, ignore_errors=True)
