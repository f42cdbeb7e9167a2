"""The guest agent acting as a user: commands run with that user's ids, file ops check that
user's permissions and chown what they create. The agent runs on the host in its test mode (as
root, as in a guest) and acts as ``nobody``; the permission logic is checked against the kernel.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from forkd.errors import GuestOSError, InvalidInput
from forkd.guest import AGENT_PATH
from forkd.vmm.agent_client import AgentClient

from .test_agent_protocol import Bridge, running_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")

NOBODY = pwd.getpwnam("nobody")


def _agent_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("forkd_guest_agent", AGENT_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


agent = _agent_module()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with running_agent(tmp_path_factory.mktemp("agent-users")) as b:
        yield b


@pytest.fixture
async def client(bridge: Bridge) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(bridge.host_path, timeout=10) as c:
        yield c


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory nobody can reach (pytest's own base directory is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="forkd-users-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tree(reachable: Path) -> Path:
    """``open/`` (0777), ``private/`` (0700, root), ``sticky/`` (1777) holding a root file,
    ``ro.txt`` (0644, root)."""
    tmp_path = reachable
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "private" / "secret").write_text("s")
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)
    (tmp_path / "sticky" / "roots").write_text("r")
    (tmp_path / "ro.txt").write_text("ro")
    (tmp_path / "ro.txt").chmod(0o644)
    return tmp_path


async def test_commands_run_as_the_user(client: AgentClient, tree: Path) -> None:
    r = await client.exec(["/bin/sh", "-c", "id -un; id -u; echo $HOME $USER $LOGNAME"],
                          user="nobody")  # fmt: skip
    assert r.stdout == f"nobody\n{NOBODY.pw_uid}\n{NOBODY.pw_dir} nobody nobody\n"
    r = await client.exec(["id", "-un"], user="root")
    assert r.stdout == "root\n"
    r = await client.exec(["cat", str(tree / "private" / "secret")], user="nobody")
    assert r.exit_code == 1 and "Permission denied" in r.stderr
    # the request's env wins over the user's
    r = await client.exec(["/bin/sh", "-c", "echo $HOME"], env={"HOME": "/x"}, user="nobody")
    assert r.stdout == "/x\n"

    stream = await client.proc_start(["id", "-u"], user="nobody")
    out = b""
    while True:
        ev = await stream.next()
        if ev.kind == "exit":
            break
        out += ev.data
    assert out == f"{NOBODY.pw_uid}\n".encode() and ev.exit_code == 0


async def test_unknown_user_is_a_bad_request(client: AgentClient, tree: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown user 'no-such-user'"):
        await client.exec(["true"], user="no-such-user")
    with pytest.raises(InvalidInput, match="unknown user"):
        await client.proc_start(["true"], user="no-such-user")
    with pytest.raises(InvalidInput, match="unknown user"):
        await client.write_file(str(tree / "open" / "x"), b"x", user="no-such-user")


async def test_files_are_created_as_the_user(client: AgentClient, tree: Path) -> None:
    path = tree / "open" / "a" / "b" / "f.txt"
    await client.write_file(str(path), b"hi", user="nobody")
    for p in (path, path.parent, path.parent.parent):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), p
    assert await client.read_file(str(path), user="nobody") == b"hi"
    # an existing file keeps its owner; root's 0644 file is not writable by nobody
    with pytest.raises(GuestOSError) as e:
        await client.write_file(str(tree / "ro.txt"), b"no", user="nobody")
    assert e.value.errno == errno.EACCES and (tree / "ro.txt").read_text() == "ro"
    assert await client.read_file(str(tree / "ro.txt"), user="nobody") == b"ro"
    # root writes into a 0700 directory; nobody cannot write, read, list or stat in it
    await client.write_file(str(tree / "private" / "r"), b"r", user="root")
    assert (tree / "private" / "r").stat().st_uid == 0
    for call in (
        client.write_file(str(tree / "private" / "n"), b"n", user="nobody"),
        client.read_file(str(tree / "private" / "secret"), user="nobody"),
        client.list_files(str(tree / "private"), user="nobody"),
        client.stat(str(tree / "private" / "secret"), user="nobody"),
        client.mkdir(str(tree / "private" / "d"), user="nobody"),
        client.remove_file(str(tree / "private" / "secret"), user="nobody"),
        client.move(str(tree / "private" / "secret"), str(tree / "open" / "s"), user="nobody"),
    ):
        with pytest.raises(GuestOSError) as e:
            await call
        assert e.value.errno == errno.EACCES
    assert not (tree / "private" / "n").exists() and (tree / "private" / "secret").exists()
    assert await client.mkdir(str(tree / "open" / "m" / "n"), user="nobody")
    assert (tree / "open" / "m").stat().st_uid == NOBODY.pw_uid
    names = {e["name"]: e for e in await client.list_files(str(tree / "open"), user="nobody")}
    assert names["m"]["uid"] == NOBODY.pw_uid


async def test_sticky_directories(client: AgentClient, tree: Path) -> None:
    sticky = tree / "sticky"
    with pytest.raises(GuestOSError) as e:
        await client.remove_file(str(sticky / "roots"), user="nobody")
    assert e.value.errno == errno.EPERM
    await client.write_file(str(sticky / "mine"), b"m", user="nobody")
    await client.move(str(sticky / "mine"), str(sticky / "mine2"), user="nobody")
    await client.remove_file(str(sticky / "mine2"), user="nobody")
    assert sorted(os.listdir(sticky)) == ["roots"]


def _kernel_allows(path: Path, want: int) -> bool:
    """Whether the kernel grants nobody ``want`` on ``path`` (a child with nobody's ids)."""
    code = (
        f"import os, sys; os.setgroups([]); os.setgid({NOBODY.pw_gid}); "
        f"os.setuid({NOBODY.pw_uid}); sys.exit(0 if os.access(sys.argv[1], {want}) else 1)"
    )
    return subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 0


@pytest.mark.parametrize("mode", [0o000, 0o400, 0o040, 0o004, 0o007, 0o070, 0o700, 0o755])
@pytest.mark.parametrize("owner", ["root", "nobody"])
def test_permission_bits_match_the_kernel(reachable: Path, mode: int, owner: str) -> None:
    f = reachable / "f"
    f.write_text("x")
    if owner == "nobody":
        os.chown(f, NOBODY.pw_uid, NOBODY.pw_gid)
    f.chmod(mode)
    user = agent._User("nobody", NOBODY.pw_uid, NOBODY.pw_gid, [NOBODY.pw_gid], "/")
    st = f.stat()
    for want in (4, 2, 1, 6):
        assert agent.may(user, st, want) == _kernel_allows(f, want), (oct(mode), owner, want)
    root = agent._User("root", 0, 0, [0], "/root")
    assert agent.may(root, st, 6)
    assert agent.may(root, st, 1) == bool(mode & 0o111)


async def test_a_dangling_symlink_is_no_way_around_permissions(
    client: AgentClient, tree: Path
) -> None:
    (tree / "open" / "link").symlink_to(tree / "private" / "new")
    with pytest.raises(GuestOSError) as e:
        await client.write_file(str(tree / "open" / "link"), b"x", user="nobody")
    assert e.value.errno == errno.EACCES and not (tree / "private" / "new").exists()
    (tree / "open" / "mine").symlink_to(tree / "open" / "target")
    await client.write_file(str(tree / "open" / "mine"), b"x", user="nobody")
    assert (tree / "open" / "target").stat().st_uid == NOBODY.pw_uid


async def test_working_directory_and_terminal_as_the_user(client: AgentClient, tree: Path) -> None:
    r = await client.exec(["pwd"], cwd=str(tree / "private"), user="nobody")
    assert r.exit_code == 126 and "Permission denied" in r.stderr
    with pytest.raises(GuestOSError) as e:
        await client.proc_start(["pwd"], cwd=str(tree / "private"), user="nobody")
    assert e.value.errno == errno.EACCES
    r = await client.exec(["nosuch-program"], user="nobody")
    assert r.exit_code == 127
    stream = await client.proc_start(["/bin/sh", "-c", "id -u; tty"], pty=(80, 24), user="nobody")
    seen = b""
    while (ev := await stream.next()).kind != "exit":
        seen += ev.data
    assert seen.startswith(f"{NOBODY.pw_uid}\r\n/dev/pts/".encode()) and ev.exit_code == 0
