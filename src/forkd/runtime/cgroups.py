"""Per-sandbox memory limits: one cgroup leaf per QEMU process.

cgroup v2 (``memory.max``) where the unified hierarchy has the memory controller, else the v1
memory controller (``memory.limit_in_bytes``). When neither is writable (or the setting
``cgroups`` is off), a requested limit is accepted but not enforced, as forkd v0.5 did, and the
spawn answer carries a ``warning`` saying so (:func:`not_enforced`): forkd v0.5's MCP server
asks for 256 MiB on every spawn, so refusing would break every such client on such a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CGROUP_ROOT = Path("/sys/fs/cgroup")
LEAF_PARENT = "forkd"


@dataclass(frozen=True)
class MemoryCgroups:
    version: Literal["v2", "v1"]
    parent: Path

    def leaf(self, sandbox_id: str) -> Path:
        return self.parent / sandbox_id

    def limit(self, sandbox_id: str, pid: int, limit_mib: int) -> Path:
        """Create the sandbox's leaf with ``limit_mib`` and move ``pid`` into it."""
        leaf = self.leaf(sandbox_id)
        leaf.mkdir(parents=True, exist_ok=True)
        limit_bytes = str(limit_mib * 1024 * 1024)
        if self.version == "v2":
            (leaf / "memory.max").write_text(limit_bytes)
            with contextlib.suppress(OSError):
                (leaf / "memory.swap.max").write_text("0")
        else:
            (leaf / "memory.limit_in_bytes").write_text(limit_bytes)
        (leaf / "cgroup.procs").write_text(str(pid))
        return leaf

    def oom_killed(self, sandbox_id: str) -> bool:
        """Whether the kernel's OOM killer ended a process of the sandbox's leaf."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            text = (self.leaf(sandbox_id) / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(OSError):
            self.leaf(sandbox_id).rmdir()


def detect(root: Path = CGROUP_ROOT) -> MemoryCgroups | None:
    """The writable memory controller on this host, if any."""
    unified = root / "cgroup.controllers"
    if unified.is_file() and "memory" in unified.read_text().split():
        parent = root / LEAF_PARENT
        try:
            (root / "cgroup.subtree_control").write_text("+memory")
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+memory")
            return MemoryCgroups("v2", parent)
        except OSError:
            pass
    v1 = root / "memory"
    if (v1 / "cgroup.procs").is_file():
        parent = v1 / LEAF_PARENT
        try:
            parent.mkdir(exist_ok=True)
            return MemoryCgroups("v1", parent)
        except OSError:
            pass
    return None


def available(enabled: bool = True) -> MemoryCgroups | None:
    """:func:`detect`, unless the ``cgroups`` setting is off (then never any)."""
    return detect() if enabled else None


def not_enforced(limit_mib: int, enabled: bool) -> str:
    """The spawn warning for a limit that no cgroup can enforce."""
    why = (
        "cgroups are disabled by the daemon's settings (FORKD_CGROUPS=0)"
        if not enabled
        else "this host offers no writable cgroup memory controller (cgroup v2 with the memory "
        "controller, or v1 memory)"
    )
    return f"memory_limit_mib={limit_mib} is not enforced: {why}"
