"""Delta branches on disk: the guest pages that differ from a root memory file, densely packed.

Layout of a ``.delta`` file: a header (magic, page size, run count), the runs as (first page,
page count) pairs of little-endian u64, then the pages of every run in order. The runs are
explicit rather than a sparse file's holes because a huge-page tmpfs allocates (and reports as
data) whole 2 MiB extents, which would turn untouched pages into zeros.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import VMError
from forkd.snapshots.guestram import COPY_CHUNK, PAGE, RamMapping

MAGIC = b"FORKDDL1"
_HEADER = struct.Struct("<8sQQ")  # magic, page size, run count
_RUN = struct.Struct("<QQ")


@dataclass(frozen=True)
class DeltaIndex:
    """Where each run's pages sit in a delta file."""

    runs: tuple[tuple[int, int], ...]

    @property
    def data_offset(self) -> int:
        return _HEADER.size + _RUN.size * len(self.runs)

    @property
    def pages(self) -> int:
        return sum(n for _, n in self.runs)


def read_index(path: Path, *, max_pages: int) -> DeltaIndex:
    """The runs of a delta file, validated against the guest size and the file's length."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise VMError(f"delta {path} is truncated")
        magic, page, count = _HEADER.unpack(head)
        if magic != MAGIC or page != PAGE:
            raise VMError(f"{path} is not a forkd delta file")
        if count > max_pages:
            raise VMError(f"delta {path} claims {count} runs for {max_pages} guest pages")
        raw = f.read(_RUN.size * count)
    if len(raw) != _RUN.size * count:
        raise VMError(f"delta {path} is truncated")
    runs = tuple(_RUN.iter_unpack(raw))
    if any(n == 0 or first + n > max_pages for first, n in runs):
        raise VMError(f"delta {path} has a run outside the guest's {max_pages} pages")
    index = DeltaIndex(runs)
    if path.stat().st_size != index.data_offset + index.pages * PAGE:
        raise VMError(f"delta {path} has the wrong size for its runs")
    return index


def write_delta(ram: RamMapping, runs: list[tuple[int, int]], dest: Path) -> int:
    """Copy the pages of ``runs`` out of a (stopped) QEMU's guest RAM into ``dest``; bytes."""
    return _pack(f"/proc/{ram.pid}/mem", ram.start, runs, dest)


def write_delta_data(runs: list[tuple[int, int]], data: bytes | bytearray, dest: Path) -> int:
    """Write delta ``dest`` from pages already read (:func:`~forkd.snapshots.guestram.read_runs`,
    the pages of ``runs`` in order); bytes."""
    index = DeltaIndex(tuple(runs))
    if len(data) != index.pages * PAGE:
        raise VMError(f"{len(data)} bytes of pages for {index.pages} pages of runs")
    header = _HEADER.pack(MAGIC, PAGE, len(runs)) + b"".join(_RUN.pack(f, n) for f, n in runs)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, memoryview(header))
        _write_all(fd, memoryview(data))
    finally:
        os.close(fd)
    return index.data_offset + index.pages * PAGE


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def delta_from_file(memory: Path, runs: list[tuple[int, int]], dest: Path) -> int:
    """Pack the pages of ``runs`` of a full memory file into delta ``dest``; bytes."""
    return _pack(str(memory), 0, runs, dest)


def _pack(source: str, base: int, runs: list[tuple[int, int]], dest: Path) -> int:
    index = DeltaIndex(tuple(runs))
    src = os.open(source, os.O_RDONLY)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            header = _HEADER.pack(MAGIC, PAGE, len(runs)) + b"".join(
                _RUN.pack(first, n) for first, n in runs
            )
            os.write(out, header)
            pos = len(header)
            for first, count in runs:
                offset, end = first * PAGE, (first + count) * PAGE
                while offset < end:
                    n = min(COPY_CHUNK, end - offset)
                    data = os.pread(src, n, base + offset)
                    if len(data) != n:
                        raise VMError(f"short read of guest RAM at offset {offset}")
                    os.pwrite(out, data, pos)
                    pos += n
                    offset += n
        finally:
            os.close(out)
    finally:
        os.close(src)
    return index.data_offset + index.pages * PAGE


def apply_delta(ram: RamMapping, path: Path) -> int:
    """Write a delta's pages into a not-yet-running QEMU's private guest RAM; bytes written.

    Through ``/proc/PID/mem``: each page becomes the child's own copy; every other page stays
    the root file's page, shared with every other child of the root."""
    index = read_index(path, max_pages=ram.pages)
    return _copy_pages(path, index, f"/proc/{ram.pid}/mem", ram.start)


def overlay(path: Path, dest: Path, *, max_pages: int) -> int:
    """Write a delta's pages over a full memory file (making a standalone copy)."""
    return _copy_pages(path, read_index(path, max_pages=max_pages), str(dest), 0)


def _copy_pages(path: Path, index: DeltaIndex, target: str, base: int) -> int:
    written = 0
    src = os.open(path, os.O_RDONLY)
    try:
        out = os.open(target, os.O_WRONLY)
        try:
            pos = index.data_offset
            for first, count in index.runs:
                offset, end = first * PAGE, (first + count) * PAGE
                while offset < end:
                    n = min(COPY_CHUNK, end - offset)
                    data = os.pread(src, n, pos)
                    if len(data) != n or os.pwrite(out, data, base + offset) != n:
                        raise VMError(f"short copy of delta {path} at page {offset // PAGE}")
                    written += n
                    pos += n
                    offset += n
        finally:
            os.close(out)
    finally:
        os.close(src)
    return written
