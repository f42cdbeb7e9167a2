"""forkd's private Python for images without a usable one.

forkd's guest agent is Python. An image without python3 (busybox, distroless, a Go binary's
image) gets a self-contained interpreter under /opt/forkd/rt: the python3 binary, its standard
library and the exact shared libraries it loads, all taken from forkd's own Debian tree. It is
started through its own dynamic loader (``ld.so --library-path``), so it works on any x86_64
root, glibc or musl or none, and nothing of it leaks into what the agent runs: no
``LD_LIBRARY_PATH``, no ``PYTHONHOME`` (``-I``: the image's ``PYTHON*`` variables are ignored).
Such images are exec-only: the user's code expects the image's Python, so eval refuses.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from forkd.errors import ImageError
from forkd.hostcmd import run
from forkd.images import rootfs, treepath
from forkd.images.guestpython import find_python

RUNTIME_VERSION = "2"
GUEST_DIR = "opt/forkd/rt"
LOADER = "ld-linux-x86-64.so.2"
LAUNCH = f"/{GUEST_DIR}/lib/{LOADER} --library-path /{GUEST_DIR}/lib /{GUEST_DIR}/bin/python3 -I -u"
# forkd's default image's package set: its debootstrap tree is usually cached already
SOURCE_PACKAGES = ("ca-certificates", "python3-numpy", "python3-pip")
# standard library parts the agent never imports
SKIP = frozenset({
    "dist-packages", "site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3",
    "ensurepip", "pydoc_data", "distutils", "sitecustomize.py",
})  # fmt: skip
# extension modules the agent never loads (several pull in large libraries: ssl, sqlite, krb5)
SKIP_DYNLOAD = re.compile(
    r"(_test|xx|_ctypes|_sqlite3|_dbm|nis|_curses|readline|_ssl|ossaudiodev|audioop|_crypt)"
)
LISTED = re.compile(r"^\s*(\S+) => (/\S+) \(")


def runtime_key() -> str:
    """Part of an imported image's digest: which tree and recipe its runtime comes from."""
    return f"rt{RUNTIME_VERSION}-{rootfs.tree_key(SOURCE_PACKAGES)}"


def agent_runtime(cache_dir: Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """The runtime directory (merged into a tree at /opt/forkd/rt), built once and cached."""
    target = cache_dir / "agent-runtime" / runtime_key()
    if (target / ".forkd-complete").exists():
        return target
    tree = rootfs.debootstrap_tree(cache_dir, SOURCE_PACKAGES, log)
    log("forkd's agent runtime for images without Python")
    python = find_python(tree)
    if python is None:
        raise ImageError(f"forkd's own tree {tree} has no python3")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    (staging / "lib").mkdir()
    binary = treepath.resolve(tree, python.path)
    shutil.copy2(binary, staging / "bin" / "python3")
    stdlib = f"usr/lib/python{python.version_str}"
    _copy_tree(tree, stdlib, staging / "lib" / f"python{python.version_str}")
    loader = treepath.resolve(tree, f"lib64/{LOADER}")
    shutil.copy2(loader, staging / "lib" / LOADER)
    dynload = staging / "lib" / f"python{python.version_str}" / "lib-dynload"
    objects = [binary, *sorted(dynload.glob("*.so"))]
    for soname, path in _needed(tree, loader, objects).items():
        shutil.copy2(path, staging / "lib" / Path(soname).name)  # a bare name, never a path
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / ".forkd-complete").write_text(LAUNCH + "\n")
    return target


def _copy_tree(tree: Path, rel: str, dest: Path) -> None:
    """Copy guest dir ``rel`` with its symlinks resolved inside ``tree`` (dangling ones and
    :data:`SKIP` left out)."""
    src = treepath.resolve(tree, rel)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d not in SKIP]
        here = Path(dirpath)
        out = dest / here.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if (
                name in SKIP
                or (here.name == "lib-dynload" and SKIP_DYNLOAD.match(name))
                or name.endswith((".opt-1.pyc", ".opt-2.pyc"))
            ):
                continue
            real = treepath.resolve(tree, str((here / name).relative_to(tree)))
            if real.is_file():
                shutil.copy2(real, out / name)


def _needed(tree: Path, loader: Path, objects: list[Path]) -> dict[str, Path]:
    """soname -> file in ``tree`` of every library ``objects`` load, as the tree's own loader
    resolves them (``ld.so --list``, what ldd runs)."""
    libpath = ":".join(
        str(treepath.resolve(tree, d)) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
    )
    found: dict[str, Path] = {}
    for obj in objects:
        out = run(
            [loader, "--inhibit-cache", "--library-path", libpath, "--list", obj],
            error=ImageError,
            what=f"listing the libraries of {obj.name}",
        )
        for line in out.splitlines():
            m = LISTED.match(line)
            # the loader's own line names it by absolute path: it is copied on its own
            if m is None or "/" in m[1] or m[1] == LOADER:
                continue
            path = Path(m[2])
            if not path.is_relative_to(tree):
                raise ImageError(f"{obj.name} needs {m[1]}, which forkd's tree {tree} lacks")
            found[m[1]] = treepath.resolve(tree, str(path.relative_to(tree)))
    return found
