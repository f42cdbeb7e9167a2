"""``forkd doctor``: what this host can do, one line per check, with a hint when it cannot."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forkd.config import DEFAULT_IMAGE, Settings
from forkd.errors import HostSetupError
from forkd.private import check_owned
from forkd.runtime import cgroups
from forkd.snapshots.memfs import AccessSampler, access_samplers, free_page_reporting, mount_of
from forkd.vmm import jail as jails
from forkd.vmm.accel import detect_accel
from forkd.vmm.machine import MACHINE_FAMILY, probe_qemu, require_supported

Status = Literal["PASS", "WARN", "FAIL"]
MIN_SHM_FREE_BYTES = 1 << 30
MIN_HOME_FREE_BYTES = 4 << 30

# userfaultfd(2) constants (x86_64).
SYS_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_USER_MODE_ONLY = 1


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


def check_qemu() -> Check:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        hint = "apt-get install qemu-system-x86 (on Debian 12: scripts/setup.sh install)"
        return Check("qemu", "FAIL", "qemu-system-x86_64 not found", hint)
    try:
        build = probe_qemu(path)
    except HostSetupError as exc:
        return Check("qemu", "WARN", str(exc))
    machine = build.resolve(MACHINE_FAMILY)
    text = f"{path} version {build.version_text}; new templates record machine type {machine}"
    try:
        require_supported(build)
    except HostSetupError as exc:
        return Check("qemu", "FAIL", text, str(exc))
    return Check("qemu", "PASS", text)


def check_accel(settings: Settings) -> Check:
    choice = detect_accel(settings.accel)
    status: Status = "PASS" if choice.name == "kvm" else "WARN"
    hint = "" if choice.name == "kvm" else "guests run 12-100x slower than on a KVM host"
    return Check("accelerator", status, f"{choice.name}: {choice.reason}", hint)


def uffd_wp_shmem_supported() -> tuple[bool, str]:
    """Ask the kernel whether userfaultfd write-protect works on shmem (needed by live BRANCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd < 0:
        fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"userfaultfd() failed: {os.strerror(err)}"
    try:
        buf = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
        if libc.ioctl(fd, ctypes.c_ulong(UFFDIO_API), buf) != 0:
            return False, f"UFFDIO_API failed: {os.strerror(ctypes.get_errno())}"
        if buf[1] & UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
            return True, "userfaultfd write-protect on shmem available"
        return False, "kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM (needs Linux >= 5.19)"
    finally:
        os.close(fd)


def check_uffd() -> Check:
    ok, detail = uffd_wp_shmem_supported()
    if ok:
        return Check("userfaultfd-wp", "PASS", detail)
    return Check(
        "userfaultfd-wp", "WARN", detail, "live BRANCH unavailable; full and diff still work"
    )


def check_tmpfs(settings: Settings) -> Check:
    target = settings.memory_dir
    probe = target if target.exists() else target.parent
    try:
        st = os.statvfs(probe)
    except OSError as exc:
        return Check("tmpfs", "FAIL", f"{probe}: {exc}", "mount a tmpfs at /dev/shm")
    free = st.f_bavail * st.f_frsize
    mount = mount_of(probe)
    fstype = mount.fstype if mount else "unknown"
    text = f"{probe} ({fstype}) has {free / 2**30:.1f} GiB free"
    if fstype not in ("tmpfs", "hugetlbfs"):
        return Check("tmpfs", "FAIL", text, "guest memory must live on tmpfs; set FORKD_SHM_DIR")
    if free < MIN_SHM_FREE_BYTES:
        return Check("tmpfs", "WARN", text, "each template needs its guest memory size in tmpfs")
    return Check("tmpfs", "PASS", text)


def _used_bytes(directory: Path) -> int:
    """Bytes the files directly in ``directory`` occupy (sparse files: their data only)."""
    total = 0
    for entry in directory.iterdir() if directory.is_dir() else []:
        try:
            total += entry.stat().st_blocks * 512
        except OSError:
            continue
    return total


def check_home_disk(settings: Settings, min_free: int = MIN_HOME_FREE_BYTES) -> Check:
    """Free space under ``FORKD_HOME``, where every template keeps its durable memory copy."""
    from forkd.snapshots.store import DISK_MEMORY_DIR

    probe = settings.home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError as exc:
        return Check("home disk", "FAIL", f"{probe}: {exc}")
    free = st.f_bavail * st.f_frsize
    copies = _used_bytes(settings.snapshots_dir / DISK_MEMORY_DIR)
    text = (
        f"{settings.home} has {free / 2**30:.1f} GiB free; durable memory copies use "
        f"{copies / 2**20:.0f} MiB"
    )
    if free < min_free:
        return Check(
            "home disk", "WARN", text,
            "each template and branch keeps a sparse disk copy of its guest memory there (what "
            "the guest used); without room new snapshots stay tmpfs-only and are lost on a "
            "host reboot: free space or point FORKD_HOME at a larger disk",
        )  # fmt: skip
    return Check("home disk", "PASS", text)


def check_private_state(settings: Settings) -> Check:
    """forkd's dirs must be its user's alone (docs/security.md); FAIL names the first that is
    not."""
    dirs = (settings.home, settings.run_dir, settings.snapshots_dir, settings.memory_dir)
    for d in dirs:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return Check("private state", "FAIL", f"{d}: {exc}")
        try:
            check_owned(d, st, "directory")
        except HostSetupError as exc:
            message, _, fix = str(exc).partition("; ")
            return Check("private state", "FAIL", message, fix)
    return Check(
        "private state", "PASS",
        "home, run, snapshot and memory dirs are yours, writable by nobody else (kept 0700)",
    )  # fmt: skip


def check_huge_memory(settings: Settings) -> Check:
    """Huge pages behind guest memory files make the live-BRANCH pause about 2x shorter."""
    target = settings.memory_dir
    mount = mount_of(target)
    if mount is not None and mount.fstype == "tmpfs" and mount.huge != "never":
        owner = " (forkd's own mount)" if mount.owned_by_forkd else ""
        return Check("huge pages", "PASS", f"{mount.mountpoint}: huge={mount.huge}{owner}")
    as_root = settings.mounts_huge_memory and os.geteuid() == 0
    if as_root and not (target.exists() and any(target.iterdir())):
        return Check(
            "huge pages", "PASS", f"forkd mounts a huge=within_size tmpfs at {target} on first use"
        )
    fix = (
        f"{target} already holds memory files, so forkd does not mount over it; delete this "
        "home's snapshots and forkd mounts a huge-page tmpfs for the next one"
        if as_root
        else "run forkd as root with the default memory dir, or mount a tmpfs with "
        "-o huge=within_size and point FORKD_SHM_DIR at it"
    )
    where = mount.mountpoint if mount else target
    return Check(
        "huge pages", "WARN",
        f"{where} has no transparent huge pages: live BRANCH pauses ~2x longer", fix,
    )  # fmt: skip


def _huge_page_caveat(
    name: str, found: str | None, absent: str, huge_memory: bool, hint: str
) -> Check:
    """A host fact that only matters for huge-page guest memory: WARN with ``hint`` when it is
    ``found`` and guest memory uses huge pages, PASS otherwise."""
    if found is None:
        return Check(name, "PASS", absent)
    if not huge_memory:
        return Check(name, "PASS", f"{found}; guest memory in 4 KiB pages, which it barely affects")
    return Check(name, "WARN", found, hint)


def check_access_sampling(huge_memory: bool, samplers: list[AccessSampler]) -> Check:
    """DAMON's access sampling makes QEMU's pass over guest RAM before a live branch slower when
    guest memory is in huge folios (docs/branch.md)."""
    found = f"DAMON {', '.join(s.label for s in samplers)} samples page access"
    return _huge_page_caveat(
        "page sampling", found if samplers else None, "no DAMON worker samples page access",
        huge_memory,
        "it clears accessed bits a whole huge page at a time, and QEMU's pass over guest RAM "
        "before a live branch sets them again (~45 ms per GiB measured in a VM host instead of "
        "~4, docs/branch.md); FORKD_HUGE_MEMORY=0: wait=false returns sooner, pauses ~2x longer",
    )  # fmt: skip


def check_page_reporting(huge_memory: bool, reporting: bool) -> Check:
    """Free page reporting makes the first touch of huge-page guest memory vary 25x."""
    found = "on: this host hands free 2 MiB blocks back to its hypervisor after a few seconds"
    return _huge_page_caveat(
        "free page reporting", found if reporting else None,
        "off: free memory stays with this host", huge_memory,
        "huge-page guest memory that lands on such a block pays the hypervisor on first touch "
        "(~1.6 s per GiB measured on one host, against 0.06 s): full BRANCH pauses and new "
        "templates vary with it (docs/branch.md)",
    )  # fmt: skip


def check_program(name: str, package: str, why: str, *, optional: bool = False) -> Check:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return Check(name, "PASS", path)
    hint = f"apt-get install {package}"
    return Check(name, "WARN" if optional else "FAIL", f"{name} not found ({why})", hint)


def check_images(settings: Settings) -> list[Check]:
    from forkd.images.store import ImageStore

    store = ImageStore(settings)
    names = [name for name, _ in store.list()]
    kernels = sorted(
        p.name for p in (settings.cache_dir / "kernels").glob("*") if (p / "done").exists()
    )
    out = [
        Check("kernel cache", "PASS" if kernels else "WARN",
              ", ".join(kernels) if kernels else "no kernel downloaded yet",
              "" if kernels else "forkd image build fetches it"),
        Check("images", "PASS" if DEFAULT_IMAGE in names else "WARN",
              ", ".join(names) if names else "no image built",
              "" if DEFAULT_IMAGE in names else f"run 'forkd image build {DEFAULT_IMAGE}'"),
    ]  # fmt: skip
    without_nic = [name for name, image in store.list() if not image.manifest.network]
    if without_nic:
        hint = "rebuild with 'forkd image build NAME' for templates with a NIC"
        old = ", ".join(without_nic)
        out.append(Check("image network", "WARN", f"built before guest networking: {old}", hint))
    return out


def check_network_backend() -> Check:
    """The guest NIC's mechanism: QEMU's user-mode (slirp) backend, one private NAT per QEMU."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        return Check("guest network", "FAIL", "no QEMU", "apt-get install qemu-system-x86")
    try:
        out = subprocess.run([path, "-netdev", "help"], capture_output=True, text=True,
                             timeout=20, check=False).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("guest network", "WARN", f"cannot ask QEMU for its backends: {exc}")
    if "user" not in out.split():
        hint = "install a QEMU built with libslirp (Debian's qemu-system-x86 is)"
        return Check("guest network", "FAIL",
                     "this QEMU has no user-mode (slirp) network backend", hint)  # fmt: skip
    return Check("guest network", "PASS",
                 "user-mode NIC per sandbox (QEMU's slirp: a private NAT in each QEMU process); "
                 "egress none: backend restricted, ingress forwards only")  # fmt: skip


def check_egress_guard() -> Check:
    from forkd.net.guard import cgroup2_root, probe

    why = probe()
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if why is None and release < (5, 13):
        why = f"kernel {os.uname().release} lacks nftables 'socket cgroupv2' (needs 5.13+)"
    if why is not None:
        hint = "sandboxes still get egress none; as root: apt-get install nftables"
        return Check("egress guard", "WARN",
                     f"egress internet/allowlist unavailable: {why}", hint)  # fmt: skip
    return Check("egress guard", "PASS",
                 f"nftables on each QEMU's cgroup ({cgroup2_root()}): internet (public "
                 "addresses only) and allowlist (domains via a per-sandbox proxy, CIDRs, "
                 "host:PORT) are enforced")  # fmt: skip


def check_jail(settings: Settings) -> Check:
    """Whether every QEMU runs jailed (own uid, no capabilities, namespaces), and if not why."""
    if settings.jail == "off":
        return Check("jail", "WARN", "off (FORKD_JAIL=off): QEMU runs as forkd's user, with its "
                     "seccomp filter only", "unset FORKD_JAIL to jail every QEMU (needs root "
                     "and bubblewrap)")  # fmt: skip
    problem = jails.probe()
    if problem is not None:
        status: Status = "FAIL" if settings.jail == "required" else "WARN"
        return Check("jail", status, f"QEMU runs unjailed (seccomp filter only): {problem}",
                     "a guest that escapes QEMU gets forkd's rights; docs/security.md")  # fmt: skip
    try:
        devices = jails.device_nodes(settings.home / "jail", settings.jail_id_base)
    except OSError as exc:
        return Check("jail", "FAIL", f"cannot prepare the jail's device nodes: {exc}")
    if "userfaultfd" not in devices and Path("/dev/userfaultfd").exists():
        return Check("jail", "WARN", "jailed, but the jail's /dev/userfaultfd does not open "
                     f"(is {settings.home} on a nodev filesystem?)",
                     "live BRANCH fails inside the jail; full and diff work")  # fmt: skip
    return Check("jail", "PASS", "every QEMU jailed: own uid, no capabilities, no_new_privs, "
                 "pid/mount/ipc/uts/net namespaces, seccomp")  # fmt: skip


def check_open_egress_netns(settings: Settings) -> Check:
    """Whether open egress (internet, CIDRs) of a jailed sandbox leaves the host's namespace."""
    from forkd.net import pasta

    why = pasta.probe()
    if settings.jail == "off" or jails.probe() is not None:
        return Check("open egress netns", "WARN", "QEMU is not jailed: every QEMU shares the "
                     "host's network namespace", "see 'jail'")  # fmt: skip
    if why is not None:
        return Check("open egress netns", "WARN", "sandboxes with egress internet or a CIDR "
                     f"allow-list keep their QEMU in the host's network namespace: {why}",
                     "as root: apt-get install passt (docs/security.md)")  # fmt: skip
    from forkd.net.guard import host_nameservers

    resolvers = host_nameservers()
    if resolvers and all(r.startswith("127.") for r in resolvers):
        return Check("open egress netns", "WARN", "internet sandboxes leave their namespace "
                     f"through pasta, but this host's resolvers ({', '.join(resolvers)}) are on "
                     "its loopback, which their DNS cannot reach", "name a resolver by its "
                     "address in /etc/resolv.conf (docs/security.md)")  # fmt: skip
    return Check("open egress netns", "PASS", "every jailed QEMU has its own network "
                 "namespace; internet and CIDR egress leave it through a pasta in the "
                 "sandbox's guard cgroup")  # fmt: skip


def check_cgroups(settings: Settings, found: cgroups.Cgroups | None = None) -> Check:
    """Which cgroup controllers limit each QEMU, and from which hierarchy (v2 or v1)."""
    if not settings.cgroups:
        return Check("cgroups", "WARN", "off (FORKD_CGROUPS=0): no memory, pids or CPU limit on "
                     "any QEMU", "unset FORKD_CGROUPS")  # fmt: skip
    detected = found if found is not None else cgroups.detect()
    have = {} if detected is None else detected.hierarchies
    text = ", ".join(f"{c} ({have[c].version})" for c in cgroups.CONTROLLERS if c in have)
    missing = [c for c in cgroups.CONTROLLERS if c not in have]
    if not missing:
        return Check("cgroups", "PASS", f"a leaf per QEMU before it runs: {text}")
    hint = ("forkd needs root and a writable cgroup hierarchy with the memory, pids and cpu "
            "controllers (v2, or v1)")  # fmt: skip
    lacking = f"no {', '.join(missing)} limit"
    return Check("cgroups", "WARN", f"{text}; {lacking}" if text else lacking, hint)


def check_kvm_device() -> Check:
    dev = Path("/dev/kvm")
    if not dev.exists():
        return Check(
            "/dev/kvm", "WARN", "absent", "TCG only; load kvm_intel/kvm_amd on a VT-x/AMD-V host"
        )
    return Check(
        "/dev/kvm", "PASS", "present" + (" (PVM)" if Path("/sys/module/kvm_pvm").exists() else "")
    )


def run_checks(settings: Settings) -> list[Check]:
    huge = check_huge_memory(settings)
    return [
        check_qemu(),
        check_kvm_device(),
        check_accel(settings),
        check_uffd(),
        check_jail(settings),
        check_cgroups(settings),
        check_tmpfs(settings),
        check_home_disk(settings),
        check_private_state(settings),
        huge,
        check_access_sampling(huge.status == "PASS", access_samplers()),
        check_page_reporting(huge.status == "PASS", free_page_reporting()),
        check_program("debootstrap", "debootstrap", "needed to build images"),
        check_program("mkfs.ext4", "e2fsprogs", "needed to build images"),
        check_program("busybox", "busybox-static", "needed for the initramfs"),
        check_program("skopeo", "skopeo", "needed to import OCI/Docker images", optional=True),
        check_program("umoci", "umoci", "needed to import OCI/Docker images", optional=True),
        check_network_backend(),
        check_egress_guard(),
        check_open_egress_netns(settings),
        *check_images(settings),
    ]
