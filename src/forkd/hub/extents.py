"""Sparse files as data extents: find them, stream them out, write them back.

A guest memory file or root image is mostly holes and zero pages; a pack stores only the pages
that hold data. Extents are found with ``SEEK_DATA``/``SEEK_HOLE`` and then narrowed to non-zero
pages, because a huge-page tmpfs reports whole 2 MiB blocks as data however little of them the
guest wrote.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import InvalidInput

PAGE = 4096
CHUNK = 4 << 20
_ZERO_PAGE = bytes(PAGE)

Extent = tuple[int, int]


def _data_ranges(fd: int, size: int) -> Iterator[Extent]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but hole after offset
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


@dataclass(frozen=True)
class Scan:
    """The non-zero runs of a file (page granularity) and the sha256 of their bytes in order."""

    size: int
    extents: list[Extent]
    stored: int
    sha256: str


def scan_extents(path: Path) -> Scan:
    """Find the runs of ``path`` that hold non-zero bytes, hashing those bytes."""
    runs: list[Extent] = []
    digest = hashlib.sha256()
    stored = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        run_start = run_end = -1
        for start, length in _data_ranges(fd, size):
            pos, end = start, start + length
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    raise OSError(f"{path} shrank while it was read")
                for i in range(0, len(chunk), PAGE):
                    page = chunk[i : i + PAGE]
                    if page == _ZERO_PAGE[: len(page)]:
                        continue
                    digest.update(page)
                    stored += len(page)
                    lo = pos + i
                    if lo == run_end:
                        run_end = lo + len(page)
                    else:
                        if run_end > run_start >= 0:
                            runs.append((run_start, run_end - run_start))
                        run_start, run_end = lo, lo + len(page)
                pos += len(chunk)
        if run_end > run_start >= 0:
            runs.append((run_start, run_end - run_start))
    finally:
        os.close(fd)
    return Scan(size, runs, stored, digest.hexdigest())


class ExtentReader:
    """A read-only file object over the concatenated ``extents`` of ``path`` (for tarfile),
    hashing what it hands out."""

    def __init__(self, path: Path, extents: list[Extent]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._extents = iter(extents)
        self._pos = 0
        self._left = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        out = bytearray()
        while len(out) < want:
            if self._left == 0:
                nxt = next(self._extents, None)
                if nxt is None:
                    break
                self._pos, self._left = nxt
                continue
            data = os.pread(self._fd, min(self._left, want - len(out)), self._pos)
            if not data:
                raise OSError("file shrank while it was packed")
            out += data
            self._pos += len(data)
            self._left -= len(data)
        self.sha256.update(out)
        return bytes(out)

    def close(self) -> None:
        os.close(self._fd)


def check_extents(extents: list[Extent], size: int, stored: int, what: str) -> None:
    """Sorted, non-overlapping, inside ``size``, and adding up to ``stored`` bytes."""
    total, end = 0, 0
    for offset, length in extents:
        if offset < end or length <= 0 or offset + length > size:
            raise InvalidInput(f"pack part {what}: extent ({offset}, {length}) is out of order "
                               f"or outside its {size} bytes")  # fmt: skip
        end = offset + length
        total += length
    if total != stored:
        raise InvalidInput(
            f"pack part {what}: extents add up to {total} bytes, member has {stored}"
        )


class ExtentWriter:
    """Writes a member's bytes back at its extents into a new sparse file of ``size`` bytes."""

    def __init__(self, dest: Path, size: int, extents: list[Extent]) -> None:
        self._fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, size)
        self._extents = iter(extents)
        self._pos = 0
        self._left = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        view = memoryview(data)
        while view:
            if self._left == 0:
                nxt = next(self._extents, None)
                if nxt is None:
                    raise InvalidInput("pack part holds more bytes than its extents")
                self._pos, self._left = nxt
            n = os.pwrite(self._fd, view[: self._left], self._pos)
            self._pos += n
            self._left -= n
            view = view[n:]

    def close(self) -> None:
        os.close(self._fd)
