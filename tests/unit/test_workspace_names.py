"""Workspace names and the snapshot tags derived from them; the registry's workspaces table."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkd.errors import InvalidInput
from forkd.runtime.registry import Registry, WorkspaceRow
from forkd.validate import (
    MAX_WORKSPACE_NAME,
    TAG_RE,
    WORKSPACE_MAX_GENERATION,
    validate_workspace_name,
    workspace_state_tag,
)


@pytest.mark.parametrize("name", ["dev", "A-b_9", "x" * MAX_WORKSPACE_NAME, "s1", "a-s2"])
def test_good_names(name: str) -> None:
    assert validate_workspace_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * (MAX_WORKSPACE_NAME + 1), "x" * 64, "../x", "a/b", "a.b", "a b", None, 7,
             "é", "a\0b"],
)  # fmt: skip
def test_bad_names(name: object) -> None:
    with pytest.raises(InvalidInput, match="invalid workspace name"):
        validate_workspace_name(name)


def test_longest_name_and_generation_still_make_a_valid_tag() -> None:
    tag = workspace_state_tag("x" * MAX_WORKSPACE_NAME, WORKSPACE_MAX_GENERATION)
    assert TAG_RE.fullmatch(tag) and len(tag) == 64
    assert workspace_state_tag("dev", 1) == "ws-dev-s1"


@pytest.mark.parametrize("generation", [0, -1, WORKSPACE_MAX_GENERATION + 1, True])
def test_generation_out_of_range(generation: int) -> None:
    with pytest.raises(InvalidInput):
        workspace_state_tag("dev", generation)


def test_derived_tags_never_collide_between_workspaces() -> None:
    names = ["a", "a-s1", "a-s", "a-s1-s2", "ws-a", "a-", "a_s1", "s1", "1"]
    tags = [(workspace_state_tag(n, g), n, g) for n in names for g in (1, 2, 11, 12, 112)]
    assert len({t for t, _, _ in tags}) == len(tags)


def test_registry_keeps_workspaces(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "forkd.db")
    row = WorkspaceRow(
        name="dev", id="ws-1", source_snapshot_tag="py", status="running", created_at_unix=1,
        last_active_unix=2, live_sandbox_id="sb-1", per_child_netns=True, memory_limit_mib=512,
        retired=["ws-dev-s1"],
    )  # fmt: skip
    assert reg.insert_workspace(row)
    assert not reg.insert_workspace(row)  # names are unique
    reg.close()
    reg = Registry(tmp_path / "forkd.db")  # a new process sees it
    assert reg.get_workspace("dev") == row
    row.status, row.live_sandbox_id, row.generation = "suspended", None, 3
    reg.put_workspace(row)
    assert reg.list_workspaces() == [row]
    reg.delete_workspace("dev")
    assert reg.get_workspace("dev") is None and reg.list_workspaces() == []
    reg.close()
