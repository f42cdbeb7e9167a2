"""The jail's command line and file preparation (no QEMU started; tests/vm/test_jail.py runs
real jailed QEMUs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import HostSetupError, InvalidInput
from forkd.vmm import jail as jails

ARGV = [
    "-machine", "q35", "-kernel", "/img/vmlinuz", "-initrd", "/img/initrd.img",
    "-drive", "file=/img/root,,fs.img,format=raw,if=none,id=root,readonly=on",
    "-object", "memory-backend-file,id=mem,size=512M,mem-path=/shm/t.mem,share=off,readonly=on",
]  # fmt: skip

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def test_files_of_a_command_line() -> None:
    ro, memory = jails.files_of(ARGV)
    assert ro == [Path("/img/vmlinuz"), Path("/img/initrd.img"), Path("/img/root,fs.img")]
    assert memory == jails.MemoryFile(Path("/shm/t.mem"), 512 << 20, share=False)


@root_only
def test_template_group_is_fresh_stable_and_read_only(tmp_path: Path) -> None:
    jail = jails.Jail()
    mem = tmp_path / "t.mem"
    mem.write_bytes(b"\0" * 4096)
    os.chmod(mem, 0o600)
    gid = jails.template_gid(jail, mem)
    assert jail.is_template_gid(gid) and not jail.is_vm_uid(gid)
    st = mem.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640)
    assert jails.template_gid(jail, mem) == gid


@root_only
def test_writable_memory_is_sized_and_the_vms_alone(tmp_path: Path) -> None:
    mem = tmp_path / "parent.mem"
    uid = jails.allocate_uid(jails.Jail())
    try:
        jails.prepare_writable_memory(mem, 4 << 20, uid)
    finally:
        jails.release_uid(uid)
    st = mem.stat()
    assert (st.st_size, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4 << 20, uid, uid,
                                                                             0o600)  # fmt: skip


@root_only
def test_the_bwrap_command_line(tmp_path: Path) -> None:
    mem = tmp_path / "t.mem"
    mem.write_bytes(b"\0" * 4096)
    argv = [a.replace("/shm/t.mem", str(mem)) for a in ARGV]
    jail = jails.Jail(devices={"userfaultfd": tmp_path / "uffd"})
    launch = jails.build(jail, "/usr/bin/qemu-system-x86_64", argv, info_fd=7, block_fd=8,
                         new_netns=False)  # fmt: skip
    jails.release_uid(launch.uid)
    a = launch.argv
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--as-pid-1",
                 "--new-session", "--clearenv", "--no-new-privs", "--bounding-set=-all",
                 "--inh-caps=-all"):  # fmt: skip
        assert flag in a, flag
    assert "--unshare-net" not in a
    assert a[a.index("--info-fd") + 1] == "7" and a[a.index("--block-fd") + 1] == "8"
    assert f"--reuid={launch.uid}" in a and f"--regid={launch.uid}" in a
    assert launch.groups == (os.stat(mem).st_gid, jail.device_gid)
    i = a.index(str(mem))
    assert a[i - 1] == "--ro-bind"  # a child's template: read-only
    assert ["--dev-bind", str(tmp_path / "uffd"), "/dev/userfaultfd"] == a[
        a.index("--dev-bind") : a.index("--dev-bind") + 3
    ]
    env = a.index("-i")
    assert a[env + 1 : env + 3] == ["PATH=/usr/bin:/bin", "/usr/bin/qemu-system-x86_64"]
    assert a[env + 3 :] == argv
    net = jails.build(jail, "/usr/bin/qemu-system-x86_64", argv, info_fd=7, block_fd=8,
                      new_netns=True)  # fmt: skip
    jails.release_uid(net.uid)
    assert "--unshare-net" in net.argv and net.uid != launch.uid


def test_settings() -> None:
    assert Settings().jail == "auto"
    with pytest.raises(InvalidInput, match="FORKD_JAIL"):
        Settings(jail="maybe")
    with pytest.raises(InvalidInput, match="FORKD_JAIL_ID_BASE"):
        Settings(jail_id_base=5)
    assert jails.configure("off", Path("/nonexistent")) is None
    with pytest.raises(HostSetupError, match="FORKD_JAIL must be"):
        jails.configure("sometimes", Path("/nonexistent"))
