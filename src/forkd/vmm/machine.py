"""The installed QEMU: its version, its machine types, and whether a recorded machine still fits.

A template's device state only loads into the machine type that saved it. ``q35`` is an alias
that moves with every QEMU release, so templates record the exact versioned type (for example
``pc-q35-10.0``) and a QEMU upgrade that drops it refuses the template with the reason instead of
failing mid-restore.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from forkd.errors import HostSetupError

# 8.2: ``memory-backend-file`` ``rom=off`` (children map the template read-only yet write their
# private copy), and userfaultfd via /dev/userfaultfd for unprivileged live branches.
MIN_QEMU = (8, 2)
MACHINE_FAMILY = "q35"
_VERSION = re.compile(r"version (\d+)\.(\d+)\.?(\d*)")
_ALIAS = re.compile(r"^(\S+)\s.*\(alias of (\S+)\)")


@dataclass(frozen=True)
class QemuBuild:
    """What one QEMU binary offers, as it says itself."""

    binary: str
    version: tuple[int, int, int]
    machine_types: frozenset[str]
    aliases: dict[str, str]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def resolve(self, machine_type: str) -> str:
        """The exact type behind an alias such as ``q35``."""
        return self.aliases.get(machine_type, machine_type)


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION.search(text)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def parse_machine_help(text: str) -> tuple[frozenset[str], dict[str, str]]:
    """Machine types and aliases from ``qemu-system-x86_64 -machine help``."""
    types: set[str] = set()
    aliases: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        name = line.split()[0]
        types.add(name)
        m = _ALIAS.match(line)
        if m:
            aliases[m[1]] = m[2]
    return frozenset(types), aliases


def probe_qemu(binary: str) -> QemuBuild:
    """Ask ``binary`` for its version and machine types (two short runs, no guest)."""
    try:
        version_out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
        machines_out = subprocess.run(
            [binary, "-machine", "help"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostSetupError(f"cannot run {binary}: {exc}") from exc
    version = parse_version(version_out)
    if version is None:
        raise HostSetupError(f"cannot read the version of {binary}: {version_out[:200]!r}")
    types, aliases = parse_machine_help(machines_out)
    return QemuBuild(binary, version, types, aliases)


def require_supported(build: QemuBuild) -> None:
    """Refuse a QEMU older than forkd needs, with the fix."""
    if build.version[:2] < MIN_QEMU:
        need = ".".join(map(str, MIN_QEMU))
        raise HostSetupError(
            f"QEMU {build.version_text} at {build.binary} is too old: forkd needs >= {need} "
            "(children map templates read-only; live branches need /dev/userfaultfd). On Debian 12 "
            "run scripts/setup.sh install, which installs QEMU from bookworm-backports"
        )


def machine_type_of(machine_args: list[str]) -> str | None:
    """The machine type in recorded ``-machine TYPE,opts`` arguments."""
    args = iter(machine_args)
    for arg in args:
        if arg == "-machine":
            value = next(args, "")
            return value.split(",", 1)[0] or None
    return None


def incompatibility(machine_args: list[str], recorded_qemu: str, build: QemuBuild) -> str | None:
    """None if ``build`` can restore a machine recorded by QEMU ``recorded_qemu``, else why not."""
    machine_type = machine_type_of(machine_args)
    if machine_type is None:
        return "the manifest records no machine type"
    if machine_type in build.aliases:
        # Made before machine types were recorded: the alias meant that QEMU's own type.
        recorded = parse_version(f"version {recorded_qemu}")
        if recorded is None or recorded[:2] != build.version[:2]:
            return (
                f"made by QEMU {recorded_qemu} with the unversioned machine {machine_type!r}; "
                f"this host runs QEMU {build.version_text}: make the template again"
            )
        return None
    if machine_type not in build.machine_types:
        return (
            f"machine type {machine_type!r} (QEMU {recorded_qemu}) is not offered by QEMU "
            f"{build.version_text} at {build.binary}: make the template again"
        )
    return None
