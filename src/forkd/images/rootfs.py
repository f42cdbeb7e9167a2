"""The read-only root image: a debootstrap tree (cached per package set) plus the forkd agent,
packed into ext4 without mounting anything."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forkd.errors import ImageError
from forkd.hostcmd import require_program, run
from forkd.images import treepath

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


def add_guest_user(stage: Path) -> None:
    """Add ``user`` (uid and gid 1000, home /home/user, bash, no password) to the tree. Paths
    resolve inside the tree (an image's /etc/passwd may be a symlink to anywhere)."""
    entries = {
        "passwd": f"{GUEST_USER}:x:{GUEST_UID}:{GUEST_UID}::{GUEST_HOME}:/bin/bash\n",
        "group": f"{GUEST_USER}:x:{GUEST_UID}:\n",
    }
    for name, line in entries.items():
        path = treepath.resolve(stage, f"etc/{name}")
        old = path.read_text() if path.is_file() else ""
        mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
        kept = [ln for ln in old.splitlines(keepends=True) if not ln.startswith(GUEST_USER + ":")]
        text = "".join(kept)
        text += ("" if not text or text.endswith("\n") else "\n") + line
        treepath.write_file(stage, f"etc/{name}", text.encode(), mode=mode)
    home = treepath.make_dir(stage, GUEST_HOME.lstrip("/"))
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


ENV_NAME_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True)
class GuestFiles:
    """What forkd adds to a root tree besides the agent (init.sh reads the first two)."""

    # the interpreter command that runs the agent; None: the tree's /usr/bin/python3
    launch: str | None = None
    # exported before the agent starts (an OCI image's configured environment)
    env: Mapping[str, str] = field(default_factory=dict)
    # eval's answer in a tree without a usable Python (the agent then refuses eval)
    exec_only: str | None = None
    # (host directory, guest directory): merged in as hard links (pip packages, agent runtime)
    merge: tuple[tuple[Path, str], ...] = ()


def env_script(env: Mapping[str, str]) -> str:
    """``export K=V`` lines for init.sh to source, each value quoted for a POSIX shell."""
    lines = []
    for key, value in env.items():
        if key and not key[0].isdigit() and set(key) <= ENV_NAME_OK and "\0" not in value:
            lines.append(f"export {key}={shlex.quote(value)}")
    return "".join(line + "\n" for line in lines)


def build_root_image(
    tree: Path, dest: Path, *, agent: Path, workdir: Path, extra: GuestFiles | None = None
) -> None:
    """Pack ``tree`` plus the agent at /opt/forkd/agent.py (and ``extra``) into an ext4 image
    at ``dest``."""
    extra = extra or GuestFiles()
    mkfs = require_program("mkfs.ext4", "e2fsprogs")
    stage = workdir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    # A hard-link copy is instant and leaves the cached tree untouched.
    run(["cp", "-al", tree, stage], error=ImageError, what="staging the root tree")
    try:
        (stage / ".forkd-complete").unlink(missing_ok=True)
        for source, guest_dir in extra.merge:
            treepath.merge_tree(source, stage, guest_dir)
        treepath.write_file(stage, "opt/forkd/agent.py", agent.read_bytes())
        for name, content in (
            ("launch", extra.launch and extra.launch + "\n"),
            ("env", env_script(extra.env) if extra.env else None),
            ("exec-only", extra.exec_only and extra.exec_only + "\n"),
        ):
            if content:
                treepath.write_file(stage, f"opt/forkd/{name}", content.encode())
        # The root is a throw-away overlay per sandbox: pip may install into the system Python.
        treepath.write_file(stage, "etc/pip.conf", PIP_CONF.encode())
        add_guest_user(stage)
        size_mib = tree_size_bytes(stage) * 13 // 10 // (1024 * 1024) + 64
        run(
            [mkfs, "-q", "-F", "-L", "forkd-root", "-d", stage, dest, f"{size_mib}M"],
            error=ImageError,
            what="mkfs.ext4",
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
