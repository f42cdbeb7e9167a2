"""The tmpfs that holds guest memory files, its transparent huge pages, and the host facts that
change what huge pages cost (DAMON access sampling, free page reporting to a hypervisor).

A live BRANCH write-protects all of guest RAM while the guest is paused. The kernel does that per
folio, so memory files whose page cache is made of 2 MiB folios cut that pause to about half
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

from forkd.private import private_dir

MOUNT_SOURCE = "forkd-mem"
HUGE_OPTION = "within_size"
DAMON_ADMIN = Path("/sys/kernel/mm/damon/admin/kdamonds")
VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_REPORTING = 5


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
    """Create ``path`` (private: 0700, owner-checked); with ``mount_huge``, put a huge-page tmpfs
    there if forkd may and should. A directory another user made (or a symlink) is refused
    before anything is mounted or written: its name under world-writable /dev/shm is
    predictable."""
    private_dir(path, "memory dir")
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


@dataclass(frozen=True)
class AccessSampler:
    """A running DAMON worker (``kdamond.N``). It samples page access by clearing accessed bits,
    every page-table entry of a sampled folio at once, so over huge folios it touches 512 entries
    per sample; the next sweep over guest RAM (QEMU's pre-pass before a live branch) pays to set
    them again."""

    name: str
    operations: str | None = None  # paddr, vaddr or fvaddr; None when not set up through sysfs
    sample_ms: float | None = None

    @property
    def label(self) -> str:
        """``kdamond.0 (paddr, every 500 ms)``"""
        every = f"every {self.sample_ms:g} ms" if self.sample_ms else None
        setup = [x for x in (self.operations, every) if x]
        return self.name + (f" ({', '.join(setup)})" if setup else "")


def access_samplers(proc: Path = Path("/proc"), admin: Path = DAMON_ADMIN) -> list[AccessSampler]:
    """The DAMON workers running on this host, with their setup where the admin sysfs has it."""
    setups: dict[int, tuple[str | None, float | None]] = {}
    for kdamond in admin.glob("[0-9]*"):
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            pid = int((kdamond / "pid").read_text())
            ctx = kdamond / "contexts" / "0"
            ops = (ctx / "operations").read_text().strip() or None
            sample_us = int((ctx / "monitoring_attrs" / "intervals" / "sample_us").read_text())
        except (OSError, ValueError):
            continue
        setups[pid] = (ops, sample_us / 1000)
    samplers: list[AccessSampler] = []
    for comm in proc.glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
            pid = int(comm.parent.name)
        except (OSError, ValueError):
            continue  # the process exited meanwhile
        if name.startswith("kdamond"):
            samplers.append(AccessSampler(name, *setups.get(pid, (None, None))))
    return sorted(samplers, key=lambda s: s.name)


def free_page_reporting(devices: Path = VIRTIO_DEVICES) -> bool:
    """Whether this host is itself a VM that hands free memory back to its hypervisor (virtio
    balloon free page reporting). Reported blocks are 2 MiB and larger, so huge-page guest memory
    allocated from them pays the hypervisor's fault on first touch."""
    for device in devices.glob("*"):
        try:
            if int((device / "device").read_text(), 16) != VIRTIO_ID_BALLOON:
                continue
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        # sysfs prints the negotiated feature bits as a string of 0/1, bit 0 first.
        if (
            len(features) > VIRTIO_BALLOON_F_REPORTING
            and features[VIRTIO_BALLOON_F_REPORTING] == "1"
        ):
            return True
    return False
