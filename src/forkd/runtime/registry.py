"""SQLite registry of snapshots and sandboxes (``forkd.db`` in the data dir).

Shared by the daemon and local CLI commands, so a sandbox started by one command is known to the
next and to a restarted daemon. WAL mode and a busy timeout let several processes use it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
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

    def mark_dead(self, sandbox_id: str, reason: str) -> None:
        self._db.execute(
            "UPDATE sandboxes SET state='dead', dead_reason=? WHERE id=? AND state!='dead'",
            (reason, sandbox_id),
        )


def _snapshot(r: sqlite3.Row) -> SnapshotRow:
    d = dict(r)
    d["extra"] = json.loads(d.get("extra") or "{}")
    return SnapshotRow(**d)


def now_unix() -> int:
    return int(time.time())
