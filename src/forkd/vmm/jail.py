"""A jail for every QEMU process: its own unprivileged uid, no capabilities, namespaces, a
minimal root.

Built with bubblewrap, started as root (no user namespace: QEMU runs in the host's user
namespace as a uid nobody else has): new mount, pid, ipc and uts namespaces (and net for a
machine without a NIC), a read-only tmpfs root holding only the QEMU binary, its libraries, its
firmware, the guest's image files and memory file, and a few device nodes; then ``setpriv``
drops to the VM's uid/gid with an empty bounding set and ``no_new_privs``, and ``env -i`` leaves
PATH as the whole environment. bwrap blocks before that exec until the daemon has put the
process into its cgroup and set its limits (``--block-fd``), and reports its pid (``--info-fd``).

Files the VM reads are shared by group: a template's memory file is re-owned ``root:<its own
group>`` 0640 the first time a child maps it, and only the children of that file get that group,
so no VM can read another template, and none can write one. Device nodes the jail needs
(``/dev/userfaultfd`` for live branch, ``/dev/kvm``) are made once per home as copies of the
host's nodes, ``root:<device group>`` 0660.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from forkd.errors import HostSetupError

JailMode = Literal["off", "auto", "required"]
JAIL_MODES: tuple[str, ...] = ("off", "auto", "required")
# A high subordinate range nobody's /etc/passwd uses: base + 0 is the device group, VM uids
# (and their gids) come from the lower half, template groups from the upper half.
DEFAULT_ID_BASE = 0x5F000000
ID_SPAN = 1 << 24
VM_IDS = (1, ID_SPAN // 2)
TEMPLATE_IDS = (ID_SPAN // 2, ID_SPAN)
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
JAIL_PATH = "/usr/bin:/bin"
# Where QEMU finds firmware and ROMs (Debian's --firmwarepath); missing ones are skipped.
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")
HELPERS = ("setpriv", "env")
RESOLV_CONF = "/etc/resolv.conf"
DEVICES = {"userfaultfd": Path("/dev/userfaultfd"), "kvm": Path("/dev/kvm")}


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


def probe() -> str | None:
    """None when this host can jail QEMU, else what is missing and how to fix it."""
    if os.geteuid() != 0:
        return (
            "the jail needs root (it gives every QEMU its own uid); as another user set "
            "FORKD_JAIL=off: QEMU then runs as you, with its seccomp filter only"
        )
    if bwrap_binary() is None:
        return "bwrap not found: install the bubblewrap package (apt-get install bubblewrap)"
    for helper in HELPERS:
        if shutil.which(helper) is None:
            return f"{helper} not found (util-linux / coreutils)"
    return None


@dataclass(frozen=True)
class Jail:
    """How QEMUs are jailed on this host (one per runtime)."""

    id_base: int = DEFAULT_ID_BASE
    # host-side copies of device nodes, group ``device_gid`` 0660 (see :func:`device_nodes`)
    devices: dict[str, Path] = field(default_factory=dict)

    @property
    def device_gid(self) -> int:
        return self.id_base

    def is_template_gid(self, gid: int) -> bool:
        return self.id_base + TEMPLATE_IDS[0] <= gid < self.id_base + TEMPLATE_IDS[1]

    def is_vm_uid(self, uid: int) -> bool:
        return self.id_base + VM_IDS[0] <= uid < self.id_base + VM_IDS[1]


def configure(mode: str, node_dir: Path, *, id_base: int = DEFAULT_ID_BASE) -> Jail | None:
    """The jail for ``mode`` (``off``: none; ``auto``: one where the host can; ``required``:
    one or :class:`HostSetupError`)."""
    if mode not in JAIL_MODES:
        raise HostSetupError(f"FORKD_JAIL must be one of {', '.join(JAIL_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    problem = probe()
    if problem is not None:
        if mode == "required":
            raise HostSetupError(f"FORKD_JAIL=required but QEMU cannot be jailed: {problem}")
        return None
    jail = Jail(id_base=id_base)
    return Jail(id_base=id_base, devices=device_nodes(node_dir, jail.device_gid))


def device_nodes(node_dir: Path, gid: int) -> dict[str, Path]:
    """Copies of the host's device nodes that VM uids may open (group ``gid``, 0660), made in
    the private ``node_dir``; a device the host lacks, or a filesystem that refuses device nodes
    (``nodev``: the node would not open), is left out."""
    node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    out: dict[str, Path] = {}
    for name, host in DEVICES.items():
        try:
            st = host.stat()
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        node = node_dir / name
        with contextlib.suppress(OSError):
            cur = node.lstat()
            if not stat.S_ISCHR(cur.st_mode) or cur.st_rdev != st.st_rdev:
                node.unlink()
        if not node.exists():
            try:
                os.mknod(node, stat.S_IFCHR | 0o600, st.st_rdev)
            except OSError:
                continue
        os.chown(node, 0, gid)
        os.chmod(node, 0o660)
        if _opens(node):
            out[name] = node
    return out


def _opens(node: Path) -> bool:
    try:
        os.close(os.open(node, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


# --- ids --------------------------------------------------------------------------------------

_taken: set[int] = set()


def _uids_running() -> set[int]:
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.add(entry.stat().st_uid)
    return out


def allocate_uid(jail: Jail) -> int:
    """A VM uid (also its gid) that no process runs as and this process has not handed out."""
    running = _uids_running()
    lo, hi = VM_IDS
    for _ in range(64):
        uid = jail.id_base + lo + secrets.randbelow(hi - lo)
        if uid not in running and uid not in _taken:
            _taken.add(uid)
            return uid
    raise HostSetupError("no free VM uid in the jail's id range")


def release_uid(uid: int) -> None:
    _taken.discard(uid)


def template_gid(jail: Jail, memory: Path) -> int:
    """The group that may read template memory file ``memory``: on first use the file becomes
    ``root:<a fresh template group>`` 0640 (under an exclusive lock, so concurrent forks of
    one template agree on it)."""
    fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if jail.is_template_gid(st.st_gid) and st.st_uid == 0 and st.st_mode & 0o777 == 0o640:
            return st.st_gid
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        gid = st.st_gid
        if not jail.is_template_gid(gid):
            lo, hi = TEMPLATE_IDS
            gid = jail.id_base + lo + secrets.randbelow(hi - lo)
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o640)
        return gid
    finally:
        os.close(fd)


def prepare_writable_memory(path: Path, size: int, uid: int) -> None:
    """A memory file a jailed QEMU maps shared (template parent, materializer): made here at its
    full size (QEMU would grow it, past its file-size limit) and owned by the VM's uid alone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        os.fchown(fd, uid, uid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def reclaim(path: Path) -> None:
    """Give a memory file a jailed QEMU wrote back to forkd's user once that QEMU is gone: its
    uid may go to another VM next."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_uid != os.geteuid():
            os.chown(path, os.geteuid(), os.getegid())
            os.chmod(path, 0o600)


# --- what QEMU reads --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryFile:
    path: Path
    size: int
    share: bool


def _option_values(option: str) -> dict[str, str]:
    """``a=1,b=x,,y`` -> {"a": "1", "b": "x,y"} (QEMU doubles a comma inside a value)."""
    out: dict[str, str] = {}
    parts = option.replace(",,", "\0").split(",")
    for part in parts:
        key, _, value = part.partition("=")
        out[key] = value.replace("\0", ",")
    return out


def _size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def files_of(argv: list[str]) -> tuple[list[Path], MemoryFile | None]:
    """The host files a QEMU command line opens by name: read-only ones (kernel, initrd,
    drives) and the guest-RAM memory file."""
    ro: list[Path] = []
    memory: MemoryFile | None = None
    for flag, value in itertools.pairwise(argv):
        if flag in ("-kernel", "-initrd"):
            ro.append(Path(value))
        elif flag == "-drive":
            if (f := _option_values(value).get("file")) is not None:
                ro.append(Path(f))
        elif flag == "-object" and value.startswith("memory-backend-file,"):
            opts = _option_values(value)
            memory = MemoryFile(
                Path(opts["mem-path"]), _size_bytes(opts["size"]), opts.get("share") == "on"
            )
    return ro, memory


@functools.cache
def _runtime_files(binary: str) -> tuple[tuple[str, str], ...]:
    """(host path, jail path) of the QEMU binary, the helpers and every library they load."""
    programs = [binary, *(shutil.which(h) or h for h in HELPERS)]
    found: dict[str, str] = {}
    for program in programs:
        real = os.path.realpath(program)
        found[real] = real
        if program != real:
            found[program] = os.path.join(os.path.realpath(os.path.dirname(program)),
                                          os.path.basename(program))  # fmt: skip
        out = subprocess.run(["ldd", real], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            for word in line.split():
                if word.startswith("/"):
                    # at its path with the directories resolved (merged /usr: /lib -> usr/lib)
                    dest = os.path.join(
                        os.path.realpath(os.path.dirname(word)), os.path.basename(word)
                    )
                    found[word] = dest
                    break
    return tuple(sorted(found.items(), key=lambda kv: kv[1]))


def _parents(paths: Iterable[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        d = os.path.dirname(p)
        while d not in ("/", ""):
            dirs.add(d)
            d = os.path.dirname(d)
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def _unrestricted_nic(qemu_argv: list[str]) -> bool:
    return any(a.startswith("user,") and "restrict=off" in a.split(",") for a in qemu_argv)


@dataclass(frozen=True)
class JailedLaunch:
    """One QEMU's jail: its ids, and the bwrap command line around QEMU's argv."""

    uid: int
    groups: tuple[int, ...]
    argv: list[str]


def build(
    jail: Jail,
    binary: str,
    qemu_argv: list[str],
    *,
    info_fd: int,
    block_fd: int,
    new_netns: bool,
    uid: int | None = None,
) -> JailedLaunch:
    """The bwrap command line that runs ``binary qemu_argv`` jailed (prepares the files)."""
    ro_files, memory = files_of(qemu_argv)
    uid = allocate_uid(jail) if uid is None else uid
    groups: list[int] = []
    binds: list[tuple[str, str, str]] = []  # (bwrap option, host path, jail path)
    for src, dest in _runtime_files(binary):
        binds.append(("--ro-bind", src, dest))
    for d in FIRMWARE_DIRS:
        if os.path.isdir(d):
            binds.append(("--ro-bind", d, d))
    for f in ro_files:
        binds.append(("--ro-bind", str(f), str(f)))
    if memory is not None:
        if memory.share:
            prepare_writable_memory(memory.path, memory.size, uid)
            binds.append(("--bind", str(memory.path), str(memory.path)))
        else:
            groups.append(template_gid(jail, memory.path))
            binds.append(("--ro-bind", str(memory.path), str(memory.path)))
    if _unrestricted_nic(qemu_argv) and os.path.exists(RESOLV_CONF):
        # an open user-mode stack forwards the guest's DNS to the host's resolvers, read here
        binds.append(("--ro-bind", os.path.realpath(RESOLV_CONF), RESOLV_CONF))
    if jail.devices:
        groups.append(jail.device_gid)
    for name, node in jail.devices.items():
        binds.append(("--dev-bind", str(node), f"/dev/{name}"))
    argv = [
        "bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "forkd",
        "--as-pid-1", "--new-session", "--clearenv",
        "--tmpfs", "/", "--dev", "/dev",
    ]  # fmt: skip
    if new_netns:
        argv.append("--unshare-net")
    # every parent made 0755 here (bwrap would apply QEMU's umask, 077, and lock the VM out)
    for d in _parents(dest for opt, _, dest in binds if opt != "--dev-bind"):
        argv += ["--perms", "0755", "--dir", d]
    for opt, src, dest in binds:
        argv += [opt, src, dest]
    for link, target in (("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")):
        if os.path.islink(link) and not any(d == link for _, _, d in binds):
            argv += ["--symlink", target, link]
    argv += [
        "--remount-ro", "/",
        # setpriv needs these three for the switch; it drops them (and the bounding set) itself
        "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
        "--info-fd", str(info_fd), "--block-fd", str(block_fd),
        "--",
        shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}",
        "--groups=" + ",".join(str(g) for g in groups) if groups else "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        # bwrap leaves PWD behind; QEMU gets PATH and nothing else
        shutil.which("env") or "env", "-i", f"PATH={JAIL_PATH}",
        binary, *qemu_argv,
    ]  # fmt: skip
    return JailedLaunch(uid, tuple(groups), argv)
