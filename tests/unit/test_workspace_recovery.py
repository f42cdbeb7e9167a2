"""Workspace bookkeeping over a real Runtime and SQLite registry, without VMs: what a start-up
cleans after a crash, and the errors of each operation in the wrong state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import Conflict, InvalidInput, NotFound
from forkd.runtime.engine import Runtime
from forkd.runtime.registry import SnapshotRow, WorkspaceRow
from forkd.runtime.workspaces import Workspaces


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = Runtime(Settings(home=tmp_path / "home", shm_dir=tmp_path / "shm", warm_pool_size=0))
    await rt.start()
    yield rt
    await rt.close()


def snapshot(rt: Runtime, tag: str, status: str = "ready") -> None:
    rt.registry.put_snapshot(SnapshotRow(tag=tag, status=status, created_at_unix=1,
                                         branched_from="sb-gone"))  # fmt: skip


def tags(rt: Runtime) -> set[str]:
    return {r.tag for r in rt.registry.list_snapshots()}


async def test_start_cleans_up_after_a_crash_mid_suspend(runtime: Runtime) -> None:
    for tag in ("py", "ws-dev-s1", "ws-dev-s3"):
        snapshot(runtime, tag)
    snapshot(runtime, "ws-dev-s4", status="failed")  # the interrupted suspend's snapshot
    runtime.registry.put_workspace(WorkspaceRow(
        name="dev", id="ws-1", source_snapshot_tag="py", status="running", created_at_unix=1,
        last_active_unix=1, current_state_tag="ws-dev-s3", live_sandbox_id="sb-gone",
        generation=4, pending_tag="ws-dev-s4", retired=["ws-dev-s1", "py"],
    ))  # fmt: skip
    ws = Workspaces(runtime)
    await ws.start()
    row = runtime.registry.get_workspace("dev")
    assert row is not None
    assert (row.status, row.live_sandbox_id, row.pending_tag, row.retired) == (
        "stale", None, None, [],
    )  # fmt: skip
    assert tags(runtime) == {"py", "ws-dev-s3"}  # the source and the current state stay


async def test_wrong_state_and_bad_input(runtime: Runtime) -> None:
    snapshot(runtime, "py")
    snapshot(runtime, "ws-dev-s1")
    ws = Workspaces(runtime)
    runtime.registry.put_workspace(WorkspaceRow(
        name="dev", id="ws-1", source_snapshot_tag="py", status="suspended", created_at_unix=1,
        last_active_unix=1, current_state_tag="ws-dev-s1", generation=1,
    ))  # fmt: skip
    with pytest.raises(NotFound, match="workspace 'nope' not found"):
        ws.get("nope")
    with pytest.raises(InvalidInput, match="invalid workspace name"):
        await ws.create("x" * 49, "py")
    with pytest.raises(InvalidInput, match="invalid snapshot tag"):
        await ws.create("new", "../py")
    with pytest.raises(Conflict, match="already exists"):
        await ws.create("dev", "py")
    with pytest.raises(Conflict, match="is suspended"):
        await ws.suspend("dev")
    # Its state snapshot lost its files: resume is refused and nothing changes.
    with pytest.raises(Conflict, match="cannot resume"):
        await ws.resume("dev")
    assert ws.get("dev").status == "suspended"
    assert [w.name for w in ws.list()] == ["dev"]
    await ws.delete("dev")
    assert tags(runtime) == {"py"} and ws.list() == []
    with pytest.raises(NotFound):
        await ws.delete("dev")


async def test_a_snapshot_being_written_is_left_for_later(runtime: Runtime) -> None:
    snapshot(runtime, "py")
    snapshot(runtime, "ws-dev-s1", status="writing")
    runtime.registry.put_workspace(WorkspaceRow(
        name="dev", id="ws-1", source_snapshot_tag="py", status="suspended", created_at_unix=1,
        last_active_unix=1, generation=1, pending_tag="ws-dev-s1",
    ))  # fmt: skip
    await Workspaces(runtime).start()
    row = runtime.registry.get_workspace("dev")
    assert row is not None and row.pending_tag == "ws-dev-s1"
    assert "ws-dev-s1" in tags(runtime)
