"""The E2B layer's durable state: what a restarted daemon takes up (real SQLite, a stand-in
runtime that knows which sandboxes run and which templates exist)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from forkd.api.e2b.state import E2BState
from forkd.api.e2b.store import E2BStore
from forkd.errors import NotFound
from forkd.runtime.engine import Runtime


class FakeRuntime:
    def __init__(self, running: set[str], snapshots: set[str]) -> None:
        self.running = running
        self.snapshots = snapshots
        self.deleted: list[str] = []

    def get_snapshot(self, tag: str) -> Any:
        if tag not in self.snapshots:
            raise NotFound(f"snapshot {tag!r} not found")
        return SimpleNamespace(tag=tag)

    def get_sandbox(self, sandbox_id: str) -> Any:
        state = "running" if sandbox_id in self.running else "dead"
        return SimpleNamespace(id=sandbox_id, state=state, snapshot_tag="py")

    def list_sandboxes(self) -> list[Any]:
        return [self.get_sandbox(i) for i in sorted(self.running)]

    def pooled_sandbox_ids(self) -> set[str]:
        return set()

    async def delete_snapshot(self, tag: str) -> None:
        self.deleted.append(tag)
        self.snapshots.discard(tag)


def _state(path: Path, runtime: FakeRuntime) -> E2BState:
    return E2BState(cast(Runtime, runtime), E2BStore(path))


async def test_running_and_paused_sandboxes_are_taken_up(tmp_path: Path) -> None:
    db = tmp_path / "home" / "e2b.db"
    runtime = FakeRuntime({"sb-run", "sb-vm2"}, {"py", "e2b-pause-1", "e2b-fork-1"})
    before = _state(db, runtime)
    run = before.add("sb-run", "py", timeout_s=60, metadata={"k": "v"}, envs={"A": "1"})
    paused = before.add("sb-paused", "py", timeout_s=None, metadata={"p": "1"})
    paused.paused_tag = "e2b-pause-1"
    paused.owned_tags.append("e2b-pause-1")
    paused.contexts["c1"] = {"language": "python", "cwd": "/home/user"}
    before.save(paused)
    resumed = before.add("sb-resumed", "py", timeout_s=30)
    resumed.vm_id = "sb-vm2"
    before.save(resumed)
    dead = before.add("sb-dead", "py", timeout_s=None)
    dead.owned_tags.append("e2b-fork-1")
    before.save(dead)
    gone = before.add("sb-gone", "py", timeout_s=None)
    gone.paused_tag = "e2b-pause-deleted"
    before.save(gone)
    await before.close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600

    after = _state(db, runtime)
    await after.start()
    try:
        assert sorted(after.sandboxes) == ["sb-paused", "sb-resumed", "sb-run"]
        got = after.sandboxes["sb-run"]
        assert (got.access_token, got.end_at, got.metadata, got.envs) == (
            run.access_token,
            run.end_at,
            {"k": "v"},
            {"A": "1"},
        )
        p = after.get("sb-paused", paused_ok=True)
        assert p.paused and p.paused_tag == "e2b-pause-1" and p.metadata == {"p": "1"}
        assert p.contexts == {"c1": {"language": "python", "cwd": "/home/user"}}
        assert after.get("sb-resumed").vm_id == "sb-vm2"
        # the dead sandbox's fork template went with it; the paused one's stays
        assert runtime.deleted == ["e2b-fork-1"]
        # a sandbox whose VM died since is forgotten, in the store too
        runtime.running.discard("sb-run")
        assert after.known("sb-run") is not None
        with pytest.raises(NotFound):
            after.get("sb-run")
        await after.kill("sb-paused")
    finally:
        await after.close()
    third = _state(db, runtime)
    await third.start()
    assert sorted(third.sandboxes) == ["sb-resumed"]
    await third.close()
