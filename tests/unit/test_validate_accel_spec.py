from __future__ import annotations

import stat
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import InvalidInput
from forkd.images.initramfs import CpioEntry, encode_newc
from forkd.validate import validate_count, validate_sandbox_id, validate_tag
from forkd.vmm.accel import detect_accel
from forkd.vmm.spec import MachineSpec, RunPaths, instance_args, without_boot_files


@pytest.mark.parametrize("tag", ["py", "A-b_9", "x" * 64])
def test_good_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "x" * 65, "../x", "a/b", "a.b", "a b", None, 3, "é"])
def test_bad_tags(tag: object) -> None:
    with pytest.raises(InvalidInput, match="invalid snapshot tag"):
        validate_tag(tag)


@pytest.mark.parametrize(("n", "msg"), [(0, "at least 1"), (1001, "at most 1000"),
                                        (True, "integer"), ("3", "integer")])  # fmt: skip
def test_bad_counts(n: object, msg: str) -> None:
    with pytest.raises(InvalidInput, match=msg):
        validate_count(n)


def test_sandbox_ids() -> None:
    assert validate_sandbox_id("sb-0a1b") == "sb-0a1b"
    with pytest.raises(InvalidInput):
        validate_sandbox_id("../../etc")


def _fake_host(tmp: Path, *, modules: list[str], flags: str, kvm: bool = True) -> dict[str, Path]:
    (tmp / "module").mkdir()
    for m in modules:
        (tmp / "module" / m).mkdir()
    (tmp / "cpuinfo").write_text(f"processor : 0\nflags\t\t: fpu sse2 {flags}\n")
    dev = tmp / "kvm"
    if kvm:
        dev.write_text("")
    return {"dev_kvm": dev, "sys_module": tmp / "module", "cpuinfo": tmp / "cpuinfo"}


def test_pvm_host_falls_back_to_tcg(tmp_path: Path) -> None:
    choice = detect_accel(**_fake_host(tmp_path, modules=["kvm", "kvm_pvm"], flags="lm"))
    assert choice.name == "tcg" and "PVM" in choice.reason
    assert "-accel" in choice.qemu_args() and "kvm" not in " ".join(choice.qemu_args())


def test_vt_host_uses_kvm(tmp_path: Path) -> None:
    choice = detect_accel(**_fake_host(tmp_path, modules=["kvm", "kvm_intel"], flags="vmx lm"))
    assert choice.name == "kvm"
    assert choice.qemu_args()[:2] == ["-accel", "kvm"]


def test_no_dev_kvm_is_tcg(tmp_path: Path) -> None:
    choice = detect_accel(**_fake_host(tmp_path, modules=[], flags="vmx", kvm=False))
    assert choice.name == "tcg" and "no /dev/kvm" in choice.reason


def test_tcg_can_be_forced(tmp_path: Path) -> None:
    host = _fake_host(tmp_path, modules=["kvm", "kvm_intel"], flags="vmx")
    assert detect_accel("tcg", **host).name == "tcg"


def test_newc_archive_layout() -> None:
    data = encode_newc([CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n")])
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"init\0" in data and b"TRAILER!!!\0" in data
    # filesize field (7th) of the first header is the content length
    assert int(data[6 + 6 * 8 : 6 + 7 * 8], 16) == len(b"#!/bin/sh\n")


def test_child_argv_differs_from_parent_only_in_instance_parts(tmp_path: Path) -> None:
    spec = MachineSpec(tmp_path / "k", tmp_path / "i", tmp_path / "r", 256, ("-accel", "tcg"))
    machine = spec.machine_args()
    paths = RunPaths(tmp_path / "run")
    parent = instance_args(machine, mem_mib=256, memory_path=tmp_path / "m", share=True,
                           paths=paths, incoming=False)  # fmt: skip
    child = instance_args(machine, mem_mib=256, memory_path=tmp_path / "m", share=False,
                          paths=paths, incoming=True)  # fmt: skip
    assert parent[: len(machine)] == child[: len(machine)] == machine
    assert any("share=on" in a for a in parent) and any("share=off" in a for a in child)
    assert child[-2:] == ["-incoming", "defer"] and "-incoming" not in parent


def test_restored_children_skip_the_boot_files(tmp_path: Path) -> None:
    spec = MachineSpec(tmp_path / "k", tmp_path / "i", tmp_path / "r", 256, ("-accel", "tcg"))
    machine = spec.machine_args()
    child = without_boot_files(machine)
    assert not {"-kernel", "-initrd", "-append"} & set(child)
    assert not any(str(tmp_path / "k") in a or str(tmp_path / "i") in a for a in child)
    # everything else (devices, memory size, accelerator) is kept, in order
    assert [a for a in machine if a in child] == child and len(machine) - len(child) == 6


def test_memory_dir_is_on_shm_and_unique_per_home(tmp_path: Path) -> None:
    a = Settings(home=tmp_path / "a")
    b = Settings(home=tmp_path / "b")
    assert a.memory_dir.parent == Path("/dev/shm")
    assert a.memory_dir != b.memory_dir


def test_launch_parallelism_follows_the_host_cpus() -> None:
    from forkd.runtime.engine import MAX_PARALLEL_LAUNCHES, launch_parallelism

    assert launch_parallelism(1) == 2
    assert launch_parallelism(2) == 3  # this box: a QEMU start-up per core and one waiting
    assert launch_parallelism(8) == 9
    assert launch_parallelism(64) == MAX_PARALLEL_LAUNCHES
