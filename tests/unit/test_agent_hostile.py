"""A hostile guest agent against the host's AgentClient: bounded lines, typed and depth-bounded
replies, floods closed, and other connections on the same event loop unaffected.

The fake agent is a real unix-socket server that answers ``hello`` properly and then misbehaves;
the real agent (behind the ``Bridge`` of test_agent_protocol) checks chunked files and that the
agent keeps its own replies within the cap the host announces.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkd.errors import AgentProtocolError, ForkdError, PayloadTooLarge, Unavailable
from forkd.vmm import agent_wire
from forkd.vmm.agent_client import FILE_CHUNK_BYTES, MAX_IN_FLIGHT, MAX_STRAY_LINES, AgentClient
from forkd.vmm.agent_wire import MAX_LINE_BYTES

from .test_agent_protocol import Bridge, running_agent

Writer = asyncio.StreamWriter
Behaviour = Callable[[dict[str, Any], Writer], Awaitable[None]]


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def _serve(path: Path, behaviour: Behaviour, seen: list[dict[str, Any]]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        reader._limit = 64 << 20  # type: ignore[attr-defined]
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                msg = json.loads(line)
                seen.append(msg)
                if msg["op"] == "hello":
                    reply = {"id": msg["id"], "ok": True, "session": msg["session"], "pid": 1}
                    writer.write(_line(reply))
                else:
                    await behaviour(msg, writer)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    return await asyncio.start_unix_server(handle, path=str(path))


async def _answer_ping(msg: dict[str, Any], writer: Writer) -> None:
    writer.write(_line({"id": msg["id"], "ok": True, "pong": True}))


@pytest.fixture
async def good_agent(tmp_path: Path) -> AsyncIterator[AgentClient]:
    """A well-behaved second sandbox on the same event loop."""
    path = tmp_path / "good.sock"
    server = await _serve(path, _answer_ping, [])
    async with server, await AgentClient.connect(path, timeout=5) as c:
        yield c


async def _hostile(tmp_path: Path, behaviour: Behaviour) -> tuple[asyncio.Server, AgentClient]:
    path = tmp_path / "bad.sock"
    server = await _serve(path, behaviour, [])
    return server, await AgentClient.connect(path, timeout=5)


async def _ping_times(
    client: AgentClient, until: asyncio.Future[Any], limit_s: float
) -> list[float]:
    """Ping ``client`` every 10 ms until ``until`` is done (at most ``limit_s``)."""
    times: list[float] = []
    deadline = time.monotonic() + limit_s
    while not until.done() and time.monotonic() < deadline:
        t = time.perf_counter()
        assert (await client.ping(timeout=5))["pong"]
        times.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    return times


# ----------------------------------------------------------------------------- line cap


async def test_endless_line_closes_connection_and_others_stay_fast(
    tmp_path: Path, good_agent: AgentClient
) -> None:
    """300 MiB without a newline: the host stops at the cap, never buffers the rest."""
    sent = [0]

    async def endless(msg: dict[str, Any], writer: Writer) -> None:
        block = b"x" * (1 << 20)
        try:
            while sent[0] < 300 << 20:
                writer.write(block)
                await writer.drain()
                sent[0] += len(block)
        except ConnectionError:
            pass

    server, bad = await _hostile(tmp_path, endless)
    async with server, bad:
        call = asyncio.ensure_future(bad.eval("1", timeout=30))
        times = await _ping_times(good_agent, call, 30)
        with pytest.raises(AgentProtocolError, match="longer than") as info:
            await call
        assert len(str(info.value)) < 200
        assert bad.closed
        with pytest.raises(AgentProtocolError):
            await bad.ping()
    assert sent[0] < 300 << 20, "the host kept reading past the cap"
    assert times and max(times) < 0.5, times


async def test_valid_line_over_cap_is_refused(tmp_path: Path) -> None:
    async def huge(msg: dict[str, Any], writer: Writer) -> None:
        writer.write(_line({"id": msg["id"], "ok": True, "result": "a" * (MAX_LINE_BYTES + 10)}))

    server, bad = await _hostile(tmp_path, huge)
    async with server, bad:
        with pytest.raises(AgentProtocolError, match="longer than"):
            await bad.eval("1", timeout=30)
        assert bad.closed


# ----------------------------------------------------------------------------- nesting, types


async def test_deep_nesting_is_a_clean_error(tmp_path: Path, good_agent: AgentClient) -> None:
    depth = 100_000

    async def deep(msg: dict[str, Any], writer: Writer) -> None:
        nested = b"[" * depth + b"]" * depth
        if msg["op"] == "ping":
            await _answer_ping(msg, writer)
            return
        # the same nesting under an id nobody sent: never parsed
        writer.write(b'{"id":"nobody-1","ok":true,"x":' + nested + b"}\n")
        writer.write(b'{"id":"' + msg["id"].encode() + b'","ok":true,"result":' + nested + b"}\n")

    server, bad = await _hostile(tmp_path, deep)
    async with server, bad:
        with pytest.raises(AgentProtocolError, match="malformed reply"):
            await bad.eval("1", timeout=10)
        with pytest.raises(AgentProtocolError, match="malformed reply"):
            await bad.request("exec", timeout=10)
        assert not bad.closed and bad.unknown_responses >= 2
        assert (await bad.ping())["pong"]  # one bad reply fails its request, not the channel
    assert (await good_agent.ping())["pong"]


async def test_open_replies_are_depth_bounded(tmp_path: Path) -> None:
    async def nested_ping(msg: dict[str, Any], writer: Writer) -> None:
        deep: Any = 1
        for _ in range(100):
            deep = [deep]
        writer.write(_line({"id": msg["id"], "ok": True, "pong": True, "extra": deep}))

    server, bad = await _hostile(tmp_path, nested_ping)
    async with server, bad:
        with pytest.raises(AgentProtocolError, match=r"deeper than 64|malformed"):
            await bad.ping()


@pytest.mark.parametrize(
    ("op", "reply", "fragment"),
    [
        ("exec", {"exit_code": "9" * 5000}, "exit_code"),
        ("exec", {"exit_code": "RAW"}, "malformed reply"),
        ("exec", {"exit_code": 0, "stdout": ["a"]}, "stdout"),
        ("exec", {}, "lacks 'exit_code'"),
        ("read_file", {"data_b64": ["AAAA"], "size": 1}, "data_b64"),
        ("read_file", {"data_b64": "!!!!", "size": 1}, "not base64"),
        ("read_file", {"data_b64": "QUJD" * 1000, "size": 1}, "at most"),
        ("write_file", {"size": "12"}, "size"),
        ("list_files", {"entries": [{"name": 1}]}, "entries"),
        ("list_files", {"entries": "nope"}, "entries"),
        ("eval", {"result": {"a": 1}}, "result"),
    ],
)
async def test_wrong_types_are_clean_errors(
    tmp_path: Path, op: str, reply: dict[str, Any], fragment: str
) -> None:
    async def typed(msg: dict[str, Any], writer: Writer) -> None:
        line = _line({"id": msg["id"], "ok": True, **reply})
        writer.write(line.replace(b'"RAW"', b"9" * 5000))  # an int json.dumps refuses to write

    server, bad = await _hostile(tmp_path, typed)
    async with server, bad:
        with pytest.raises(AgentProtocolError, match=fragment) as info:
            if op == "exec":
                await bad.exec(["true"], timeout=5)
            elif op == "read_file":
                await bad.read_file("/x", limit=10)
            elif op == "write_file":
                await bad.write_file("/x", b"data")
            elif op == "list_files":
                await bad.list_files("/x")
            else:
                await bad.eval("1", timeout=5)
        assert len(str(info.value)) < 400


async def test_exec_output_over_requested_cap_is_refused(tmp_path: Path) -> None:
    async def chatty(msg: dict[str, Any], writer: Writer) -> None:
        writer.write(_line({"id": msg["id"], "ok": True, "exit_code": 0, "stdout": "a" * 5000}))

    server, bad = await _hostile(tmp_path, chatty)
    async with server, bad:
        with pytest.raises(AgentProtocolError, match="exceeds the requested cap"):
            await bad.exec(["true"], max_output=100, timeout=5)


async def test_guest_error_text_is_clipped(tmp_path: Path) -> None:
    async def wordy(msg: dict[str, Any], writer: Writer) -> None:
        writer.write(_line({"id": msg["id"], "ok": False, "error": "e" * 100_000, "kind": "x"}))

    server, bad = await _hostile(tmp_path, wordy)
    async with server, bad:
        with pytest.raises(ForkdError) as info:
            await bad.eval("1", timeout=5)
        assert len(str(info.value)) < 1200


# ----------------------------------------------------------------------------- floods


async def test_flood_of_unsolicited_replies_closes_connection(
    tmp_path: Path, good_agent: AgentClient
) -> None:
    async def flood(msg: dict[str, Any], writer: Writer) -> None:
        for i in range(MAX_STRAY_LINES * 3):
            writer.write(_line({"id": f"forged-{i}", "ok": True, "result": "x" * 100}))
            if i % 100 == 0:
                try:
                    await writer.drain()
                except ConnectionError:
                    return

    server, bad = await _hostile(tmp_path, flood)
    async with server, bad:
        call = asyncio.ensure_future(bad.eval("1", timeout=30))
        times = await _ping_times(good_agent, call, 30)
        with pytest.raises(AgentProtocolError, match="flooded"):
            await call
        assert bad.closed
        assert bad.unknown_responses == MAX_STRAY_LINES + 1
    assert times and max(times) < 0.5


async def test_flood_of_junk_before_hello_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.sock"

    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            await reader.readline()
            for _ in range(MAX_STRAY_LINES * 2):
                writer.write(b"junk junk junk\n")
            await writer.drain()
            await asyncio.sleep(5)
        except (ConnectionError, asyncio.CancelledError):
            pass

    async with await asyncio.start_unix_server(handle, path=str(path)):
        with pytest.raises(AgentProtocolError, match="flooded"):
            await AgentClient.connect(path, timeout=5)


async def test_requests_in_flight_are_capped(tmp_path: Path) -> None:
    async def silent(msg: dict[str, Any], writer: Writer) -> None:
        pass

    server, bad = await _hostile(tmp_path, silent)
    async with server, bad:
        waiting = [asyncio.ensure_future(bad.eval("1", timeout=30)) for _ in range(MAX_IN_FLIGHT)]
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match=f"the cap is {MAX_IN_FLIGHT}"):
            await bad.eval("1", timeout=30)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        with pytest.raises(ForkdError, match="timed out"):
            await bad.eval("1", timeout=0.1)  # the slots are free again


# ----------------------------------------------------------------------------- decoder


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_decoder_raises_only_protocol_errors(data: bytes) -> None:
    for op in ("exec", "eval", "read_file", "list_files", "write_file", "ping"):
        with contextlib.suppress(AgentProtocolError):
            agent_wire.decode(op, data)


def test_peek_id_ignores_escaped_text() -> None:
    assert agent_wire.peek_id(b'{"ok":true,"id":"s-1"}') == "s-1"
    assert agent_wire.peek_id(b'{"stdout":"\\"id\\":\\"s-1\\"","ok":true}') is None
    assert agent_wire.peek_id(b"garbage") is None


def test_protocol_errors_are_502() -> None:
    assert AgentProtocolError("x").http_status == 502


# ----------------------------------------------------------------------------- the real agent


@pytest.fixture(scope="module")
def real_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with running_agent(tmp_path_factory.mktemp("agent-hostile")) as b:
        yield b


async def test_files_larger_than_the_cap_move_in_chunks(real_agent: Bridge, tmp_path: Path) -> None:
    data = os.urandom(MAX_LINE_BYTES + 3 * FILE_CHUNK_BYTES + 123)
    path = str(tmp_path / "big.bin")
    async with await AgentClient.connect(real_agent.host_path, timeout=10) as c:
        assert await c.write_file(path, data) == len(data)
        assert Path(path).read_bytes() == data
        assert await c.read_file(path) == data
        assert (
            await c.read_file(path, offset=5, limit=FILE_CHUNK_BYTES * 2 + 7)
            == data[5:][: FILE_CHUNK_BYTES * 2 + 7]
        )
        assert await c.write_file(path, b"") == 0
        assert await c.read_file(path) == b""


async def test_file_transfers_never_send_big_lines(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    store = bytearray()

    async def files(msg: dict[str, Any], writer: Writer) -> None:
        if msg["op"] == "write_file":
            chunk = base64.b64decode(msg["data_b64"])
            if not msg["append"]:
                store.clear()
            store.extend(chunk)
            writer.write(_line({"id": msg["id"], "ok": True, "size": len(store)}))
        else:
            part = bytes(store[msg["offset"] : msg["offset"] + msg["limit"]])
            more = msg["offset"] + len(part) < len(store)
            writer.write(
                _line(
                    {
                        "id": msg["id"],
                        "ok": True,
                        "data_b64": base64.b64encode(part).decode(),
                        "size": len(store),
                        "truncated": more,
                    }
                )
            )

    path = tmp_path / "files.sock"
    async with await _serve(path, files, seen), await AgentClient.connect(path) as c:
        data = os.urandom(5 * FILE_CHUNK_BYTES + 1)
        assert await c.write_file("/f", data) == len(data)
        assert await c.read_file("/f") == data
    writes = [m for m in seen if m["op"] == "write_file"]
    reads = [m for m in seen if m["op"] == "read_file"]
    assert len(writes) == 6 and len(reads) == 6
    assert [m["append"] for m in writes] == [False] + [True] * 5
    assert all(len(m["data_b64"]) <= (FILE_CHUNK_BYTES + 2) // 3 * 4 for m in writes)
    assert all(m["limit"] <= FILE_CHUNK_BYTES for m in reads)
    assert seen[0]["op"] == "hello" and seen[0]["max_line"] == MAX_LINE_BYTES


async def test_agent_keeps_replies_within_the_cap(real_agent: Bridge) -> None:
    async with await AgentClient.connect(real_agent.host_path, timeout=10) as c:
        # NUL bytes encode as \u0000: 6 MiB of them is 36 MiB of JSON; the agent trims
        r = await c.exec(
            cmd="head -c 6000000 /dev/zero; echo done >&2", max_output=8 << 20, timeout=30
        )
        assert r.exit_code == 0 and r.stdout_truncated and r.stdout
        assert set(r.stdout) == {"\0"} and r.stderr == "done\n" and not r.stderr_truncated
        with pytest.raises(PayloadTooLarge, match="line cap"):
            await c.eval(f"'x' * {MAX_LINE_BYTES + 1}", timeout=30)
        assert (await c.eval("'fits'")).result == "'fits'"
        assert not c.closed and c.unknown_responses == 0 and c.junk_lines == 0
