"""Whether a template made on another host can be restored here.

A child loads the template's device state into a QEMU started with the template's machine
arguments, so it needs a QEMU that knows the machine type and is not older than the one that
saved the state, the same accelerator, and (KVM ``-cpu host``) every CPU feature the guest saw.
"""

from __future__ import annotations

import re
from pathlib import Path

from forkd.errors import HostSetupError
from forkd.hub.format import HostFacts
from forkd.runtime.engine import Runtime
from forkd.snapshots.manifest import SnapshotManifest
from forkd.vmm import machine

_VERSIONED_TYPE = re.compile(r"^pc-(?:q35|i440fx)-(\d+)\.(\d+)$")


def _arg_after(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            return args[i + 1]
    return None


def machine_type(machine_args: list[str]) -> str:
    value = _arg_after(machine_args, "-machine") or _arg_after(machine_args, "-M") or "pc"
    return value.split(",", 1)[0].removeprefix("type=")


def cpu_model(machine_args: list[str]) -> str | None:
    value = _arg_after(machine_args, "-cpu")
    return value.split(",", 1)[0] if value else None


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str]]:
    vendor: str | None = None
    flags: list[str] = []
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(value.split())
    return vendor, flags


def facts_of(manifest: SnapshotManifest) -> HostFacts:
    """The facts a template depends on (KVM: with this host's CPU, which made it)."""
    model = cpu_model(manifest.machine_args)
    vendor, flags = cpu_identity() if model == "host" else (None, None)
    return HostFacts(
        qemu_version=manifest.qemu_version,
        machine_type=machine_type(manifest.machine_args),
        accel=manifest.accel,
        cpu_model=model,
        cpu_flags=flags,
        cpu_vendor=vendor,
    )


def parse_version(text: str) -> tuple[int, int, int] | None:
    return machine.parse_version(f"version {text}")


def incompatibility(
    facts: HostFacts,
    *,
    accel: str,
    qemu_version: tuple[int, int, int] | None,
    machine_types: dict[str, str],
    cpu: tuple[str | None, list[str]] | None,
) -> str | None:
    """None if a template with ``facts`` restores on a host with these properties, else why."""
    if facts.accel != accel:
        return (f"it was made under {facts.accel} and this host runs {accel}: device state "
                "does not move between accelerators")  # fmt: skip
    theirs = parse_version(facts.qemu_version)
    if theirs is None:
        return f"it names an unreadable QEMU version {facts.qemu_version!r}"
    if qemu_version is None:
        return "this host's QEMU version could not be read"
    if qemu_version[:2] < theirs[:2]:
        here = ".".join(map(str, qemu_version))
        return (f"it was made by QEMU {facts.qemu_version} and this host has QEMU {here}: an "
                "older QEMU cannot load newer state")  # fmt: skip
    mtype = facts.machine_type
    if mtype not in machine_types:
        return f"machine type {mtype!r} is not supported by this host's QEMU"
    if not _VERSIONED_TYPE.match(mtype) and theirs[:2] != qemu_version[:2]:
        # An unversioned type is an alias of the QEMU's newest: another QEMU is another machine.
        return (f"machine type {mtype!r} is an alias whose meaning changes between QEMU "
                f"versions, and it was made by QEMU {facts.qemu_version}, not this host's "
                f"{'.'.join(map(str, qemu_version))}")  # fmt: skip
    if facts.cpu_model == "host":
        if cpu is None:
            return "it needs the host CPU's features and this host's CPU could not be read"
        vendor, flags = cpu
        if facts.cpu_vendor and vendor != facts.cpu_vendor:
            return f"it was made on a {facts.cpu_vendor} CPU and this host's is {vendor}"
        missing = sorted(set(facts.cpu_flags or ()) - set(flags))
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            return f"this host's CPU lacks features the template's guest uses: {shown}"
    return None


def check_here(facts: HostFacts, runtime: Runtime) -> str | None:
    """None if this host (its accelerator, QEMU, CPU) restores a template with ``facts``."""
    try:
        build = runtime.qemu
    except HostSetupError as exc:
        return str(exc)
    types = {t: build.resolve(t) for t in build.machine_types}
    cpu = cpu_identity() if facts.cpu_model == "host" else None
    return incompatibility(facts, accel=runtime.accel.name, qemu_version=build.version,
                           machine_types=types, cpu=cpu)  # fmt: skip
