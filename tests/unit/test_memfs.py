from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.doctor import check_access_sampling, check_page_reporting
from forkd.errors import InvalidInput
from forkd.snapshots.memfs import (
    MOUNT_SOURCE,
    AccessSampler,
    access_samplers,
    free_page_reporting,
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


def _fake_host(tmp_path: Path) -> tuple[Path, Path]:
    proc, admin = tmp_path / "proc", tmp_path / "kdamonds"
    for pid, comm in ((1, "init"), (77, "kdamond.0"), (90, "kdamond.1"), (91, "python3")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / "self").mkdir()  # not a pid: ignored
    for n, state, pid in ((0, "on", 77), (1, "off", 0)):
        intervals = admin / str(n) / "contexts" / "0" / "monitoring_attrs" / "intervals"
        intervals.mkdir(parents=True)
        (admin / str(n) / "state").write_text(state + "\n")
        (admin / str(n) / "pid").write_text(f"{pid}\n")
        (admin / str(n) / "contexts" / "0" / "operations").write_text("paddr\n")
        (intervals / "sample_us").write_text("500000\n")
    return proc, admin


def test_access_samplers_lists_running_kdamonds_with_their_setup(tmp_path: Path) -> None:
    proc, admin = _fake_host(tmp_path)
    samplers = access_samplers(proc, admin)
    # kdamond.1 runs but its sysfs entry is off: it belongs to a module (e.g. DAMON_RECLAIM).
    assert samplers == [
        AccessSampler("kdamond.0", "paddr", 500.0),
        AccessSampler("kdamond.1", None, None),
    ]


def test_no_damon_means_no_samplers(tmp_path: Path) -> None:
    (tmp_path / "proc" / "1").mkdir(parents=True)
    (tmp_path / "proc" / "1" / "comm").write_text("init\n")
    assert access_samplers(tmp_path / "proc", tmp_path / "absent") == []


def test_doctor_warns_about_sampling_only_over_huge_pages() -> None:
    sampler = [AccessSampler("kdamond.0", "paddr", 500.0)]
    assert check_access_sampling(True, []).status == "PASS"
    plain = check_access_sampling(False, sampler)
    assert plain.status == "PASS" and "kdamond.0 (paddr, every 500 ms)" in plain.detail
    huge = check_access_sampling(True, sampler)
    assert huge.status == "WARN" and "FORKD_HUGE_MEMORY=0" in huge.hint
    unknown = check_access_sampling(True, [AccessSampler("kdamond.1")])
    assert unknown.status == "WARN" and "DAMON kdamond.1 samples" in unknown.detail


def _virtio(root: Path, name: str, device_id: int, features: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "device").write_text(f"0x{device_id:04x}\n")
    (root / name / "features").write_text(features + "\n")


def test_free_page_reporting_reads_the_balloon_feature_bit(tmp_path: Path) -> None:
    _virtio(tmp_path, "virtio1", 2, "0010001" + "0" * 57)  # a block device: bit 5 means nothing
    assert not free_page_reporting(tmp_path)
    _virtio(tmp_path, "virtio0", 5, "0110000" + "0" * 57)  # balloon without reporting
    assert not free_page_reporting(tmp_path)
    (tmp_path / "virtio0" / "features").write_text("0110010" + "0" * 57 + "\n")
    assert free_page_reporting(tmp_path)
    assert not free_page_reporting(tmp_path / "absent")


def test_doctor_warns_about_page_reporting_only_over_huge_pages() -> None:
    assert check_page_reporting(True, False).status == "PASS"
    assert check_page_reporting(False, True).status == "PASS"
    warned = check_page_reporting(True, True)
    assert warned.status == "WARN" and "first touch" in warned.hint
