"""Where CLI commands run: in this process (local runtime) or on a daemon over HTTP.

Both speak the same dict-shaped wire data, so each command is written once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx

from forkd.config import DEFAULT_BIND, Settings

if TYPE_CHECKING:
    from forkd.runtime.workspaces import Workspaces

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
        network: dict[str, Any] | None = None,
        cpus: int | None = None,
    ) -> dict[str, Any]: ...
    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None: ...
    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]: ...
    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS,
        network: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]: ...  # fmt: skip
    def expose_port(self, sandbox_id: str, port: int) -> dict[str, Any]: ...
    def list_ports(self, sandbox_id: str) -> list[dict[str, Any]]: ...
    def remove_port(self, sandbox_id: str, port: int) -> None: ...
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
    def create_workspace(
        self, name: str, snapshot_tag: str, per_child_netns: bool, memory_limit_mib: int | None
    ) -> dict[str, Any]: ...
    def list_workspaces(self) -> list[dict[str, Any]]: ...
    def suspend_workspace(self, name: str, diff: bool) -> dict[str, Any]: ...
    def resume_workspace(self, name: str) -> dict[str, Any]: ...
    def delete_workspace(self, name: str) -> None: ...
    def pack(self, tag: str, dest: Path, compress: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]: ...  # fmt: skip
    def unpack(self, path: Path, tag: str | None, force: bool, progress: Callable[[str], None]
               ) -> dict[str, Any]: ...  # fmt: skip
    def push(self, tag: str, ref: str, insecure: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]: ...  # fmt: skip
    def pull(self, ref: str, tag: str | None, force: bool, insecure: bool,
             progress: Callable[[str], None]) -> dict[str, Any]: ...  # fmt: skip
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
        network: dict[str, Any] | None = None,
        cpus: int | None = None,
    ) -> dict[str, Any]:
        info = self._run(
            self.runtime.create_snapshot(
                tag, image=image, mem_mib=mem_mib, warmup=warmup, progress=progress,
                network=_network(network), cpus=cpus,
            )
        )  # fmt: skip
        return info.model_dump()

    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None:
        self._run(self.runtime.delete_snapshot(tag, cascade=cascade, force=force))

    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]:
        return self._run(self.runtime.compact_snapshot(tag, to)).model_dump()

    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS,
        network: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        from forkd import compat, wire

        req = wire.SpawnRequest(snapshot_tag=tag, n=n, **dataclasses.asdict(flags))
        notes = compat.spawn_notes(req, memory_dir=self.runtime.settings.memory_dir)
        spawned = self._run(self.runtime.spawn(
            tag, n, memory_limit_mib=memory_limit_mib, network=_network(network)
        ))  # fmt: skip
        return [
            {**s.sandbox.model_dump(), "fork_timing_ms": _timing(s.timing),
             "warning": compat.join(s.warning, *notes)}
            for s in spawned
        ]  # fmt: skip

    def expose_port(self, sandbox_id: str, port: int) -> dict[str, Any]:
        return self._run(self.runtime.expose_port(sandbox_id, port)).model_dump()

    def list_ports(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [p.model_dump() for p in self.runtime.list_ports(sandbox_id)]

    def remove_port(self, sandbox_id: str, port: int) -> None:
        self._run(self.runtime.unexpose_port(sandbox_id, port))

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

    @functools.cached_property
    def workspaces(self) -> Workspaces:
        from forkd.runtime.workspaces import Workspaces

        return Workspaces(self.runtime)

    def create_workspace(
        self, name: str, snapshot_tag: str, per_child_netns: bool, memory_limit_mib: int | None
    ) -> dict[str, Any]:
        call = self.workspaces.create(
            name, snapshot_tag, per_child_netns=per_child_netns, memory_limit_mib=memory_limit_mib
        )
        return self._run(call).model_dump()

    def list_workspaces(self) -> list[dict[str, Any]]:
        return [w.model_dump() for w in self.workspaces.list()]

    def suspend_workspace(self, name: str, diff: bool) -> dict[str, Any]:
        return self._run(self.workspaces.suspend(name, diff=diff)).model_dump()

    def resume_workspace(self, name: str) -> dict[str, Any]:
        return self._run(self.workspaces.resume(name)).model_dump()

    def delete_workspace(self, name: str) -> None:
        self._run(self.workspaces.delete(name))

    def pack(self, tag: str, dest: Path, compress: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]:  # fmt: skip
        from forkd.hub.pack import write_pack

        r = self._run(write_pack(self.runtime, tag, dest, compress=compress, progress=progress))
        return {"path": str(r.path), "bytes": r.bytes, "logical_bytes": r.logical_bytes,
                "stored_bytes": r.stored_bytes, "compressed": r.compressed,
                "seconds": round(r.seconds, 3)}  # fmt: skip

    def unpack(self, path: Path, tag: str | None, force: bool, progress: Callable[[str], None]
               ) -> dict[str, Any]:  # fmt: skip
        from forkd.hub.unpack import unpack

        r = self._run(unpack(self.runtime, path, tag=tag, force=force, progress=progress))
        return {"tag": r.tag, "image": r.image_name, "image_reused": r.image_reused,
                "seconds": round(r.seconds, 3)}  # fmt: skip

    def push(self, tag: str, ref: str, insecure: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]:  # fmt: skip
        from forkd.hub.registry import push

        r = self._run(push(self.runtime, tag, ref, insecure=insecure, progress=progress))
        return {"ref": r.ref, "digest": r.digest, "bytes": r.pack.bytes,
                "stored_bytes": r.pack.stored_bytes, "logical_bytes": r.pack.logical_bytes,
                "seconds": round(r.seconds, 3)}  # fmt: skip

    def pull(self, ref: str, tag: str | None, force: bool, insecure: bool,
             progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
        from forkd.hub.registry import pull

        r = self._run(pull(self.runtime, ref, tag=tag, force=force, insecure=insecure,
                           progress=progress))  # fmt: skip
        u = r.unpacked
        return {"tag": u.tag, "image": u.image_name, "image_reused": u.image_reused,
                "seconds": round(u.seconds, 3), "downloaded_bytes": r.downloaded_bytes,
                "download_seconds": round(r.download_seconds, 3)}  # fmt: skip


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
        network: dict[str, Any] | None = None,
        cpus: int | None = None,
    ) -> dict[str, Any]:
        progress("daemon is booting and warming the parent")
        return dict(self.c.create_snapshot(
            tag, image=image, mem_mib=mem_mib, warmup=warmup, network=network, cpus=cpus
        ))  # fmt: skip

    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None:
        self.c.delete_snapshot(tag, cascade=cascade, force=force)

    def compact_snapshot(self, tag: str, to: str) -> dict[str, Any]:
        return dict(self.c.compact_snapshot(tag, to))

    def spawn(
        self, tag: str, n: int, memory_limit_mib: int | None, flags: SpawnFlags = NO_FLAGS,
        network: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        return list(self.c.spawn_sandboxes(
            tag, n=n, memory_limit_mib=memory_limit_mib, network=network,
            **dataclasses.asdict(flags),
        ))  # fmt: skip

    def expose_port(self, sandbox_id: str, port: int) -> dict[str, Any]:
        return dict(self.c.expose_port(sandbox_id, port))

    def list_ports(self, sandbox_id: str) -> list[dict[str, Any]]:
        return list(self.c.list_ports(sandbox_id))

    def remove_port(self, sandbox_id: str, port: int) -> None:
        self.c.remove_port(sandbox_id, port)

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

    def create_workspace(
        self, name: str, snapshot_tag: str, per_child_netns: bool, memory_limit_mib: int | None
    ) -> dict[str, Any]:
        return dict(self.c.create_workspace(name, snapshot_tag, per_child_netns, memory_limit_mib))

    def list_workspaces(self) -> list[dict[str, Any]]:
        return list(self.c.list_workspaces())

    def suspend_workspace(self, name: str, diff: bool) -> dict[str, Any]:
        return dict(self.c.suspend_workspace(name, diff=diff))

    def resume_workspace(self, name: str) -> dict[str, Any]:
        return dict(self.c.resume_workspace(name))

    def delete_workspace(self, name: str) -> None:
        self.c.delete_workspace(name)

    def pack(self, tag: str, dest: Path, compress: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]:  # fmt: skip
        progress("daemon is packing; downloading the pack")
        t0 = time.monotonic()
        size = self.c.pack(tag, dest, compress=compress)
        return {"path": str(dest), "bytes": size, "seconds": round(time.monotonic() - t0, 3)}

    def unpack(self, path: Path, tag: str | None, force: bool, progress: Callable[[str], None]
               ) -> dict[str, Any]:  # fmt: skip
        progress("uploading the pack to the daemon")
        return dict(self.c.unpack(path, tag, force=force))

    def push(self, tag: str, ref: str, insecure: bool, progress: Callable[[str], None]
             ) -> dict[str, Any]:  # fmt: skip
        progress("daemon is packing and pushing")
        return dict(self.c.push(tag, ref, insecure=insecure))

    def pull(self, ref: str, tag: str | None, force: bool, insecure: bool,
             progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
        progress("daemon is pulling and verifying")
        return dict(self.c.pull(ref, tag, force=force, insecure=insecure))


def _network(network: dict[str, Any] | None) -> Any:
    """The wire model of a CLI-built ``network`` (validated like a request body)."""
    if network is None:
        return None
    from forkd.errors import InvalidInput
    from forkd.wire import NetworkRequest

    try:
        return NetworkRequest.model_validate(network)
    except ValueError as exc:
        raise InvalidInput(f"network: {exc}") from exc


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
