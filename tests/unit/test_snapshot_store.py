from __future__ import annotations

from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import Conflict, NotFound
from forkd.snapshots.manifest import Artifact, SnapshotManifest
from forkd.snapshots.store import SnapshotStore, bootability


def _store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(Settings(home=tmp_path / "home", shm_dir=tmp_path / "shm"))


def _manifest(tag: str, tmp_path: Path) -> SnapshotManifest:
    for name in ("k", "i", "r"):
        (tmp_path / name).write_text("x")
    return SnapshotManifest(
        tag=tag, created_at_unix=1, memory=Artifact(path="", bytes=4),
        devstate=Artifact(path="devstate", bytes=2), mem_mib=64, machine_args=[], accel="tcg",
        qemu_version="7.2.0", kernel=str(tmp_path / "k"), initrd=str(tmp_path / "i"),
        rootfs=str(tmp_path / "r"),
    )  # fmt: skip


def test_commit_makes_snapshot_visible_only_at_the_end(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staging = store.begin("t1")
    staging.memory.write_bytes(b"mem!")
    staging.devstate.write_bytes(b"ds")
    assert not store.exists("t1")
    manifest = store.commit(staging, _manifest("t1", tmp_path))
    assert store.exists("t1")
    memory = Path(manifest.memory.path)
    assert memory.parent == store.memory_root and memory.name.startswith("t1.")
    assert memory.read_bytes() == b"mem!" and not staging.memory.exists()
    assert bootability(store.load("t1"), store.devstate_path("t1")) is None
    with pytest.raises(Conflict):
        store.begin("t1")


def test_crash_debris_is_swept_and_never_loadable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staging = store.begin("t2")
    staging.memory.write_bytes(b"half")
    # simulated crash: no commit
    with pytest.raises(NotFound):
        store.load("t2")
    assert store.tags_on_disk() == []
    removed = store.sweep_staging()
    assert len(removed) == 2
    assert not staging.dir.exists() and not staging.memory.exists()


def test_missing_memory_makes_snapshot_unbootable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staging = store.begin("t3")
    staging.memory.write_bytes(b"mem!")
    staging.devstate.write_bytes(b"ds")
    store.commit(staging, _manifest("t3", tmp_path))
    Path(store.load("t3").memory.path).unlink()
    reason = bootability(store.load("t3"), store.devstate_path("t3"))
    assert reason and "is gone" in reason


def test_sweep_spares_a_live_writer_and_clears_a_dead_one(tmp_path: Path) -> None:
    import subprocess

    store = _store(tmp_path)
    store.root.mkdir(parents=True)
    store.memory_root.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for pid, tag in ((live.pid, "busy"), (dead.pid, "crashed")):
            (store.root / f".staging-{pid}-{tag}-0000").mkdir()
            (store.memory_root / f".staging-{pid}-{tag}-0000.mem").write_bytes(b"x")
        removed = store.sweep_staging()
        assert sorted(removed) == sorted([f".staging-{dead.pid}-crashed-0000",
                                          f".staging-{dead.pid}-crashed-0000.mem"])  # fmt: skip
        assert (store.root / f".staging-{live.pid}-busy-0000").is_dir()
    finally:
        live.kill()
        live.wait()


def test_shared_memory_outlives_its_template_until_the_last_user(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staging = store.begin("root")
    staging.memory.write_bytes(b"mem!")
    staging.devstate.write_bytes(b"ds")
    root = store.commit(staging, _manifest("root", tmp_path))
    branch = store.begin("br")
    branch.memory.write_bytes(b"delta")
    branch.devstate.write_bytes(b"ds")
    delta = Artifact(path="x", bytes=5)
    store.commit(branch, root.model_copy(update={"tag": "br", "delta": delta, "root_tag": "root"}))
    store.delete("root")
    assert Path(root.memory.path).is_file()  # the branch still names it
    assert bootability(store.load("br"), store.devstate_path("br")) is None
    store.delete("br")
    assert not Path(root.memory.path).exists()
    assert list(store.memory_root.iterdir()) == []
