"""Every QEMU runs jailed: each property read from /proc of a running child, and what a VM's uid
can no longer do (docs/security.md)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from forkd.errors import ForkdError
from forkd.runtime.engine import Runtime
from forkd.vmm import jail as jails
from forkd.vmm.qemu import QemuProcess, pid_runs_in
from forkd.vmm.spec import RunPaths

pytestmark = pytest.mark.vm

NAMESPACES = ("mnt", "pid", "ipc", "uts")


def _status(pid: int | str, task: str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _jail(runtime: Runtime) -> jails.Jail:
    if runtime.jail is None:
        pytest.skip(f"QEMU is not jailed here: {jails.probe() or 'FORKD_JAIL=off'}")
    return runtime.jail


def _as_vm(pid: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process with the uid, gid and groups of QEMU ``pid``, without
    capabilities (a stand-in for that QEMU after an escape from the guest)."""
    st = _status(pid)
    uid, gid = st["Uid"].split()[0], st["Gid"].split()[0]
    groups = ",".join(st["Groups"].split())
    python = shutil.which("python3") or "python3"
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
           f"--groups={groups}" if groups else "--clear-groups",
           "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
           python, "-I", "-c", code]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


OPEN = """
import errno, os, sys
try:
    os.close(os.open(sys.argv[1], getattr(os, sys.argv[2])))
    print("opened")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def _try_open(pid: int, path: str, flag: str = "O_RDONLY") -> str:
    code = OPEN.replace("sys.argv[1]", repr(path)).replace("sys.argv[2]", repr(flag))
    return _as_vm(pid, code).stdout.strip()


async def test_a_child_runs_jailed(runtime: Runtime, template: str) -> None:
    jail = _jail(runtime)
    a, b = (s.sandbox for s in await runtime.spawn(template, 2))
    manifest = runtime.snapshots.load(template)
    memory = manifest.memory.path
    try:
        uids = set()
        for sb in (a, b):
            pid = sb.pid
            st = _status(pid)
            uid = int(st["Uid"].split()[0])
            assert jail.is_vm_uid(uid)
            assert st["Uid"].split() == [str(uid)] * 4
            assert st["Gid"].split() == [str(uid)] * 4
            uids.add(uid)
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(st[cap], 16) == 0, cap
            assert st["NoNewPrivs"] == "1"
            tasks = os.listdir(f"/proc/{pid}/task")
            assert len(tasks) > 1
            assert all(_status(pid, t)["Seccomp"] == "2" for t in tasks)
            assert st["NSpid"].split()[-1] == "1"  # pid 1 of its own pid namespace
            for ns in NAMESPACES:
                assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
            # its own network namespace, NIC or not (docs/security.md)
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert Path(f"/proc/{pid}/environ").read_bytes() == b"PATH=/usr/bin:/bin\0"
            root = Path(f"/proc/{pid}/root")
            assert {"usr", "dev"} <= set(os.listdir(root))
            for host_only in ("home", "root", "proc", "sys", "var", "etc/passwd", "etc/shadow"):
                assert not (root / host_only).exists(), host_only
            assert not (root / "usr/bin/python3").exists()
            assert (root / "dev/userfaultfd").exists()
            # of the host's files only QEMU's own and this guest's are there
            allowed = {manifest.rootfs, memory}
            assert not (root / "etc").exists()
            for top, dirs, files in os.walk(root):
                rel = "/" + os.path.relpath(top, root).lstrip(".")
                if rel.startswith("/dev"):
                    dirs.clear()
                    continue
                for f in files:
                    path = os.path.join(rel, f).replace("//", "/")
                    assert path.startswith("/usr/") or path in allowed, path
            # The template: mapped privately, through descriptors opened read-only.
            maps = [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
                    if ln.endswith(memory)]  # fmt: skip
            assert maps and all(ln.split()[1].endswith("p") for ln in maps)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_path = f"/proc/{pid}/fd/{fd}"
                if os.readlink(with_path) == memory:
                    flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[3], 8)
                    assert flags & os.O_ACCMODE == os.O_RDONLY
            # only the files it needs: its log, image and memory (and sockets, eventfds and the
            # like); none of the daemon's
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/"):
                    log = str(RunPaths(Path(sb.run_dir or "")).qemu_log)
                    assert target.startswith("/dev/") or target in {*allowed, log}, target
        assert len(uids) == 2
        st = os.stat(memory)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o640)
        assert jail.is_template_gid(st.st_gid)
    finally:
        for sb in (a, b):
            await runtime.kill(sb.id)


async def test_a_vm_uid_cannot_reach_a_sibling_or_a_template(
    runtime: Runtime, template: str, tmp_path: Path
) -> None:
    jail = _jail(runtime)
    a, b = (s.sandbox for s in await runtime.spawn(template, 2))
    manifest = runtime.snapshots.load(template)
    try:
        # its own template, as its jail shows it: readable (it maps it), never writable
        inside = f"/proc/{b.pid}/root{manifest.memory.path}"
        assert _try_open(b.pid, inside) == "opened"
        assert _try_open(b.pid, inside, "O_RDWR") in ("EACCES", "EROFS")
        # the host's path to it: not even reachable
        assert _try_open(b.pid, manifest.memory.path) == "EACCES"
        # a template it does not map has a group of its own: not readable even where reachable
        public = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            public.chmod(0o755)
            other = public / "other.mem"
            other.write_bytes(b"\0" * 4096)
            jails.template_gid(jail, other)
            assert _try_open(b.pid, str(other)) == "EACCES"
            os.chown(other, 0, os.stat(manifest.memory.path).st_gid)  # b's template's group
            assert _try_open(b.pid, str(other)) == "opened"
        finally:
            shutil.rmtree(public)
        # a sibling's memory, sockets, state and template device state
        assert _try_open(b.pid, f"/proc/{a.pid}/mem") in ("EACCES", "EPERM")
        paths = RunPaths(Path(a.run_dir or ""))
        for path in (paths.qmp, paths.agent, paths.qemu_log):
            assert _try_open(b.pid, str(path)) == "EACCES", path
        connect = _as_vm(b.pid, (
            "import socket, errno\ns = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect({str(paths.qmp)!r}); print('connected')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
        ))  # fmt: skip
        assert connect.stdout.strip() == "EACCES"
        assert _try_open(b.pid, str(runtime.snapshots.devstate_path(template))) == "EACCES"
        assert _try_open(b.pid, str(runtime.settings.db_path)) == "EACCES"
    finally:
        for sb in (a, b):
            await runtime.kill(sb.id)


async def test_a_jailed_qemu_is_readopted_by_its_run_dir(runtime: Runtime, template: str) -> None:
    _jail(runtime)
    sb = (await runtime.spawn(template, 1))[0].sandbox
    try:
        paths = RunPaths(Path(sb.run_dir or ""))
        assert pid_runs_in(sb.pid, paths)
        assert paths.pidfile.read_text().strip() == str(sb.pid)
        # what a restarted daemon does: a new QMP connection through the socket's path
        qemu = QemuProcess(sb.pid, paths)
        try:
            assert (await qemu.execute("query-status"))["status"] == "running"
        finally:
            await qemu.close_qmp()
    finally:
        await runtime.kill(sb.id)


BARE = ["-machine", "none", "-S", "-nodefaults", "-display", "none"]


async def test_seccomp_kills_a_forbidden_call_and_refuses_spawning(
    runtime: Runtime, tmp_path: Path
) -> None:
    jail = _jail(runtime)
    # -run-with user= makes QEMU itself call setgid/setuid after its filter is in: killed.
    with pytest.raises(ForkdError, match="seccomp filter"):
        await QemuProcess.launch([*BARE, "-run-with", "user=1234:1234"],
                                 RunPaths(tmp_path / "a"), jail=jail, new_netns=True)  # fmt: skip
    qemu = await QemuProcess.launch(BARE, RunPaths(tmp_path / "b"), jail=jail, new_netns=True)
    try:
        with pytest.raises(ForkdError, match="Operation not permitted"):
            await qemu.execute("migrate", {"uri": "exec:/bin/true"})
        assert (await qemu.execute("query-status"))["status"] == "prelaunch"
    finally:
        await qemu.terminate()


async def test_a_start_that_fails_before_exec_leaves_no_qemu(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The jailed child waits on its block fd; a failed placement (or a cancelled start) must
    end it, not let it go on to run QEMU orphaned once the fd closes."""
    jail = _jail(runtime)
    seen: list[int] = []

    def refuse(pid: int) -> None:
        seen.append(pid)
        raise RuntimeError("placement refused")

    with pytest.raises(RuntimeError, match="placement refused"):
        await QemuProcess.launch(BARE, RunPaths(tmp_path / "refused"), jail=jail,
                                 new_netns=True, before_exec=refuse)  # fmt: skip
    await asyncio.sleep(1.0)  # an orphan would have exec'd QEMU by now
    [pid] = seen
    try:
        state = _status(pid).get("State", "")
    except OSError:
        state = "gone"
    assert state == "gone" or state.startswith("Z"), f"the child lives on: {state}"
