"""What forkd keeps per E2B sandbox: its access token, deadline, metadata and env vars.

In memory, per daemon: a sandbox made through forkd's own API (or before a daemon restart)
gets a fresh entry, with no deadline, the first time an E2B client connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field

from forkd.errors import ForkdError, NotFound
from forkd.runtime.engine import Runtime

log = logging.getLogger("forkd.api.e2b")

DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 24 * 3600
REAP_INTERVAL_S = 1.0


@dataclass
class E2BSandbox:
    sandbox_id: str
    template_id: str
    access_token: str
    started_at: float
    end_at: float | None  # unix time it is killed at; None: never
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    allow_internet_access: bool | None = None
    home_ready: bool = False
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> language, cwd
    exec_counts: dict[str, int] = field(default_factory=dict)  # per context id

    def set_timeout(self, seconds: int) -> None:
        self.end_at = time.time() + seconds


def iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat().replace("+00:00", "Z")


class E2BState:
    """The E2B view of the runtime's sandboxes, and the reaper that enforces their timeouts."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sandboxes: dict[str, E2BSandbox] = {}
        self._reaper: asyncio.Task[None] | None = None

    def add(
        self,
        sandbox_id: str,
        template_id: str,
        *,
        timeout_s: int | None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
    ) -> E2BSandbox:
        now = time.time()
        sb = E2BSandbox(
            sandbox_id=sandbox_id,
            template_id=template_id,
            access_token=secrets.token_urlsafe(24),
            started_at=now,
            end_at=None if timeout_s is None else now + timeout_s,
            metadata=dict(metadata or {}),
            envs=dict(envs or {}),
            allow_internet_access=allow_internet_access,
        )
        self.sandboxes[sandbox_id] = sb
        self._ensure_reaper()
        return sb

    def get(self, sandbox_id: str) -> E2BSandbox:
        """The entry of a running sandbox (made on first sight); :class:`NotFound` otherwise."""
        try:
            info = self.runtime.get_sandbox(sandbox_id)
        except ForkdError:
            self.sandboxes.pop(sandbox_id, None)
            raise NotFound(f"sandbox {sandbox_id!r} was not found") from None
        if info.state != "running":
            self.sandboxes.pop(sandbox_id, None)
            raise NotFound(f"sandbox {sandbox_id!r} was not found (it is {info.state})")
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            sb = self.add(sandbox_id, info.snapshot_tag, timeout_s=None)
            sb.started_at = float(info.created_at_unix)
        return sb

    def known(self, sandbox_id: str) -> E2BSandbox | None:
        return self.sandboxes.get(sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        self.sandboxes.pop(sandbox_id, None)
        await self.runtime.kill(sandbox_id)

    # --- the reaper --------------------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_forever(), name="e2b-reaper"
            )

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            await self.reap_once()

    async def reap_once(self) -> list[str]:
        """Kill every sandbox whose timeout has passed; their ids."""
        now = time.time()
        due = [s.sandbox_id for s in self.sandboxes.values() if s.end_at and s.end_at <= now]
        for sandbox_id in due:
            log.info("e2b: sandbox %s timed out; killing it", sandbox_id)
            try:
                await self.kill(sandbox_id)
            except NotFound:
                pass
            except Exception as e:  # keep reaping the others
                log.warning("e2b: killing timed-out sandbox %s failed: %s", sandbox_id, e)
        return due

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
