"""Driving one QEMU process: launch (daemonized), QMP, device-state save/load, stop, kill.

QEMU runs with ``-daemonize``: it is never our child, so neither the CLI nor the daemon leaves
zombies, sandboxes outlive the process that started them, and when ``launch`` returns QEMU has
finished initialising (its sockets exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from forkd.errors import HostSetupError, QemuGone, VMError
from forkd.vmm.spec import CONSOLE_CHARDEV, RunPaths

QEMU_BINARY = "qemu-system-x86_64"
MIGRATION_POLL_S = 0.002
# No file QEMU writes grows past this (RLIMIT_FSIZE, set on every QEMU once it runs): its -D log,
# the only file a running QEMU appends to on its own, holds QEMU's error reports, some of which a
# guest can provoke at will. SIGXFSZ stays ignored (inherited from Python), so a write past the
# cap fails with EFBIG and QEMU runs on. A live branch lifts the cap while QEMU streams RAM.
QEMU_FILE_CAP_BYTES = 8 << 20


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
    """True if ``pid`` is a live QEMU whose command line names this run dir's QMP socket."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return pid_alive(pid) and any(str(paths.qmp).encode() in arg for arg in cmdline)


class QemuProcess:
    """A running (daemonized) QEMU, addressed by pid and run dir."""

    def __init__(self, pid: int, paths: RunPaths) -> None:
        self.pid = pid
        self.paths = paths
        self._qmp: QMPClient | None = None

    @classmethod
    async def launch(
        cls, argv: list[str], paths: RunPaths, *, timeout: float = 60.0
    ) -> QemuProcess:
        """Start QEMU with ``argv`` (which must include ``-daemonize`` and ``-pidfile``).

        A run dir created here is removed again when the start fails.
        """
        created = not paths.dir.exists()
        paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return await cls._start(argv, paths, timeout)
        except BaseException:
            if created:
                shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    @classmethod
    async def _start(cls, argv: list[str], paths: RunPaths, timeout: float) -> QemuProcess:
        proc = await asyncio.create_subprocess_exec(
            qemu_binary(),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            # Keep Python's SIG_IGN of SIGXFSZ (and SIGPIPE, which QEMU ignores anyway): a write
            # past QEMU_FILE_CAP_BYTES must fail, not kill the VM.
            restore_signals=False,
            # What QEMU creates before it daemonizes (log, sockets) is the daemon user's alone;
            # after, QEMU's own umask (027) applies, so memory and device-state files are
            # created by forkd first, 0600.
            umask=0o077,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as exc:
            # Cancelled or timed out mid-start: the daemonized QEMU may already exist; never
            # leave it running unowned.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                os.kill(int(paths.pidfile.read_text().strip()), signal.SIGKILL)
            if isinstance(exc, TimeoutError):
                raise VMError(f"QEMU did not finish starting within {timeout} s") from exc
            raise
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip().splitlines()[-5:]
            if not detail:
                raise QemuGone(
                    f"QEMU exited (status {proc.returncode}) before it finished starting and "
                    "said nothing: killed from outside, or out of memory?"
                )
            raise VMError("QEMU failed to start: " + " | ".join(detail))
        try:
            pid = int(paths.pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise VMError(f"QEMU started but wrote no pid file {paths.pidfile}") from exc
        cap_file_size(pid, QEMU_FILE_CAP_BYTES)
        return cls(pid, paths)

    # --- QMP -------------------------------------------------------------------------------

    async def qmp(self) -> QMPClient:
        if self._qmp is None:
            client = QMPClient(f"forkd-{self.pid}")
            try:
                await asyncio.wait_for(client.connect(str(self.paths.qmp)), 10.0)
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
        # Created here, 0600: QEMU would make it 0640 (0660 under its daemonized umask).
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        await self.execute("xen-save-devices-state", {"filename": str(dest), "live": False})

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

    def allow_large_files(self, allow: bool) -> None:
        """Lift (or restore) the QEMU_FILE_CAP_BYTES cap, for a migration stream QEMU writes."""
        cap_file_size(self.pid, None if allow else QEMU_FILE_CAP_BYTES)

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
