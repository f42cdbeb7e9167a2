"""Make a running process call a system call of our choosing, as code that took it over would:
``python forbidden_call.py PID NR ARG``. One of its threads stopped just after a ``syscall``
instruction (in a blocking call) is rewound onto it with new registers (ptrace, x86-64).

Run in a process of its own: once it exits, the target is no longer traced and its parent
reaps it as usual. The VM tests use it to make a sandbox's QEMU call ``setuid``, which QEMU's
seccomp filter answers by killing the process with SIGSYS.
"""

from __future__ import annotations

import ctypes
import os
import sys

PTRACE_PEEKTEXT, PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 1, 7, 12, 13, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
WAIT_ALL = 0x40000000  # __WALL: threads too
SYSCALL_INSN = 0x050F  # 0f 05, little-endian
# struct user_regs_struct, in order
_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
         "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
         "es", "fs", "gs")  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in _REGS]


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    result = int(_libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)))
    err = ctypes.get_errno()
    if result == -1 and err:
        raise OSError(err, f"ptrace({request}) of {tid}: {os.strerror(err)}")
    return result


def inject(tid: int, nr: int, arg: int) -> bool:
    """True if thread ``tid`` was set to call ``nr(arg)`` (False: not in a system call)."""
    _ptrace(PTRACE_SEIZE, tid)
    _ptrace(PTRACE_INTERRUPT, tid)
    os.waitpid(tid, WAIT_ALL)
    regs = Regs()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    if _ptrace(PTRACE_PEEKTEXT, tid, regs.rip - 2) & 0xFFFF != SYSCALL_INSN:
        _ptrace(PTRACE_DETACH, tid)
        return False
    regs.rip -= 2
    # orig_rax -1: no system call to restart, so the kernel leaves rip and rax as set here
    regs.rax, regs.rdi, regs.orig_rax = nr, arg, (1 << 64) - 1
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
    _ptrace(PTRACE_CONT, tid)
    return True


def main(pid: int, nr: int, arg: int) -> int:
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        try:
            if inject(tid, nr, arg):
                print(f"thread {tid} calls {nr}({arg})")
                return 0
        except OSError as exc:
            print(exc, file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(
        main(
            int(sys.argv[1]),
            int(sys.argv[2]),
            int(sys.argv[3:4][0] or 0) if len(sys.argv) > 3 else 0,
        )
    )
