"""The initramfs: static busybox, the init script and the guest kernel modules, as a newc cpio.

Written directly (no cpio tool, no mknod) so device nodes need no privileges. Left uncompressed:
under TCG, decompressing in the guest costs more than reading a few extra megabytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import ImageError
from forkd.hostcmd import require_program

BUSYBOX_APPLETS = (
    "sh", "mount", "insmod", "switch_root", "usleep", "mkdir", "cat", "echo", "ip",
    "hostname", "poweroff", "sleep", "ls", "rm", "printf",
)  # fmt: skip


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def encode_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Encode entries in the SVR4 'newc' format the kernel unpacks, ending with the trailer."""
    out = bytearray()
    all_entries = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, entry in enumerate(all_entries, start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def build_initramfs(dest: Path, *, init_script: Path, modules: tuple[Path, ...]) -> None:
    """Write the initramfs for ``modules`` (loaded in the given order) to ``dest``."""
    busybox = Path(require_program("busybox", "busybox-static"))
    data = busybox.read_bytes()
    if b"GLIBC_" in data[:4096] or not _is_static(busybox):
        raise ImageError(f"{busybox} is not statically linked: install busybox-static")
    entries = [
        CpioEntry(d, stat.S_IFDIR | 0o755)
        for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot", "tmp")
    ]
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, data))
    entries += [
        CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox") for applet in BUSYBOX_APPLETS
    ]
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, init_script.read_bytes()))
    order = []
    for module in modules:
        base = module.name.split(".ko")[0]
        entries.append(CpioEntry(f"modules/{base}.ko", stat.S_IFREG | 0o644, module.read_bytes()))
        order.append(base)
    if order:
        entries.append(
            CpioEntry("modules/order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode())
        )
    dest.write_bytes(encode_newc(entries))


def _is_static(path: Path) -> bool:
    # A dynamically linked ELF carries a PT_INTERP naming the loader.
    return b"/lib64/ld-linux" not in path.read_bytes()[:65536]
