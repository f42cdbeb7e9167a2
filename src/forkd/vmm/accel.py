"""Choosing the accelerator: KVM where it can boot a stock kernel, TCG otherwise.

Decided from facts the kernel exposes, never by booting a probe VM, so it cannot hang. PVM hosts
(``kvm_pvm`` loaded, no vmx/svm CPU flag) open ``/dev/kvm`` fine but only run PVM-built guests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AccelName = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class AccelChoice:
    name: AccelName
    reason: str

    def qemu_args(self) -> list[str]:
        """The only place the two accelerators differ."""
        if self.name == "kvm":
            # no nested virtualization for guests: a guest-reachable KVM surface the host's own
            # KVM would have to defend (new templates; recorded ones keep their CPU)
            return ["-accel", "kvm", "-cpu", "host,-vmx,-svm"]
        # A bounded translation cache keeps per-child memory small.
        return ["-accel", "tcg,tb-size=64", "-cpu", "max"]

    @property
    def default_cpus(self) -> int:
        """vCPUs of a template that asks for none. KVM: 2, forkd v0.5's default (a second
        vCPU costs a thread and a few KiB). TCG: 1: each vCPU is a host thread translating
        guest code on its own, so under emulation a second one roughly doubles the CPU a fan-out
        burns for little guest speed-up on the few-core hosts that run TCG."""
        return 2 if self.name == "kvm" else 1


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_accel(
    requested: str = "auto",
    *,
    dev_kvm: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> AccelChoice:
    """Pick the accelerator, with the reason in words ``forkd doctor`` can show."""
    if requested == "tcg":
        return AccelChoice("tcg", "TCG requested (FORKD_ACCEL=tcg)")
    if requested not in ("auto", "kvm"):
        return AccelChoice("tcg", f"unknown accelerator {requested!r} requested; using TCG")
    forced = requested == "kvm"
    if not dev_kvm.exists():
        return AccelChoice("tcg", "no /dev/kvm on this host: software emulation (TCG)")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{dev_kvm} is not readable and writable by this user: TCG")
    try:
        flags = _cpu_flags(cpuinfo.read_text())
    except OSError:
        flags = set()
    has_vt = bool(flags & {"vmx", "svm"})
    if (sys_module / "kvm_pvm").exists() and not has_vt:
        return AccelChoice(
            "tcg",
            "KVM here is PVM (kvm_pvm loaded, no vmx/svm CPU flag): it cannot boot a stock "
            "kernel, so TCG",
        )
    if has_vt and ((sys_module / "kvm_intel").exists() or (sys_module / "kvm_amd").exists()):
        return AccelChoice("kvm", "KVM usable: /dev/kvm open and hardware virtualization present")
    if forced:
        return AccelChoice("kvm", "KVM forced by FORKD_ACCEL=kvm")
    return AccelChoice("tcg", "/dev/kvm exists but no vmx/svm CPU flag with kvm_intel/kvm_amd: TCG")
