"""The guest agent and AgentClient end to end, without VMs.

A thread plays QEMU's role: it listens on ``agent.sock`` for the host (one connection at a time,
reconnects allowed) and bridges bytes to the agent process, which runs
``agent.py --connect-unix <guest.sock>`` and stays up across host connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from forkd.errors import AgentError, InvalidInput, NotFound
from forkd.vmm.agent_client import AgentClient

AGENT_PY = Path(__file__).resolve().parents[2] / "src" / "forkd" / "guest" / "agent.py"


class Bridge:
    """QEMU's chardev in miniature: host clients come and go, the guest side stays connected.

    Bytes from the guest while no host is connected are discarded.
    """

    def __init__(self, directory: Path) -> None:
        self.host_path = directory / "agent.sock"
        self.guest_path = directory / "guest.sock"
        self._guest_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._guest_listener.bind(str(self.guest_path))
        self._guest_listener.listen(1)
        self._host_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._host_listener.bind(str(self.host_path))
        self._host_listener.listen(8)
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._guest_listener.settimeout(10)
        try:
            guest, _ = self._guest_listener.accept()
        except OSError:
            return
        guest.settimeout(None)
        host: socket.socket | None = None
        try:
            while True:
                watch: list[socket.socket] = [guest, self._stop_r]
                watch.append(host if host is not None else self._host_listener)
                readable, _, _ = select.select(watch, [], [])
                if self._stop_r in readable:
                    return
                if guest in readable:
                    data = guest.recv(1 << 16)
                    if not data:
                        return  # agent exited
                    if host is not None:
                        try:
                            host.sendall(data)
                        except OSError:
                            host.close()
                            host = None
                if host is None and self._host_listener in readable:
                    host, _ = self._host_listener.accept()
                elif host is not None and host in readable:
                    try:
                        data = host.recv(1 << 16)
                    except OSError:
                        data = b""
                    if data:
                        guest.sendall(data)
                    else:
                        host.close()
                        host = None
        finally:
            if host is not None:
                host.close()
            guest.close()

    def stop(self) -> None:
        self._stop_w.send(b"x")
        self._thread.join(5)
        for s in (self._guest_listener, self._host_listener, self._stop_r, self._stop_w):
            s.close()


@contextlib.contextmanager
def running_agent(directory: Path, wrapper: Sequence[str] = ()) -> Iterator[Bridge]:
    """A bridge in ``directory`` and an agent process (under ``wrapper``) behind it."""
    b = Bridge(directory)
    proc = subprocess.Popen(
        [*wrapper, sys.executable, str(AGENT_PY), "--connect-unix", str(b.guest_path)],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield b
    finally:
        proc.kill()
        proc.wait(5)
        b.stop()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with running_agent(tmp_path_factory.mktemp("agent")) as b:
        yield b


@pytest.fixture
async def client(bridge: Bridge) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(bridge.host_path, timeout=10) as c:
        yield c
        assert c.unknown_responses == 0
        assert c.junk_lines == 0


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ----------------------------------------------------------------------------- basics


async def test_ping_and_hello(client: AgentClient) -> None:
    pong = await client.ping()
    assert pong["ok"] is True and pong["pong"] is True
    assert pong["ready"] is True
    assert pong["numpy_version"] is None
    assert isinstance(pong["version"], str) and pong["version"]
    assert pong["pid"] == client.hello["pid"]
    assert client.hello["session"] == client.session
    assert pong["id"].startswith(client.session + "-")


async def test_bad_requests(client: AgentClient) -> None:
    with pytest.raises(InvalidInput):
        await client.request("exec")
    with pytest.raises(InvalidInput):
        await client.request("no_such_op")
    with pytest.raises(InvalidInput):
        await client.request("eval", code=123)
    with pytest.raises(InvalidInput):
        await client.request("write_file", path="/tmp/x", data_b64="!!notbase64")
    assert (await client.ping())["pong"]


# ----------------------------------------------------------------------------- exec


async def test_exec_argv(client: AgentClient) -> None:
    r = await client.exec(["echo", "hello", "world"])
    assert r.stdout == "hello world\n"
    assert r.stderr == ""
    assert r.exit_code == 0 and r.ok
    assert not r.timed_out and not r.stdout_truncated and not r.stderr_truncated
    assert r.duration_ms >= 0


async def test_exec_cmd_env_cwd_stdin(client: AgentClient, tmp_path: Path) -> None:
    r = await client.exec(
        cmd='echo "$FORKD_TEST_VAR"; pwd; cat; echo oops >&2',
        env={"FORKD_TEST_VAR": "value 1"},
        cwd=str(tmp_path),
        stdin=b"from stdin",
    )
    assert r.exit_code == 0
    assert r.stdout == f"value 1\n{tmp_path}\nfrom stdin"
    assert r.stderr == "oops\n"
    # env is merged over the agent's own environment
    r = await client.exec(cmd='test -n "$PATH" && echo "$A$B"', env={"A": "x", "B": "y"})
    assert r.stdout == "xy\n"


async def test_exec_large_stdin(client: AgentClient) -> None:
    data = os.urandom(300_000)
    r = await client.exec(["sh", "-c", "wc -c"], stdin=data)
    assert r.stdout.strip() == str(len(data))


async def test_exec_nonzero_and_missing(client: AgentClient) -> None:
    r = await client.exec(cmd="echo bad >&2; exit 3")
    assert r.exit_code == 3 and not r.ok
    assert r.stderr == "bad\n"
    r = await client.exec(["/nonexistent/forkd-no-such-program"])
    assert r.exit_code == 127
    assert "forkd-no-such-program" in r.stderr


async def test_exec_timeout_kills_group(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    r = await client.exec(cmd=f"sleep 30 & echo $! > {pidfile}; sleep 30", timeout=0.5)
    assert r.timed_out
    assert r.exit_code == -9
    assert r.duration_ms < 10_000
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _pid_gone(grandchild):
        assert time.monotonic() < deadline, "background grandchild survived the timeout"
        await asyncio.sleep(0.02)


async def test_exec_output_cap(client: AgentClient) -> None:
    r = await client.exec(
        cmd="head -c 200000 /dev/zero | tr '\\0' a; echo done >&2", max_output=1000
    )
    assert r.exit_code == 0
    assert r.stdout == "a" * 1000
    assert r.stdout_truncated
    assert r.stderr == "done\n"
    assert not r.stderr_truncated


async def test_exec_background_holding_pipe_does_not_hang(client: AgentClient) -> None:
    r = await client.exec(cmd="sleep 5 & echo started", timeout=20)
    assert r.exit_code == 0 and not r.timed_out
    assert r.stdout == "started\n"
    assert r.duration_ms < 4000


# ----------------------------------------------------------------------------- eval


async def test_eval_expression_and_statements(client: AgentClient) -> None:
    r = await client.eval("1 + 1")
    assert (r.result, r.error, r.exit_code, r.traceback) == ("2", None, 0, None)
    r = await client.eval("t_eval_a = 5\nt_eval_b = [t_eval_a]\nt_eval_b * 2")
    assert r.result == "[5, 5]"
    r = await client.eval("t_eval_c = 1")
    assert r.result is None and r.error is None and r.exit_code == 0
    r = await client.eval("None")
    assert r.result == "None"
    r = await client.eval("'x' * 3")
    assert r.result == "'xxx'"


async def test_eval_single_lines_that_look_like_expressions(client: AgentClient) -> None:
    """One-line code takes a direct-compile path; every shape must still mean what Python says."""
    cases = {
        "t_one_ann: int": None,  # an annotation is a statement even without "="
        "dict(a=1)": "{'a': 1}",  # "=" inside a call
        "(t_one_w := 3) + 1": "4",
        "2 >= 1 != 0": "True",
        "# only a comment": None,
        "lambda: 1": None,  # checked below: a function repr
    }
    for code, want in cases.items():
        r = await client.eval(code)
        assert r.error is None, (code, r.error)
        if code.startswith("lambda"):
            assert r.result is not None and r.result.startswith("<function <lambda>")
        else:
            assert r.result == want, code
    assert (await client.eval("t_one_w")).result == "3"
    r = await client.eval("1 / 0")
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.traceback is not None and "1 / 0" in r.traceback and "agent.py" not in r.traceback


async def test_eval_namespace_persists(client: AgentClient) -> None:
    await client.eval("import math\ndef t_ns_f(x):\n    return math.sqrt(x) + t_ns_k\nt_ns_k = 1")
    r = await client.eval("t_ns_f(16)")
    assert r.result == "5.0"
    r = await client.eval("__name__")
    assert r.result == "'__main__'"


async def test_eval_exception(client: AgentClient) -> None:
    r = await client.eval("def t_exc_f():\n    raise ValueError('boom')\nt_exc_f()")
    assert r.error == "ValueError: boom"
    assert r.exit_code == 1
    assert r.result is None
    assert r.traceback is not None
    assert "ValueError: boom" in r.traceback and "t_exc_f" in r.traceback
    assert "raise ValueError('boom')" in r.traceback
    assert "agent.py" not in r.traceback
    for bad in ("1 +", "X := 100", "x = (1,\ny = 2"):  # direct-compile path and ast path
        r = await client.eval(bad)
        assert r.error is not None and r.error.startswith("SyntaxError"), bad
        assert r.exit_code == 1
        assert r.traceback is not None and "SyntaxError" in r.traceback
        assert "agent.py" not in r.traceback and "ast.py" not in r.traceback, r.traceback
    r = await client.eval("import sys\nsys.exit(4)")
    assert r.error == "SystemExit: 4"
    assert (await client.ping())["pong"]


async def test_eval_print_captured_per_request(client: AgentClient) -> None:
    r = await client.eval("print('hello', 42)\n7")
    assert r.stdout == "hello 42\n"
    assert r.result == "7"
    code = "import time\nfor i in range(5):\n    print({tag!r}, i)\n    time.sleep(0.02)"
    a, b = await asyncio.gather(
        client.eval(code.format(tag="A")), client.eval(code.format(tag="B"))
    )
    assert a.stdout == "".join(f"A {i}\n" for i in range(5))
    assert b.stdout == "".join(f"B {i}\n" for i in range(5))
    # a print from a background thread of an eval goes to the agent's real stdout, not an answer
    r = await client.eval("import threading\nthreading.Thread(target=print, args=('bg',)).start()")
    assert r.error is None


async def test_slow_requests_do_not_block_others(client: AgentClient) -> None:
    slow_exec = asyncio.create_task(client.exec(["sleep", "2"]))
    slow_eval = asyncio.create_task(client.eval("import time\ntime.sleep(2)\n'slow'"))
    await asyncio.sleep(0.1)
    assert (await client.ping())["pong"]
    assert (await client.eval("6 * 7")).result == "42"
    assert (await client.exec(["echo", "quick"])).stdout == "quick\n"
    assert not slow_exec.done()
    assert not slow_eval.done()
    r_exec, r_eval = await asyncio.gather(slow_exec, slow_eval)
    assert r_exec.exit_code == 0
    assert r_eval.result == "'slow'"


# ----------------------------------------------------------------------------- files


async def test_files_round_trip(client: AgentClient, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    path = str(tmp_path / "sub" / "dir" / "blob.bin")
    assert await client.write_file(path, data) == len(data)
    assert await client.read_file(path) == data
    assert Path(path).read_bytes() == data
    assert await client.write_file(path, b"\x00\xff", append=True) == len(data) + 2
    assert await client.read_file(path, offset=len(data)) == b"\x00\xff"
    part = await client.request("read_file", path=path, offset=10, limit=5)
    assert base64.b64decode(part["data_b64"]) == data[10:15]
    assert part["truncated"] is True and part["size"] == len(data) + 2
    await client.write_file(path, b"new")
    assert await client.read_file(path) == b"new"

    secret = str(tmp_path / "secret")
    await client.write_file(secret, b"s", mode=0o600)
    os.symlink(secret, tmp_path / "link")
    entries = {e["name"]: e for e in await client.list_files(str(tmp_path))}
    assert set(entries) == {"sub", "secret", "link"}
    assert entries["sub"]["type"] == "dir"
    assert entries["secret"]["type"] == "file"
    assert entries["secret"]["mode"] == 0o600
    assert entries["secret"]["size"] == 1
    assert entries["link"]["type"] == "symlink"
    assert entries["secret"]["path"] == secret
    assert isinstance(entries["secret"]["mtime"], float)

    await client.remove_file(secret)
    assert not Path(secret).exists()
    with pytest.raises(AgentError) as info:
        await client.remove_file(str(tmp_path / "sub"))
    assert not isinstance(info.value, NotFound)
    await client.remove_file(str(tmp_path / "sub"), recursive=True)
    assert not (tmp_path / "sub").exists()


async def test_files_errors(client: AgentClient, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(NotFound):
        await client.read_file(missing)
    with pytest.raises(NotFound):
        await client.list_files(missing)
    with pytest.raises(NotFound):
        await client.remove_file(missing)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(AgentError) as info:
        await client.list_files(str(tmp_path / "f"))
    assert not isinstance(info.value, NotFound)
    with pytest.raises(AgentError) as info:
        await client.read_file(str(tmp_path))
    assert not isinstance(info.value, NotFound)
    with pytest.raises(InvalidInput):
        await client.request("read_file", path="")


# ----------------------------------------------------------------------------- reseed


async def test_reseed_unprivileged(tmp_path: Path) -> None:
    # Never credit the test host's kernel pool: as root, run this agent without CAP_SYS_ADMIN.
    wrapper: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is not available to drop CAP_SYS_ADMIN")
        wrapper = [setpriv, "--bounding-set", "-sys_admin"]
    with running_agent(tmp_path, wrapper) as b:
        async with await AgentClient.connect(b.host_path) as client:
            await client.eval("import random\nrandom.seed(1234)")
            r = await client.reseed(os.urandom(64))
            assert r["reseeded"] is False and r["credited_bits"] == 0
            after = await client.eval("random.random()")
            assert after.result != repr(random.Random(1234).random())
            with pytest.raises(InvalidInput):
                await client.request("reseed", entropy_b64=base64.b64encode(b"short").decode())


# ----------------------------------------------------------------------------- sessions


def _raw_lines_until(sock: socket.socket, needle: str, timeout: float) -> list[dict[str, Any]]:
    """Read JSON lines from ``sock`` until one has id ``needle``."""
    sock.settimeout(timeout)
    buf = b""
    seen: list[dict[str, Any]] = []
    while True:
        chunk = sock.recv(65536)
        assert chunk, "agent connection closed"
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                seen.append(json.loads(line))
        if any(m.get("id") == needle for m in seen):
            return seen


async def test_session_switch_drops_old_answers(bridge: Bridge) -> None:
    a = await AgentClient.connect(bridge.host_path)
    slow = asyncio.create_task(a.eval("import time\ntime.sleep(0.6)\n'answer-for-A'"))
    slow_exec = asyncio.create_task(a.exec(cmd="sleep 0.6; echo answer-for-A"))
    await asyncio.sleep(0.15)  # the agent has read both requests
    await a.close()
    for task in (slow, slow_exec):
        with pytest.raises(AgentError):
            await task

    b = await AgentClient.connect(bridge.host_path)
    try:
        assert b.session != a.session
        assert (await b.ping())["pong"]
        assert (await b.eval("'B'")).result == "'B'"
        await asyncio.sleep(0.8)  # A's requests finish while B is connected
        assert (await b.ping())["pong"]
        assert b.unknown_responses == 0
        assert b.junk_lines == 0
    finally:
        await b.close()

    # The same, read raw: nothing with A's session reaches the next connection.
    a = await AgentClient.connect(bridge.host_path)
    slow_raw = asyncio.create_task(a.exec(cmd="sleep 0.5; echo answer-for-A"))
    await asyncio.sleep(0.15)
    await a.close()
    with pytest.raises(AgentError):
        await slow_raw

    def raw() -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(bridge.host_path))
            s.sendall(b'\n{"id":"raw-0","op":"hello","session":"raw"}\n')
            seen = _raw_lines_until(s, "raw-0", 5)
            time.sleep(0.7)
            s.sendall(b'{"id":"raw-1","op":"ping"}\n')
            return seen + _raw_lines_until(s, "raw-1", 5)

    seen = await asyncio.to_thread(raw)
    assert [m["id"] for m in seen] == ["raw-0", "raw-1"]
    assert all(a.session not in json.dumps(m) for m in seen)


async def test_junk_and_partial_line_before_hello(bridge: Bridge) -> None:
    def junk() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(bridge.host_path))
            s.sendall(b'garbage\n[1, 2]\n{"op": "ping"}\n\xff\xfe\n{"id": "x", "op": "pi')

    await asyncio.to_thread(junk)
    await asyncio.sleep(0.1)
    async with await AgentClient.connect(bridge.host_path) as c:
        assert (await c.ping())["pong"]
        assert (await c.eval("2 ** 10")).result == "1024"
        assert c.unknown_responses == 0


# ----------------------------------------------------------------------------- client alone


async def _fake_agent(path: Path, behaviour: str) -> asyncio.Server:
    """A scripted agent: answers hello after noise, then misbehaves per ``behaviour``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                msg = json.loads(line)
                if msg["op"] == "hello":
                    writer.write(b'garbage\n{"id":"someone-else-1","ok":true}\n')
                    reply = {"id": msg["id"], "ok": True, "session": msg["session"], "pid": 1}
                    writer.write(b"\n" + json.dumps(reply).encode() + b"\n")
                elif behaviour == "noisy":
                    writer.write(b"{not json\n")
                    writer.write(json.dumps({"id": "stale-9", "ok": True}).encode() + b"\n")
                    writer.write(json.dumps({"id": msg["id"], "ok": True, "pong": True}).encode())
                    writer.write(b"\n")
                elif behaviour == "hangup":
                    writer.close()
                    return
                # "silent": never answers
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    return await asyncio.start_unix_server(handle, path=str(path))


async def test_client_ignores_noise(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    server = await _fake_agent(path, "noisy")
    async with server, await AgentClient.connect(path, timeout=5) as c:
        assert c.unknown_responses == 1 and c.junk_lines == 1
        assert (await c.request("ping"))["pong"] is True
        assert c.unknown_responses == 2 and c.junk_lines == 2


async def test_client_connection_loss_fails_all_pending(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    server = await _fake_agent(path, "hangup")
    async with server, await AgentClient.connect(path, timeout=5) as c:
        tasks = [asyncio.create_task(c.request("eval", code="1")) for _ in range(3)]
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        for t in done:
            assert isinstance(t.exception(), AgentError)
        assert c.closed
        with pytest.raises(AgentError):
            await c.ping()


async def test_client_timeout(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    server = await _fake_agent(path, "silent")
    async with server, await AgentClient.connect(path, timeout=5) as c:
        with pytest.raises(AgentError, match=r"timed out after 0\.2 s"):
            await c.request("eval", timeout=0.2, code="1")
        assert not c.closed


async def test_client_connect_retries_then_gives_up(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    with pytest.raises(AgentError):
        await AgentClient.connect(path, timeout=0.2)

    async def start_later() -> asyncio.Server:
        await asyncio.sleep(0.2)
        return await _fake_agent(path, "noisy")

    starter = asyncio.create_task(start_later())
    c = await AgentClient.connect(path, timeout=5)
    server = await starter
    async with server, c:
        assert (await c.request("ping"))["pong"] is True


# ----------------------------------------------------------------------------- clock


async def test_test_mode_agent_never_sets_the_host_clock(client: AgentClient) -> None:
    # Every hello carries the host's wall clock; the guest steps to it, the host-side test agent
    # (this one) must refuse, or every unit-test run as root would step the host's own clock.
    assert client.hello["clock_set"] is False
    answer = await client.set_clock()
    assert answer["clock_set"] is False and "test mode" in answer["clock_error"]
