"""The installed QEMU's machine types; whether a recorded machine fits an upgraded QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forkd.errors import HostSetupError
from forkd.vmm.machine import (
    QemuBuild,
    incompatibility,
    machine_type_of,
    parse_machine_help,
    parse_version,
    probe_qemu,
    require_supported,
)
from forkd.vmm.spec import MachineSpec, RunPaths, instance_args

HELP = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)
pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)
pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)
pc-q35-9.2           Standard PC (Q35 + ICH9, 2009)
"""


def build(version: tuple[int, int, int] = (10, 0, 2)) -> QemuBuild:
    types, aliases = parse_machine_help(HELP)
    return QemuBuild("/usr/bin/qemu-system-x86_64", version, types, aliases)


def machine(machine_type: str) -> list[str]:
    return ["-machine", f"{machine_type},memory-backend=mem,smm=off", "-m", "512M"]


def test_machine_help_parses_types_and_aliases() -> None:
    b = build()
    assert b.resolve("q35") == "pc-q35-10.0"
    assert b.resolve("pc-q35-9.2") == "pc-q35-9.2"
    assert {"pc-q35-10.0", "pc-q35-9.2", "q35", "microvm"} <= b.machine_types
    assert parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert parse_version("QEMU emulator version 8.2") == (8, 2, 0)


def test_recorded_exact_type_must_be_offered() -> None:
    assert incompatibility(machine("pc-q35-10.0"), "10.0.2", build()) is None
    # An older exact type stays loadable after an upgrade (QEMU keeps versioned machines).
    assert incompatibility(machine("pc-q35-9.2"), "9.2.0", build()) is None
    reason = incompatibility(machine("pc-q35-11.0"), "11.0.0", build())
    assert reason is not None and "pc-q35-11.0" in reason and "10.0.2" in reason


def test_unversioned_alias_only_fits_the_same_qemu_release() -> None:
    assert incompatibility(machine("q35"), "10.0.1", build()) is None
    reason = incompatibility(machine("q35"), "7.2.19", build())
    assert reason is not None and "7.2.19" in reason and "make the template again" in reason
    assert incompatibility(["-m", "512M"], "10.0.2", build()) == (
        "the manifest records no machine type"
    )


def test_old_qemu_is_refused_with_the_fix() -> None:
    with pytest.raises(HostSetupError, match="bookworm-backports"):
        require_supported(build((7, 2, 19)))
    require_supported(build((8, 2, 0)))


def test_spec_records_the_exact_type_and_children_map_read_only() -> None:
    spec = MachineSpec(
        kernel=Path("/k"), initrd=Path("/i"),
        rootfs=Path("/r"), mem_mib=512, accel_args=("-accel", "tcg"),
        machine_type="pc-q35-10.0",
    )  # fmt: skip
    args = spec.machine_args()
    assert machine_type_of(args) == "pc-q35-10.0"
    paths = RunPaths(Path("/run/x"))
    child = " ".join(
        instance_args(args, mem_mib=512, memory_path=Path("/m"), share=False, paths=paths,
                      incoming=True)
    )  # fmt: skip
    parent = " ".join(
        instance_args(args, mem_mib=512, memory_path=Path("/m"), share=True, paths=paths,
                      incoming=False)
    )  # fmt: skip
    assert "share=off,readonly=on,rom=off" in child
    assert "share=on" in parent and "readonly=on,rom" not in parent


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU installed")
def test_probe_of_the_installed_qemu() -> None:
    b = probe_qemu(shutil.which("qemu-system-x86_64") or "")
    assert b.resolve("q35").startswith("pc-q35-")
    assert b.resolve("q35") in b.machine_types
