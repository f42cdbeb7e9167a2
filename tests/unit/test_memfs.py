from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import InvalidInput
from forkd.snapshots.memfs import (
    MOUNT_SOURCE,
    mount_of,
    parse_mountinfo,
    prepare_memory_dir,
    release_memory_dir,
)
from forkd.snapshots.store import SnapshotStore

MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
30 22 0:26 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=24684084k
41 30 0:40 / /dev/shm/forkd-abc rw - tmpfs forkd-mem rw,size=1024k,mode=700,huge=within_size
42 22 0:41 / /mnt/with\\040space rw - tmpfs none rw
"""


def test_parse_mountinfo_reads_fstype_source_and_options() -> None:
    mounts = {m.mountpoint: m for m in parse_mountinfo(MOUNTINFO + "garbage line\n")}
    assert set(mounts) == {
        Path("/"),
        Path("/dev/shm"),
        Path("/dev/shm/forkd-abc"),
        Path("/mnt/with space"),
    }
    shm, ours = mounts[Path("/dev/shm")], mounts[Path("/dev/shm/forkd-abc")]
    assert (shm.fstype, shm.huge, shm.owned_by_forkd) == ("tmpfs", "never", False)
    assert (ours.source, ours.huge, ours.owned_by_forkd) == (MOUNT_SOURCE, "within_size", True)
    assert ours.options["mode"] == "700"


def test_mount_of_finds_the_innermost_mount_of_a_missing_path(tmp_path: Path) -> None:
    where = mount_of(tmp_path / "not" / "there")
    assert where is not None
    assert where.mountpoint == mount_of(tmp_path).mountpoint  # type: ignore[union-attr]
    assert mount_of(Path("/proc/self")).fstype == "proc"  # type: ignore[union-attr]


def test_huge_memory_setting_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_HUGE_MEMORY", "0")
    assert Settings.from_env().huge_memory is False
    monkeypatch.setenv("FORKD_HUGE_MEMORY", "maybe")
    with pytest.raises(InvalidInput, match="FORKD_HUGE_MEMORY must be 1 or 0, got 'maybe'"):
        Settings.from_env()


def test_plain_directory_without_the_option(tmp_path: Path) -> None:
    target = tmp_path / "mem"
    prepare_memory_dir(target, mount_huge=False)
    assert target.is_dir()
    assert mount_of(target).mountpoint != target  # type: ignore[union-attr]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def shm_target() -> Iterator[Path]:
    target = Path("/dev/shm") / f"forkd-test-{secrets.token_hex(4)}"
    yield target
    release_memory_dir(target)
    assert not target.exists()
    assert mount_of(target).mountpoint != target  # type: ignore[union-attr]


@needs_root
def test_default_memory_dir_gets_a_huge_page_tmpfs(shm_target: Path) -> None:
    prepare_memory_dir(shm_target, mount_huge=True)
    where = mount_of(shm_target)
    assert where is not None and where.mountpoint == shm_target
    assert where.owned_by_forkd and where.huge == "within_size"
    assert where.options["mode"] == "700"
    prepare_memory_dir(shm_target, mount_huge=True)  # idempotent: nothing stacked on top
    mounted = [m for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
               if m.mountpoint == shm_target]  # fmt: skip
    assert len(mounted) == 1
    # A file written there is backed by 2 MiB folios.
    (shm_target / "f").write_bytes(b"\1" * (4 << 20))
    assert mount_of(shm_target / "f").huge == "within_size"  # type: ignore[union-attr]


@needs_root
def test_existing_files_are_never_hidden_by_a_mount(shm_target: Path) -> None:
    shm_target.mkdir()
    (shm_target / "old.mem").write_bytes(b"x")
    prepare_memory_dir(shm_target, mount_huge=True)
    assert mount_of(shm_target).mountpoint != shm_target  # type: ignore[union-attr]
    assert (shm_target / "old.mem").read_bytes() == b"x"


@needs_root
def test_store_mounts_only_for_the_default_memory_dir(tmp_path: Path) -> None:
    explicit = SnapshotStore(Settings(home=tmp_path / "a", shm_dir=Path("/dev/shm") / "forkd-x1"))
    default = SnapshotStore(Settings(home=tmp_path / "b"))
    try:
        explicit.abort(explicit.begin("t"))
        default.abort(default.begin("t"))
        assert mount_of(explicit.memory_root).mountpoint != explicit.memory_root  # type: ignore[union-attr]
        assert mount_of(default.memory_root).owned_by_forkd  # type: ignore[union-attr]
    finally:
        release_memory_dir(explicit.memory_root)
        release_memory_dir(default.memory_root)
