"""Private host state: forkd's dirs are 0700 and owner-checked, its files 0600, and whatever
QEMU creates is the daemon user's alone. Refusals run as root (to chown a dir to nobody)."""

from __future__ import annotations

import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.api.audit import AuditLog
from forkd.config import Settings
from forkd.doctor import check_private_state
from forkd.errors import HostSetupError
from forkd.private import private_dir, private_file
from forkd.runtime.registry import Registry
from forkd.snapshots.memfs import mount_of, prepare_memory_dir, release_memory_dir
from forkd.snapshots.store import SnapshotStore
from forkd.vmm.qemu import QEMU_FILE_CAP_BYTES, QemuProcess, qemu_binary
from forkd.vmm.spec import RunPaths

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_dirs_are_created_0700_and_tightened(tmp_path: Path, umask_022: None) -> None:
    new = private_dir(tmp_path / "a" / "b", "test dir")
    assert _mode(new) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    private_dir(loose)
    assert _mode(loose) == 0o700


def test_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(HostSetupError, match=r"writable by group or others \(mode 0777\)") as e:
        private_dir(shared, "memory dir")
    assert f"memory dir {shared}" in str(e.value) and "chmod 700" in str(e.value)


def test_symlinked_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(HostSetupError, match="is a symlink") as e:
        private_dir(link, "run dir")
    assert str(link) in str(e.value)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(HostSetupError, match="is a symlink"):
        private_dir(dangling)
    assert not (tmp_path / "nowhere").exists()


@needs_root
def test_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, _nobody(), _nobody())
    with pytest.raises(HostSetupError, match=f"owned by uid {_nobody()}") as e:
        private_dir(theirs, "forkd home")
    assert f"forkd home {theirs}" in str(e.value) and "not by uid 0" in str(e.value)
    link = tmp_path / "to-theirs"
    link.symlink_to(theirs)
    with pytest.raises(HostSetupError, match="symlink"):
        private_dir(link)


@needs_root
def test_squatted_memory_dir_is_refused_before_any_mount(tmp_path: Path) -> None:
    """Another user pre-creates the predictable /dev/shm name with a file in it."""
    squat = Path("/dev/shm") / f"forkd-test-{secrets.token_hex(4)}"
    squat.mkdir(mode=0o755)
    (squat / "planted.mem").write_bytes(b"x")
    os.chown(squat, _nobody(), _nobody())
    try:
        with pytest.raises(HostSetupError, match=r"memory dir .* owned by uid"):
            prepare_memory_dir(squat, mount_huge=True)
        assert mount_of(squat).mountpoint != squat  # type: ignore[union-attr]
        store = SnapshotStore(Settings(home=tmp_path / "home", shm_dir=squat))
        with pytest.raises(HostSetupError, match="owned by uid"):
            store.begin("t")
    finally:
        release_memory_dir(squat)


@needs_root
def test_home_of_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, _nobody(), _nobody())
    with pytest.raises(HostSetupError, match=f"forkd home {home} is owned by uid"):
        Registry(home / "forkd.db")


def test_doctor_names_a_dir_that_is_not_private(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", shm_dir=tmp_path / "shm")
    assert check_private_state(settings).status == "PASS"  # nothing exists yet
    private_dir(settings.home)
    (tmp_path / "shm").mkdir()
    os.chmod(tmp_path / "shm", 0o1777)
    check = check_private_state(settings)
    assert check.status == "FAIL" and str(tmp_path / "shm") in check.detail
    assert "chmod 700" in check.hint
    os.chmod(tmp_path / "shm", 0o700)
    assert check_private_state(settings).status == "PASS"


def test_database_and_audit_log_are_0600(tmp_path: Path, umask_022: None) -> None:
    home = tmp_path / "home"
    reg = Registry(home / "forkd.db")
    try:
        reg.list_snapshots()
        assert _mode(home) == 0o700
        for name in ("forkd.db", "forkd.db-wal", "forkd.db-shm"):
            if (home / name).exists():
                assert _mode(home / name) == 0o600, name
    finally:
        reg.close()
    os.chmod(home / "forkd.db", 0o644)
    Registry(home / "forkd.db").close()
    assert _mode(home / "forkd.db") == 0o600

    log = home / "audit.log"
    AuditLog(log).close()
    assert _mode(log) == 0o600
    os.chmod(log, 0o644)
    audit = AuditLog(log)
    audit.write({"ok": 1})
    audit.close()
    assert _mode(log) == 0o600 and log.read_text() == '{"ok":1}\n'


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "home").mkdir(mode=0o700)
    (tmp_path / "home" / "audit.log").symlink_to(target)
    with pytest.raises(HostSetupError, match=r"audit log .* is not a regular file"):
        private_file(tmp_path / "home" / "audit.log", "audit log")


async def test_qemu_creates_private_files_and_is_file_capped(
    tmp_path: Path, umask_022: None
) -> None:
    """A real QEMU (no guest) creating its memory file, log and sockets."""
    try:
        qemu_binary()
    except HostSetupError:
        pytest.skip("no QEMU on this host")
    paths = RunPaths(tmp_path / "run" / "vm")
    store = SnapshotStore(Settings(home=tmp_path / "home", shm_dir=tmp_path / "shm"))
    memory = store.begin("t").memory  # QEMU fills the file forkd created
    argv = [
        "-machine", "none", "-S", "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=mem,size=4M,mem-path={memory},share=on",
    ]  # fmt: skip

    def proc_line(name: str, prefix: str) -> list[str]:
        text = Path(f"/proc/{qemu.pid}/{name}").read_text()
        return next(x for x in text.splitlines() if x.startswith(prefix)).split()

    qemu = await QemuProcess.launch(argv, paths, timeout=30)
    try:
        assert _mode(paths.dir) == 0o700
        assert _mode(memory) == 0o600
        # connect() needs write permission: nobody but the owner may
        assert _mode(paths.qmp) & 0o022 == 0
        assert _mode(paths.qemu_log) & 0o077 == 0
        assert proc_line("limits", "Max file size")[3] == str(QEMU_FILE_CAP_BYTES)
        ignored = int(proc_line("status", "SigIgn")[1], 16)
        assert ignored & (1 << (25 - 1)), "SIGXFSZ must stay ignored in QEMU"
    finally:
        qemu.kill()
        await qemu.wait_exit(10)


def test_checking_an_open_database_keeps_its_locks(tmp_path: Path) -> None:
    """A second Registry on the same home in one process must not drop the first one's SQLite
    locks (closing any descriptor of a file releases this process's POSIX locks on it)."""
    from forkd.runtime.registry import Registry, SnapshotRow

    home = tmp_path / "home"
    first = Registry(home / "forkd.db")
    first.put_snapshot(SnapshotRow(tag="a", status="ready", created_at_unix=1))
    second = Registry(home / "forkd.db")
    second.put_snapshot(SnapshotRow(tag="b", status="ready", created_at_unix=2))
    assert {r.tag for r in first.list_snapshots()} == {"a", "b"}
    assert {r.tag for r in second.list_snapshots()} == {"a", "b"}
    first.close()
    second.close()
