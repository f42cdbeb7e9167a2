"""Routes out of a jailed sandbox's network namespace for open egress: one ``pasta`` per sandbox.

A jailed QEMU's namespace has only ``lo``; its user-mode stack (slirp) opens the guest's
connections there. For ``internet`` and CIDR allow-lists, ``pasta`` (Debian package ``passt``)
joins that namespace, gives it a tap interface with the host's address and default route, and
re-opens each connection it sees there as a socket of its own in the host's namespace. pasta is
started inside the sandbox's guard cgroup, so the egress guard filters its sockets exactly as
it filtered QEMU's (``socket cgroupv2`` matches the cgroup a socket was created in, so pasta must
be in the leaf before it runs: it pre-opens sockets at start). Connections to the gateway are
not mapped to the host (``--no-map-gw``), no port is forwarded either way.

pasta of Debian 12 cannot enter a namespace it does not own as an unprivileged user (it drops
every capability with its uid), so it keeps uid 0 with ``CAP_SYS_ADMIN`` and
``CAP_NET_BIND_SERVICE`` only, ``no_new_privs``, its own seccomp allowlist, and its own empty
mount, ipc and uts namespaces (docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

READY_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 2.0
NAMES = ("pasta", "passt")  # its comm is passt or passt.avx2 (one binary, two names)


def binary() -> str | None:
    return shutil.which("pasta") or shutil.which("pasta", path="/usr/bin:/usr/sbin:/bin")


def probe() -> str | None:
    """None when open egress can leave a jailed sandbox's namespace through pasta, else why not."""
    if binary() is None:
        return "pasta not found: install the passt package (apt-get install passt)"
    if os.geteuid() != 0:
        return "pasta must be started by root to enter another user's network namespace"
    return None


def argv(pasta: str, ns_fd: int) -> list[str]:
    """pasta's command line for the namespace open as descriptor ``ns_fd`` (pure: unit-tested).

    The namespace is passed by descriptor: pasta opens its path after it has dropped what it
    would need to open another process's ``/proc/PID/ns/net``.
    """
    return [
        pasta, "--foreground", "--quiet", "--ipv4-only", "--config-net", "--no-map-gw",
        "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
        "-t", "none", "-u", "none", "-T", "none", "-U", "none",
        "--runas", "0", "--netns", f"/proc/self/fd/{ns_fd}",
    ]  # fmt: skip


def has_default_route(pid: int) -> bool:
    """Whether ``pid``'s network namespace has an IPv4 default route (pasta configured it)."""
    try:
        lines = Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(len(f := line.split()) > 2 and f[1] == "00000000" for line in lines)


def start(ns_fd: int, netns_pid: int, leaf: Path) -> subprocess.Popen[bytes]:
    """pasta for the namespace ``ns_fd`` (of process ``netns_pid``), started inside cgroup
    ``leaf``; returns once the namespace has its route out."""
    pasta = binary()
    if pasta is None:
        raise OSError(probe())
    procs = leaf / "cgroup.procs"
    # The shell moves itself into the leaf, then becomes pasta: every socket pasta creates,
    # the pre-opened ones included, belongs to the guarded cgroup.
    wrapper = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(procs),
               *argv(pasta, ns_fd)]  # fmt: skip
    # its errors (it is quiet otherwise) go to an unnamed file, read only if it fails to start
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            wrapper, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            pass_fds=(ns_fd,), start_new_session=True, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not has_default_route(netns_pid):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                err.seek(0)
                said = err.read(4096).decode(errors="replace").strip()[-300:]
                raise OSError(f"pasta did not configure the sandbox's namespace: {said}")
            time.sleep(0.005)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End it at once (it keeps no state worth a clean exit) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def kill_leftovers(leaf: Path) -> None:
    """SIGKILL every pasta still in cgroup ``leaf`` (one a previous process started)."""
    try:
        pids = (leaf / "cgroup.procs").read_text().split()
    except OSError:
        return
    killed = False
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if comm.startswith(NAMES):
                os.kill(int(pid), signal.SIGKILL)
                killed = True
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while killed and time.monotonic() < deadline:  # until reaped: the leaf can go then
        with contextlib.suppress(OSError):
            if not (leaf / "cgroup.procs").read_text().split():
                return
        time.sleep(0.01)
