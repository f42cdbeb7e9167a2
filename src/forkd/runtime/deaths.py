"""Why a sandbox's QEMU died, in words: the one place every death the runtime notices is
explained (its pidfd firing, a request finding the pid gone, a restart finding it gone).

What is known, most telling first: the exit status of a QEMU this process started (SIGSYS: its
seccomp filter; bwrap reports a child killed by signal N as exit status 128 + N), then the
counters of the sandbox's cgroup leaf (``oom_kill``: the memory limit; ``max``: the pids limit),
read before the leaf is removed. A QEMU another process started (a restarted daemon adopts
its sandboxes) leaves no exit status here: only its cgroup counters tell.
"""

from __future__ import annotations

import os
import signal

from forkd.runtime.cgroups import Cgroups
from forkd.vmm.qemu import exit_signal, exit_status

GENERIC = "QEMU process exited (killed or crashed)"
SECCOMP = "QEMU was killed by its seccomp filter (SIGSYS: a forbidden system call)"
# bwrap's report of its child's end comes a moment after QEMU's own pidfd fires
LAUNCHER_WAIT_S = 0.5


def explain(pid: int, cgroups: Cgroups | None, leaf: str, *, log_tail: str = "") -> str:
    """The reason a dead sandbox shows (``dead_reason``, and its 410 answers)."""
    status = exit_status(pid, wait_s=LAUNCHER_WAIT_S)
    sig = exit_signal(status)
    if sig == signal.SIGSYS:
        return SECCOMP
    if cgroups is not None:
        events = cgroups.events(leaf)
        limits = cgroups.limits(leaf)
        if events.oom_kills:
            size = f"{limits.memory_mib} MiB" if limits.memory_mib is not None else "its size"
            return (
                f"memory limit of {size} exceeded: the kernel's OOM killer ended QEMU in the "
                "sandbox's cgroup"
            )
        if events.pids_refused:
            count = f"{limits.pids} tasks" if limits.pids is not None else "its tasks"
            said = f" (QEMU said: {log_tail})" if log_tail else ""
            return f"pids limit of {count} reached: QEMU could not start a thread and ended{said}"
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return f"{GENERIC}: signal {name}"
    if status is not None and os.WIFEXITED(status):
        said = f": {log_tail}" if log_tail else ""
        return f"QEMU exited with status {os.WEXITSTATUS(status)}{said}"
    return GENERIC
