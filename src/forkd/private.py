"""Private host state: forkd's directories are 0700 and its own, its files 0600.

Guest memory files hold every secret a sandbox ever saw, the database and audit log name every
sandbox and caller, and the run dirs hold the sockets that control each VM. A directory that
already exists is used only if it is a real directory (not a symlink) owned by the user forkd
runs as and not writable by anyone else; one that is merely readable by others is tightened to
0700. Anything else is refused with :class:`HostSetupError`, naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from forkd.errors import HostSetupError

DIR_MODE = 0o700
FILE_MODE = 0o600


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, what: str, problem: str, fix: str) -> HostSetupError:
    return HostSetupError(f"{what} {path} {problem}: forkd keeps it private; {fix}")


def check_owned(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse ``path`` (already ``lstat``-ed) unless it is this user's and nobody else can write."""
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(
            path, what, "is a symlink", f"remove it (rm {path}) or point forkd at the real path"
        )
    if st.st_uid != me:
        raise _refuse(
            path,
            what,
            f"is owned by {_user(st.st_uid)}, not by {_user(me)} that forkd runs as",
            "remove it, or run forkd as its owner, or choose another path",
        )
    if st.st_mode & 0o022:
        raise _refuse(
            path,
            what,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"check what is in it, then chmod 700 {path}, or remove it",
        )


def private_dir(path: Path, what: str = "directory") -> Path:
    """Create ``path`` mode 0700 (parents as usual), or check and tighten an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    st = os.lstat(path)
    check_owned(path, st, what)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, what, "is not a directory", "remove it or choose another path")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def private_file(path: Path, what: str = "file") -> None:
    """Make sure ``path`` exists as this user's regular file, mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as e:
        raise _refuse(path, what, f"cannot be opened ({e.strerror})", "remove it") from e
    try:
        st = os.fstat(fd)
        check_owned(path, st, what)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, "is not a regular file", "remove it")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
