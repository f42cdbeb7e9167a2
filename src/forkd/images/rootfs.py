"""The read-only root image: a debootstrap tree (cached per package set) plus the forkd agent,
packed into ext4 without mounting anything."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from forkd.errors import ImageError
from forkd.hostcmd import require_program, run

SUITE = "bookworm"
BASE_PACKAGES = ("python3-minimal", "python3")
SLIM_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "var/cache/apt", "var/lib/apt/lists",
)  # fmt: skip


PIP_CONF = "[global]\nbreak-system-packages = true\nroot-user-action = ignore\n"

# The unprivileged account E2B's SDKs run commands and file operations as by default.
GUEST_USER = "user"
GUEST_UID = 1000
GUEST_HOME = "/home/user"


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` anew (a hard-linked staging tree: never write through existing links),
    keeping its mode."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    path.unlink(missing_ok=True)
    path.write_text(text)
    path.chmod(mode)


def add_guest_user(stage: Path) -> None:
    """Add ``user`` (uid and gid 1000, home /home/user, bash, no password) to the tree."""
    etc = stage / "etc"
    entries = {
        "passwd": f"{GUEST_USER}:x:{GUEST_UID}:{GUEST_UID}::{GUEST_HOME}:/bin/bash\n",
        "group": f"{GUEST_USER}:x:{GUEST_UID}:\n",
    }
    for name, line in entries.items():
        path = etc / name
        old = path.read_text() if path.exists() else ""
        kept = [ln for ln in old.splitlines(keepends=True) if not ln.startswith(GUEST_USER + ":")]
        text = "".join(kept)
        _replace_text(path, text + ("" if not text or text.endswith("\n") else "\n") + line)
    home = stage / GUEST_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)
    os.chown(home, GUEST_UID, GUEST_UID)


def tree_key(packages: tuple[str, ...]) -> str:
    """Cache key of a debootstrap tree: suite and the sorted package set."""
    spec = SUITE + "\n" + "\n".join(sorted(set(BASE_PACKAGES + packages)))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def debootstrap_tree(
    cache_dir: Path, packages: tuple[str, ...], log: Callable[[str], None] = lambda _: None
) -> Path:
    """The debootstrap tree for ``packages``, built once and then served from the cache."""
    key = tree_key(packages)
    tree = cache_dir / "rootfs" / key
    if (tree / ".forkd-complete").exists():
        return tree
    debootstrap = require_program("debootstrap", "debootstrap")
    staging = tree.with_name(key + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    include = ",".join(sorted(set(BASE_PACKAGES + packages)))
    log(f"debootstrap {SUITE} with {include}")
    run(
        [debootstrap, "--variant=minbase", f"--include={include}", SUITE, staging],
        error=ImageError,
        what="debootstrap",
        timeout=1800,
    )
    for rel in SLIM_PATHS:
        target = staging / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
    (staging / ".forkd-complete").write_text(include + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    return tree


def tree_size_bytes(tree: Path) -> int:
    total = 0
    for p in tree.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def build_root_image(tree: Path, dest: Path, *, agent: Path, workdir: Path) -> None:
    """Pack ``tree`` plus the agent at /opt/forkd/agent.py into an ext4 image at ``dest``."""
    mkfs = require_program("mkfs.ext4", "e2fsprogs")
    stage = workdir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    # A hard-link copy is instant and leaves the cached tree untouched.
    run(["cp", "-al", tree, stage], error=ImageError, what="staging the root tree")
    try:
        (stage / ".forkd-complete").unlink(missing_ok=True)
        (stage / "opt" / "forkd").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(agent, stage / "opt" / "forkd" / "agent.py")
        # The root is a throw-away overlay per sandbox: pip may install into the system Python.
        # (A hard-linked staging tree: replace files, never write through existing links.)
        pip_conf = stage / "etc" / "pip.conf"
        pip_conf.unlink(missing_ok=True)
        pip_conf.write_text(PIP_CONF)
        add_guest_user(stage)
        size_mib = tree_size_bytes(stage) * 13 // 10 // (1024 * 1024) + 64
        run(
            [mkfs, "-q", "-F", "-L", "forkd-root", "-d", stage, dest, f"{size_mib}M"],
            error=ImageError,
            what="mkfs.ext4",
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
