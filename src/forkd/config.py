"""The one configuration object of forkd, read from the environment once and passed down."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from forkd.errors import InvalidInput

DEFAULT_BIND = "127.0.0.1:8889"
DEFAULT_IMAGE = "python"
DEFAULT_MEM_MIB = 512
MiB = 1024 * 1024


def _default_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "forkd"


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{name} must be 1 or 0, got {raw!r}")


def _cgroup_limit(name: str, raw: str, *, floats: bool = False) -> float | str | None:
    """A limit setting: ``off`` (no limit), ``auto`` (CPUs only), or a number."""
    value = raw.strip().lower()
    if value in ("off", "none", "max"):
        return None
    if floats and value == "auto":
        return "auto"
    try:
        return float(value) if floats else int(value)
    except ValueError:
        choices = "auto, off or a number" if floats else "off or an integer"
        raise InvalidInput(f"{name} must be {choices}, got {raw!r}") from None


def _default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "forkd"


@dataclass(frozen=True)
class Limits:
    """Bounds the daemon puts on each request (seconds unless stated).

    Every runtime call is wrapped in the matching timeout; when it expires the call is cancelled
    (the runtime cleans up on cancellation) and the client gets 504 instead of a hang.
    """

    max_body_bytes: int = 64 * MiB
    exec_margin_s: float = 30.0
    eval_timeout_s: float = 300.0
    agent_call_timeout_s: float = 120.0  # ping, files
    spawn_timeout_s: float = 300.0
    spawn_per_child_s: float = 2.0
    kill_timeout_s: float = 60.0
    snapshot_timeout_s: float = 1800.0  # create, compact, delete
    branch_timeout_s: float = 900.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        """Defaults, overridden by ``FORKD_<FIELD>`` variables (e.g. ``FORKD_EVAL_TIMEOUT_S``)."""
        env = os.environ if environ is None else environ
        limits = cls()
        for f in fields(cls):
            raw = env.get(f"FORKD_{f.name.upper()}")
            if raw is None:
                continue
            name = f"FORKD_{f.name.upper()}"
            try:
                value: float = int(raw) if f.type in (int, "int") else float(raw)
            except ValueError:
                raise InvalidInput(f"{name} must be a number, got {raw!r}") from None
            if not value > 0:
                raise InvalidInput(f"{name} must be positive, got {raw!r}")
            changes: dict[str, Any] = {f.name: value}
            limits = replace(limits, **changes)
        return limits


@dataclass(frozen=True)
class Settings:
    """Where forkd keeps its state and the bounds it enforces.

    ``home`` holds images, manifests, run dirs and the database; ``cache_dir`` the downloaded
    kernel and debootstrap trees (shared by every home); ``shm_dir`` (on tmpfs) holds
    guest memory files, which must live on shmem for copy-on-write forks and live BRANCH.
    ``huge_memory``: when ``shm_dir`` is not set and forkd runs as root, mount a tmpfs with
    transparent huge pages at the default memory dir (shorter live-BRANCH pauses).
    ``cgroups``: every QEMU gets a cgroup leaf before it runs (:mod:`forkd.runtime.cgroups`)
    with a memory limit of twice guest RAM + ``cgroup_memory_overhead_mib`` (or the spawn's
    ``memory_limit_mib``), ``cgroup_pids_max`` tasks and ``cgroup_cpus`` CPUs (``"auto"``: its
    vCPU count); pool members wait at CPU weight ``cgroup_pool_weight`` (100 is normal). None
    turns one limit off. ``False`` (``FORKD_CGROUPS=0``) behaves as a host without cgroups: a
    ``memory_limit_mib`` is accepted but not enforced, and the spawn answer's ``warning`` says so.
    """

    home: Path = field(default_factory=_default_home)
    cache_dir: Path = field(default_factory=_default_cache)
    shm_dir: Path | None = None
    huge_memory: bool = True
    accel: str = "auto"
    max_sandboxes: int = 256
    branch_concurrency: int = 4
    # a live branch of a sandbox holding at most this much of its own memory is taken during a
    # pause, as diff is (0: always stream RAM with QEMU's background snapshot)
    live_inline_mib: int = 64
    default_exec_timeout_s: float = 30.0
    max_exec_timeout_s: float = 3600.0
    exec_output_cap_bytes: int = 4 * 1024 * 1024
    warm_pool_size: int = 2
    # egress of a sandbox (and template warm-up) whose request names none: "none" or "internet"
    default_egress: str = "none"
    cgroups: bool = True
    cgroup_memory_overhead_mib: int | None = 256
    cgroup_pids_max: int | None = 256
    cgroup_cpus: float | Literal["auto"] | None = "auto"
    cgroup_pool_weight: int | None = 10
    # "auto": every QEMU jailed where the host can (forkd.vmm.jail); "required": refuse to run
    # QEMU unjailed; "off": QEMU runs as forkd's user with its seccomp filter only
    jail: str = "auto"
    jail_id_base: int = 0x5F000000
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Build settings from ``FORKD_*`` environment variables, then apply ``overrides``."""
        values: dict[str, object] = {}
        if home := os.environ.get("FORKD_HOME"):
            values["home"] = Path(home)
        if cache := os.environ.get("FORKD_CACHE_DIR"):
            values["cache_dir"] = Path(cache)
        if shm := os.environ.get("FORKD_SHM_DIR"):
            values["shm_dir"] = Path(shm)
        if huge := os.environ.get("FORKD_HUGE_MEMORY"):
            values["huge_memory"] = _flag("FORKD_HUGE_MEMORY", huge)
        if cgroups := os.environ.get("FORKD_CGROUPS"):
            values["cgroups"] = _flag("FORKD_CGROUPS", cgroups)
        for name in ("memory_overhead_mib", "pids_max", "cpus", "pool_weight"):
            var = f"FORKD_CGROUP_{name.upper()}"
            if (raw := os.environ.get(var)) is not None:
                values[f"cgroup_{name}"] = _cgroup_limit(var, raw, floats=name == "cpus")
        if jail := os.environ.get("FORKD_JAIL"):
            values["jail"] = jail.strip().lower()
        if id_base := os.environ.get("FORKD_JAIL_ID_BASE"):
            try:
                values["jail_id_base"] = int(id_base, 0)
            except ValueError:
                msg = f"FORKD_JAIL_ID_BASE must be an integer, got {id_base!r}"
                raise InvalidInput(msg) from None
        if accel := os.environ.get("FORKD_ACCEL"):
            values["accel"] = accel
        if pool := os.environ.get("FORKD_WARM_POOL"):
            values["warm_pool_size"] = int(pool)
        if maxsb := os.environ.get("FORKD_MAX_SANDBOXES"):
            values["max_sandboxes"] = int(maxsb)
        if egress := os.environ.get("FORKD_DEFAULT_EGRESS"):
            values["default_egress"] = egress
        if cap := os.environ.get("FORKD_BRANCH_CONCURRENCY"):
            try:
                values["branch_concurrency"] = int(cap)
            except ValueError:
                msg = f"FORKD_BRANCH_CONCURRENCY must be an integer, got {cap!r}"
                raise InvalidInput(msg) from None
        if inline := os.environ.get("FORKD_LIVE_INLINE_MIB"):
            try:
                values["live_inline_mib"] = int(inline)
            except ValueError:
                msg = f"FORKD_LIVE_INLINE_MIB must be an integer, got {inline!r}"
                raise InvalidInput(msg) from None
        values["limits"] = Limits.from_env()
        values.update({k: v for k, v in overrides.items() if v is not None})
        branch_cap = values.get("branch_concurrency", 1)
        if not isinstance(branch_cap, int) or branch_cap < 1:
            raise InvalidInput(f"branch concurrency must be at least 1, got {branch_cap!r}")
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.live_inline_mib < 0:
            msg = f"FORKD_LIVE_INLINE_MIB must be 0 or more, got {self.live_inline_mib}"
            raise InvalidInput(msg)
        if self.jail not in ("off", "auto", "required"):
            raise InvalidInput(f"FORKD_JAIL must be off, auto or required, got {self.jail!r}")
        if not 1 << 16 <= self.jail_id_base <= (1 << 31) - (1 << 24):
            raise InvalidInput(
                f"FORKD_JAIL_ID_BASE must leave 2^24 ids below 2^31, got {self.jail_id_base}"
            )
        for name, low, high in (
            ("cgroup_memory_overhead_mib", 0, 1 << 20),
            ("cgroup_pids_max", 16, 1 << 22),
            ("cgroup_pool_weight", 1, 10000),
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and low <= value <= high):
                raise InvalidInput(
                    f"FORKD_{name.upper()} must be {low}..{high} or off, got {value!r}"
                )
        cpus = self.cgroup_cpus
        if (
            cpus is not None
            and cpus != "auto"
            and not (isinstance(cpus, (int, float)) and 0.01 <= cpus <= 4096)
        ):
            raise InvalidInput(f"FORKD_CGROUP_CPUS must be auto, off or 0.01..4096, got {cpus!r}")
        if self.default_egress not in ("none", "internet"):
            raise InvalidInput(
                f"default egress must be 'none' or 'internet' (an allow-list is per sandbox), "
                f"got {self.default_egress!r}"
            )

    @property
    def mounts_huge_memory(self) -> bool:
        """Whether forkd may mount its huge-page tmpfs at ``memory_dir`` (never over a dir the
        user chose)."""
        return self.huge_memory and self.shm_dir is None

    @property
    def memory_dir(self) -> Path:
        """tmpfs folder for guest memory files; unique per home so two homes never collide."""
        if self.shm_dir is not None:
            return self.shm_dir
        return Path("/dev/shm") / f"forkd-{self.home_key}"

    @property
    def home_key(self) -> str:
        """A short name of this home, for host-wide things it must not share with other homes
        (its default memory dir, its egress-guard tables)."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def db_path(self) -> Path:
        return self.home / "forkd.db"

    @property
    def audit_log_path(self) -> Path:
        return self.home / "audit.log"
