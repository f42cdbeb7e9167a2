"""What forkd keeps per E2B sandbox: its access token, deadline, metadata and env vars.

Kept in memory and, with a store, in ``e2b.db`` (:mod:`forkd.api.e2b.store`), so a restarted
daemon serves running and paused E2B sandboxes as before (same tokens, deadlines, metadata). A
sandbox made through forkd's own API gets an entry, with no deadline, the first time an E2B
client connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field

from forkd.api.e2b.store import E2BStore, StoredSandbox
from forkd.errors import ForkdError, NotFound
from forkd.runtime.engine import Runtime

log = logging.getLogger("forkd.api.e2b")

DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 24 * 3600
REAP_INTERVAL_S = 1.0


@dataclass
class Watcher:
    """A directory watch: its root and what was there at the last look."""

    root: str
    recursive: bool
    seen: dict[str, tuple[object, ...]]
    user: str | None = None


@dataclass
class E2BSandbox:
    """``sandbox_id`` is the id E2B clients use; ``vm_id`` the forkd sandbox running it now
    (they differ after a pause and resume), ``paused_tag`` the template a paused one resumes
    from."""

    sandbox_id: str
    template_id: str
    access_token: str
    started_at: float
    end_at: float | None  # unix time it is killed at; None: never
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    allow_internet_access: bool | None = None
    users: dict[str, str] | None = None  # the guest's users (name -> home); None: not read yet
    vm_id: str = ""
    paused_tag: str | None = None
    owned_tags: list[str] = field(default_factory=list)  # templates made for its pause/fork
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> language, cwd
    exec_counts: dict[str, int] = field(default_factory=dict)  # per context id
    watchers: dict[str, Watcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vm_id = self.vm_id or self.sandbox_id

    @property
    def paused(self) -> bool:
        return self.paused_tag is not None

    def set_timeout(self, seconds: int) -> None:
        self.end_at = time.time() + seconds

    def stored(self) -> StoredSandbox:
        return StoredSandbox.model_validate(
            {name: getattr(self, name) for name in StoredSandbox.model_fields}
        )

    @classmethod
    def from_stored(cls, row: StoredSandbox) -> E2BSandbox:
        return cls(**row.model_dump())


def iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat().replace("+00:00", "Z")


class E2BState:
    """The E2B view of the runtime's sandboxes, and the reaper that enforces their timeouts."""

    def __init__(self, runtime: Runtime, store: E2BStore | None = None) -> None:
        self.runtime = runtime
        self.store = store
        self.sandboxes: dict[str, E2BSandbox] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take up the stored sandboxes: paused ones whose template is still there and running
        ones whose VM still runs (the runtime has re-adopted it); forget the rest."""
        if self.store is None:
            return
        gone: list[str] = []
        for row in self.store.load():
            sb = E2BSandbox.from_stored(row)
            why = self._unusable(sb)
            if why is not None:
                log.info("e2b: forgetting sandbox %s: %s", sb.sandbox_id, why)
                self.store.delete(sb.sandbox_id)
                gone += sb.owned_tags
                continue
            self.sandboxes[sb.sandbox_id] = sb
        await self.drop_tags(gone)
        if self.sandboxes:
            self._ensure_reaper()

    def _unusable(self, sb: E2BSandbox) -> str | None:
        try:
            if sb.paused_tag is not None:
                self.runtime.get_snapshot(sb.paused_tag)
                return None
            state = self.runtime.get_sandbox(sb.vm_id).state
        except ForkdError as e:
            return str(e) or type(e).__name__
        return None if state == "running" else f"its VM {sb.vm_id} is {state}"

    def save(self, sb: E2BSandbox) -> None:
        """Store ``sb`` as it is now (call after every change a restart must keep)."""
        if self.store is not None and self.sandboxes.get(sb.sandbox_id) is sb:
            self.store.put(sb.stored())

    def _drop(self, sandbox_id: str) -> E2BSandbox | None:
        sb = self.sandboxes.pop(sandbox_id, None)
        if sb is not None and self.store is not None:
            self.store.delete(sandbox_id)
        return sb

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
        self.save(sb)
        self._ensure_reaper()
        return sb

    def get(self, sandbox_id: str, *, paused_ok: bool = False) -> E2BSandbox:
        """The entry of a running (or with ``paused_ok`` a paused) sandbox, made on first sight
        of a forkd sandbox; :class:`NotFound` otherwise."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None and sb.paused:
            if paused_ok:
                return sb
            raise NotFound(f"sandbox {sandbox_id!r} was not found (it is paused)")
        vm_id = sb.vm_id if sb is not None else sandbox_id
        try:
            info = self.runtime.get_sandbox(vm_id)
        except ForkdError:
            self._drop(sandbox_id)
            raise NotFound(f"sandbox {sandbox_id!r} was not found") from None
        if info.state != "running":
            self._drop(sandbox_id)
            raise NotFound(f"sandbox {sandbox_id!r} was not found (it is {info.state})")
        if sb is None:
            if self.by_vm(vm_id) is not None:  # a resumed sandbox's VM, under its E2B id
                raise NotFound(f"sandbox {sandbox_id!r} was not found")
            sb = self.add(sandbox_id, info.snapshot_tag, timeout_s=None)
            sb.started_at = float(info.created_at_unix)
            self.save(sb)
        return sb

    def by_vm(self, vm_id: str) -> E2BSandbox | None:
        for sb in self.sandboxes.values():
            if sb.vm_id == vm_id and sb.vm_id != sb.sandbox_id:
                return sb
        return None

    def known(self, sandbox_id: str) -> E2BSandbox | None:
        return self.sandboxes.get(sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        sb = self._drop(sandbox_id)
        if sb is None:
            await self.runtime.kill(sandbox_id)
            return
        if not sb.paused:
            await self.runtime.kill(sb.vm_id)
        await self.drop_tags(sb.owned_tags)

    async def drop_tags(self, tags: list[str]) -> None:
        """Delete the templates forkd made for E2B pauses and forks once no sandbox needs them
        (a template other sandboxes still run from stays; the last one's kill deletes it)."""
        needed = {t for s in self.sandboxes.values() for t in s.owned_tags}
        pooled = self.runtime.pooled_sandbox_ids()
        needed |= {i.snapshot_tag for i in self.runtime.list_sandboxes() if i.id not in pooled}
        for tag in tags:
            if tag not in needed:
                with contextlib.suppress(ForkdError):
                    await self.runtime.delete_snapshot(tag)

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
        due = [
            s.sandbox_id
            for s in self.sandboxes.values()
            if s.end_at and s.end_at <= now and not s.paused
        ]
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
        if self.store is not None:
            self.store.close()
