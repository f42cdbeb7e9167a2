#!/usr/bin/env python3
"""forkd guest agent: serves the host over one virtio-serial port (see docs/agent-protocol.md).

Stdlib only, single file, runs on guest Python >= 3.9.

Usage:
    agent.py [--port-name NAME | --device PATH | --connect-unix PATH] [--init]

``--init`` runs as PID 1: it forks the serving agent, reaps every child forever and restarts the
agent if it ever exits. ``--connect-unix`` is the test mode: the agent connects as a client to a
unix stream socket, uses it as the port and exits when it closes.
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import builtins
import contextlib
import errno
import fcntl
import glob
import io
import json
import linecache
import os
import pwd
import random
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor

AGENT_VERSION = "0.7.0"
DEFAULT_PORT_NAME = "org.forkd.agent.0"

MAX_WORKERS = 64
READ_CHUNK = 1 << 16
MAX_LINE = 512 << 20  # a request line longer than this is dropped
# Every reply line stays within this many bytes; the host sends its cap (max_line) in hello.
DEFAULT_REPLY_CAP = 8 << 20
MIN_REPLY_CAP = 64 << 10
REPLY_SLACK = 16 << 10  # room for the other fields of a trimmed reply
DEFAULT_EXEC_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 1 << 20
DEFAULT_READ_LIMIT = 64 << 20
EXIT_GRACE_S = 0.5  # how long to keep draining pipes held open by descendants after exit
EVAL_SOURCES_KEPT = 512  # eval sources kept in linecache for tracebacks

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

_START = time.monotonic()
_reply_cap = DEFAULT_REPLY_CAP


def _log(msg: str) -> None:
    try:
        sys.__stderr__.write("forkd-agent: %s\n" % msg)
        sys.__stderr__.flush()
    except Exception:
        pass


class RequestError(Exception):
    """An error answered with the given protocol ``kind``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _bad(message: str) -> RequestError:
    return RequestError("bad_request", message)


# --------------------------------------------------------------------------- argument checks


def _arg_str(req: dict, name: str, default=None, required: bool = False):
    value = req.get(name, default)
    if value is None:
        if required:
            raise _bad("missing argument %r" % name)
        return None
    if not isinstance(value, str):
        raise _bad("argument %r must be a string" % name)
    return value


def _arg_bool(req: dict, name: str, default: bool) -> bool:
    value = req.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad("argument %r must be a boolean" % name)
    return value


def _arg_int(req: dict, name: str, default, minimum: int = 0):
    value = req.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad("argument %r must be an integer" % name)
    if value < minimum:
        raise _bad("argument %r must be >= %d" % (name, minimum))
    return value


def _arg_number(req: dict, name: str, default: float) -> float:
    value = req.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad("argument %r must be a number" % name)
    if not value > 0:
        raise _bad("argument %r must be > 0" % name)
    return float(value)


def _arg_b64(req: dict, name: str, required: bool = False):
    value = _arg_str(req, name, required=required)
    if value is None:
        return None
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _bad("argument %r is not valid base64" % name) from None


def _arg_path(req: dict) -> str:
    path = _arg_str(req, "path", required=True)
    if not path or "\0" in path:
        raise _bad("argument 'path' must be a non-empty path")
    return path


# --------------------------------------------------------------------------- print capture


_tls = threading.local()


class _StreamProxy:
    """Stands in for sys.stdout / sys.stderr: a thread running an eval writes into its buffer."""

    def __init__(self, real, is_err: bool = False) -> None:
        self._real = real
        self._is_err = is_err

    def _target(self):
        buf = getattr(_tls, "err", None) if self._is_err else None
        if buf is None:
            buf = getattr(_tls, "buf", None)
        return buf if buf is not None else self._real

    def write(self, s):
        target = self._target()
        if target is None:
            return len(s)
        return target.write(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            with contextlib.suppress(Exception):
                target.flush()

    def isatty(self) -> bool:
        if getattr(_tls, "buf", None) is not None:
            return False
        try:
            return bool(self._real.isatty())
        except Exception:
            return False

    def __getattr__(self, name):
        return getattr(self._real, name)


def _install_capture() -> None:
    if not isinstance(sys.stdout, _StreamProxy):
        sys.stdout = _StreamProxy(sys.stdout)
    if not isinstance(sys.stderr, _StreamProxy):
        sys.stderr = _StreamProxy(sys.stderr, is_err=True)


# --------------------------------------------------------------------------- ops


def op_ping(req: dict) -> dict:
    numpy = sys.modules.get("numpy")
    return {
        "pong": True,
        "version": AGENT_VERSION,
        "pid": os.getpid(),
        "ready": True,
        "uptime_s": round(time.monotonic() - _START, 3),
        "numpy_version": getattr(numpy, "__version__", None) if numpy is not None else None,
    }


def _pidfd(pid: int):
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------- acting as a user
#
# exec, proc_start and the file ops take an optional ``user`` (a name from /etc/passwd): the
# command runs with that user's uid, gid and groups (HOME, USER, LOGNAME set); a file op checks
# that user's permissions the way the kernel would (owner/group/other bits, search permission on
# every directory on the way, the sticky bit) and chowns what it creates to the user. The agent
# itself stays root: switching its own ids would switch every thread's (glibc broadcasts them).


class _User:
    def __init__(self, name: str, uid: int, gid: int, groups, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = frozenset(groups) | {gid}
        self.home = home

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def _arg_user(req: dict):
    name = _arg_str(req, "user")
    if name is None:
        return None
    if not name or "\0" in name:
        raise _bad("argument 'user' must be a user name")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise _bad("unknown user %r" % name) from None
    try:
        groups = os.getgrouplist(name, pw.pw_gid)
    except OSError:
        groups = [pw.pw_gid]
    return _User(name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir)


_setpriv = []  # util-linux setpriv's path (or None), looked up once


def _as_user(user, argv, cwd=None):
    """(argv, subprocess.Popen keyword arguments) that run ``argv`` as ``user`` (None: as we
    are), after checking that the user may enter ``cwd``.

    util-linux ``setpriv`` switches the ids as it execs the command: asked to switch them
    itself, CPython forks instead of vforking, and copying the agent's page tables (numpy and
    all) costs hundreds of milliseconds in a fresh child under emulation."""
    if user is None or (user.is_self and user.gid == os.getegid()):
        return list(argv), {}
    if cwd is not None:
        _need(user, cwd, 1)
    if not _setpriv:
        _setpriv.append(shutil.which("setpriv"))
    if _setpriv[0] is None:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": sorted(user.groups)}
        return list(argv), ids
    wrapped = [_setpriv[0], "--reuid=%d" % user.uid, "--regid=%d" % user.gid]
    wrapped.append("--groups=" + ",".join(str(g) for g in sorted(user.groups)))
    return wrapped + ["--"] + list(argv), {}


def may(user, st, want: int) -> bool:
    """Whether ``user`` has the ``want`` bits (4 read, 2 write, 1 execute/search) on a file with
    stat ``st``: root has all but execute of a file nobody may execute."""
    mode = st.st_mode
    if user.uid == 0:
        return not (want & 1) or stat.S_ISDIR(mode) or bool(mode & 0o111)
    if st.st_uid == user.uid:
        bits = (mode >> 6) & 7
    elif st.st_gid in user.groups:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def _denied(path: str, code: int = errno.EACCES) -> OSError:
    return PermissionError(code, os.strerror(code), path)


def _search(user, directory: str) -> None:
    """Search permission on ``directory`` (resolved) and every directory above it; a missing
    component ends the walk (the operation itself then fails with ENOENT)."""
    if user is None:
        return
    path = "/"
    for part in [""] + [p for p in os.path.realpath(directory).split("/") if p]:
        path = os.path.join(path, part) if part else "/"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) and not may(user, st, 1):
            raise _denied(path)


def _need(user, path: str, want: int) -> None:
    """``want`` on ``path`` itself (followed), after search permission on the way to it."""
    if user is None:
        return
    real = os.path.realpath(path)
    _search(user, os.path.dirname(real))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return
    if not may(user, st, want):
        raise _denied(path)


def _may_unlink(user, path: str) -> None:
    """What removing or renaming the entry ``path`` needs: write and search on its directory,
    and with the sticky bit set, owning the entry or the directory."""
    if user is None:
        return
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    _need(user, parent, 3)
    pst = os.stat(parent)
    if pst.st_mode & stat.S_ISVTX and user.uid not in (0, pst.st_uid):
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_uid != user.uid:
                raise _denied(path, errno.EPERM)


def _make_dirs(user, directory: str) -> None:
    """``os.makedirs(directory, exist_ok=True)`` as ``user``: the first existing ancestor must
    be writable by the user, and what is created belongs to the user."""
    if user is None:
        os.makedirs(directory, exist_ok=True)
        return
    real = os.path.realpath(directory)
    missing = []
    while not os.path.isdir(real) and real != "/":
        if os.path.lexists(real):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), real)
        missing.append(real)
        real = os.path.dirname(real)
    if not missing:
        _need(user, real, 1)
        return
    _need(user, real, 3)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            _chown(user, path)


def _chown(user, path: str) -> None:
    if user is not None and not user.is_self:
        os.lchown(path, user.uid, user.gid)


def _user_env(env, user):
    """``env`` (None: the agent's own) with the user's HOME, USER and LOGNAME."""
    if user is None:
        return env
    env = dict(os.environ) if env is None else env
    env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


def op_exec(req: dict) -> dict:
    argv = req.get("argv")
    cmd = req.get("cmd")
    if argv is not None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise _bad("argument 'argv' must be a non-empty list of strings")
        argv = list(argv)
    elif cmd is not None:
        if not isinstance(cmd, str):
            raise _bad("argument 'cmd' must be a string")
        argv = ["/bin/sh", "-c", cmd]
    else:
        raise _bad("exec needs 'argv' or 'cmd'")
    user = _arg_user(req)
    env, _ = _env_arg(req, user)
    cwd = _arg_str(req, "cwd")
    stdin_data = _arg_b64(req, "stdin_b64")
    timeout = _arg_number(req, "timeout", DEFAULT_EXEC_TIMEOUT)
    cap = _arg_int(req, "max_output", DEFAULT_MAX_OUTPUT)

    start = time.monotonic()
    deadline = start + timeout
    try:
        run_argv, ids = _as_user(user, argv, cwd)
        proc = subprocess.Popen(
            run_argv,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            **ids,
        )
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return {
            "stdout": "",
            "stderr": "%s: %s\n" % (argv[0], e),
            "exit_code": code,
            "timed_out": False,
            "stdout_truncated": False,
            "stderr_truncated": False,
            "duration_ms": round((time.monotonic() - start) * 1000.0, 3),
        }

    out_fd = proc.stdout.fileno()
    err_fd = proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = {out_fd: False, err_fd: False}
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(err_fd, select.POLLIN)
    open_outputs = 2

    in_fd = None
    in_view = None
    in_off = 0
    if proc.stdin is not None:
        if stdin_data:
            in_fd = proc.stdin.fileno()
            in_view = memoryview(stdin_data)
            os.set_blocking(in_fd, False)
            poller.register(in_fd, select.POLLOUT)
        else:
            proc.stdin.close()

    def close_stdin() -> None:
        nonlocal in_fd
        if in_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                poller.unregister(in_fd)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            in_fd = None

    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    exited_at = None
    timed_out = False
    try:
        while open_outputs > 0:
            now = time.monotonic()
            if now >= deadline:
                timed_out = exited_at is None
                break
            wait = deadline - now
            if exited_at is not None:
                # The command exited but a descendant still holds its pipes: drain briefly.
                if now >= exited_at + EXIT_GRACE_S:
                    break
                wait = min(wait, exited_at + EXIT_GRACE_S - now)
            elif pidfd is None:
                wait = min(wait, 0.05)
            for fd, ev in poller.poll(int(wait * 1000) + 1):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    exited_at = time.monotonic()
                elif fd == in_fd:
                    if ev & select.POLLOUT:
                        try:
                            in_off += os.write(in_fd, in_view[in_off : in_off + READ_CHUNK])
                        except BlockingIOError:
                            pass
                        except OSError:
                            in_off = len(in_view)
                    elif ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        in_off = len(in_view)
                    if in_off >= len(in_view):
                        close_stdin()
                elif fd in bufs:
                    try:
                        data = os.read(fd, READ_CHUNK)
                    except OSError:
                        data = b""
                    if not data:
                        poller.unregister(fd)
                        open_outputs -= 1
                        continue
                    buf = bufs[fd]
                    room = cap - len(buf)
                    if room >= len(data):
                        buf += data
                    else:
                        if room > 0:
                            buf += data[:room]
                        truncated[fd] = True
            if pidfd is None and exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
        close_stdin()
        if timed_out:
            _killpg(proc.pid)
            proc.wait()
        else:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(proc.pid)
                proc.wait()
    finally:
        close_stdin()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode is None:
            _killpg(proc.pid)
            proc.wait()

    return {
        "stdout": bytes(bufs[out_fd]).decode("utf-8", "replace"),
        "stderr": bytes(bufs[err_fd]).decode("utf-8", "replace"),
        "exit_code": -9 if timed_out else proc.returncode,
        "timed_out": timed_out,
        "stdout_truncated": truncated[out_fd],
        "stderr_truncated": truncated[err_fd],
        "duration_ms": round((time.monotonic() - start) * 1000.0, 3),
    }


# --------------------------------------------------------------------------- tracked processes
#
# proc_start answers with the pid at once; the process's output and exit then arrive as
# unsolicited events ({"event": "proc_output"|"proc_exit", "pid": ...}) on the current
# connection, sent only after the start answer. See docs/agent-protocol.md.

MAX_PROCS = 256  # tracked processes running at once
EXITED_KEPT = 128  # exit statuses remembered after the exit event
OUTPUT_CHUNK = 32 << 10  # bytes of output per event at most

_procs = {}  # pid -> _Proc
_exited = deque()  # (pid, exit_code, signal) of recently exited tracked processes
_procs_lock = threading.Lock()
_event_sink = [None]  # the serving Agent's emit(event) (set by Agent.__init__)


def _emit(event: dict) -> None:
    sink = _event_sink[0]
    if sink is not None:
        sink(event)


class _Proc:
    def __init__(self, popen, argv, env, cwd, tag, deadline, master=None) -> None:
        self.popen = popen
        self.master = master  # the pty's master side (None: pipes)
        self.pid = popen.pid
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.tag = tag
        self.deadline = deadline
        self.stdin_lock = threading.Lock()
        self.started = threading.Event()


def _env_arg(req: dict, user=None):
    """The child's environment (None: the agent's own) and the variables the request gave."""
    env_arg = req.get("env")
    if env_arg is None:
        return _user_env(None, user), {}
    if not isinstance(env_arg, dict):
        raise _bad("argument 'env' must be an object")
    env = _user_env(dict(os.environ), user)
    given = {}
    for key, value in env_arg.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise _bad("bad environment variable name %r" % (key,))
        if value is None:
            env.pop(key, None)
        elif isinstance(value, str) and "\0" not in value:
            env[key] = value
            given[key] = value
        else:
            raise _bad("environment variable %r must be a string" % key)
    return env, given


MAX_PTY_SIZE = 10000


def _arg_pty_size(req: dict, name: str):
    size = req.get(name)
    if size is None:
        return None
    if not isinstance(size, dict):
        raise _bad("argument %r must be an object {cols, rows}" % name)
    cols = _arg_int(size, "cols", 80, minimum=1)
    rows = _arg_int(size, "rows", 24, minimum=1)
    if cols > MAX_PTY_SIZE or rows > MAX_PTY_SIZE:
        raise _bad("a pty is at most %d columns and rows" % MAX_PTY_SIZE)
    return cols, rows


def _set_winsize(fd: int, size) -> None:
    cols, rows = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _spawn_on_pty(argv, size, env, cwd, user):
    """``argv`` on a new pty of ``size`` as its controlling terminal; (popen, master fd).

    util-linux ``setsid -c`` makes the session and takes the terminal: no preexec_fn, which is
    unsafe in a threaded process. Started outside a new session, setsid does not fork, so the
    pid stays the command's (and its process group's)."""
    master, slave = os.openpty()
    try:
        _set_winsize(slave, size)
        setsid = shutil.which("setsid")
        run_argv, ids = _as_user(user, argv, cwd)  # the terminal is taken before ids change
        popen = subprocess.Popen(
            [setsid, "-c", *run_argv] if setsid else run_argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=setsid is None,
            close_fds=True,
            **ids,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return popen, master


def op_proc_start(req: dict) -> dict:
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise _bad("argument 'argv' must be a non-empty list of strings")
    user = _arg_user(req)
    env, given_env = _env_arg(req, user)
    cwd = _arg_str(req, "cwd")
    tag = _arg_str(req, "tag")
    use_stdin = _arg_bool(req, "stdin", False)
    pty_size = _arg_pty_size(req, "pty")
    timeout = _arg_number(req, "timeout", 1.0) if req.get("timeout") is not None else None
    with _procs_lock:
        if len(_procs) >= MAX_PROCS:
            raise _bad("too many tracked processes running (at most %d)" % MAX_PROCS)
    master = None
    try:
        if pty_size is not None:
            popen, master = _spawn_on_pty(argv, pty_size, env, cwd, user)
        else:
            run_argv, ids = _as_user(user, argv, cwd)
            popen = subprocess.Popen(
                run_argv,
                stdin=subprocess.PIPE if use_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                **ids,
            )
    except FileNotFoundError as e:
        if cwd is not None and not os.path.isdir(cwd):
            raise RequestError("not_found", "working directory %s does not exist" % cwd) from e
        raise RequestError("not_found", "%s: %s" % (argv[0], e)) from e
    deadline = time.monotonic() + timeout if timeout is not None else None
    proc = _Proc(popen, list(argv), given_env, cwd, tag, deadline, master)
    with _procs_lock:
        _procs[proc.pid] = proc
    thread = threading.Thread(target=_pump, args=(proc,), name="forkd-proc-%d" % proc.pid)
    thread.daemon = True
    thread.start()
    # The pump sends nothing before the start answer is out (run_op calls this after sending).
    return {"pid": proc.pid, "_after_send": proc.started.set}


def _pump(proc: _Proc) -> None:
    """Forward the process's output as events until it exits, then send its exit event."""
    proc.started.wait()
    popen = proc.popen
    if proc.master is not None:
        names = {proc.master: "pty"}
    else:
        names = {popen.stdout.fileno(): "stdout", popen.stderr.fileno(): "stderr"}
    poller = select.poll()
    for fd in names:
        poller.register(fd, select.POLLIN)
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    open_outputs = len(names)
    exited_at = None
    killed_for_timeout = False
    try:
        while open_outputs > 0:
            now = time.monotonic()
            wait = 1.0 if pidfd is not None else 0.05
            if proc.deadline is not None:
                if now >= proc.deadline and not killed_for_timeout:
                    killed_for_timeout = True
                    _killpg(proc.pid)
                wait = min(wait, max(0.0, proc.deadline - now))
            if exited_at is not None:
                # It exited but a descendant still holds its pipes: drain briefly, like exec.
                if now >= exited_at + EXIT_GRACE_S:
                    break
                wait = min(wait, exited_at + EXIT_GRACE_S - now)
            for fd, _ev in poller.poll(int(wait * 1000) + 1):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    exited_at = time.monotonic()
                    continue
                try:
                    data = os.read(fd, OUTPUT_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    poller.unregister(fd)
                    open_outputs -= 1
                    continue
                _emit(
                    {
                        "event": "proc_output",
                        "pid": proc.pid,
                        "stream": names[fd],
                        "data_b64": base64.b64encode(data).decode("ascii"),
                    }
                )
            if pidfd is None and exited_at is None and popen.poll() is not None:
                exited_at = time.monotonic()
        code = popen.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)
        for pipe in (popen.stdout, popen.stderr, popen.stdin):
            if pipe is not None:
                with contextlib.suppress(Exception):
                    pipe.close()
        if proc.master is not None:
            with proc.stdin_lock:
                os.close(proc.master)
                proc.master = None
        if popen.returncode is None:
            _killpg(proc.pid)
            popen.wait()
    code = popen.returncode
    sig = -code if code < 0 else None
    exit_code = 128 + sig if sig is not None else code
    with _procs_lock:
        _procs.pop(proc.pid, None)
        _exited.append((proc.pid, exit_code, sig))
        while len(_exited) > EXITED_KEPT:
            _exited.popleft()
    event = {"event": "proc_exit", "pid": proc.pid, "exit_code": exit_code, "signal": sig}
    if killed_for_timeout:
        event["timed_out"] = True
    _emit(event)


def _tracked(req: dict) -> _Proc:
    pid = _arg_int(req, "pid", None, minimum=1)
    if pid is None:
        raise _bad("argument 'pid' is required")
    with _procs_lock:
        proc = _procs.get(pid)
    if proc is None:
        raise RequestError("not_found", "no running tracked process with pid %d" % pid)
    return proc


def op_proc_input(req: dict) -> dict:
    proc = _tracked(req)
    data = _arg_b64(req, "data_b64", required=True)
    if proc.master is not None:
        with proc.stdin_lock:
            if proc.master is None:
                raise _bad("the pty of process %d is closed" % proc.pid)
            view = memoryview(data)
            while view:
                view = view[os.write(proc.master, view) :]
        return {"written": len(data)}
    if proc.popen.stdin is None:
        raise _bad("process %d was started without stdin" % proc.pid)
    with proc.stdin_lock:
        try:
            proc.popen.stdin.write(data)
            proc.popen.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise _bad("stdin of process %d is closed" % proc.pid) from e
    return {"written": len(data)}


def op_proc_close_stdin(req: dict) -> dict:
    proc = _tracked(req)
    if proc.popen.stdin is not None:
        with proc.stdin_lock, contextlib.suppress(OSError, ValueError):
            proc.popen.stdin.close()
    return {"closed": True}


def op_proc_resize(req: dict) -> dict:
    """Set the window size of a process's pty (the kernel sends its foreground group
    SIGWINCH)."""
    proc = _tracked(req)
    size = _arg_pty_size(req, "size")
    if size is None:
        raise _bad("argument 'size' is required")
    with proc.stdin_lock:
        if proc.master is None:
            raise _bad("process %d has no pty" % proc.pid)
        _set_winsize(proc.master, size)
    return {"resized": True}


def op_proc_signal(req: dict) -> dict:
    proc = _tracked(req)
    sig = _arg_int(req, "signal", int(signal.SIGKILL), minimum=1)
    if sig > 64:
        raise _bad("argument 'signal' must be a signal number (1-64)")
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        raise RequestError("not_found", "process %d has exited" % proc.pid) from None
    return {"signalled": True}


def op_proc_list(req: dict) -> dict:
    with _procs_lock:
        running = list(_procs.values())
        exited = list(_exited)
    return {
        "processes": [
            {"pid": p.pid, "argv": p.argv, "env": p.env, "cwd": p.cwd, "tag": p.tag}
            for p in running
        ],
        "exited": [{"pid": pid, "exit_code": code, "signal": sig} for pid, code, sig in exited],
    }


_NAMESPACE = {"__name__": "__main__", "__builtins__": builtins}
_eval_counter = [0]
_eval_lock = threading.Lock()
_eval_sources = deque()


def _eval_filename(code: str) -> str:
    with _eval_lock:
        _eval_counter[0] += 1
        name = "<eval-%d>" % _eval_counter[0]
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        _eval_sources.append(name)
        while len(_eval_sources) > EVAL_SOURCES_KEPT:
            linecache.cache.pop(_eval_sources.popleft(), None)
    return name


def _format_exc(e: BaseException, skip_first: bool) -> str:
    tb = e.__traceback__
    if skip_first and tb is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def _exc_text(e: BaseException) -> str:
    msg = str(e)
    return "%s: %s" % (type(e).__name__, msg) if msg else type(e).__name__


_STATEMENT_WORDS = frozenset(
    {"assert", "async", "break", "class", "continue", "def", "del", "for", "from", "global",
     "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with"}
)  # fmt: skip


def _plain_expression(code: str) -> bool:
    """True if ``code`` is most likely one expression (no line break, ``;``, assignment or
    statement keyword): then it compiles directly, without a round trip through Python AST
    objects. That saves ~1,400 freshly translated blocks in a child's first eval under TCG; the
    check itself stays cheap (no ``re``: the regex engine would need translating too)."""
    text = code.strip()
    if not text or "\n" in text or ";" in text or text[0] == "@":
        return False
    for op in ("==", "!=", "<=", ">="):
        text = text.replace(op, "")
    return "=" not in text and text.split(None, 1)[0].rstrip(":") not in _STATEMENT_WORDS


def _compile_eval(code: str, filename: str):
    """Statements with an optional trailing expression whose value is the result, as (body,
    tail) code objects. One parse, no SyntaxError round trip: raising one costs milliseconds
    under emulation."""
    if _plain_expression(code):
        try:
            return None, compile(code, filename, "eval")
        except SyntaxError:
            pass  # a statement after all (``x: int``): the general path decides
    tree = ast.parse(code, filename, "exec")
    tail = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        tail = compile(ast.Expression(body=last.value), filename, "eval")
    return (compile(tree, filename, "exec") if tree.body else None), tail


MAX_EVAL_CONTEXTS = 64
_CONTEXTS = {}  # name -> namespace of a named eval context (the default one is _NAMESPACE)


def _eval_namespace(req: dict) -> dict:
    name = _arg_str(req, "context")
    if name is None or name == "":
        return _NAMESPACE
    if len(name) > 128:
        raise _bad("argument 'context' is longer than 128 characters")
    with _eval_lock:
        ns = _CONTEXTS.get(name)
        if ns is None:
            if len(_CONTEXTS) >= MAX_EVAL_CONTEXTS:
                raise _bad("too many eval contexts (at most %d)" % MAX_EVAL_CONTEXTS)
            ns = _CONTEXTS[name] = {"__name__": "__main__", "__builtins__": builtins}
    return ns


def op_eval_context_drop(req: dict) -> dict:
    name = _arg_str(req, "context", required=True)
    with _eval_lock:
        removed = _CONTEXTS.pop(name, None) is not None
    return {"removed": removed}


EVAL_OUTPUT_CHUNK = 8 << 10  # characters of streamed eval output per event at most


class _StreamedOutput(io.StringIO):
    """Captures like StringIO and also sends what is written as ``eval_output`` events of the
    request ``ref`` (a line at a time, or a chunk of a long line), before the answer."""

    def __init__(self, ref: str, name: str) -> None:
        super().__init__()
        self._ref = ref
        self._name = name
        self._pending = []
        self._size = 0

    def write(self, s) -> int:
        n = super().write(s)
        self._pending.append(s)
        self._size += len(s)
        if "\n" in s or self._size >= EVAL_OUTPUT_CHUNK:
            self.flush()
        return n

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending = []
        self._size = 0
        for i in range(0, len(text), EVAL_OUTPUT_CHUNK):
            _emit(
                {
                    "event": "eval_output",
                    "ref": self._ref,
                    "stream": self._name,
                    "text": text[i : i + EVAL_OUTPUT_CHUNK],
                }
            )


def op_eval(req: dict) -> dict:
    return _run_eval(req, _eval_namespace(req))


def op_warm(req: dict) -> dict:
    """Run snippets through eval's whole path in a throw-away copy of the namespace: a pooled
    child translates that guest code before it is handed out, and nothing it did is visible
    to the user's code (the names, values and modules of the namespace are left as they were)."""
    snippets = req.get("code")
    if not isinstance(snippets, list) or not all(isinstance(c, str) for c in snippets):
        raise _bad("argument 'code' must be a list of strings")
    errors = 0
    for code in snippets[:16]:
        if _run_eval({"id": "warm", "code": code}, dict(_NAMESPACE))["error"] is not None:
            errors += 1
    return {"warmed": len(snippets[:16]), "errors": errors}


def _run_eval(req: dict, namespace: dict) -> dict:
    code = _arg_str(req, "code", required=True)
    split_stderr = _arg_bool(req, "split_stderr", False)
    streamed = _arg_bool(req, "stream", False) and split_stderr
    filename = _eval_filename(code)
    if streamed:
        out = _StreamedOutput(req["id"], "stdout")
        err = _StreamedOutput(req["id"], "stderr")
    else:
        out = io.StringIO()
        err = io.StringIO() if split_stderr else None
    result = None
    result_str = None
    none_result = False
    error = None
    error_type = None
    error_value = None
    tb_text = None
    try:
        body, tail = _compile_eval(code, filename)
    except BaseException as e:  # SyntaxError, ValueError (null bytes), RecursionError, ...
        body = tail = None
        error = _exc_text(e)
        error_type = type(e).__name__
        error_value = str(e)
        # Like Python's own REPL: the offending line and caret, not the agent's compile frames.
        tb_text = "".join(traceback.format_exception_only(type(e), e))
    if error is None:
        _tls.buf = out
        _tls.err = err
        try:
            if body is not None:
                exec(body, namespace)
            if tail is not None:
                value = eval(tail, namespace)
                result = repr(value)
                if isinstance(value, str):
                    result_str = value
                elif value is None:
                    none_result = True
        except BaseException as e:
            error = _exc_text(e)
            error_type = type(e).__name__
            error_value = str(e)
            tb_text = _format_exc(e, skip_first=True)
        finally:
            _tls.buf = None
            _tls.err = None
            if streamed:
                out.flush()
                err.flush()
    resp = {
        "result": result if error is None else None,
        "error": error,
        "traceback": tb_text,
        "exit_code": 0 if error is None else 1,
        "stdout": out.getvalue(),
    }
    if split_stderr:
        # The richer form (code interpreters): stderr apart, the exception's type and message
        # apart, a str result unquoted, and whether the trailing value was None.
        resp["stderr"] = err.getvalue() if err is not None else ""
        resp["error_type"] = error_type
        resp["error_value"] = error_value
        resp["result_str"] = result_str if error is None else None
        resp["result_none"] = none_result and error is None
    return resp


def op_write_file(req: dict) -> dict:
    path = _arg_path(req)
    data = _arg_b64(req, "data_b64", required=True)
    append = _arg_bool(req, "append", False)
    mode = _arg_int(req, "mode", None)
    if mode is not None and mode > 0o7777:
        raise _bad("argument 'mode' must be a permission mode <= 0o7777")
    user = _arg_user(req)
    if _arg_bool(req, "mkdirs", True):
        parent = os.path.dirname(path)
        if parent:
            _make_dirs(user, parent)
    created = False
    if user is not None:
        if os.path.exists(path):
            _need(user, path, 2)
        else:  # created where the path leads (through a dangling symlink too)
            _need(user, os.path.dirname(os.path.realpath(path)), 3)
            created = True
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644 if mode is None else mode)
    try:
        if created and not user.is_self:
            os.fchown(fd, user.uid, user.gid)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if mode is not None:
            os.fchmod(fd, mode)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"path": path, "size": size}


def op_read_file(req: dict) -> dict:
    path = _arg_path(req)
    offset = _arg_int(req, "offset", 0)
    limit = _arg_int(req, "limit", DEFAULT_READ_LIMIT)
    # base64 of the data must fit one reply line: a longer read is cut and flagged truncated.
    limit = min(limit, (_reply_cap - REPLY_SLACK) // 4 * 3)
    _need(_arg_user(req), path, 4)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if offset:
            try:
                os.lseek(fd, offset, os.SEEK_SET)
            except OSError:
                # Not seekable: skip forward by reading.
                left = offset
                while left > 0:
                    skipped = os.read(fd, min(left, READ_CHUNK))
                    if not skipped:
                        break
                    left -= len(skipped)
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        truncated = False
        if left <= 0:
            truncated = bool(os.read(fd, 1))
    finally:
        os.close(fd)
    return {
        "path": path,
        "data_b64": base64.b64encode(data).decode("ascii"),
        "size": st.st_size,
        "truncated": truncated,
    }


def _file_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def op_list_files(req: dict) -> dict:
    path = _arg_path(req)
    _need(_arg_user(req), path, 5)
    entries = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue  # removed meanwhile
        entries.append(
            {
                "name": name,
                "path": full,
                "type": _file_type(st.st_mode),
                "size": st.st_size,
                "mode": stat.S_IMODE(st.st_mode),
                "mtime": st.st_mtime,
                "uid": st.st_uid,
                "gid": st.st_gid,
            }
        )
    return {"entries": entries}


def _entry(full: str, st) -> dict:
    entry = {
        "name": os.path.basename(full.rstrip("/")) or "/",
        "path": full,
        "type": _file_type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            entry["symlink_target"] = os.readlink(full)
    return entry


def op_stat(req: dict) -> dict:
    path = _arg_path(req)
    _search(_arg_user(req), os.path.dirname(os.path.abspath(path)))
    return {"entry": _entry(path, os.lstat(path))}


def op_mkdir(req: dict) -> dict:
    """Create directory ``path`` with its parents; ``created`` false if it already was one."""
    path = _arg_path(req)
    user = _arg_user(req)
    _search(user, os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        return {"created": False, "entry": _entry(path, os.lstat(path))}
    if user is None:
        os.makedirs(path)
    else:
        _make_dirs(user, path)
    return {"created": True, "entry": _entry(path, os.lstat(path))}


def op_move(req: dict) -> dict:
    source = _arg_str(req, "source", required=True)
    destination = _arg_str(req, "destination", required=True)
    for p in (source, destination):
        if not p.startswith("/") or "\0" in p:
            raise _bad("paths must be absolute")
    user = _arg_user(req)
    _may_unlink(user, source)
    parent = os.path.dirname(destination)
    if parent:
        _make_dirs(user, parent)
    _may_unlink(user, destination)
    os.rename(source, destination)
    return {"entry": _entry(destination, os.lstat(destination))}


def op_remove_file(req: dict) -> dict:
    path = _arg_path(req)
    recursive = _arg_bool(req, "recursive", False)
    user = _arg_user(req)
    _may_unlink(user, path)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if user is not None and recursive:
            for top, _dirs, _files in os.walk(path):
                _need(user, top, 7)
        if recursive:
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    return {"removed": True}


def apply_net(cfg) -> dict:
    """Point the guest at its resolver and set proxy/CA variables in the agent's own
    environment (eval code sees it, every later exec inherits it). The host sends this in a
    fork's hello, so it holds before any user request runs."""
    if not isinstance(cfg, dict):
        raise _bad("argument 'net' must be an object")
    nameserver = cfg.get("nameserver")
    if nameserver is not None and (
        not isinstance(nameserver, str) or not all(p.isdigit() for p in nameserver.split("."))
    ):
        raise _bad("net.nameserver must be an IPv4 address")
    changes = cfg.get("env") or {}
    if not isinstance(changes, dict):
        raise _bad("net.env must be an object")
    for key, value in changes.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise _bad("bad environment variable name %r" % (key,))
        if value is not None and (not isinstance(value, str) or "\0" in value):
            raise _bad("environment variable %r must be a string or null" % key)
    if nameserver is not None:
        tmp = "/etc/.resolv.conf.forkd"
        with open(tmp, "w") as f:
            f.write("nameserver %s\n" % nameserver)
        os.replace(tmp, "/etc/resolv.conf")
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return {"net_set": True}


def op_set_net(req: dict) -> dict:
    return apply_net(req.get("net"))


def op_reseed(req: dict) -> dict:
    return reseed(_arg_b64(req, "entropy_b64", required=True))


def set_clock(wall_ns) -> dict:
    """Step the wall clock to the host's. A restored guest's clock resumes from the instant its
    template was taken (QEMU's virtual clock stands still while a VM is stopped), so a child
    forked today from yesterday's template would otherwise believe it is yesterday."""
    if isinstance(wall_ns, bool) or not isinstance(wall_ns, int) or wall_ns <= 0:
        raise _bad("wall_ns must be a positive integer (ns since the epoch)")
    before = time.time_ns()
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, wall_ns)
    except OSError as e:
        return {"clock_set": False, "clock_error": str(e)}
    return {"clock_set": True, "clock_step_ms": round((wall_ns - before) / 1e6, 3)}


_urandom = []  # one descriptor, opened before the template is taken: children skip the lookup


def _encode(resp: dict) -> bytes:
    return json.dumps(resp, separators=(",", ":")).encode("utf-8") + b"\n"


def _encoded_len(text: str) -> int:
    return len(json.dumps(text).encode("utf-8"))


def _trim_to(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose JSON encoding takes at most ``budget`` bytes."""
    if _encoded_len(text) <= budget:
        return text
    lo, hi = 0, min(len(text), max(budget, 0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _encoded_len(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_reply(resp: dict, cap: int) -> bytes:
    """``resp`` as one line of at most ``cap`` bytes: output streams are trimmed (and flagged
    truncated); a reply that still does not fit becomes a ``too_large`` error."""
    line = _encode(resp)
    if len(line) <= cap:
        return line
    streams = [k for k in ("stdout", "stderr") if isinstance(resp.get(k), str) and resp[k]]
    if streams:
        rest = dict(resp)
        for k in streams:
            rest[k] = ""
            rest[k + "_truncated"] = True
        budget = cap - len(_encode(rest)) - 8
        if budget > 0:
            sizes = {k: _encoded_len(resp[k]) for k in streams}
            share = budget // len(streams)
            spare = sum(share - n for n in sizes.values() if n < share)
            for k in streams:
                rest[k] = _trim_to(resp[k], share + spare if sizes[k] > share else share)
                if len(rest[k]) == len(resp[k]):
                    rest[k + "_truncated"] = resp.get(k + "_truncated", False)
            line = _encode(rest)
            if len(line) <= cap:
                return line
    error = "the reply of %d bytes exceeds the agent channel's line cap of %d bytes" % (
        len(line),
        cap,
    )
    return _encode({"id": resp.get("id"), "ok": False, "error": error, "kind": "too_large"})


def _urandom_fd() -> int:
    if not _urandom:
        _urandom.append(os.open("/dev/urandom", os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)))
    return _urandom[0]


def reseed(data: bytes) -> dict:
    """Mix host entropy into the kernel pool (credited, CRNG reseeded at once) and reseed the
    interpreter's generators. No hashing here: under emulation a first use of hashlib costs tens of
    milliseconds in every fresh child, and the host's bytes are already uniformly random."""
    if len(data) < 32:
        raise _bad("reseed needs at least 32 bytes of entropy")
    credited = 0
    reseeded = False
    fd = _urandom_fd()
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
        credited = len(data) * 8
    except OSError:
        os.write(fd, data)  # unprivileged: mixed in, not credited
    if credited:
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
            reseeded = True
        except OSError:
            pass
    # Host bytes XOR fresh kernel bytes: the generators diverge even if the kernel did not.
    mixed = (
        int.from_bytes(data[:32], "little") ^ int.from_bytes(os.urandom(32), "little")
    ).to_bytes(32, "little")
    random.seed(int.from_bytes(mixed, "little"))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            # An int seed takes numpy's direct MT19937 path; a list goes through ndarray
            # machinery that costs ~40 ms of fresh translation in every child under TCG.
            numpy.random.seed(int.from_bytes(mixed[:4], "little"))
        except Exception as e:
            _log("numpy reseed failed: %s" % e)
    return {"credited_bits": credited, "reseeded": reseeded}


OPS = {
    "exec": op_exec,
    "eval": op_eval,
    "write_file": op_write_file,
    "read_file": op_read_file,
    "list_files": op_list_files,
    "remove_file": op_remove_file,
    "reseed": op_reseed,
    "set_net": op_set_net,
    "warm": op_warm,
    "eval_context_drop": op_eval_context_drop,
    "stat": op_stat,
    "mkdir": op_mkdir,
    "move": op_move,
    "proc_start": op_proc_start,
    "proc_input": op_proc_input,
    "proc_close_stdin": op_proc_close_stdin,
    "proc_signal": op_proc_signal,
    "proc_resize": op_proc_resize,
    "proc_list": op_proc_list,
}


# --------------------------------------------------------------------------- serving


class Agent:
    """The reader loop, session tracking and the single locked writer of one port."""

    def set_clock(self, req: dict) -> dict:
        if not self.sets_clock:
            return {"clock_set": False, "clock_error": "test mode never sets the clock"}
        try:
            return set_clock(req.get("wall_ns"))
        except Exception as e:
            return {"clock_set": False, "clock_error": _exc_text(e)}

    def __init__(self, fd: int, eof_exits: bool, sigio: bool = False, sets_clock=False) -> None:
        self.fd = fd
        # Only the guest's agent steps the clock: the test mode runs on the host.
        self.sets_clock = sets_clock
        self.eof_exits = eof_exits
        self.sigio = sigio
        self.session = None
        self.write_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="forkd-op")
        _event_sink[0] = self.emit

    # -- writing

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.005)
                continue
            view = view[n:]

    def send(self, resp: dict, session) -> None:
        line = fit_reply(resp, _reply_cap)
        with self.write_lock:
            if session != self.session:
                return  # answered into a later connection: drop
            try:
                self._write_all(line)
            except OSError as e:
                _log("write failed: %s" % e)

    def emit(self, event: dict) -> None:
        """An unsolicited event (a tracked process's output or exit) to the current host."""
        line = json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n"
        with self.write_lock:
            try:
                self._write_all(line)
            except OSError as e:
                _log("write failed: %s" % e)

    # -- requests

    def run_op(self, handler, req: dict, rid: str, session) -> None:
        after_send = None
        try:
            resp = {"id": rid, "ok": True}
            resp.update(handler(req))
            after_send = resp.pop("_after_send", None)
        except RequestError as e:
            resp = {"id": rid, "ok": False, "error": str(e), "kind": e.kind}
        except FileNotFoundError as e:
            resp = {"id": rid, "ok": False, "error": str(e), "kind": "not_found"}
        except OSError as e:
            resp = {"id": rid, "ok": False, "error": str(e), "kind": "os_error", "errno": e.errno}
        except BaseException as e:
            _log("op %s failed: %s" % (req.get("op"), traceback.format_exc()))
            resp = {"id": rid, "ok": False, "error": _exc_text(e), "kind": "internal"}
        self.send(resp, session)
        if after_send is not None:
            after_send()

    def handle_line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError:
            return
        if not isinstance(req, dict):
            return
        rid = req.get("id")
        if not isinstance(rid, str):
            return
        op = req.get("op")
        if op == "hello":
            global _reply_cap
            cap = req.get("max_line")
            if isinstance(cap, int) and not isinstance(cap, bool):
                _reply_cap = max(MIN_REPLY_CAP, min(cap, MAX_LINE))
            session = req.get("session")
            if not isinstance(session, str) or not session:
                err = {"id": rid, "ok": False, "error": "hello needs a session"}
                self.send(dict(err, kind="bad_request"), self.session)
                return
            resp = {
                "id": rid,
                "ok": True,
                "version": AGENT_VERSION,
                "pid": os.getpid(),
                "ready": True,
                "session": session,
            }
            if req.get("wall_ns") is not None:
                # Before the hello is answered, so no user request ever sees a stale clock.
                resp.update(self.set_clock(req))
            if req.get("net") is not None:
                try:
                    resp.update(apply_net(req["net"]))
                except Exception as e:
                    resp.update(net_set=False, net_error=_exc_text(e))
            entropy = req.get("entropy_b64")
            if entropy is not None:
                # A fork's first message: fresh randomness before any other request runs.
                try:
                    resp.update(reseed(base64.b64decode(entropy)))
                except Exception as e:
                    resp.update(reseeded=False, reseed_error=_exc_text(e))
            line_out = b"\n" + json.dumps(resp, separators=(",", ":")).encode("utf-8") + b"\n"
            with self.write_lock:
                # Switch session and answer under one lock: no old answer can follow the hello.
                self.session = session
                try:
                    self._write_all(line_out)
                except OSError as e:
                    _log("write failed: %s" % e)
            return
        session = self.session
        if op == "ping":
            self.send(dict(op_ping(req), id=rid, ok=True), session)
            return
        if op == "set_clock":
            self.send(dict(self.set_clock(req), id=rid, ok=True), session)
            return
        if op == "renew":
            # A pooled child handed out: what a fork's hello gives, on the open session.
            resp = self.set_clock(req)
            try:
                resp.update(reseed(base64.b64decode(req.get("entropy_b64") or "")))
            except Exception as e:
                resp.update(reseeded=False, reseed_error=_exc_text(e))
            if req.get("net") is not None:
                try:
                    resp.update(apply_net(req["net"]))
                except Exception as e:
                    resp.update(net_set=False, net_error=_exc_text(e))
            self.send(dict(resp, id=rid, ok=True), session)
            return
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            self.send(
                {"id": rid, "ok": False, "error": "unknown op %r" % (op,), "kind": "bad_request"},
                session,
            )
            return
        self.pool.submit(self.run_op, handler, req, rid, session)

    def serve(self) -> None:
        pending = bytearray()
        dropping = False  # inside an over-long line: skip to its end
        while True:
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except InterruptedError:
                continue
            except OSError as e:
                if self.eof_exits:
                    return
                _log("read failed: %s" % e)
                time.sleep(0.05)
                continue
            if not chunk:
                if self.eof_exits:
                    return
                # virtio port, host disconnected: read() cannot block and poll() cannot either,
                # but the driver sends SIGIO when a host connects.
                if self.sigio:
                    signal.sigtimedwait([signal.SIGIO], 1.0)
                else:
                    time.sleep(0.05)
                continue
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    if not dropping:
                        pending += chunk[start:]
                        if len(pending) > MAX_LINE:
                            pending = bytearray()
                            dropping = True
                    break
                if dropping:
                    dropping = False
                elif pending:
                    pending += chunk[start:nl]
                    line = bytes(pending)
                    pending = bytearray()
                    self.handle_line(line)
                else:
                    self.handle_line(chunk[start:nl])
                start = nl + 1


def find_port(name: str, wait_s: float = 10.0) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        for name_file in sorted(glob.glob("/sys/class/virtio-ports/*/name")):
            try:
                with open(name_file) as f:
                    found = f.read().strip()
            except OSError:
                continue
            if found == name:
                return "/dev/" + os.path.basename(os.path.dirname(name_file))
        if time.monotonic() >= deadline:
            raise RuntimeError("virtio-serial port %r not found" % name)
        time.sleep(0.05)


def open_device(path: str, wait_s: float = 10.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENXIO):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def arm_sigio(fd: int) -> bool:
    """Ask for SIGIO on port events, blocked so that only sigtimedwait() takes it. Done before
    any other thread exists, so every thread inherits the blocked mask."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        return True
    except (AttributeError, OSError, ValueError) as e:
        _log("SIGIO unavailable, polling instead: %s" % e)
        return False


def serve(args) -> int:
    _install_capture()
    sock = None  # kept referenced while serving
    if args.connect_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.connect_unix)
        fd = sock.fileno()
        eof_exits = True
    else:
        path = args.device or find_port(args.port_name)
        fd = open_device(path)
        eof_exits = False
        _log("serving on %s (pid %d)" % (path, os.getpid()))
    sigio = False if eof_exits else arm_sigio(fd)
    _urandom_fd()
    Agent(fd, eof_exits, sigio, sets_clock=not args.connect_unix).serve()
    if sock is not None:
        sock.close()
    return 0


def run_init(args) -> None:
    """PID 1: fork the serving agent, reap every child forever, restart the agent if it exits."""
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ.setdefault("HOME", "/root")
    agent_pid = 0
    while True:
        if agent_pid == 0:
            try:
                agent_pid = os.fork()
            except OSError as e:
                _log("fork failed: %s" % e)
                time.sleep(1.0)
                continue
            if agent_pid == 0:
                code = 1
                try:
                    os.setsid()
                    code = serve(args)
                except BaseException:
                    _log("agent crashed: %s" % traceback.format_exc())
                finally:
                    os._exit(code)
        try:
            pid, status = os.wait()
        except ChildProcessError:
            agent_pid = 0
            continue
        except Exception as e:
            _log("wait failed: %s" % e)
            time.sleep(0.1)
            continue
        if pid == agent_pid:
            _log("agent exited (status %d); restarting" % status)
            agent_pid = 0
            time.sleep(0.5)


EXEC_ONLY_FILE = "/opt/forkd/exec-only"


def _exec_only() -> None:
    """An image without a usable Python runs this agent on forkd's private interpreter: exec,
    files and processes work, eval answers the reason the image builder wrote."""
    try:
        with open(EXEC_ONLY_FILE) as f:
            reason = f.read().strip() or "this template is exec-only"
    except OSError:
        return

    def refuse(req: dict) -> dict:
        raise _bad(reason)

    OPS["eval"] = refuse
    OPS["eval_context_drop"] = refuse
    # a pooled child is warmed with eval snippets: nothing to warm here
    OPS["warm"] = lambda req: {"warmed": 0, "errors": 0}


def main(argv=None) -> int:
    _exec_only()
    parser = argparse.ArgumentParser(description="forkd guest agent")
    parser.add_argument("--port-name", default=DEFAULT_PORT_NAME)
    parser.add_argument("--device", help="open this port device instead of looking it up")
    parser.add_argument(
        "--connect-unix", metavar="PATH", help="test mode: serve over a unix socket client"
    )
    parser.add_argument("--init", action="store_true", help="run as PID 1 (reap, restart)")
    args = parser.parse_args(argv)
    if args.init:
        run_init(args)
        return 0
    try:
        code = serve(args)
    except Exception:
        _log("agent failed: %s" % traceback.format_exc())
        code = 1
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)  # do not wait for worker threads still running user code


if __name__ == "__main__":
    sys.exit(main())
