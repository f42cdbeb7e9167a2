"""Durable snapshots without VMs: the disk copy is sparse, complete before the manifest says so,
restores tmpfs after a simulated reboot, and a truncated or corrupt copy is refused with a
reason instead of being mapped."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.doctor import check_home_disk
from forkd.errors import Conflict
from forkd.hostcmd import sha256_file
from forkd.snapshots.durable import durable_copy, temp_name
from forkd.snapshots.manifest import Artifact, SnapshotManifest
from forkd.snapshots.store import SnapshotStore

MiB = 1024 * 1024
SIZE = 8 * MiB


def _settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", shm_dir=tmp_path / "shm")


def _guest_memory(path: Path) -> None:
    """8 MiB: data at 1 MiB, a written-but-zero 2 MiB extent (as a huge-page tmpfs reports),
    data at 6 MiB, holes elsewhere."""
    with open(path, "r+b") as f:
        f.truncate(SIZE)
        f.seek(1 * MiB)
        f.write(os.urandom(256 * 1024))
        f.seek(2 * MiB)
        f.write(bytes(2 * MiB))
        f.seek(6 * MiB + 4096)
        f.write(b"forkd" * 1000)


def _manifest(tag: str, tmp_path: Path, **update: object) -> SnapshotManifest:
    for name in ("k", "i", "r"):
        (tmp_path / name).write_text("x")
    m = SnapshotManifest(
        tag=tag, created_at_unix=1, memory=Artifact(path="", bytes=SIZE),
        devstate=Artifact(path="devstate", bytes=2), mem_mib=8, machine_args=[], accel="tcg",
        qemu_version="10.0.0", kernel=str(tmp_path / "k"), initrd=str(tmp_path / "i"),
        rootfs=str(tmp_path / "r"),
    )  # fmt: skip
    return m.model_copy(update=update)


def _template(store: SnapshotStore, tag: str, tmp_path: Path, **kw: bool) -> SnapshotManifest:
    staging = store.begin(tag)
    _guest_memory(staging.memory)
    staging.devstate.write_bytes(b"ds")
    sha = sha256_file(staging.memory)
    manifest = _manifest(tag, tmp_path)
    manifest.memory.sha256 = sha
    return store.commit(staging, manifest, **kw)


def _reboot(store: SnapshotStore) -> None:
    for entry in store.memory_root.iterdir():
        entry.unlink()


def test_copy_is_sparse_and_hashes_the_whole_content(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.touch()
    _guest_memory(src)
    result = durable_copy(src, dest, SIZE)
    assert dest.read_bytes() == src.read_bytes()
    assert result.sha256 == sha256_file(src)
    # the zero-filled 2 MiB extent and the holes are not stored
    assert result.data_bytes < 512 * 1024
    assert dest.stat().st_blocks * 512 < 1 * MiB
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_commit_writes_the_disk_copy_before_saying_disk(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path)
    assert m.memory_authoritative == "disk" and m.memory_disk is not None
    disk = Path(m.memory_disk.path)
    assert disk.parent == store.disk_root and disk.name == Path(m.memory.path).name
    assert (m.memory_disk.bytes, m.memory_disk.sha256) == (SIZE, m.memory.sha256)
    assert store.load("t") == m
    assert disk.read_bytes() == Path(m.memory.path).read_bytes()
    assert store.tags_on_disk() == ["t"]  # .memory is no snapshot


def test_non_durable_commit_then_persist(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path, durable=False)
    assert m.memory_authoritative == "tmpfs" and m.memory_disk is None
    assert not store.disk_copy_path(m.memory.path).exists()
    _reboot(store)
    assert store.bootability(store.load("t")) is not None  # tmpfs-only: lost
    store2 = SnapshotStore(_settings(tmp_path))
    m2 = _template(store2, "u", tmp_path, durable=False)
    assert store2.persist("u").memory_authoritative == "disk"
    assert store2.load("u").memory_disk is not None and m2.memory.sha256


def test_reboot_restores_tmpfs_from_the_disk_copy(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path)
    content = Path(m.memory.path).read_bytes()
    _reboot(store)
    assert not store.memory_cached(m)
    assert store.bootability(m) is None  # restorable
    assert store.memory_source(m) == store.disk_copy_path(m.memory.path)
    assert store.restore_memory(m) is True
    assert Path(m.memory.path).read_bytes() == content
    assert store.memory_source(m) == Path(m.memory.path)
    assert store.restore_memory(m) is False  # already there
    assert [p.name for p in store.memory_root.iterdir()] == [Path(m.memory.path).name]


def test_truncated_disk_copy_is_unbootable_with_a_reason(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path)
    _reboot(store)
    os.truncate(store.disk_copy_path(m.memory.path), SIZE // 2)
    reason = store.bootability(m)
    assert reason is not None and "truncated" in reason and "is gone" in reason
    with pytest.raises(Conflict, match="not bootable"):
        store.restore_memory(m)
    assert not Path(m.memory.path).exists()


def test_corrupt_disk_copy_is_refused_and_never_restored(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path)
    _reboot(store)
    disk = store.disk_copy_path(m.memory.path)
    with open(disk, "r+b") as f:  # one flipped byte, same size
        f.seek(1 * MiB + 17)
        byte = f.read(1)
        f.seek(1 * MiB + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert store.bootability(m) is None  # size is right: only the hash tells
    with pytest.raises(Conflict, match="sha256"):
        store.restore_memory(m)
    assert not Path(m.memory.path).exists()
    assert list(store.memory_root.iterdir()) == []  # no temp left either
    reason = store.bootability(m)
    assert reason is not None and "sha256" in reason
    store.delete("t")
    assert list(store.disk_root.iterdir()) == []  # the corrupt copy goes with its snapshot


def test_delta_branch_survives_its_root_and_a_reboot(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    root = _template(store, "root", tmp_path)
    staging = store.begin("br")
    staging.memory.write_bytes(b"delta-pages")
    staging.devstate.write_bytes(b"ds")
    delta = Artifact(path="x", bytes=11)
    br = store.commit(staging, root.model_copy(update={"tag": "br", "delta": delta,
                                                       "root_tag": "root"}))  # fmt: skip
    assert br.delta is not None and Path(br.delta.path) == store.dir_of("br") / "delta"
    assert Path(br.delta.path).read_bytes() == b"delta-pages"
    assert br.memory_authoritative == "disk" and br.memory.path == root.memory.path
    store.delete("root")
    _reboot(store)
    assert store.bootability(store.load("br")) is None
    assert store.restore_memory(store.load("br"))
    assert Path(root.memory.path).is_file()
    store.delete("br")
    assert list(store.disk_root.iterdir()) == [] and list(store.memory_root.iterdir()) == []


def test_corrupt_delta_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    root = _template(store, "root", tmp_path)
    staging = store.begin("br")
    staging.memory.write_bytes(b"delta-pages")
    staging.devstate.write_bytes(b"ds")
    good = Artifact(path="x", bytes=11, sha256=sha256_file(staging.memory))
    br = store.commit(staging, root.model_copy(update={"tag": "br", "delta": good}))
    store.check_delta(br)
    assert br.delta is not None
    Path(br.delta.path).write_bytes(b"delta-pageZ")
    with pytest.raises(Conflict, match="sha256"):
        SnapshotStore(_settings(tmp_path)).check_delta(br)
    reason = store.bootability(br)
    assert reason is not None and "sha256" in reason


def test_an_interrupted_copy_never_looks_usable_and_is_swept(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path, durable=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    disk = store.disk_copy_path(m.memory.path)
    store.disk_root.mkdir()
    half = temp_name(disk).with_name(f".staging-{dead.pid}-{disk.name}-abc")
    half.write_bytes(b"half a copy")
    _reboot(store)
    reason = store.bootability(m)
    assert reason is not None and "no disk copy" in reason
    assert half.name in store.sweep_staging()
    assert not half.exists()


def test_unused_disk_copies_are_swept_once_old(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    m = _template(store, "t", tmp_path)
    orphan = store.disk_root / "gone.1234abcd.mem"
    orphan.write_bytes(b"x")
    assert store.unused_disk_copies() == []  # young: its manifest may be being written
    later = orphan.stat().st_mtime + 3600
    assert store.unused_disk_copies(now=later) == [orphan]
    assert store.disk_copy_path(m.memory.path) not in store.unused_disk_copies(now=later)


def test_doctor_reports_home_disk_space(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ok = check_home_disk(settings)
    assert ok.status == "PASS" and "GiB free" in ok.detail
    low = check_home_disk(settings, min_free=1 << 62)
    assert low.status == "WARN" and "reboot" in low.hint


def test_a_failed_disk_copy_keeps_the_snapshot_tmpfs_only_and_says_why(tmp_path: Path) -> None:
    store = SnapshotStore(_settings(tmp_path))
    store.root.mkdir(parents=True)
    store.disk_root.write_text("not a directory")  # the disk copy cannot be written
    m = _template(store, "t", tmp_path)
    assert m.memory_authoritative == "tmpfs" and m.memory_disk is None
    assert store.bootability(m) is None  # usable from tmpfs meanwhile
    assert "t" in store.persist_errors and "not a directory" in store.persist_errors["t"]
    store.disk_root.unlink()
    assert store.persist("t").memory_authoritative == "disk"
    assert "t" not in store.persist_errors


def test_sparse_copy_from_disk_into_tmpfs(tmp_path: Path) -> None:
    """copy_file_range refuses some cross-file-system copies (EXDEV): the copy still works."""
    from forkd.snapshots.guestram import sparse_copy

    src = tmp_path / "disk-copy"
    src.touch()
    _guest_memory(src)
    shm = Path("/dev/shm") / f"forkd-unit-{os.getpid()}"
    shm.mkdir(mode=0o700)
    try:
        sparse_copy(src, shm / "mem", SIZE)
        assert (shm / "mem").read_bytes() == src.read_bytes()
    finally:
        shutil.rmtree(shm)
