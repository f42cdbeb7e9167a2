"""Driving one QEMU process: launch, QMP, device-state save/load, stop, kill.

QEMU never daemonizes (its seccomp filter forbids it): it is started in its own session, jailed
where the host can (:mod:`forkd.vmm.jail`), with its QMP and agent sockets made here and passed
as listening descriptors, and its stdout and stderr going to a log file made here. Its pid is
written to the run dir's pid file. Sandboxes outlive the process that started them; this
process reaps what it started while it runs (:func:`death_reason` says how one ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from forkd.errors import HostSetupError, QemuGone, VMError
from forkd.vmm import jail as jails
from forkd.vmm.spec import CONSOLE_CHARDEV, RunPaths, name_marker

QEMU_BINARY = "qemu-system-x86_64"
MIGRATION_POLL_S = 0.002
# No file QEMU writes grows past this (RLIMIT_FSIZE, set on every QEMU before it runs a guest):
# its log, the only file a running QEMU appends to on its own, holds QEMU's error reports, some
# of which a guest can provoke at will. SIGXFSZ stays ignored (inherited from Python), so a write
# past the cap fails with EFBIG and QEMU runs on. A live branch lifts the cap while QEMU streams
# RAM.
QEMU_FILE_CAP_BYTES = 8 << 20
INFO_TIMEOUT_S = 10.0
SOCKET_BACKLOG = 16

# pid of a QEMU this process started -> the wait status of it (or of its jail launcher)
_exits: dict[int, int] = {}
# pid of a QEMU this process started -> that process (QEMU or its jail launcher), until reaped
_launchers: dict[int, subprocess.Popen[bytes]] = {}


def cap_file_size(pid: int, cap: int | None) -> None:
    """Set the soft RLIMIT_FSIZE of process ``pid`` (None: unlimited); a gone pid is ignored."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    soft = hard if cap is None else cap
    with contextlib.suppress(ProcessLookupError):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise HostSetupError(
            f"{QEMU_BINARY} not found: install the qemu-system-x86 package (apt-get install "
            "qemu-system-x86)"
        )
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pid_runs_in(pid: int, paths: RunPaths) -> bool:
    """True if ``pid`` is a live QEMU whose command line names this run dir (its ``-name``, or
    the QMP socket path of a QEMU started before sockets were passed as descriptors)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = f"guest={name_marker(paths)}".encode()
    qmp = str(paths.qmp).encode()
    return pid_alive(pid) and any(arg == name or qmp in arg for arg in cmdline)


def _collect(qemu_pid: int) -> bool:
    """Reap the process behind ``qemu_pid`` if it has ended; True once its status is known."""
    proc = _launchers.get(qemu_pid)
    if proc is None:
        return qemu_pid in _exits
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere (Popen.wait): its status is lost
        _launchers.pop(qemu_pid, None)
        return qemu_pid in _exits
    if pid == 0:
        return False
    _exits[qemu_pid] = status
    proc.returncode = os.waitstatus_to_exitcode(status)
    _launchers.pop(qemu_pid, None)
    return True


def exit_status(pid: int, *, wait_s: float = 0.0) -> int | None:
    """The wait status of a QEMU this process started, once it ended (bwrap reports its child's
    end a moment after QEMU's own: up to ``wait_s`` is waited for that)."""
    deadline = time.monotonic() + wait_s
    while not _collect(pid) and pid in _launchers and time.monotonic() < deadline:
        time.sleep(0.005)
    return _exits.get(pid)


def exit_signal(status: int | None) -> int | None:
    """The signal that ended QEMU, from its (or its jail launcher's) wait status."""
    if status is None:
        return None
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) > 128:
        return os.WEXITSTATUS(status) - 128  # bwrap exits 128 + N when its child died of N
    return None


def death_reason(pid: int, *, wait_s: float = 0.0) -> str | None:
    """Why a QEMU this process started died, when its exit status says more than "exited"."""
    if exit_signal(exit_status(pid, wait_s=wait_s)) == signal.SIGSYS:
        return "QEMU was killed by its seccomp filter (SIGSYS: a forbidden system call)"
    return None


SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def run_dir_for(run_root: Path, name: str) -> Path:
    """``run_root / name``, or a shorter random name when its sockets' paths would not fit."""
    if len(str(run_root / name / "agent.sock").encode()) <= SOCKET_PATH_MAX:
        return run_root / name
    return run_root / f"{name.split('-', 1)[0]}-{secrets.token_hex(6)}"


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(SOCKET_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _reap(proc: subprocess.Popen[bytes], qemu_pid: int) -> None:
    """Reap ``proc`` (QEMU or its jail launcher) when it exits, while this loop runs."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    _launchers[qemu_pid] = proc

    def done() -> None:
        if not _collect(qemu_pid) and qemu_pid in _launchers:
            return
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, done)


def _read_info(fd: int, timeout: float) -> dict[str, Any]:
    """bwrap's ``--info-fd`` JSON (written once the namespaces exist; EOF if it failed)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ValueError):
            return dict(json.loads(data))
        if time.monotonic() > deadline:
            raise VMError("the QEMU jail did not start in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise VMError("the QEMU jail failed to start")
        data += chunk


class QemuProcess:
    """A running QEMU, addressed by pid and run dir."""

    def __init__(self, pid: int, paths: RunPaths) -> None:
        self.pid = pid
        self.paths = paths
        self._qmp: QMPClient | None = None

    @classmethod
    async def launch(
        cls,
        argv: list[str],
        paths: RunPaths,
        *,
        jail: jails.Jail | None = None,
        new_netns: bool = False,
        before_exec: Callable[[int], None] | None = None,
        timeout: float = 60.0,
    ) -> QemuProcess:
        """Start QEMU with ``argv`` (from ``instance_args``), jailed when ``jail`` is given (in
        a network namespace of its own with ``new_netns``); return once QMP answers.

        ``before_exec(pid)`` runs before QEMU runs a guest (to put it into its cgroup). A run
        dir created here is removed again when the start fails.
        """
        created = not paths.dir.exists()
        paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return await cls._start(argv, paths, jail, new_netns, before_exec, timeout)
        except BaseException:
            if created:
                shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    @classmethod
    async def _start(
        cls,
        argv: list[str],
        paths: RunPaths,
        jail: jails.Jail | None,
        new_netns: bool,
        before_exec: Callable[[int], None] | None,
        timeout: float,
    ) -> QemuProcess:
        agent, qmp = _listen(paths.agent), _listen(paths.qmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log = os.open(paths.qemu_log, flags, 0o600)
        full = [
            *argv,
            "-chardev", f"socket,id=agent,fd={agent.fileno()},server=on,wait=off",
            "-chardev", f"socket,id=qmp,fd={qmp.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-sandbox", jails.SANDBOX_OPTION,
        ]  # fmt: skip
        fds = [agent.fileno(), qmp.fileno()]
        uid: int | None = None
        try:
            if jail is not None:
                proc, pid, uid = await cls._start_jailed(jail, full, fds, log, new_netns,
                                                         before_exec)  # fmt: skip
            else:
                proc = cls._popen([qemu_binary(), *full], fds, log)
                pid = proc.pid
                cap_file_size(pid, QEMU_FILE_CAP_BYTES)
                if before_exec is not None:
                    before_exec(pid)
        finally:
            agent.close()
            qmp.close()
            os.close(log)
        _reap(proc, pid)
        qemu = cls(pid, paths)
        try:
            # inside the try: QEMU runs already, and a run dir removed under it (a sweep) must
            # not leave it running with nobody to kill it
            paths.pidfile.write_text(f"{pid}\n")
            await qemu._wait_ready(proc, timeout)
        except BaseException:
            qemu.kill()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await qemu.close_qmp()
            raise
        finally:
            if uid is not None:
                jails.release_uid(uid)
        return qemu

    @classmethod
    async def _start_jailed(
        cls,
        jail: jails.Jail,
        argv: list[str],
        fds: list[int],
        log: int,
        new_netns: bool,
        before_exec: Callable[[int], None] | None,
    ) -> tuple[subprocess.Popen[bytes], int, int]:
        """bwrap, blocked before its exec until the pid has its limits and cgroup."""
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        try:
            try:
                launch = jails.build(jail, qemu_binary(), argv, info_fd=info_w, block_fd=block_r,
                                     new_netns=new_netns)  # fmt: skip
                proc = cls._popen(launch.argv, [*fds, info_w, block_r], log)
            finally:
                os.close(info_w)
                os.close(block_r)
            reading = asyncio.ensure_future(asyncio.to_thread(_read_info, info_r, INFO_TIMEOUT_S))
            pid: int | None = None
            try:
                pid = int((await asyncio.shield(reading))["child-pid"])
                cap_file_size(pid, QEMU_FILE_CAP_BYTES)
                if before_exec is not None:
                    before_exec(pid)
            except BaseException:
                # The blocked child goes on to exec QEMU once its block fd reaches EOF, and
                # killing bwrap does not end it (it is pid 1 of its own namespace): it must be
                # killed itself, even when this start was cancelled mid-way (a pool drain).
                proc.kill()
                if pid is None:
                    with contextlib.suppress(Exception):
                        got = await asyncio.wait_for(asyncio.shield(reading), INFO_TIMEOUT_S)
                        pid = int(got["child-pid"])
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
                jails.release_uid(launch.uid)
                raise
            os.write(block_w, b"1")
        finally:
            os.close(info_r)
            os.close(block_w)
        return proc, pid, launch.uid

    @staticmethod
    def _popen(argv: list[str], fds: list[int], log: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=fds,
            env={"PATH": jails.JAIL_PATH},
            # its own session: a signal to the daemon's process group never reaches QEMU
            start_new_session=True,
            # Keep Python's SIG_IGN of SIGXFSZ (and SIGPIPE, which QEMU ignores anyway): a write
            # past QEMU_FILE_CAP_BYTES must fail, not kill the VM.
            restore_signals=False,
            umask=0o077,
        )

    async def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Until QMP greets (QEMU has initialised), or QEMU exits (then why, from its log)."""
        ready = asyncio.ensure_future(self.qmp(timeout=timeout))
        exited = asyncio.ensure_future(self.wait_exit(timeout))
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # cancelled (a pool drain): the QMP attempt ends with the QEMU killed under it, and
            # its error is this start's, already being handled, not an unretrieved one
            ready.cancel()
            ready.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise
        finally:
            exited.cancel()
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return
        ready.cancel()
        with contextlib.suppress(BaseException):
            await ready
        for _ in range(100):  # the reaper records how it ended (bwrap reports QEMU's end)
            if self.pid in _exits or not pid_alive(proc.pid):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        detail = self.log_tail(5)
        if pid_alive(self.pid):
            raise VMError(f"QEMU did not finish starting within {timeout} s: {detail}")
        why = death_reason(self.pid)
        if detail:
            raise VMError("QEMU failed to start: " + (f"{why} | " if why else "") + detail)
        status = _exits.get(self.pid)
        code = "unknown" if status is None else os.waitstatus_to_exitcode(status)
        raise QemuGone(
            f"QEMU exited (status {code}) before it finished starting and said "
            "nothing: " + (why or "killed from outside, or out of memory?")
        )

    # --- QMP -------------------------------------------------------------------------------

    async def qmp(self, *, timeout: float = 10.0) -> QMPClient:
        if self._qmp is None:
            client = QMPClient(f"forkd-{self.pid}")
            try:
                await asyncio.wait_for(client.connect(str(self.paths.qmp)), timeout)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                self._raise_if_gone("while forkd connected to its QMP socket")
                raise VMError(f"cannot reach QMP of QEMU pid {self.pid}: {exc}") from exc
            self._qmp = client
        return self._qmp

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = await self.qmp()
        try:
            return await client.execute(command, arguments)
        except Exception as exc:
            self._raise_if_gone(f"during QMP {command}")
            raise VMError(f"QMP {command} failed on QEMU pid {self.pid}: {exc}") from exc

    def _raise_if_gone(self, when: str) -> None:
        """:class:`QemuGone` if the process no longer runs (the likely cause of a QMP error)."""
        if not pid_alive(self.pid):
            raise QemuGone(f"QEMU pid {self.pid} exited {when} (killed or crashed)")

    async def close_qmp(self) -> None:
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    @contextlib.asynccontextmanager
    async def events(self, *names: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue receiving the named QMP events while the context is open."""
        client = await self.qmp()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with client.listener(names) as listener:

            async def pump() -> None:
                async for event in listener:
                    queue.put_nowait(dict(event))

            task = asyncio.create_task(pump())
            try:
                yield queue
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- run state -------------------------------------------------------------------------

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def set_capabilities(self, **caps: bool) -> None:
        await self.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()
                ]
            },
        )

    async def wait_migration(self, *, timeout: float, what: str) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed; raise on failure or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VMError(f"{what} {status}: {info.get('error-desc', 'no detail from QEMU')}")
            if time.monotonic() > deadline:
                raise VMError(f"{what} did not complete within {timeout} s (status {status})")
            await asyncio.sleep(MIGRATION_POLL_S)

    async def save_device_state(self, dest: Path) -> None:
        """Write the state of every device, no RAM, to ``dest`` (the VM stays stopped if it was).

        ``xen-save-devices-state`` (a historical name: it works on any machine) records the run
        state as "running", so a child restored from the file starts as soon as it is loaded.
        Guest RAM is never in the file: it lives in the template's memory file.
        """
        async with self.device_state_target(dest) as target:
            await self.save_device_state_to(target)

    @contextlib.asynccontextmanager
    async def device_state_target(self, dest: Path) -> AsyncIterator[str]:
        """``dest`` opened here (0600) and handed to QEMU in an fdset, for
        :meth:`save_device_state_to`: a jailed QEMU sees no host path. Prepared before a branch
        stops its guest, so the pause holds one monitor command for the device state."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            client = await self.qmp()
            client.send_fd_scm(fd)
            added = await self.execute("add-fd", {"opaque": f"forkd-{dest.name}"})
        finally:
            os.close(fd)
        fdset = int(added["fdset-id"])
        try:
            yield f"/dev/fdset/{fdset}"
        finally:
            with contextlib.suppress(VMError):
                await self.execute("remove-fd", {"fdset-id": fdset})

    async def save_device_state_to(self, target: str) -> None:
        await self.execute("xen-save-devices-state", {"filename": target, "live": False})

    async def file_uri(self, path: Path, *, write: bool) -> str:
        """A migration URI for ``path`` that needs no helper process: the file is opened here and
        its descriptor handed to QEMU over QMP (``getfd``). An ``exec:`` URI would make QEMU fork
        a shell, and forking a process that maps gigabytes of guest RAM costs the guest."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        name = f"forkd-{path.name}-{fd}"
        try:
            client = await self.qmp()
            client.send_fd_scm(fd)
            await self.execute("getfd", {"fdname": name})
        finally:
            os.close(fd)
        return f"fd:{name}"

    async def pipe_uri(self, dest: Path) -> tuple[str, asyncio.Future[int]]:
        """A migration URI whose stream this process copies into ``dest`` (the returned future:
        the bytes written, once QEMU closes its end). QEMU writes no file itself, so its
        file-size limit stays in force: lifting it on a QEMU of another uid needs
        CAP_SYS_RESOURCE, which forkd may lack."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        name = f"forkd-{dest.name}-{write_end}"
        try:
            client = await self.qmp()
            client.send_fd_scm(write_end)
            await self.execute("getfd", {"fdname": name})
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)

        def copy() -> int:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            total = 0
            try:
                while n := os.splice(read_end, out, 1 << 20):
                    total += n
            finally:
                os.close(out)
                os.close(read_end)
            return total

        return f"fd:{name}", asyncio.ensure_future(asyncio.to_thread(copy))

    async def restore_and_run(self, devstate: Path) -> None:
        """On a ``-incoming defer`` QEMU whose x-ignore-shared is already on: load ``devstate`` and
        run as soon as it is loaded, without waiting here (``cont`` during an incoming migration
        means "start when done"). If the load fails QEMU exits, which its caller notices on the
        agent socket."""
        await self.execute("migrate-incoming", {"uri": await self.file_uri(devstate, write=False)})
        await self.cont()

    async def migrate_incoming(self, source: Path, *, timeout: float) -> None:
        """Load a full migration stream (RAM included) from ``source``; wait until it is in."""
        await self.execute("migrate-incoming", {"uri": await self.file_uri(source, write=False)})
        deadline = time.monotonic() + timeout
        while True:
            if not pid_alive(self.pid):
                raise VMError(
                    f"QEMU exited while loading {source.name} (see {self.paths.qemu_log})"
                )
            status = (await self.execute("query-status"))["status"]
            if status != "inmigrate":
                break
            if time.monotonic() > deadline:
                raise VMError(f"loading {source.name} did not finish within {timeout} s")
            await asyncio.sleep(MIGRATION_POLL_S)
        if status not in ("paused", "postmigrate", "prelaunch", "running"):
            raise VMError(f"loading {source.name} left the VM in state {status!r}")

    # --- ending ----------------------------------------------------------------------------

    def alive(self) -> bool:
        return pid_runs_in(self.pid, self.paths)

    async def console_tail(self, size: int = 64 << 10) -> str:
        """Up to ``size`` of the newest bytes the guest wrote to its serial console (consumed)."""
        text = await self.execute(
            "ringbuf-read", {"device": CONSOLE_CHARDEV, "size": size, "format": "utf8"}
        )
        return str(text)

    def log_tail(self, lines: int = 3) -> str:
        """QEMU's last error reports (``-D`` log), for error messages."""
        try:
            text = self.paths.qemu_log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    async def wait_exit(self, timeout: float) -> bool:
        """Wait until the process is gone; True if it exited within ``timeout``."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_exit() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await asyncio.wait_for(done, timeout)
            return True
        except TimeoutError:
            return not pid_alive(self.pid)
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def terminate(self, *, grace: float = 2.0) -> None:
        """Quit QEMU: QMP ``quit``, then SIGKILL if it lingers. Never raises for a dead VM."""
        await self.close_qmp()
        if not pid_alive(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not await self.wait_exit(grace):
            self.kill()
            await self.wait_exit(5.0)
