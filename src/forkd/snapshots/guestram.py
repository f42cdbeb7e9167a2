"""Reading a running QEMU's guest RAM from the host: where it is mapped, which pages the guest has
written since the fork (copy-on-write copies), and copying them out.

A child maps its template's memory file ``MAP_PRIVATE``. In ``/proc/PID/pagemap`` a page the
guest has written is present and anonymous (bit 63 set, bit 61 clear); an untouched page is still
the template file's page (bit 61 set) or not present. So the pages that differ from the template
are exactly the anonymous ones, found without stopping the guest for longer than the scan.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import QemuGone, VMError
from forkd.vmm.qemu import pid_alive

PAGE = 4096
COPY_CHUNK = 4 * 1024 * 1024
IOV_MAX = 1024  # iovecs per process_vm_readv call (the kernel's UIO_MAXIOV)

# pagemap entry, most significant byte: bit 63 present, 62 swapped, 61 file-page/shared-anon.
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
_WRITTEN = bytes(
    1 if (b & _SWAPPED) or ((b & _PRESENT) and not (b & _FILE)) else 0 for b in range(256)
)
_RUN = re.compile(rb"\x01+")


@dataclass(frozen=True)
class RamMapping:
    """Guest RAM inside the QEMU process: host virtual address range and file offset."""

    pid: int
    start: int
    length: int
    file_offset: int
    map_file: Path  # /proc/PID/map_files/...: the mapped file, even if it was deleted

    @property
    def pages(self) -> int:
        return self.length // PAGE


def find_ram_mapping(pid: int, memory_file: str, size: int) -> RamMapping:
    """The mapping of ``memory_file`` (``size`` bytes) in QEMU ``pid``."""
    candidates = (memory_file, memory_file + " (deleted)")
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as exc:
        if not pid_alive(pid):
            raise QemuGone(f"QEMU pid {pid} exited before its memory map was read") from exc
        raise VMError(f"cannot read the memory map of QEMU pid {pid}: {exc}") from exc
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in candidates:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if hi - lo == size:
                return RamMapping(pid, lo, hi - lo, int(parts[2], 16),
                                  Path(f"/proc/{pid}/map_files/{parts[0]}"))  # fmt: skip
    if not pid_alive(pid):  # a zombie's map is empty
        raise QemuGone(f"QEMU pid {pid} exited before its memory map was read")
    raise VMError(f"guest RAM mapping of {memory_file} not found in QEMU pid {pid}")


def written_runs(ram: RamMapping) -> list[tuple[int, int]]:
    """(first page, page count) of every run of pages the guest wrote since the fork."""
    with open(f"/proc/{ram.pid}/pagemap", "rb", buffering=0) as f:
        f.seek(ram.start // PAGE * 8)
        entries = bytearray()
        want = ram.pages * 8
        while len(entries) < want:
            chunk = f.read(want - len(entries))
            if not chunk:
                raise VMError(f"short read of /proc/{ram.pid}/pagemap")
            entries += chunk
    flags = bytes(entries[7::8]).translate(_WRITTEN)
    return [(m.start(), m.end() - m.start()) for m in _RUN.finditer(flags)]


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


def _process_vm_readv() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    return fn


def read_runs(ram: RamMapping, runs: list[tuple[int, int]]) -> bytearray:
    """The guest pages of ``runs``, concatenated in order, read from a stopped QEMU.

    ``process_vm_readv`` gathers up to 1,024 runs per system call: a just-forked child's pages
    are scattered over hundreds of short runs, one ``pread`` each is what a pause used to pay."""
    total = sum(n for _, n in runs) * PAGE
    out = bytearray(total)
    readv = _process_vm_readv()
    if readv is None:
        _read_runs_via_mem(ram, runs, out)
        return out
    if not total:
        return out
    window = (ctypes.c_char * total).from_buffer(out)  # exported while the kernel fills it
    base = ctypes.addressof(window)
    pos = 0
    for i in range(0, len(runs), IOV_MAX):
        batch = runs[i : i + IOV_MAX]
        remote = (_IoVec * len(batch))(
            *(_IoVec(ram.start + first * PAGE, n * PAGE) for first, n in batch)
        )
        want = sum(n for _, n in batch) * PAGE
        local = _IoVec(base + pos, want)
        got = readv(ram.pid, ctypes.byref(local), 1, remote, len(batch), 0)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM) and i == 0:
                _read_runs_via_mem(ram, runs, out)
                return out
            if err == errno.ESRCH or not pid_alive(ram.pid):
                raise QemuGone(f"QEMU pid {ram.pid} exited while its guest RAM was read")
            raise VMError(f"cannot read guest RAM of QEMU pid {ram.pid}: {os.strerror(err)}")
        if got != want:
            raise VMError(f"short read of guest RAM of QEMU pid {ram.pid}")
        pos += want
    del window
    return out


def _read_runs_via_mem(ram: RamMapping, runs: list[tuple[int, int]], out: bytearray) -> None:
    view = memoryview(out)
    pos = 0
    fd = os.open(f"/proc/{ram.pid}/mem", os.O_RDONLY)
    try:
        for first, count in runs:
            n = count * PAGE
            if os.preadv(fd, [view[pos : pos + n]], ram.start + first * PAGE) != n:
                raise VMError(f"short read of guest RAM at page {first}")
            pos += n
    finally:
        os.close(fd)


def copy_runs(ram: RamMapping, runs: list[tuple[int, int]], dest: Path) -> int:
    """Copy the guest pages of ``runs`` into ``dest`` at their file offsets; bytes written."""
    written = 0
    src = os.open(f"/proc/{ram.pid}/mem", os.O_RDONLY)
    try:
        out = os.open(dest, os.O_WRONLY)
        try:
            for first, count in runs:
                offset, end = first * PAGE, (first + count) * PAGE
                while offset < end:
                    n = min(COPY_CHUNK, end - offset)
                    data = os.pread(src, n, ram.start + offset)
                    if len(data) != n:
                        raise VMError(f"short read of guest RAM at offset {offset}")
                    os.pwrite(out, data, ram.file_offset + offset)
                    written += n
                    offset += n
        finally:
            os.close(out)
    finally:
        os.close(src)
    return written


def sparse_copy(src: Path, dest: Path, size: int) -> int:
    """Copy ``src`` to a new ``dest`` of ``size`` bytes, data extents only (holes stay holes, so
    a copy of a mostly-empty guest memory file costs only what the guest really used)."""
    written = 0
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fout, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(fin, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after offset
                    break
                end = min(os.lseek(fin, start, os.SEEK_HOLE), size)
                pos = start
                while pos < end:
                    n = _copy_range(fin, fout, end - pos, pos)
                    if n <= 0:
                        raise VMError(f"copy of {src} stopped at offset {pos}")
                    pos += n
                written += end - start
                offset = end
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return written


def _copy_range(fin: int, fout: int, count: int, offset: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` in the kernel where it can; between file
    systems (a disk copy into tmpfs) some kernels refuse that (EXDEV), so read and write."""
    try:
        return os.copy_file_range(fin, fout, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(fin, min(count, COPY_CHUNK), offset)
    return os.pwrite(fout, data, offset) if data else 0
