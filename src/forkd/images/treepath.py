"""Paths inside a root tree as the guest sees them: symlinks followed within the tree.

An imported image is untrusted: an absolute symlink such as ``/opt -> /etc`` names the guest's
``/etc``, never the host's, so every path forkd writes into or reads from a tree goes through
:func:`resolve` instead of the host's own path resolution.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from pathlib import Path, PurePosixPath

from forkd.errors import ImageError

MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one lookup


def resolve(root: Path, rel: str) -> Path:
    """The host path of guest path ``rel`` under ``root``: symlinks followed with absolute
    targets taken from ``root`` and ``..`` stopping at it, so the result is always inside it.
    Components that do not exist are kept as they are."""
    parts = deque(p for p in PurePosixPath(rel).parts if p != "/")
    done: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            links += 1
            if links > MAX_LINKS:
                raise ImageError(f"too many levels of symbolic links in /{rel} of the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts.extendleft(reversed([p for p in PurePosixPath(target).parts if p != "/"]))
            continue
        done.append(part)
    return root.joinpath(*done)


def make_dir(root: Path, rel: str) -> Path:
    """Guest directory ``rel`` under ``root``, created (as real directories) where missing."""
    path = resolve(root, rel)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ImageError(f"/{rel} in the image is not a directory") from exc
    return path


def write_file(root: Path, rel: str, data: bytes, mode: int = 0o644) -> Path:
    """Write guest file ``rel``, replacing what is there. The root may be a hard-linked copy of
    a cached tree: an existing file is unlinked first, never written through."""
    parent = make_dir(root, str(PurePosixPath(rel).parent))
    path = parent / PurePosixPath(rel).name
    if path.is_dir() and not path.is_symlink():
        raise ImageError(f"/{rel} in the image is a directory")
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def merge_tree(source: Path, root: Path, rel: str) -> None:
    """Hard-link every file of host directory ``source`` into guest directory ``rel``. What the
    tree has in the way is replaced, and a symlink in it is never followed: an image's
    ``/opt/forkd/rt/lib -> /usr/lib`` must not send forkd's files to the host's /usr/lib."""
    target = make_dir(root, rel)
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        out = target / here.relative_to(source)
        for name in dirnames:
            _replace_with_dir(out / name)
        for name in filenames:
            dest = out / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            dest.unlink(missing_ok=True)
            os.link(here / name, dest, follow_symlinks=False)


def _replace_with_dir(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(exist_ok=True)
