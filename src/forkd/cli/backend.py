"""Where CLI commands run: in this process (local runtime) or on a daemon over HTTP.

Both speak the same dict-shaped wire data, so each command is written once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import httpx

from forkd.config import DEFAULT_BIND, Settings

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SpawnFlags:
    """forkd v0.5's spawn flags; see :mod:`forkd.compat` for what each means here."""

    per_child_netns: bool = False
    prewarm: bool = False
    live_fork: bool = False
    hugepages: bool = False


NO_FLAGS = SpawnFlags()


class Backend(Protocol):
    kind: str

    def list_snapshots(self) -> list[dict[str, Any]]: ...
    def snapshot_info(self, tag: str) -> dict[str, Any]: ...
    def create_snapshot(
        self,
        tag: str,
        image: str,
        mem_mib: int,
        warmup: str | None,
        progress: Callable[[str], None],
    ) -> dict[str, Any]: ...
    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None: ...
    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]: ...
    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS
    ) -> list[dict[str, Any]]: ...
    def list_sandboxes(self, include_dead: bool) -> list[dict[str, Any]]: ...
    def kill(self, sandbox_id: str) -> None: ...
    def ping(self, sandbox_id: str) -> dict[str, Any]: ...
    def exec(
        self, sandbox_id: str, args: list[str], timeout: float, env: dict[str, str] | None,
        cwd: str | None,
    ) -> dict[str, Any]: ...  # fmt: skip
    def eval(self, sandbox_id: str, code: str) -> dict[str, Any]: ...
    def branch(
        self, sandbox_id: str, tag: str | None, mode: str | None, diff: bool, wait: bool
    ) -> dict[str, Any]: ...
    def close(self) -> None: ...


class LocalBackend:
    """Runs the engine in this process; state is shared with other processes through SQLite."""

    kind = "local"

    def __init__(self, settings: Settings) -> None:
        from forkd.runtime.engine import Runtime

        self._runner = asyncio.Runner()
        # A one-shot process would only start pre-launched children to kill them at exit.
        self.runtime = Runtime(dataclasses.replace(settings, warm_pool_size=0))
        self._run(self.runtime.start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        self._run(self.runtime.close())
        self._runner.close()

    def list_snapshots(self) -> list[dict[str, Any]]:
        return [s.model_dump() for s in self.runtime.list_snapshots()]

    def snapshot_info(self, tag: str) -> dict[str, Any]:
        return self.runtime.snapshot_detail(tag).model_dump()

    def create_snapshot(
        self,
        tag: str,
        image: str,
        mem_mib: int,
        warmup: str | None,
        progress: Callable[[str], None],
    ) -> dict[str, Any]:
        info = self._run(
            self.runtime.create_snapshot(
                tag, image=image, mem_mib=mem_mib, warmup=warmup, progress=progress
            )
        )
        return info.model_dump()

    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None:
        self._run(self.runtime.delete_snapshot(tag, cascade=cascade, force=force))

    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]:
        return self._run(self.runtime.compact_snapshot(tag, to)).model_dump()

    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS
    ) -> list[dict[str, Any]]:
        from forkd import compat, wire

        req = wire.SpawnRequest(snapshot_tag=tag, n=n, **dataclasses.asdict(flags))
        notes = compat.spawn_notes(req, memory_dir=self.runtime.settings.memory_dir)
        spawned = self._run(self.runtime.spawn(tag, n, memory_limit_mib=memory_limit_mib))
        return [
            {**s.sandbox.model_dump(), "fork_timing_ms": _timing(s.timing),
             "warning": compat.join(s.warning, *notes)}
            for s in spawned
        ]  # fmt: skip

    def list_sandboxes(self, include_dead: bool) -> list[dict[str, Any]]:
        return [s.model_dump() for s in self.runtime.list_sandboxes(include_dead=include_dead)]

    def kill(self, sandbox_id: str) -> None:
        self._run(self.runtime.kill(sandbox_id))

    def ping(self, sandbox_id: str) -> dict[str, Any]:
        return dict(self._run(self.runtime.ping(sandbox_id)))

    def exec(
        self, sandbox_id: str, args: list[str], timeout: float, env: dict[str, str] | None,
        cwd: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        r = self._run(self.runtime.exec(sandbox_id, args, timeout_s=timeout, env=env, cwd=cwd))
        return r.model_dump()

    def eval(self, sandbox_id: str, code: str) -> dict[str, Any]:
        return self._run(self.runtime.eval(sandbox_id, code)).model_dump()

    def branch(
        self, sandbox_id: str, tag: str | None, mode: str | None, diff: bool, wait: bool
    ) -> dict[str, Any]:
        info = self._run(self.runtime.branch(sandbox_id, tag=tag, mode=mode, diff=diff, wait=wait))
        return info.model_dump()


class RemoteBackend:
    """Talks to a forkd daemon through the Python SDK's Controller."""

    kind = "daemon"

    def __init__(self, base_url: str, token: str | None) -> None:
        from forkd.client.controller import Controller

        self.c = Controller(base_url=base_url, token=token, timeout=3600.0)

    def close(self) -> None:
        self.c.close()

    def list_snapshots(self) -> list[dict[str, Any]]:
        return list(self.c.list_snapshots())

    def snapshot_info(self, tag: str) -> dict[str, Any]:
        return dict(self.c.snapshot_info(tag))

    def create_snapshot(
        self,
        tag: str,
        image: str,
        mem_mib: int,
        warmup: str | None,
        progress: Callable[[str], None],
    ) -> dict[str, Any]:
        progress("daemon is booting and warming the parent")
        return dict(self.c.create_snapshot(tag, image=image, mem_mib=mem_mib, warmup=warmup))

    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None:
        self.c.delete_snapshot(tag, cascade=cascade, force=force)

    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]:
        return dict(self.c.compact_snapshot(tag, to))

    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS
    ) -> list[dict[str, Any]]:
        return list(
            self.c.spawn_sandboxes(
                tag, n=n, memory_limit_mib=memory_limit_mib, **dataclasses.asdict(flags)
            )
        )

    def list_sandboxes(self, include_dead: bool) -> list[dict[str, Any]]:
        return list(self.c.list_sandboxes(include_dead=include_dead))

    def kill(self, sandbox_id: str) -> None:
        self.c.kill_sandbox(sandbox_id)

    def ping(self, sandbox_id: str) -> dict[str, Any]:
        return dict(self.c.ping_sandbox(sandbox_id))

    def exec(
        self, sandbox_id: str, args: list[str], timeout: float, env: dict[str, str] | None,
        cwd: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        return dict(self.c.exec_command(sandbox_id, args, timeout_secs=timeout, env=env, cwd=cwd))

    def eval(self, sandbox_id: str, code: str) -> dict[str, Any]:
        return dict(self.c.eval_code(sandbox_id, code))

    def branch(
        self, sandbox_id: str, tag: str | None, mode: str | None, diff: bool, wait: bool
    ) -> dict[str, Any]:
        return dict(self.c.branch_sandbox(sandbox_id, tag=tag, diff=diff, mode=mode, wait=wait))


def _timing(t: Any) -> dict[str, float]:
    return {k: round(v, 1) for k, v in vars(t).items()}


def daemon_reachable(url: str) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def choose_backend(
    settings: Settings, *, daemon_url: str | None, token: str | None, local: bool
) -> Backend:
    """An explicit URL means the daemon; otherwise use a daemon answering on the default bind,
    else run locally."""
    if local:
        return LocalBackend(settings)
    url = daemon_url or os.environ.get("FORKD_URL")
    token = token or os.environ.get("FORKD_TOKEN")
    if url:
        return RemoteBackend(url, token)
    default_url = f"http://{DEFAULT_BIND}"
    if daemon_reachable(default_url):
        return RemoteBackend(default_url, token)
    return LocalBackend(settings)
