"""E2B-style sandbox objects on top of the forkd REST API.

``Sandbox`` wraps one running child VM of the daemon: create it from a template snapshot, run
commands, move files, evaluate Python in the warm agent, branch it into a new template and fork
children from that branch, kill it. ``AsyncSandbox`` is the same surface for asyncio.

Example::

    with Sandbox(tag="python") as sb:   # or Sandbox.create("python"); Sandbox() reads $FORKD_TAG
        print(sb.commands.run("echo hi").stdout)
        sb.files.write("/tmp/x.txt", "state")
        kids = sb.fork(3)                   # three copies of this exact VM state
        for kid in kids:
            print(kid.files.read("/tmp/x.txt"))
            kid.kill()

The constructor keeps forkd v0.5's ``Sandbox(tag=None, target=None, timeout=30, *, spawn=True)``
(it spawns, through the daemon here rather than a ``forkd fork`` subprocess), and ``eval`` returns
the result string and raises :class:`EvalError` on a guest error as v0.5's did;
:meth:`Sandbox.eval_result` gives the whole :class:`EvalResult` instead.

Differences from E2B worth knowing: ``commands.run`` does not raise on a non-zero exit code
(check ``result.exit_code``), and the ``timeout`` given to ``create`` is not enforced by anyone
(see :meth:`Sandbox.create`).
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, overload

from forkd.client.controller import (
    AsyncController,
    BranchMode,
    Controller,
    ControllerError,
    JSONDict,
)
from forkd.errors import ForkdError
from forkd.wire import FileEntry, FileWriteResponse

__all__ = ["AsyncSandbox", "CommandResult", "EvalError", "EvalResult", "Sandbox"]

DEFAULT_TEMPLATE = "python"
"""The template used when neither an argument nor ``$FORKD_TAG`` names one (forkd v0.5 used
``pyagent``, a tag of its own recipes; this forkd's default image is ``python``)."""


def default_template() -> str:
    """``$FORKD_TAG`` if set (as in forkd v0.5), else :data:`DEFAULT_TEMPLATE`."""
    return os.environ.get("FORKD_TAG") or DEFAULT_TEMPLATE


FileFormat = Literal["text", "bytes"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of ``sandbox.commands.run``. A non-zero ``exit_code`` is not an exception."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CommandResult:
        duration = data.get("duration_ms")
        return cls(
            stdout=str(data.get("stdout") or ""),
            stderr=str(data.get("stderr") or ""),
            exit_code=int(data.get("exit_code", -1)),
            timed_out=bool(data.get("timed_out", False)),
            stdout_truncated=bool(data.get("stdout_truncated", False)),
            stderr_truncated=bool(data.get("stderr_truncated", False)),
            duration_ms=float(duration) if duration is not None else None,
        )


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Outcome of ``sandbox.eval_result``: ``result`` is the value's repr, ``error`` the
    exception text (``traceback`` the whole traceback), ``stdout`` what the code printed."""

    result: str | None
    error: str | None
    exit_code: int
    stdout: str = ""
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EvalResult:
        return cls(
            result=data.get("result"),
            error=data.get("error"),
            exit_code=int(data.get("exit_code", 0)),
            stdout=str(data.get("stdout") or ""),
            traceback=data.get("traceback"),
        )


class EvalError(ForkdError, RuntimeError):
    """``sandbox.eval``: the code raised (or exited) in the guest.

    A ``RuntimeError``, as forkd v0.5's ``Sandbox.eval`` raised, and a ``ForkdError``, the base
    of every error of this package. ``result`` is the whole :class:`EvalResult`; ``error`` and
    ``traceback`` are its fields.
    """

    def __init__(self, result: EvalResult) -> None:
        self.result = result
        self.error = result.error or f"exit code {result.exit_code}"
        self.traceback = result.traceback
        super().__init__(f"forkd eval: {self.error}")


def _value(result: EvalResult) -> str | None:
    """What ``eval`` returns: the result string, or :class:`EvalError` for a guest error."""
    if not result.ok:
        raise EvalError(result)
    return result.result


def _argv(cmd: str | Sequence[str]) -> list[str]:
    """A string runs through ``/bin/sh -c``; a sequence is the argv itself."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    return list(cmd)


def _decode(data: bytes, fmt: FileFormat) -> str | bytes:
    if fmt == "bytes":
        return data
    if fmt == "text":
        return data.decode()
    raise ValueError(f"format must be 'text' or 'bytes', not {fmt!r}")


_C = TypeVar("_C", Controller, AsyncController)


class _Lease(Generic[_C]):
    """A controller shared by a sandbox and the children forked from it.

    The controller is closed when the last sandbox using it is killed or closed, but only if
    the SDK created it; a controller the caller passed in stays the caller's to close.
    """

    def __init__(self, controller: _C, owned: bool) -> None:
        self.controller: _C = controller
        self.owned = owned
        self.users = 0

    def acquire(self) -> _C:
        self.users += 1
        return self.controller

    def release(self) -> bool:
        """Drop one user; True when the controller should now be closed."""
        self.users -= 1
        return self.owned and self.users <= 0


def _check_connection_args(controller: object, base_url: str | None, token: str | None) -> None:
    if controller is not None and (base_url is not None or token is not None):
        raise ValueError("pass either controller= or base_url=/token=, not both")


def _pick_template(template: str | None, tag: str | None) -> str:
    if template is not None and tag is not None and template != tag:
        raise ValueError(f"template={template!r} and tag={tag!r} disagree: pass one of them")
    return template or tag or default_template()


def _no_target(target: str | None, spawn: bool) -> None:
    if target is not None or not spawn:
        raise ValueError(
            "target=/spawn=False attached forkd v0.5's Sandbox to a guest agent over TCP; here "
            "sandboxes are reached through the daemon: use Sandbox.connect(sandbox_id)"
        )


# --------------------------------------------------------------------------------------------
# Sync
# --------------------------------------------------------------------------------------------


class _SandboxBase(Generic[_C]):
    """What a sandbox object is, whichever client drives it."""

    def _setup(self, info: JSONDict, lease: _Lease[_C], timeout: float | None) -> None:
        self.info: JSONDict = info
        self.id: str = str(info["id"])
        self.timeout = timeout
        self.created_at = time.time()
        self._lease: _Lease[_C] = lease
        self.controller: _C = lease.acquire()
        self._released = False

    @property
    def sandbox_id(self) -> str:
        return self.id

    @property
    def template(self) -> str | None:
        tag = self.info.get("snapshot_tag")
        return str(tag) if tag is not None else None

    @property
    def tag(self) -> str | None:
        """The snapshot tag the sandbox was forked from (forkd v0.5's name for ``template``)."""
        return self.template

    @property
    def target(self) -> str | None:
        """The guest's network address (``guest_addr``), when the sandbox has one."""
        addr = self.info.get("guest_addr")
        return str(addr) if addr is not None else None


class Commands:
    """``sandbox.commands``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def run(
        self,
        cmd: str | Sequence[str],
        timeout: float = 30,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CommandResult:
        """Run a command to completion and return its output.

        A string is run with ``/bin/sh -c``; a list is executed as argv. ``timeout`` is in
        seconds (the guest kills the command then; ``result.timed_out`` tells). ``envs`` adds
        environment variables, ``cwd`` sets the directory, ``stdin`` is written to its input.
        ``on_stdout`` / ``on_stderr`` receive the output as the command writes it (streamed).
        """
        if on_stdout is None and on_stderr is None:
            data = self._sb.controller.exec_command(
                self._sb.id, _argv(cmd), timeout, env=envs, cwd=cwd, stdin=stdin
            )
            return CommandResult.from_wire(data)
        collected = _Collected(on_stdout, on_stderr)
        for event in self._sb.controller.exec_stream(
            self._sb.id, _argv(cmd), timeout, env=envs, cwd=cwd, stdin=stdin
        ):
            collected.add(event)
        return collected.result()


class _Collected:
    """Assembles a :class:`CommandResult` from ``exec/stream`` events, calling back as they come."""

    def __init__(
        self,
        on_stdout: Callable[[str], object] | None,
        on_stderr: Callable[[str], object] | None,
    ) -> None:
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.end: Mapping[str, Any] | None = None

    def add(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            text = str(event.get("data", ""))
            self.parts[kind].append(text)
            callback = self.callbacks[kind]
            if callback is not None:
                callback(text)
        elif kind == "exit":
            self.end = event
        elif kind == "error":
            raise ControllerError(502, {"error": event.get("error")}, "exec/stream")

    def result(self) -> CommandResult:
        if self.end is None:
            raise ControllerError(502, {"error": "the output stream ended early"}, "exec/stream")
        return CommandResult.from_wire(
            {
                "stdout": "".join(self.parts["stdout"]),
                "stderr": "".join(self.parts["stderr"]),
                "exit_code": self.end.get("exit_code", -1),
                "timed_out": self.end.get("timed_out", False),
                "duration_ms": self.end.get("duration_ms"),
            }
        )


class Files:
    """``sandbox.files``: the guest filesystem."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    def read(self, path: str, format: FileFormat = "text") -> str | bytes:
        """A file's content: ``str`` (UTF-8) by default, ``bytes`` with ``format="bytes"``."""
        return _decode(self._sb.controller.read_file(self._sb.id, path), format)

    def write(self, path: str, data: str | bytes) -> FileWriteResponse:
        """Create or overwrite a file (``str`` is written as UTF-8). Returns path and size."""
        return FileWriteResponse.model_validate(
            self._sb.controller.write_file(self._sb.id, path, data)
        )

    def list(self, path: str) -> builtins.list[FileEntry]:
        """The entries of a directory (name, path, type, size, mode, mtime)."""
        return [
            FileEntry.model_validate(e) for e in self._sb.controller.list_files(self._sb.id, path)
        ]

    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file; a directory needs ``recursive=True``."""
        self._sb.controller.remove_file(self._sb.id, path, recursive=recursive)


class Sandbox(_SandboxBase[Controller]):
    """One running forkd sandbox (a forked microVM).

    ``Sandbox(tag="py")``, ``Sandbox()`` (template ``$FORKD_TAG``, else ``python``) and
    :meth:`create` fork a new one through the daemon; :meth:`connect` attaches to one by id.

    Attributes:
        id: the daemon's sandbox id (also ``sandbox_id``, E2B's name).
        info: the SandboxInfo dict from when the object was made; :meth:`get_info` refreshes it.
        template: the snapshot tag the sandbox was forked from (also ``tag``, forkd v0.5's name).
        timeout: the lifetime given to :meth:`create`, recorded only (see there).
        commands: :class:`Commands`; files: :class:`Files`.
    """

    def __init__(
        self,
        tag: str | None = None,
        target: str | None = None,
        timeout: float | None = None,
        *,
        spawn: bool = True,
        template: str | None = None,
        base_url: str | None = None,
        token: str | None = None,
        controller: Controller | None = None,
        memory_limit_mib: int | None = None,
        live_fork: bool = False,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
    ) -> None:
        """Fork one new sandbox from template ``tag`` (forkd v0.5's constructor).

        ``tag`` (or ``template``, this SDK's name) defaults to ``$FORKD_TAG``, else ``python``.
        ``target`` and ``spawn=False`` attached v0.5's object to a guest agent over TCP, which
        this forkd does not expose: they raise ``ValueError`` naming :meth:`connect`. The other
        arguments are those of :meth:`create`.
        """
        _no_target(target, spawn)
        _check_connection_args(controller, base_url, token)
        name = _pick_template(template, tag)
        ctl = controller if controller is not None else Controller(base_url, token)
        lease = _Lease(ctl, owned=controller is None)
        try:
            infos = ctl.spawn_sandboxes(
                name, n=1, memory_limit_mib=memory_limit_mib, live_fork=live_fork,
                network=network, allow_internet_access=allow_internet_access,
            )  # fmt: skip
        except BaseException:
            if lease.owned:
                ctl.close()
            raise
        self._init(infos[0], lease, timeout)

    def _init(self, info: JSONDict, lease: _Lease[Controller], timeout: float | None) -> None:
        self._setup(info, lease, timeout)
        self.commands = Commands(self)
        self.files = Files(self)

    @classmethod
    def _wrap(cls, info: JSONDict, lease: _Lease[Controller], timeout: float | None = None) -> Self:
        """An object for a sandbox that already exists (no spawn)."""
        sb = cls.__new__(cls)
        sb._init(info, lease, timeout)
        return sb

    @classmethod
    def create(
        cls,
        template: str | None = None,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        base_url: str | None = None,
        token: str | None = None,
        controller: Controller | None = None,
        memory_limit_mib: int | None = None,
        live_fork: bool = False,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
    ) -> Self:
        """Fork one new sandbox from the snapshot tagged ``template`` (or ``tag=``, forkd
        v0.5's keyword; default ``$FORKD_TAG``, else ``python``).

        ``timeout`` (seconds) is stored on the object and nothing more: forkd has no
        server-side sandbox TTL yet and this SDK runs no timer, so a sandbox lives until
        :meth:`kill` (or leaving the ``with`` block) or until the daemon stops. Connect with
        ``controller=`` (shared, left open) or ``base_url=``/``token=`` (default
        ``$FORKD_URL``/``$FORKD_TOKEN``; the SDK then closes its controller when the last
        sandbox using it is killed or closed). ``live_fork`` is accepted for compatibility;
        every sandbox can ``branch(mode="live")``. ``allow_internet_access`` (E2B's name) or
        ``network`` (``{"egress", "allow", "host_ca"}``) set its egress; default none.
        """
        if isinstance(timeout, str):  # forkd v0.5's create(tag, target): a host:port
            _no_target(timeout, True)
        return cls(
            tag, None, timeout, template=template, base_url=base_url, token=token,
            controller=controller, memory_limit_mib=memory_limit_mib, live_fork=live_fork,
            allow_internet_access=allow_internet_access, network=network,
        )  # fmt: skip

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        token: str | None = None,
        controller: Controller | None = None,
    ) -> Sandbox:
        """Attach to an existing sandbox by id (``ControllerError`` 404 if it does not exist)."""
        _check_connection_args(controller, base_url, token)
        ctl = controller if controller is not None else Controller(base_url, token)
        lease = _Lease(ctl, owned=controller is None)
        try:
            info = ctl.get_sandbox(sandbox_id)
        except BaseException:
            if lease.owned:
                ctl.close()
            raise
        return cls._wrap(info, lease)

    def get_info(self) -> JSONDict:
        """Fetch the SandboxInfo again (and store it in ``info``)."""
        self.info = self.controller.get_sandbox(self.id)
        return self.info

    def is_running(self) -> bool:
        """True while the daemon knows the sandbox and has not marked it dead."""
        try:
            info = self.get_info()
        except ControllerError as exc:
            if exc.status in (404, 410):
                return False
            raise
        return bool(info.get("state", "running") == "running")

    def ping(self) -> JSONDict:
        """Round-trip to the guest agent."""
        return self.controller.ping_sandbox(self.id)

    def eval(self, code: str) -> str | None:
        """Run Python in the sandbox's warm agent process (no interpreter start-up cost) and
        return the value's ``repr`` (``None`` for statements), as forkd v0.5's ``eval`` did.

        Raises :class:`EvalError` (a ``RuntimeError``) when ``code`` raises or exits in the
        guest; :meth:`eval_result` reports that in the result instead, with the traceback and
        what the code printed.
        """
        return _value(self.eval_result(code))

    def eval_result(self, code: str) -> EvalResult:
        """Like :meth:`eval`, but the whole :class:`EvalResult`; a Python exception in
        ``code`` is reported in ``error``/``traceback``, not raised."""
        return EvalResult.from_wire(self.controller.eval_code(self.id, code))

    def branch(
        self,
        tag: str | None = None,
        mode: BranchMode | str | None = None,
        wait: bool = True,
    ) -> JSONDict:
        """Snapshot this running sandbox as a new template; returns the SnapshotInfo dict.

        ``mode``: ``"full"``, ``"diff"`` or ``"live"``;
        ``None`` lets the daemon choose its default. ``wait=False`` (live only) returns while
        the snapshot is still ``"writing"``. The snapshot outlives this sandbox.
        """
        return self.controller.branch_sandbox(self.id, tag=tag, mode=mode, wait=wait)

    def fork(
        self,
        n: int = 1,
        *,
        mode: BranchMode | str = BranchMode.DIFF,
        tag: str | None = None,
        memory_limit_mib: int | None = None,
        live_fork: bool = False,
    ) -> list[Sandbox]:
        """Branch this sandbox, then spawn ``n`` children from the branch.

        ``mode`` defaults to ``diff``: a pause close to ``live``'s (only what this sandbox wrote
        is copied while it is paused) with a round trip close to ``full``'s (no materializing);
        the README's BRANCH table has the numbers.
        Each child starts from this sandbox's exact state at branch time. The branch snapshot
        stays registered afterwards (the children's memory is mapped from it); delete it with
        ``controller.delete_snapshot(tag, cascade=True)`` when done. Children share this
        sandbox's controller.
        """
        snap = self.controller.branch_sandbox(self.id, tag=tag, mode=mode, wait=True)
        branch_tag = str(snap["tag"])
        if snap.get("status", "ready") != "ready":
            self.controller.wait_for_snapshot(branch_tag)
        infos = self.controller.spawn_sandboxes(
            branch_tag, n=n, memory_limit_mib=memory_limit_mib, live_fork=live_fork
        )
        return [self._wrap(info, self._lease, self.timeout) for info in infos]

    def get_host(self, port: int) -> str:
        """``host:port`` on this machine's loopback where guest TCP ``port`` answers (E2B's
        name; the forward is made on first use and goes with the sandbox)."""
        info = self.controller.expose_port(self.id, port)
        return f"{info['host']}:{info['host_port']}"

    def kill(self) -> bool:
        """Stop the sandbox. False if the daemon no longer knew it (already gone)."""
        try:
            self.controller.kill_sandbox(self.id)
        except ControllerError as exc:
            if exc.status != 404:
                raise
            return False
        finally:
            self.close()
        return True

    def close(self) -> None:
        """Detach without killing: release this object's hold on the controller."""
        if not self._released:
            self._released = True
            if self._lease.release():
                self.controller.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, template={self.template!r})"


# --------------------------------------------------------------------------------------------
# Async
# --------------------------------------------------------------------------------------------


class AsyncCommands:
    """``sandbox.commands`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        cmd: str | Sequence[str],
        timeout: float = 30,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CommandResult:
        """Run a command to completion; see :meth:`Commands.run`."""
        if on_stdout is None and on_stderr is None:
            data = await self._sb.controller.exec_command(
                self._sb.id, _argv(cmd), timeout, env=envs, cwd=cwd, stdin=stdin
            )
            return CommandResult.from_wire(data)
        collected = _Collected(on_stdout, on_stderr)
        async for event in self._sb.controller.exec_stream(
            self._sb.id, _argv(cmd), timeout, env=envs, cwd=cwd, stdin=stdin
        ):
            collected.add(event)
        return collected.result()


class AsyncFiles:
    """``sandbox.files`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @overload
    async def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    async def read(self, path: str, format: FileFormat = "text") -> str | bytes:
        """A file's content: ``str`` (UTF-8) by default, ``bytes`` with ``format="bytes"``."""
        return _decode(await self._sb.controller.read_file(self._sb.id, path), format)

    async def write(self, path: str, data: str | bytes) -> FileWriteResponse:
        """Create or overwrite a file (``str`` is written as UTF-8). Returns path and size."""
        return FileWriteResponse.model_validate(
            await self._sb.controller.write_file(self._sb.id, path, data)
        )

    async def list(self, path: str) -> builtins.list[FileEntry]:
        """The entries of a directory (name, path, type, size, mode, mtime)."""
        entries = await self._sb.controller.list_files(self._sb.id, path)
        return [FileEntry.model_validate(e) for e in entries]

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file; a directory needs ``recursive=True``."""
        await self._sb.controller.remove_file(self._sb.id, path, recursive=recursive)


class AsyncSandbox(_SandboxBase[AsyncController]):
    """The asyncio twin of :class:`Sandbox` (``await AsyncSandbox.create(...)``,
    ``async with``); the same attributes and methods, awaitable."""

    def __init__(
        self, info: JSONDict, lease: _Lease[AsyncController], timeout: float | None = None
    ) -> None:
        self._setup(info, lease, timeout)
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        base_url: str | None = None,
        token: str | None = None,
        controller: AsyncController | None = None,
        memory_limit_mib: int | None = None,
        live_fork: bool = False,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
    ) -> AsyncSandbox:
        """Fork one new sandbox from ``template`` (or ``tag=``; default ``$FORKD_TAG``, else
        ``python``); see :meth:`Sandbox.create` (``timeout`` is recorded only)."""
        _check_connection_args(controller, base_url, token)
        name = _pick_template(template, tag)
        ctl = controller if controller is not None else AsyncController(base_url, token)
        lease = _Lease(ctl, owned=controller is None)
        try:
            infos = await ctl.spawn_sandboxes(
                name, n=1, memory_limit_mib=memory_limit_mib, live_fork=live_fork,
                network=network, allow_internet_access=allow_internet_access,
            )  # fmt: skip
        except BaseException:
            if lease.owned:
                await ctl.aclose()
            raise
        return cls(infos[0], lease, timeout)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        token: str | None = None,
        controller: AsyncController | None = None,
    ) -> AsyncSandbox:
        """Attach to an existing sandbox by id (``ControllerError`` 404 if it does not exist)."""
        _check_connection_args(controller, base_url, token)
        ctl = controller if controller is not None else AsyncController(base_url, token)
        lease = _Lease(ctl, owned=controller is None)
        try:
            info = await ctl.get_sandbox(sandbox_id)
        except BaseException:
            if lease.owned:
                await ctl.aclose()
            raise
        return cls(info, lease)

    async def get_info(self) -> JSONDict:
        """Fetch the SandboxInfo again (and store it in ``info``)."""
        self.info = await self.controller.get_sandbox(self.id)
        return self.info

    async def is_running(self) -> bool:
        """True while the daemon knows the sandbox and has not marked it dead."""
        try:
            info = await self.get_info()
        except ControllerError as exc:
            if exc.status in (404, 410):
                return False
            raise
        return bool(info.get("state", "running") == "running")

    async def ping(self) -> JSONDict:
        """Round-trip to the guest agent."""
        return await self.controller.ping_sandbox(self.id)

    async def eval(self, code: str) -> str | None:
        """The value's ``repr``; raises :class:`EvalError` on a guest error. See
        :meth:`Sandbox.eval`."""
        return _value(await self.eval_result(code))

    async def eval_result(self, code: str) -> EvalResult:
        """The whole :class:`EvalResult` (never raises on a guest error)."""
        return EvalResult.from_wire(await self.controller.eval_code(self.id, code))

    async def branch(
        self,
        tag: str | None = None,
        mode: BranchMode | str | None = None,
        wait: bool = True,
    ) -> JSONDict:
        """Snapshot this sandbox as a new template; see :meth:`Sandbox.branch`."""
        return await self.controller.branch_sandbox(self.id, tag=tag, mode=mode, wait=wait)

    async def fork(
        self,
        n: int = 1,
        *,
        mode: BranchMode | str = BranchMode.DIFF,
        tag: str | None = None,
        memory_limit_mib: int | None = None,
        live_fork: bool = False,
    ) -> list[AsyncSandbox]:
        """Branch this sandbox, then spawn ``n`` children from it; see :meth:`Sandbox.fork`."""
        snap = await self.controller.branch_sandbox(self.id, tag=tag, mode=mode, wait=True)
        branch_tag = str(snap["tag"])
        if snap.get("status", "ready") != "ready":
            await self.controller.wait_for_snapshot(branch_tag)
        infos = await self.controller.spawn_sandboxes(
            branch_tag, n=n, memory_limit_mib=memory_limit_mib, live_fork=live_fork
        )
        return [type(self)(info, self._lease, self.timeout) for info in infos]

    async def get_host(self, port: int) -> str:
        """``host:port`` where guest TCP ``port`` answers; see :meth:`Sandbox.get_host`."""
        info = await self.controller.expose_port(self.id, port)
        return f"{info['host']}:{info['host_port']}"

    async def kill(self) -> bool:
        """Stop the sandbox. False if the daemon no longer knew it (already gone)."""
        try:
            await self.controller.kill_sandbox(self.id)
        except ControllerError as exc:
            if exc.status != 404:
                raise
            return False
        finally:
            await self.close()
        return True

    async def close(self) -> None:
        """Detach without killing: release this object's hold on the controller."""
        if not self._released:
            self._released = True
            if self._lease.release():
                await self.controller.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, template={self.template!r})"
