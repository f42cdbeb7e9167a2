"""Workspaces: named, durable sandboxes that are suspended into a template and resumed from it.

A workspace is ``running`` (a sandbox forked from its current snapshot), ``suspended`` (no VM;
its state is the template ``ws-<name>-s<N>``) or ``stale`` (its sandbox died while running).
Workspaces live in the registry's ``workspaces`` table, so they survive a daemon restart; a
running workspace's sandbox is re-adopted by the runtime like any other.

Suspend is ordered so that a failure loses nothing:

1. BRANCH the running sandbox into a fresh tag (the previous state is untouched meanwhile);
2. only once that snapshot is ready, switch the workspace to it, in one SQLite write;
3. then kill the VM, and delete the superseded suspend snapshot.

A suspend that fails in 1 leaves the workspace running, on its previous state, with its VM. The
tag being written is recorded (``pending_tag``) and superseded tags are queued (``retired``), so
a crash anywhere leaves debris the next operation, or the next start, deletes.

Built only on the Runtime's public operations (spawn, branch, kill, delete_snapshot) and its
registry. Operations on one workspace do not overlap: a second one meanwhile answers 409.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
from collections.abc import Callable, Iterator

from forkd import wire
from forkd.errors import Conflict, ForkdError, NotFound, Unavailable, VMError
from forkd.runtime.engine import Runtime
from forkd.runtime.registry import Registry, WorkspaceRow, now_unix
from forkd.validate import (
    validate_sandbox_id,
    validate_tag,
    validate_workspace_name,
    workspace_state_tag,
)


class Workspaces:
    """The workspace lifecycle over one :class:`Runtime` (which must be started first)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._busy: dict[str, str] = {}  # name -> the operation in progress

    @property
    def _registry(self) -> Registry:
        return self._rt.registry

    async def start(self) -> None:
        """Mark workspaces whose sandbox is gone stale and finish interrupted cleanups."""
        for row in self._registry.list_workspaces():
            if row.name not in self._busy:
                self._refresh(row)
                with contextlib.suppress(ForkdError, OSError):  # retried by the next suspend
                    await self._cleanup(row.name)

    # --- queries ---------------------------------------------------------------------------

    def list(self) -> list[wire.WorkspaceInfo]:
        return [_info(self._view(row)) for row in self._registry.list_workspaces()]

    def get(self, name: str) -> wire.WorkspaceInfo:
        return _info(self._view(self._row(name)))

    # --- lifecycle -------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        snapshot_tag: str,
        *,
        per_child_netns: bool = False,
        memory_limit_mib: int | None = None,
    ) -> wire.WorkspaceInfo:
        """Fork a sandbox from ``snapshot_tag`` and track it as workspace ``name``."""
        validate_workspace_name(name)
        validate_tag(snapshot_tag)
        with self._exclusive(name, "create"):
            if self._registry.get_workspace(name) is not None:
                raise Conflict(f"workspace {name!r} already exists: delete it first")
            [spawned] = await self._rt.spawn(snapshot_tag, 1, memory_limit_mib=memory_limit_mib)
            sandbox_id = spawned.sandbox.id
            now = now_unix()
            row = WorkspaceRow(
                name=name, id=f"ws-{secrets.token_hex(8)}", source_snapshot_tag=snapshot_tag,
                status="running", created_at_unix=now, last_active_unix=now,
                live_sandbox_id=sandbox_id, per_child_netns=per_child_netns,
                memory_limit_mib=memory_limit_mib,
            )  # fmt: skip
            if not self._registry.insert_workspace(row):  # another process took the name
                await self._rt.kill(sandbox_id)
                raise Conflict(f"workspace {name!r} already exists: delete it first")
            return _info(row)

    async def suspend(self, name: str, *, diff: bool = False) -> wire.WorkspaceInfo:
        """Snapshot the running sandbox into a new state tag, then stop it.

        ``diff`` writes the snapshot in diff mode (the pause copies only the pages the sandbox
        wrote since its fork). Diff is always possible here: it needs exactly what a full
        branch needs, the sandbox's base memory, which stays reachable through its mapping even
        if the template was deleted.
        """
        validate_workspace_name(name)
        with self._exclusive(name, "suspend"):
            row = self._refresh(self._row(name))
            if row.status != "running" or row.live_sandbox_id is None:
                raise Conflict(
                    f"workspace {name!r} is {row.status}: only a running workspace can be "
                    "suspended (resume it first)"
                )
            await self._cleanup(name)
            sandbox_id = row.live_sandbox_id
            row = self._update(name, lambda r: setattr(r, "generation", r.generation + 1))
            tag = workspace_state_tag(name, row.generation)
            if self._registry.get_snapshot(tag) is not None or self._rt.snapshots.exists(tag):
                raise Conflict(
                    f"cannot suspend workspace {name!r}: snapshot {tag!r} exists and is not "
                    f"this workspace's; the workspace keeps running. Delete that snapshot, or "
                    f"suspend again (the next attempt writes "
                    f"{workspace_state_tag(name, row.generation + 1)!r})"
                )

            # From here any snapshot named ``tag`` is this suspend's (nothing runs in between).
            def stage(r: WorkspaceRow) -> None:
                if r.pending_tag not in (None, tag):  # an older one not yet deleted
                    r.retired.append(r.pending_tag)
                r.pending_tag = tag

            self._update(name, stage)
            try:
                snap = await self._rt.branch(sandbox_id, tag=tag, mode="diff" if diff else "full")
            except BaseException as exc:
                with contextlib.suppress(ForkdError, OSError):
                    await self._cleanup(name)
                if isinstance(exc, ForkdError) and exc.http_status == 500:
                    raise _suspend_failed(name, exc) from exc
                raise
            memory_path = self._rt.snapshot_detail(tag).memory_path
            now = now_unix()

            def swap(r: WorkspaceRow) -> None:
                if r.current_state_tag is not None:
                    r.retired.append(r.current_state_tag)
                r.current_state_tag, r.pending_tag = tag, None
                r.status, r.live_sandbox_id, r.last_active_unix = "suspended", None, now
                r.last_branch_memory_path = memory_path

            row = self._update(name, swap)
            warnings = [snap.warning] if snap.warning else []
            try:
                await self._rt.kill(sandbox_id)
            except NotFound:
                pass
            except ForkdError as exc:
                warnings.append(
                    f"state saved, but sandbox {sandbox_id} could not be stopped ({exc}): "
                    f"kill it with DELETE /v1/sandboxes/{sandbox_id}"
                )
            with contextlib.suppress(ForkdError, OSError):  # queued; retried next time
                await self._cleanup(name)
            return _info(self._row(name), "; ".join(warnings) or None)

    async def resume(self, name: str) -> wire.WorkspaceInfo:
        """Fork a sandbox from the latest suspend snapshot (the source if never suspended),
        with the workspace's memory limit."""
        validate_workspace_name(name)
        with self._exclusive(name, "resume"):
            row = self._refresh(self._row(name))
            if row.status == "running":
                raise Conflict(
                    f"workspace {name!r} is already running (sandbox {row.live_sandbox_id})"
                )
            tag = row.current_state_tag or row.source_snapshot_tag
            warning = None
            if row.status == "stale":
                since = "its last suspend" if row.current_state_tag else "its source snapshot"
                warning = (
                    f"the workspace's sandbox had died while running: resumed from {tag!r} "
                    f"({since}); changes made after that are lost"
                )
            try:
                [spawned] = await self._rt.spawn(tag, 1, memory_limit_mib=row.memory_limit_mib)
            except NotFound as exc:
                raise Conflict(
                    f"workspace {name!r} cannot resume: its snapshot {tag!r} is gone ({exc})"
                ) from exc
            sandbox_id, now = spawned.sandbox.id, now_unix()

            def run(r: WorkspaceRow) -> None:
                r.status, r.live_sandbox_id, r.last_active_unix = "running", sandbox_id, now

            return _info(self._update(name, run), warning)

    async def delete(self, name: str) -> None:
        """Kill the live sandbox and delete the workspace's own snapshots (never its source)."""
        validate_workspace_name(name)
        with self._exclusive(name, "delete"):
            row = self._row(name)
            if row.live_sandbox_id is not None:
                with contextlib.suppress(NotFound):
                    await self._rt.kill(row.live_sandbox_id)
            self._registry.delete_workspace(name)
            owned = {*row.retired, row.current_state_tag, row.pending_tag}
            for tag in sorted(t for t in owned if t and t != row.source_snapshot_tag):
                # Best effort: a snapshot that cannot go now stays an ordinary snapshot.
                with contextlib.suppress(ForkdError, OSError):
                    await self._rt.delete_snapshot(tag, force=True)

    # --- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, name: str, operation: str) -> Iterator[None]:
        busy = self._busy.get(name)
        if busy is not None:
            raise Conflict(f"workspace {name!r} is busy: a {busy} is in progress")
        self._busy[name] = operation
        try:
            yield
        finally:
            del self._busy[name]

    def _row(self, name: str) -> WorkspaceRow:
        validate_workspace_name(name)
        row = self._registry.get_workspace(name)
        if row is None:
            raise NotFound(f"workspace {name!r} not found")
        return row

    def _update(self, name: str, change: Callable[[WorkspaceRow], None]) -> WorkspaceRow:
        """Read, change and write one row with no await in between (the daemon's loop is the
        only writer of its workspaces)."""
        row = self._row(name)
        change(row)
        self._registry.put_workspace(row)
        return row

    def _view(self, row: WorkspaceRow) -> WorkspaceRow:
        """What a query shows: refreshed, unless an operation is changing it right now."""
        return row if row.name in self._busy else self._refresh(row)

    def _refresh(self, row: WorkspaceRow) -> WorkspaceRow:
        """A running workspace whose sandbox is dead or gone becomes stale."""
        if row.status != "running":
            return row
        alive = False
        if row.live_sandbox_id is not None:
            try:
                validate_sandbox_id(row.live_sandbox_id)
                alive = self._rt.get_sandbox(row.live_sandbox_id).state != "dead"
            except NotFound:
                alive = False

        def stale(r: WorkspaceRow) -> None:
            r.status, r.live_sandbox_id = "stale", None

        return row if alive else self._update(row.name, stale)

    async def _cleanup(self, name: str) -> None:
        """Delete an interrupted suspend's snapshot and superseded state snapshots."""
        row = self._row(name)
        keep = {row.current_state_tag, row.source_snapshot_tag}
        pending = row.pending_tag
        if pending is not None and pending not in keep:
            snap = self._registry.get_snapshot(pending)
            try:
                if snap is not None and snap.status == "writing":
                    raise Conflict(f"snapshot {pending!r} is still being written")
                if snap is not None or self._rt.snapshots.exists(pending):
                    await self._rt.delete_snapshot(pending, force=True)
            except (ForkdError, OSError):
                pending = None  # kept for a later cleanup
        done: list[str] = []
        for tag in row.retired:
            if tag not in keep:
                try:
                    await self._rt.delete_snapshot(tag, force=True)
                except NotFound:
                    pass
                except (ForkdError, OSError):
                    continue  # kept in the queue for the next cleanup
            done.append(tag)

        def cleaned(r: WorkspaceRow) -> None:
            if pending is not None and r.pending_tag == pending:
                r.pending_tag = None
            r.retired = [t for t in r.retired if t not in done]

        self._update(name, cleaned)


def _suspend_failed(name: str, exc: ForkdError) -> ForkdError:
    """The error of a failed suspend: says what was kept; a full disk is 503, not a fault."""
    message = f"suspend of workspace {name!r} failed; it keeps running on its previous state: {exc}"
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return Unavailable(message)
    return VMError(message)


def _info(row: WorkspaceRow, warning: str | None = None) -> wire.WorkspaceInfo:
    return wire.WorkspaceInfo(
        id=row.id,
        name=row.name,
        source_snapshot_tag=row.source_snapshot_tag,
        current_state_tag=row.current_state_tag,
        status=row.status,  # type: ignore[arg-type]
        live_sandbox_id=row.live_sandbox_id,
        created_at_unix=row.created_at_unix,
        last_active_unix=row.last_active_unix,
        last_branch_memory_path=row.last_branch_memory_path,
        per_child_netns=row.per_child_netns,
        memory_limit_mib=row.memory_limit_mib,
        warning=warning,
    )
