"""Tracked processes and eval contexts of the guest agent, end to end without VMs.

The agent runs in its test mode behind the same bridge as tests/unit/test_agent_protocol.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from forkd.errors import InvalidInput, NotFound
from forkd.vmm.agent_client import AgentClient, ProcEvent, ProcStream

from .test_agent_protocol import Bridge, running_agent


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with running_agent(tmp_path_factory.mktemp("agent-procs")) as b:
        yield b


@pytest.fixture
async def client(bridge: Bridge) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(bridge.host_path, timeout=10) as c:
        yield c
        assert c.junk_lines == 0


async def drain(stream: ProcStream, limit_s: float = 10.0) -> tuple[bytes, bytes, ProcEvent]:
    out, err = bytearray(), bytearray()
    async with asyncio.timeout(limit_s):
        while True:
            ev = await stream.next()
            if ev.kind == "exit":
                return bytes(out), bytes(err), ev
            (out if ev.kind == "stdout" else err).extend(ev.data)


async def test_start_streams_output_and_exit(client: AgentClient, tmp_path: Path) -> None:
    stream = await client.proc_start(
        ["/bin/sh", "-c", "echo out; echo err >&2; pwd; echo $FOO; exit 3"],
        env={"FOO": "bar"},
        cwd=str(tmp_path),
    )
    assert stream.pid > 0
    out, err, end = await drain(stream)
    assert out == f"out\n{tmp_path}\nbar\n".encode()
    assert err == b"err\n"
    assert end.exit_code == 3 and end.signal is None


async def test_output_arrives_before_exit(client: AgentClient) -> None:
    stream = await client.proc_start(["/bin/sh", "-c", "echo first; sleep 1; echo second"])
    t0 = time.monotonic()
    first = await asyncio.wait_for(stream.next(), 5)
    assert first.kind == "stdout" and first.data == b"first\n"
    assert time.monotonic() - t0 < 0.9
    out, _, end = await drain(stream)
    assert out == b"second\n" and end.exit_code == 0


async def test_stdin_signal_and_list(client: AgentClient) -> None:
    cat = await client.proc_start(["cat"], stdin=True, tag="cat")
    await client.proc_input(cat.pid, b"hello\n")
    ev = await asyncio.wait_for(cat.next(), 5)
    assert ev.data == b"hello\n"
    listed = {p["pid"]: p for p in await client.proc_list()}
    assert listed[cat.pid]["argv"] == ["cat"] and listed[cat.pid]["tag"] == "cat"
    await client.proc_close_stdin(cat.pid)
    _, _, end = await drain(cat)
    assert end.exit_code == 0

    sleeper = await client.proc_start(["sleep", "60"])
    second = client.proc_attach(sleeper.pid)
    await client.proc_signal(sleeper.pid, int(signal.SIGKILL))
    for s in (sleeper, second):
        _, _, end = await drain(s)
        assert end.signal == signal.SIGKILL and end.exit_code == 128 + signal.SIGKILL
    assert sleeper.pid not in {p["pid"] for p in await client.proc_list()}
    with pytest.raises(NotFound):
        await client.proc_signal(sleeper.pid, int(signal.SIGKILL))
    with pytest.raises(NotFound):
        client.proc_attach(sleeper.pid)


async def test_timeout_kills_and_errors(client: AgentClient) -> None:
    stream = await client.proc_start(["sleep", "30"], timeout=0.5)
    _, _, end = await drain(stream)
    assert end.timed_out and end.signal == signal.SIGKILL
    with pytest.raises(NotFound):
        await client.proc_start(["/no/such/program"])
    with pytest.raises(NotFound):
        await client.proc_start(["true"], cwd="/no/such/dir")
    with pytest.raises(NotFound):
        await client.proc_input(1 << 30, b"x")
    with pytest.raises(InvalidInput):
        await client.proc_start(["true"], env={"A=B": "x"})


async def test_eval_contexts_and_rich_answer(client: AgentClient) -> None:
    r = await client.eval_rich("import sys\nprint('o'); print('e', file=sys.stderr); 'abc'")
    assert (r["stdout"], r["stderr"], r["result_str"], r["result"]) == (
        "o\n",
        "e\n",
        "abc",
        "'abc'",
    )
    await client.eval_rich("y = 1", context="c1")
    assert (await client.eval_rich("y + 1", context="c1"))["result"] == "2"
    missing = await client.eval_rich("y", context="c2")
    assert missing["error_type"] == "NameError" and "y" in missing["error_value"]
    assert "NameError" in missing["traceback"]
    assert (await client.eval_rich("None", context="c1"))["result_none"] is True
    assert await client.eval_context_drop("c1") is True
    gone = await client.eval_rich("y", context="c1")
    assert gone["error_type"] == "NameError"


async def test_stat_mkdir_move(client: AgentClient, tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    assert await client.mkdir(str(d)) is True
    assert await client.mkdir(str(d)) is False
    await client.write_file(str(d / "f.txt"), b"hello")
    st = await client.stat(str(d / "f.txt"))
    assert (st["name"], st["type"], st["size"]) == ("f.txt", "file", 5)
    moved = await client.move(str(d / "f.txt"), str(tmp_path / "c" / "g.txt"))
    assert moved["path"] == str(tmp_path / "c" / "g.txt") and moved["size"] == 5
    with pytest.raises(NotFound):
        await client.stat(str(d / "f.txt"))


async def test_eval_streams_output_before_answering(client: AgentClient) -> None:
    seen: list[tuple[float, str, str]] = []
    code = "import sys, time\nprint('a')\nprint('e', file=sys.stderr)\ntime.sleep(1)\nprint('b')"
    r = await client.eval_rich(
        code, on_output=lambda stream, text: seen.append((time.monotonic(), stream, text))
    )
    done = time.monotonic()
    assert [(s, t) for _, s, t in seen] == [("stdout", "a\n"), ("stderr", "e\n"), ("stdout", "b\n")]
    assert done - seen[0][0] > 0.8
    assert (r["stdout"], r["stderr"]) == ("a\nb\n", "e\n")


async def _pty_until(stream: ProcStream, marker: bytes, limit_s: float = 10.0) -> bytes:
    seen = b""
    async with asyncio.timeout(limit_s):
        while marker not in seen:
            ev = await stream.next()
            assert ev.kind == "pty", (ev, seen)
            seen += ev.data
    return seen


async def test_a_process_on_a_pty(client: AgentClient) -> None:
    stream = await client.proc_start(["/bin/sh"], pty=(80, 24), env={"PS1": "$ "})
    await client.proc_input(stream.pid, b"tty; stty size; echo done-$((1+1))\n")
    seen = await _pty_until(stream, b"done-2")
    assert b"/dev/pts/" in seen and b"24 80" in seen  # a terminal of the size asked for
    await client.proc_resize(stream.pid, 100, 40)
    await client.proc_input(stream.pid, b"stty size; echo again-$((2+1))\n")
    assert b"40 100" in await _pty_until(stream, b"again-3")
    await client.proc_input(stream.pid, b"exit 5\n")
    async with asyncio.timeout(10):
        while (ev := await stream.next()).kind != "exit":
            assert ev.kind == "pty"
    assert ev.exit_code == 5
    with pytest.raises(NotFound):
        await client.proc_resize(stream.pid, 10, 10)
    plain = await client.proc_start(["sleep", "30"])
    with pytest.raises(InvalidInput, match="no pty"):
        await client.proc_resize(plain.pid, 10, 10)
    await client.proc_signal(plain.pid, signal.SIGKILL)
    with pytest.raises(InvalidInput, match="cols"):
        await client.proc_start(["true"], pty=(0, 24))
