"""The E2B layer's durable state: one row per E2B sandbox in ``e2b.db`` under the forkd home.

What a restarted daemon needs to serve an E2B sandbox as before: its access token, deadline,
metadata, env vars, code contexts, the forkd sandbox running it and, for a paused one, the
template it resumes from. Its own SQLite file (private, 0600), apart from the runtime's
registry: the E2B layer sits above the runtime and the registry knows nothing of it.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forkd.private import private_dir, private_file

log = logging.getLogger("forkd.api.e2b")

SCHEMA = """
CREATE TABLE IF NOT EXISTS e2b_sandboxes (
    sandbox_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
)
"""


class StoredSandbox(BaseModel):
    """An E2B sandbox as stored (``body``, JSON); unknown keys of a newer forkd are ignored."""

    model_config = ConfigDict(extra="ignore")

    sandbox_id: str
    template_id: str
    access_token: str
    started_at: float
    end_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    envs: dict[str, str] = Field(default_factory=dict)
    allow_internet_access: bool | None = None
    vm_id: str = ""
    paused_tag: str | None = None
    owned_tags: list[str] = Field(default_factory=list)
    contexts: dict[str, dict[str, str]] = Field(default_factory=dict)
    exec_counts: dict[str, int] = Field(default_factory=dict)


class E2BStore:
    def __init__(self, path: Path) -> None:
        private_dir(path.parent, "forkd home")
        # SQLite gives its journal the mode of the database file.
        private_file(path, "E2B state database")
        self._db = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute(SCHEMA)

    def put(self, row: StoredSandbox) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO e2b_sandboxes VALUES (?, ?)",
            (row.sandbox_id, row.model_dump_json()),
        )

    def delete(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM e2b_sandboxes WHERE sandbox_id = ?", (sandbox_id,))

    def load(self) -> list[StoredSandbox]:
        """Every stored sandbox; a row that does not parse is logged and dropped."""
        rows: list[StoredSandbox] = []
        for sandbox_id, body in self._db.execute("SELECT sandbox_id, body FROM e2b_sandboxes"):
            try:
                rows.append(StoredSandbox.model_validate_json(body))
            except ValidationError as e:
                log.warning("e2b: dropping unreadable state of sandbox %s: %s", sandbox_id, e)
                self.delete(sandbox_id)
        return rows

    def close(self) -> None:
        self._db.close()
