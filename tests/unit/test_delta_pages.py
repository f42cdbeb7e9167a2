"""Reading scattered guest pages in few system calls, and packing them as a delta file."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from forkd.errors import VMError
from forkd.snapshots.delta import read_index, write_delta_data
from forkd.snapshots.guestram import IOV_MAX, PAGE, RamMapping, read_runs

PAGES = 3 * IOV_MAX  # more runs than one process_vm_readv call takes


@pytest.fixture
def region() -> mmap.mmap:
    m = mmap.mmap(-1, PAGES * PAGE)
    for page in range(PAGES):
        m[page * PAGE : page * PAGE + 8] = page.to_bytes(8, "little")
    return m


def _mapping(m: mmap.mmap) -> RamMapping:
    start = ctypes.addressof(ctypes.c_char.from_buffer(m))
    return RamMapping(os.getpid(), start, len(m), 0, Path("/nonexistent"))


def test_read_runs_returns_every_run_in_order(region: mmap.mmap) -> None:
    # every other page: 1,536 one-page runs, over two calls of 1,024 iovecs at most
    runs = [(p, 1) for p in range(0, PAGES, 2)] + [(PAGES - 1, 1)]
    data = read_runs(_mapping(region), runs)
    assert len(data) == len(runs) * PAGE
    for i, (first, _) in enumerate(runs):
        assert int.from_bytes(data[i * PAGE : i * PAGE + 8], "little") == first


def test_read_runs_outside_the_mapping_fails_cleanly(region: mmap.mmap) -> None:
    with pytest.raises(VMError):
        read_runs(_mapping(region), [(PAGES + (1 << 30), 1)])  # an address nothing maps


def test_packed_pages_round_trip_through_the_index(region: mmap.mmap, tmp_path: Path) -> None:
    runs = [(3, 2), (10, 1), (PAGES - 4, 4)]
    data = read_runs(_mapping(region), runs)
    dest = tmp_path / "x.delta"
    written = write_delta_data(runs, data, dest)
    assert written == dest.stat().st_size
    index = read_index(dest, max_pages=PAGES)
    assert list(index.runs) == runs and index.pages == 7
    raw = dest.read_bytes()[index.data_offset :]
    assert raw == bytes(data)
    with pytest.raises(VMError, match="bytes of pages"):
        write_delta_data(runs, data[:-PAGE], tmp_path / "short.delta")
