"""A typed QEMU machine spec and its argv.

The *machine* part (devices, memory size, accelerator) must be identical between a template's
parent and every child restored from it; the *instance* part (memory file and sharing, sockets,
logs, incoming) differs per process. The manifest stores ``machine_args()`` and children reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forkd.guest import AGENT_PORT_NAME
from forkd.vmm.netdev import NETDEV_ID, GuestNetwork, backend_args

# The guest's serial console goes to a ring buffer inside QEMU (read with QMP ``ringbuf-read``),
# never to a host file: a guest printing forever costs at most this much QEMU memory.
CONSOLE_RING_BYTES = 256 << 10
CONSOLE_CHARDEV = "console"

# The last three keep an idle guest asleep (an idle child's host CPU 2.0-3.0 -> 0.7 ms/s under
# TCG, where every guest wake-up is emulated): no proactive compaction (kcompactd woke twice a
# second), vmstat folded every 10 s instead of every second, no lockup watchdog timers.
KERNEL_CMDLINE = (
    "console=ttyS0 rdinit=/init quiet loglevel=3 panic=-1 tsc=reliable no_timer_check "
    "mitigations=off random.trust_cpu=on i8042.noaux i8042.nokbd i8042.nopnp "
    "nowatchdog sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10"
)


@dataclass(frozen=True)
class RunPaths:
    """Per-VM host files, all inside one run dir."""

    dir: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


@dataclass(frozen=True)
class MachineSpec:
    """Everything that defines the guest machine (and so must match across a fork)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    mem_mib: int
    accel_args: tuple[str, ...]
    cpus: int = 1
    nic: GuestNetwork | None = None
    # exact and versioned (``pc-q35-10.0``): an alias such as ``q35`` moves with QEMU upgrades
    machine_type: str = "q35"

    def machine_args(self) -> list[str]:
        cmdline = (
            KERNEL_CMDLINE if self.nic is None else f"{KERNEL_CMDLINE} {self.nic.kernel_cmdline()}"
        )

        args = [
            # No built-in devices the guest never uses: less to start and to restore per child.
            # suppress-vmdesc: no JSON self-description after a migration stream. QEMU >= 8.2
            # opens that description in the configuration section, which send-configuration=off
            # (below) leaves out, and then aborts closing it (json-writer ``depth`` assertion).
            # hpet=off: the guest kernel (6.1) leaves an HPET comparator running periodically at
            # HZ after it moves to the LAPIC timer, so QEMU's main loop woke every 4 ms in every
            # idle child: 20 ms of host CPU per second per idle child, 2.7 ms without it.
            "-machine", f"{self.machine_type},memory-backend=mem,sata=off,smbus=off,usb=off,"
            "vmport=off,smm=off,i8042=off,hpet=off,suppress-vmdesc=on",
            *self.accel_args,
            "-m", f"{self.mem_mib}M",
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot",
            # Device-state files are written by xen-save-devices-state, which emits no
            # configuration section; both ends must agree to not expect one.
            "-global", "migration.send-configuration=off",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", cmdline,
            # drop-cache=off: by default every restored QEMU evicts the image from the host page
            # cache (meant for migration over shared storage); children share one read-only image.
            "-drive", f"file={self.rootfs},format=raw,if=none,id=root,readonly=on,"
            "file.drop-cache=off",
            "-device", "virtio-blk-pci,drive=root",
            # max_ports=2 (port 0 is reserved for a console): the default 31 ports mean 64
            # virtqueues whose notifiers QEMU re-arms one by one on every start, ~6 ms per child.
            "-device", "virtio-serial-pci,id=vs0,max_ports=2",
            "-device", f"virtserialport,bus=vs0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
        if self.nic is not None:
            args += self.nic.device_args()
        # No vmgenid device: the agent reseeds every child before any user code runs, and the
        # device's ACPI notification alone costs each child ~1,500 freshly translated blocks of
        # guest AML interpreter under TCG (the 6.1 cloud kernel has no driver to use it).
        return args


def name_marker(paths: RunPaths) -> str:
    """``-name`` value naming the run dir (QEMU doubles commas inside an option value)."""
    return "forkd:" + str(paths.dir).replace(",", ",,")


BOOT_FILE_OPTIONS = ("-kernel", "-initrd", "-append")


def has_nic(machine_args: list[str]) -> bool:
    """Whether a machine (as recorded in a manifest) has the guest NIC."""
    return any(f"netdev={NETDEV_ID}," in arg for arg in machine_args)


def without_boot_files(machine_args: list[str]) -> list[str]:
    """``machine_args`` minus kernel, initrd and command line: QEMU reads those files whole at
    start-up (~17 MiB), and a guest restored from a device-state file never reads them again.
    Only for device-state-only restores: a full migration stream also carries the ROM QEMU adds
    for ``-kernel``, so whoever loads one needs the same options as the source."""
    out: list[str] = []
    args = iter(machine_args)
    for arg in args:
        if arg in BOOT_FILE_OPTIONS:
            next(args, None)
        else:
            out.append(arg)
    return out


def instance_args(
    machine_args: list[str],
    *,
    mem_mib: int,
    memory_path: Path,
    share: bool,
    paths: RunPaths,
    incoming: bool,
    restrict_network: bool = True,
) -> list[str]:
    """argv after the binary: the machine plus this process's memory, console and (for a machine
    with a NIC) its own network backend, restricted unless the host guards egress. The QMP and
    agent sockets, the seccomp filter and the log are added by ``QemuProcess.launch``."""
    # A child maps the template read-only (rom=off: its private copy stays writable), so even a
    # compromised child cannot change the pages its siblings map.
    access = "share=on" if share else "share=off,readonly=on,rom=off"
    args = [
        *machine_args,
        # align=2M: QEMU otherwise offsets guest RAM by a guard page, and a mapping that is not
        # 2 MiB aligned never gets huge pages from a huge-page tmpfs (see snapshots/memfs.py).
        "-object",
        f"memory-backend-file,id=mem,size={mem_mib}M,mem-path={memory_path},{access}"
        ",align=2M",
        "-chardev", f"ringbuf,id={CONSOLE_CHARDEV},size={CONSOLE_RING_BYTES}",
        "-serial", f"chardev:{CONSOLE_CHARDEV}",
        # host-only (not guest-visible, not in the recorded machine): merged into -machine
        "-machine", "dump-guest-core=off",
        # the run dir, for recognising this QEMU after a daemon restart (pid_runs_in)
        "-name", f"guest={name_marker(paths)}",
    ]  # fmt: skip
    if has_nic(machine_args):
        args += backend_args(restrict=restrict_network)
    if incoming:
        # -S: after the load the VM stays paused unless told to run (children are, with an early
        # ``cont``; the live-branch materializer is not).
        args += ["-S", "-incoming", "defer"]
    return args
