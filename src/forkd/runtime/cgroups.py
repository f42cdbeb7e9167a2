"""Per-VM cgroup limits: one leaf per QEMU process (sandbox, pool member, template parent,
live-branch materializer), with memory, pids and CPU limits, entered before QEMU runs.

Each controller is taken from cgroup v2 where the unified hierarchy offers it (``memory.max``,
``pids.max``, ``cpu.max`` and ``cpu.weight``), else from its v1 hierarchy
(``memory.limit_in_bytes``, ``pids.max``, ``cpu.cfs_quota_us`` and ``cpu.shares``), so a hybrid
host gets what it has. Leaves live in ``forkd/<name>`` below each hierarchy's root: on v2 that
is the egress guard's leaf of the same sandbox too (:mod:`forkd.net.guard`), so the guard's
``enter`` leaves QEMU where it is. When no controller is writable (or the setting ``cgroups`` is
off), an explicit ``memory_limit_mib`` is accepted but not enforced, as forkd v0.5 did, and the
spawn answer carries a ``warning`` saying so (:func:`not_enforced`): forkd v0.5's MCP server asks
for 256 MiB on every spawn, so refusing would break every such client on such a host.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from forkd.config import Settings
from forkd.errors import HostSetupError, InvalidInput

CGROUP_ROOT = Path("/sys/fs/cgroup")
LEAF_PARENT = "forkd"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
NORMAL_WEIGHT = 100  # cgroup v2's default cpu.weight; v1's cpu.shares default is 1024
MiB = 1024 * 1024
SWEEP_GRACE_S = 120.0
"""An empty leaf is garbage once this old (a leaf holds its QEMU from before exec to its end)."""

Version = Literal["v2", "v1"]


@dataclass(frozen=True)
class LeafLimits:
    """What one QEMU's leaf enforces (None: that limit is not set)."""

    memory_mib: int | None = None
    pids: int | None = None
    cpus: float | None = None  # a quota of this many CPUs (cpu.max / cfs_quota_us)
    weight: int | None = None  # v2 scale, 1..10000 (100 normal); v1 shares = weight * 10.24


@dataclass(frozen=True)
class LeafEvents:
    """What the kernel counted in a leaf: OOM kills, and task creations refused by pids.max."""

    oom_kills: int = 0
    pids_refused: int = 0


@dataclass(frozen=True)
class Hierarchy:
    version: Version
    parent: Path  # the ``forkd`` dir in it

    def leaf(self, name: str) -> Path:
        return self.parent / name


def for_vm(
    settings: Settings,
    *,
    mem_mib: int,
    cpus: int,
    memory_limit_mib: int | None = None,
    pooled: bool = False,
) -> LeafLimits:
    """The limits of a QEMU with ``mem_mib`` of guest RAM and ``cpus`` vCPUs: an explicit
    ``memory_limit_mib`` wins over the default, guest RAM twice plus QEMU's allowance.

    Twice: a child is charged for its private copies of guest pages (up to guest RAM) and for
    the template file's pages it is first to read in; a live branch reads every page (QEMU
    populates all RAM before write-protecting it), so a source can be charged up to guest RAM
    of template pages too (measured: +300 MiB on a 512 MiB template's first live branch)."""
    memory = memory_limit_mib
    if memory is None and settings.cgroup_memory_overhead_mib is not None:
        memory = 2 * mem_mib + settings.cgroup_memory_overhead_mib
    quota: float | None = None
    if settings.cgroup_cpus == "auto":
        quota = float(cpus)
    elif settings.cgroup_cpus is not None:
        quota = settings.cgroup_cpus
    return LeafLimits(
        memory_mib=memory,
        pids=settings.cgroup_pids_max,
        cpus=quota,
        weight=settings.cgroup_pool_weight if pooled else None,
    )


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _counter(path: Path, key: str) -> int:
    """The ``key N`` line of a flat-keyed cgroup file (0 when absent or unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        k, _, value = line.partition(" ")
        if k == key and value.strip().isdigit():
            return int(value)
    return 0


def _int_file(path: Path) -> int | None:
    try:
        raw = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(raw) if raw.lstrip("-").isdigit() else None


@dataclass(frozen=True)
class Cgroups:
    """The writable controllers of this host, by name (``memory``, ``pids``, ``cpu``)."""

    hierarchies: dict[str, Hierarchy] = field(default_factory=dict)

    def has(self, controller: str) -> bool:
        return controller in self.hierarchies

    def dirs(self, name: str) -> list[Path]:
        """The leaf dirs of ``name``, one per hierarchy (v2 controllers share one)."""
        return list(dict.fromkeys(h.leaf(name) for h in self.hierarchies.values()))

    def leaf(self, controller: str, name: str) -> Path | None:
        h = self.hierarchies.get(controller)
        return None if h is None else h.leaf(name)

    def place(self, name: str, pid: int, limits: LeafLimits) -> None:
        """Create ``name``'s leaves with ``limits`` and move ``pid`` into them (before QEMU
        runs: its start-up and every thread it makes are counted there)."""
        try:
            for d in self.dirs(name):
                d.mkdir(parents=True, exist_ok=True)
            self._set(name, limits)
            for d in self.dirs(name):
                _write(d / "cgroup.procs", str(pid))
        except OSError as exc:
            self.remove(name)
            raise HostSetupError(
                f"cannot put QEMU pid {pid} into its cgroup {name}: {exc}"
            ) from exc

    def _set(self, name: str, limits: LeafLimits) -> None:
        if limits.memory_mib is not None and (m := self.hierarchies.get("memory")):
            self._write_memory(m, name, limits.memory_mib)
        if limits.pids is not None and (p := self.hierarchies.get("pids")):
            _write(p.leaf(name) / "pids.max", str(limits.pids))
        if (c := self.hierarchies.get("cpu")) is not None:
            leaf = c.leaf(name)
            if limits.cpus is not None:
                quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
                if c.version == "v2":
                    _write(leaf / "cpu.max", f"{quota} {CPU_PERIOD_US}")
                else:
                    _write(leaf / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(leaf / "cpu.cfs_quota_us", str(quota))
            if limits.weight is not None:
                self._write_weight(c, leaf, limits.weight)

    @staticmethod
    def _write_memory(h: Hierarchy, name: str, mib: int) -> None:
        leaf = h.leaf(name)
        if h.version == "v2":
            _write(leaf / "memory.max", str(mib * MiB))
            for extra, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                with contextlib.suppress(OSError):
                    _write(leaf / extra, value)
        else:
            _write(leaf / "memory.limit_in_bytes", str(mib * MiB))

    @staticmethod
    def _write_weight(h: Hierarchy, leaf: Path, weight: int) -> None:
        if h.version == "v2":
            _write(leaf / "cpu.weight", str(weight))
        else:
            _write(leaf / "cpu.shares", str(max(2, weight * 1024 // NORMAL_WEIGHT)))

    def memory_usage_mib(self, name: str) -> int | None:
        h = self.hierarchies.get("memory")
        if h is None:
            return None
        file = "memory.current" if h.version == "v2" else "memory.usage_in_bytes"
        used = _int_file(h.leaf(name) / file)
        return None if used is None else -(-used // MiB)

    def retarget(self, name: str, pid: int, memory_mib: int | None, *, what: str) -> None:
        """A pool member ``pid`` handed out: normal CPU weight, and the memory limit its spawn
        asked for (None: keep the default it has). A member already using more than that is
        refused (:class:`InvalidInput`), never silently left over its limit or OOM-killed by the
        write. One without a leaf (pooled while cgroups were off) gets one now."""
        if not all(d.is_dir() for d in self.dirs(name)):
            self.place(name, pid, LeafLimits(memory_mib=memory_mib))
            return
        if (c := self.hierarchies.get("cpu")) is not None:
            with contextlib.suppress(OSError):
                self._write_weight(c, c.leaf(name), NORMAL_WEIGHT)
        if memory_mib is None or (m := self.hierarchies.get("memory")) is None:
            return
        used = self.memory_usage_mib(name)
        if used is not None and used > memory_mib:
            raise InvalidInput(
                f"memory_limit_mib={memory_mib} is below what {what} uses once started "
                f"({used} MiB): ask for at least {used + 64} MiB"
            )
        try:
            self._write_memory(m, name, memory_mib)
        except OSError as exc:
            raise InvalidInput(
                f"memory_limit_mib={memory_mib} cannot be applied to {what} ({exc})"
            ) from exc

    def limits(self, name: str) -> LeafLimits:
        """The limits ``name``'s leaves hold now (as the kernel reports them)."""
        memory = pids = None
        cpus: float | None = None
        weight = None
        if (m := self.hierarchies.get("memory")) is not None:
            file = "memory.max" if m.version == "v2" else "memory.limit_in_bytes"
            value = _int_file(m.leaf(name) / file)
            # v1 reports "no limit" as a huge page-rounded number
            memory = value // MiB if value is not None and value < 1 << 60 else None
        if (p := self.hierarchies.get("pids")) is not None:
            pids = _int_file(p.leaf(name) / "pids.max")
        if (c := self.hierarchies.get("cpu")) is not None:
            leaf = c.leaf(name)
            if c.version == "v2":
                with contextlib.suppress(OSError, ValueError, IndexError):
                    quota, period = (leaf / "cpu.max").read_text().split()[:2]
                    cpus = None if quota == "max" else int(quota) / int(period)
                weight = _int_file(leaf / "cpu.weight")
            else:
                quota_us = _int_file(leaf / "cpu.cfs_quota_us")
                period_us = _int_file(leaf / "cpu.cfs_period_us")
                if quota_us is not None and quota_us > 0 and period_us:
                    cpus = quota_us / period_us
                shares = _int_file(leaf / "cpu.shares")
                weight = None if shares is None else round(shares * NORMAL_WEIGHT / 1024)
        return LeafLimits(memory, pids, cpus, weight)

    def events(self, name: str) -> LeafEvents:
        oom = refused = 0
        if (m := self.hierarchies.get("memory")) is not None:
            file = "memory.events" if m.version == "v2" else "memory.oom_control"
            oom = _counter(m.leaf(name) / file, "oom_kill")
        if (p := self.hierarchies.get("pids")) is not None:
            refused = _counter(p.leaf(name) / "pids.events", "max")
        return LeafEvents(oom, refused)

    def remove(self, name: str, *, wait_s: float = 0.0) -> None:
        """Remove ``name``'s leaves; one that still holds a process (a QEMU just killed, not yet
        gone) is retried for up to ``wait_s``, then left for :meth:`sweep`."""
        deadline = time.monotonic() + wait_s
        for d in self.dirs(name):
            while True:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        break
                    time.sleep(0.01)
                    continue
                break

    def placement(self, limits: LeafLimits) -> Placement:
        return Placement(self, limits)

    def sweep(self, *, grace_s: float = SWEEP_GRACE_S, now: float | None = None) -> list[Path]:
        """Remove leaves that hold no process and are older than ``grace_s``; the removed."""
        removed: list[Path] = []
        stale_before = (time.time() if now is None else now) - grace_s
        for parent in dict.fromkeys(h.parent for h in self.hierarchies.values()):
            for leaf in stale_leaves(parent, stale_before):
                with contextlib.suppress(OSError):
                    leaf.rmdir()
                    removed.append(leaf)
        return removed

    def stale(self, *, grace_s: float = SWEEP_GRACE_S) -> list[Path]:
        """What :meth:`sweep` would remove, changing nothing."""
        stale_before = time.time() - grace_s
        parents = dict.fromkeys(h.parent for h in self.hierarchies.values())
        return [leaf for parent in parents for leaf in stale_leaves(parent, stale_before)]


class Placement:
    """A ``before_exec(name, pid)`` hook putting a new QEMU into its leaf with ``limits``; it
    remembers the leaves it made, so that a start that fails later can :meth:`undo` them."""

    def __init__(self, cgroups: Cgroups, limits: LeafLimits) -> None:
        self.cgroups = cgroups
        self.limits = limits
        self.names: list[str] = []

    def __call__(self, name: str, pid: int) -> None:
        self.names.append(name)
        self.cgroups.place(name, pid, self.limits)

    def undo(self) -> None:
        for name in self.names:
            self.cgroups.remove(name, wait_s=REMOVE_WAIT_S)


REMOVE_WAIT_S = 1.0


class Leaves:
    """One runtime's leaves: the host's controllers (looked up once), the settings' defaults
    (read at each use: ``settings()`` gives the current ones)."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self._found: tuple[Cgroups | None] | None = None

    @property
    def host(self) -> Cgroups | None:
        """This host's writable controllers; None when there are none or the setting is off."""
        if not self._settings().cgroups:
            return None
        if self._found is None:
            self._found = (detect(),)
        return self._found[0]

    @property
    def made(self) -> Cgroups | None:
        """Where leaves made so far are (also after the setting was turned off)."""
        return self.host if self._found is None else self._found[0]

    def placement(
        self, mem_mib: int, cpus: int, memory_limit_mib: int | None = None, *,
        pooled: bool = False,
    ) -> Placement | None:  # fmt: skip
        """The ``before_exec`` hook of a QEMU of this size: its leaf, with the default limits."""
        host = self.host
        if host is None:
            return None
        return host.placement(for_vm(self._settings(), mem_mib=mem_mib, cpus=cpus,
                                     memory_limit_mib=memory_limit_mib, pooled=pooled))  # fmt: skip

    def of_materializer(
        self, mem_mib: int, cpus: int
    ) -> tuple[Callable[[int], None], Callable[[], None]] | None:
        """A live branch's materializer's leaf: its ``before_exec``, and its removal."""
        place = self.placement(mem_mib, cpus)
        if place is None:
            return None
        name = f"materialize-{secrets.token_hex(6)}"
        return (lambda pid: place(name, pid)), place.undo

    def remove(self, name: str, *, wait_s: float = 0.0) -> None:
        if (made := self.made) is not None:
            made.remove(name, wait_s=wait_s)

    def sweep(self) -> None:
        if (made := self.made) is not None:
            made.sweep()


def stale_leaves(parent: Path, stale_before: float) -> list[Path]:
    out: list[Path] = []
    with contextlib.suppress(OSError):
        for leaf in sorted(parent.iterdir()):
            if leaf.is_symlink() or not leaf.is_dir():
                continue
            try:
                procs = (leaf / "cgroup.procs").read_text()
            except FileNotFoundError:
                procs = ""
            except OSError:
                continue
            try:
                old = leaf.stat().st_mtime < stale_before
            except OSError:
                continue
            empty = not procs.strip()
            if empty and old:
                out.append(leaf)
    return out


def _enable_v2(root: Path, parent: Path, controller: str) -> bool:
    """Turn ``controller`` on for ``forkd``'s children on a v2 hierarchy (root only)."""
    try:
        for d in (root, parent):
            enabled = (d / "cgroup.subtree_control").read_text().split()
            if controller not in enabled:
                _write(d / "cgroup.subtree_control", f"+{controller}")
        return True
    except OSError:
        return False


def v2_root(root: Path = CGROUP_ROOT) -> Path | None:
    """The unified (v2) hierarchy: ``root`` itself, or a hybrid host's ``root/unified``."""
    for candidate in (root, root / "unified"):
        if (candidate / "cgroup.controllers").is_file():
            return candidate
    return None


def detect(root: Path = CGROUP_ROOT) -> Cgroups | None:
    """The writable memory, pids and cpu controllers on this host, if any."""
    found: dict[str, Hierarchy] = {}
    unified = v2_root(root)
    if unified is not None:
        try:
            offered = (unified / "cgroup.controllers").read_text().split()
        except OSError:
            offered = []
        parent = unified / LEAF_PARENT
        for controller in CONTROLLERS:
            if controller not in offered:
                continue
            with contextlib.suppress(OSError):
                parent.mkdir(exist_ok=True)
                if _enable_v2(unified, parent, controller):
                    found[controller] = Hierarchy("v2", parent)
    for controller in CONTROLLERS:
        v1 = root / controller
        if controller in found or not (v1 / "cgroup.procs").is_file():
            continue
        if (v1 / "cgroup.controllers").exists():  # a v2 mount, not this controller's v1
            continue
        with contextlib.suppress(OSError):
            (v1 / LEAF_PARENT).mkdir(exist_ok=True)
            found[controller] = Hierarchy("v1", v1 / LEAF_PARENT)
    return Cgroups(found) if found else None


def available(enabled: bool = True) -> Cgroups | None:
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
