"""SQLite registry of snapshots and sandboxes (``forkd.db`` in the data dir).

Shared by the daemon and local CLI commands, so a sandbox started by one command is known to the
next and to a restarted daemon. WAL mode and a busy timeout let several processes use it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from forkd.private import private_dir, private_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    tag TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at_unix INTEGER NOT NULL,
    branched_from TEXT,
    parent_tag TEXT,
    mode TEXT,
    error TEXT,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    snapshot_tag TEXT NOT NULL,
    pid INTEGER NOT NULL,
    run_dir TEXT NOT NULL,
    created_at_unix INTEGER NOT NULL,
    state TEXT NOT NULL,
    dead_reason TEXT,
    memory_limit_mib INTEGER,
    branch_count INTEGER NOT NULL DEFAULT 0,
    last_branch_memory_path TEXT
);
CREATE TABLE IF NOT EXISTS sandbox_networks (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    ports TEXT NOT NULL DEFAULT '[]',
    proxy_port INTEGER,
    nic TEXT
);
CREATE TABLE IF NOT EXISTS workspaces (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    source_snapshot_tag TEXT NOT NULL,
    current_state_tag TEXT,
    status TEXT NOT NULL,
    live_sandbox_id TEXT,
    created_at_unix INTEGER NOT NULL,
    last_active_unix INTEGER NOT NULL,
    per_child_netns INTEGER NOT NULL DEFAULT 0,
    memory_limit_mib INTEGER,
    generation INTEGER NOT NULL DEFAULT 0,
    last_branch_memory_path TEXT,
    pending_tag TEXT,
    retired TEXT NOT NULL DEFAULT '[]'
);
"""


@dataclass
class SnapshotRow:
    tag: str
    status: str
    created_at_unix: int
    branched_from: str | None = None
    parent_tag: str | None = None
    mode: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SandboxRow:
    id: str
    snapshot_tag: str
    pid: int
    run_dir: str
    created_at_unix: int
    state: str
    dead_reason: str | None = None
    memory_limit_mib: int | None = None
    branch_count: int = 0
    last_branch_memory_path: str | None = None


@dataclass
class NetworkRow:
    """A sandbox's egress policy (wire form), its forwarded ports and its proxy's port."""

    id: str
    policy: dict[str, Any]
    ports: list[dict[str, Any]] = field(default_factory=list)
    proxy_port: int | None = None
    nic: dict[str, Any] | None = None  # the guest's addresses (GuestNetwork), None: no NIC


@dataclass
class WorkspaceRow:
    """A named, durable sandbox (see :mod:`forkd.runtime.workspaces`).

    ``generation`` counts suspend attempts (it names the next suspend snapshot); ``pending_tag``
    is the snapshot a suspend is writing right now; ``retired`` lists superseded suspend
    snapshots still to be deleted.
    """

    name: str
    id: str
    source_snapshot_tag: str
    status: str
    created_at_unix: int
    last_active_unix: int
    current_state_tag: str | None = None
    live_sandbox_id: str | None = None
    per_child_netns: bool = False
    memory_limit_mib: int | None = None
    generation: int = 0
    last_branch_memory_path: str | None = None
    pending_tag: str | None = None
    retired: list[str] = field(default_factory=list)


_WORKSPACE_COLUMNS = tuple(f.name for f in fields(WorkspaceRow))


class Registry:
    def __init__(self, path: Path) -> None:
        private_dir(path.parent, "forkd home")
        # SQLite gives its -wal and -shm files the mode of the database file.
        private_file(path, "database")
        for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if side.exists():
                private_file(side, "database")
        self._db = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- snapshots -------------------------------------------------------------------------

    def put_snapshot(self, row: SnapshotRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?,?,?,?)",
            (row.tag, row.status, row.created_at_unix, row.branched_from, row.parent_tag,
             row.mode, row.error, json.dumps(row.extra)),
        )  # fmt: skip

    def reserve_snapshot(self, row: SnapshotRow) -> bool:
        """Insert ``row`` unless the tag is taken; True if this call reserved it."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO snapshots VALUES (?,?,?,?,?,?,?,?)",
            (row.tag, row.status, row.created_at_unix, row.branched_from, row.parent_tag,
             row.mode, row.error, json.dumps(row.extra)),
        )  # fmt: skip
        return cur.rowcount == 1

    def get_snapshot(self, tag: str) -> SnapshotRow | None:
        r = self._db.execute("SELECT * FROM snapshots WHERE tag=?", (tag,)).fetchone()
        return _snapshot(r) if r else None

    def list_snapshots(self) -> list[SnapshotRow]:
        rows = self._db.execute("SELECT * FROM snapshots ORDER BY created_at_unix, tag")
        return [_snapshot(r) for r in rows]

    def delete_snapshot(self, tag: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE tag=?", (tag,))

    # --- sandboxes -------------------------------------------------------------------------

    def put_sandbox(self, row: SandboxRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?)",
            (row.id, row.snapshot_tag, row.pid, row.run_dir, row.created_at_unix, row.state,
             row.dead_reason, row.memory_limit_mib, row.branch_count,
             row.last_branch_memory_path),
        )  # fmt: skip

    def get_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        r = self._db.execute("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return SandboxRow(**dict(r)) if r else None

    def list_sandboxes(self) -> list[SandboxRow]:
        rows = self._db.execute("SELECT * FROM sandboxes ORDER BY created_at_unix, id")
        return [SandboxRow(**dict(r)) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    # --- sandbox networks ------------------------------------------------------------------

    def put_network(self, row: NetworkRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sandbox_networks VALUES (?,?,?,?,?)",
            (row.id, json.dumps(row.policy), json.dumps(row.ports), row.proxy_port,
             json.dumps(row.nic) if row.nic is not None else None),
        )  # fmt: skip

    def get_network(self, sandbox_id: str) -> NetworkRow | None:
        r = self._db.execute("SELECT * FROM sandbox_networks WHERE id=?", (sandbox_id,)).fetchone()
        if r is None:
            return None
        return NetworkRow(id=r["id"], policy=json.loads(r["policy"]), ports=json.loads(r["ports"]),
                          proxy_port=r["proxy_port"],
                          nic=json.loads(r["nic"]) if r["nic"] else None)  # fmt: skip

    def network_ids(self) -> list[str]:
        return [r["id"] for r in self._db.execute("SELECT id FROM sandbox_networks")]

    def delete_network(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM sandbox_networks WHERE id=?", (sandbox_id,))

    def mark_dead(self, sandbox_id: str, reason: str) -> None:
        self._db.execute(
            "UPDATE sandboxes SET state='dead', dead_reason=? WHERE id=? AND state!='dead'",
            (reason, sandbox_id),
        )

    # --- workspaces ------------------------------------------------------------------------

    def insert_workspace(self, row: WorkspaceRow) -> bool:
        """Insert ``row`` unless the name is taken; True if this call inserted it."""
        cur = self._db.execute(
            f"INSERT OR IGNORE INTO workspaces ({','.join(_WORKSPACE_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(_WORKSPACE_COLUMNS))})",
            _workspace_values(row),
        )
        return cur.rowcount == 1

    def put_workspace(self, row: WorkspaceRow) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO workspaces ({','.join(_WORKSPACE_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(_WORKSPACE_COLUMNS))})",
            _workspace_values(row),
        )

    def get_workspace(self, name: str) -> WorkspaceRow | None:
        r = self._db.execute("SELECT * FROM workspaces WHERE name=?", (name,)).fetchone()
        return _workspace(r) if r else None

    def list_workspaces(self) -> list[WorkspaceRow]:
        rows = self._db.execute("SELECT * FROM workspaces ORDER BY created_at_unix, name")
        return [_workspace(r) for r in rows]

    def delete_workspace(self, name: str) -> None:
        self._db.execute("DELETE FROM workspaces WHERE name=?", (name,))


def _workspace_values(row: WorkspaceRow) -> tuple[object, ...]:
    values = {**row.__dict__, "per_child_netns": int(row.per_child_netns),
              "retired": json.dumps(row.retired)}  # fmt: skip
    return tuple(values[c] for c in _WORKSPACE_COLUMNS)


def _workspace(r: sqlite3.Row) -> WorkspaceRow:
    d = dict(r)
    d["per_child_netns"] = bool(d["per_child_netns"])
    d["retired"] = json.loads(d.get("retired") or "[]")
    return WorkspaceRow(**d)


def _snapshot(r: sqlite3.Row) -> SnapshotRow:
    d = dict(r)
    d["extra"] = json.loads(d.get("extra") or "{}")
    return SnapshotRow(**d)


def now_unix() -> int:
    return int(time.time())
