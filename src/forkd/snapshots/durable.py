"""Durable copies of guest memory files: sparse, hashed, and never usable-looking when half done.

Guest memory must be on tmpfs (copy-on-write mapping, userfaultfd), which a host reboot empties.
So every memory file also has a copy on disk under ``FORKD_HOME`` and tmpfs is a cache, filled
from that copy on first use. A copy holds only the data extents of the source (``SEEK_DATA``) and
within them skips all-zero blocks, so it costs what the guest really used: a huge-page tmpfs
reports whole 2 MiB extents as data, mostly zeros in a fresh guest. The sha256 covers the whole
logical content (holes read as zeros), so it equals the hash of the tmpfs file it copies.

Every copy is written under a temporary name in its destination dir, fsynced, and only then
renamed to its final name (and the dir fsynced): a copy under its final name is always complete.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import VMError

CHUNK = 4 * 1024 * 1024
# Zero detection granularity: coarse enough to cost little Python per GiB, fine enough to drop
# the untouched parts of a 2 MiB huge-page extent.
ZERO_BLOCK = 64 * 1024
_ZEROS = bytes(CHUNK)
_ZERO_BLOCK = bytes(ZERO_BLOCK)
TEMP_PREFIX = ".staging-"


@dataclass(frozen=True)
class CopyResult:
    """What a copy wrote: bytes of data stored (the rest are holes) and the content's sha256."""

    data_bytes: int
    sha256: str


def temp_name(final: Path) -> Path:
    """A temporary name beside ``final``; it names the writer's pid, so only a dead writer's
    leftovers are swept (the store's staging sweep)."""
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{final.name}-{secrets.token_hex(3)}")


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of every data extent of ``fd`` below ``size``."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        offset = end
    return out


def sparse_hashed_copy(src: Path, dest: Path, size: int) -> CopyResult:
    """Copy ``src`` (``size`` bytes) to a new file ``dest`` (0600), holes and zero blocks left
    as holes, fsynced; return the data stored and the sha256 of the whole content."""
    digest = hashlib.sha256()
    stored = 0
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fin).st_size != size:
            raise VMError(f"{src} has {os.fstat(fin).st_size} bytes, expected {size}")
        fout = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, size)
            hashed = 0
            for start, end in _extents(fin, size):
                _hash_zeros(digest, start - hashed)
                pos = start
                while pos < end:
                    data = os.pread(fin, min(CHUNK, end - pos), pos)
                    if not data:
                        raise VMError(f"{src} ended at offset {pos}, expected {size} bytes")
                    digest.update(data)
                    stored += _write_nonzero(fout, data, pos)
                    pos += len(data)
                hashed = end
            _hash_zeros(digest, size - hashed)
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return CopyResult(stored, digest.hexdigest())


def _hash_zeros(digest: hashlib._Hash, n: int) -> None:
    while n > 0:
        step = min(n, CHUNK)
        digest.update(_ZEROS[:step])
        n -= step


def _write_nonzero(fd: int, data: bytes, offset: int) -> int:
    """Write the blocks of ``data`` that are not all zero at ``offset``; bytes written."""
    view = memoryview(data)
    written = 0
    run_start: int | None = None
    for block in range(0, len(data) + 1, ZERO_BLOCK):
        n = min(ZERO_BLOCK, len(data) - block)
        # startswith at an offset: a memcmp without copying the block
        zero = n <= 0 or data.startswith(_ZERO_BLOCK if n == ZERO_BLOCK else bytes(n), block)
        if not zero and run_start is None:
            run_start = block
        elif zero and run_start is not None:
            chunk = view[run_start:block]
            if os.pwrite(fd, chunk, offset + run_start) != len(chunk):
                raise VMError(f"short write at offset {offset + run_start}")
            written += len(chunk)
            run_start = None
    if run_start is not None:
        chunk = view[run_start:]
        if os.pwrite(fd, chunk, offset + run_start) != len(chunk):
            raise VMError(f"short write at offset {offset + run_start}")
        written += len(chunk)
    return written


def fsync_path(path: Path) -> None:
    """fsync a file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_copy(src: Path, final: Path, size: int) -> CopyResult:
    """Copy ``src`` to ``final`` so that ``final`` exists only once complete and on disk."""
    tmp = temp_name(final)
    try:
        result = sparse_hashed_copy(src, tmp, size)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final.parent)
    return result


def hash_file(path: Path, size: int) -> str:
    """sha256 of ``path``'s content (holes are zeros), reading only its data extents."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        hashed = 0
        for start, end in _extents(fd, size):
            _hash_zeros(digest, start - hashed)
            pos = start
            while pos < end:
                data = os.pread(fd, min(CHUNK, end - pos), pos)
                if not data:
                    raise VMError(f"{path} ended at offset {pos}")
                digest.update(data)
                pos += len(data)
            hashed = end
        _hash_zeros(digest, size - hashed)
    finally:
        os.close(fd)
    return digest.hexdigest()
