"""Agent events against the host's bounded dispatch (a scripted guest, no VM): events nobody
reads are dropped unparsed without counting as abuse (forks inherit processes), malformed ones
for a reader are junk, and a reader gets its process's events in order."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from forkd.vmm.agent_client import MAX_STRAY_LINES

from .test_agent_hostile import Writer, _hostile, _line


def _event(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def test_unread_events_are_not_abuse_and_read_ones_arrive(tmp_path: Path) -> None:
    async def guest(msg: dict[str, Any], writer: Writer) -> None:
        if msg["op"] == "ping":
            for _ in range(MAX_STRAY_LINES * 2):  # a forked child's inherited chatty process
                writer.write(_event({"event": "proc_output", "pid": 999, "stream": "stdout",
                                     "data_b64": "aGkK"}))  # fmt: skip
            writer.write(_line({"id": msg["id"], "ok": True, "pong": True}))
        elif msg["op"] == "proc_start":
            writer.write(_line({"id": msg["id"], "ok": True, "pid": 5}))
            writer.write(_event({"event": "proc_output", "pid": 5, "stream": "stdout",
                                 "data_b64": "not base64!"}))  # fmt: skip
            writer.write(_event({"event": "proc_output", "pid": 5, "stream": "stderr",
                                 "data_b64": "b2sK"}))  # fmt: skip
            writer.write(_event({"event": "proc_exit", "pid": 5, "exit_code": 0, "signal": None}))

    server, client = await _hostile(tmp_path, guest)
    async with server, client:
        assert (await client.ping(timeout=10))["pong"] is True
        assert not client.closed and client.junk_lines == 0
        stream = await client.proc_start(["true"])
        first = await asyncio.wait_for(stream.next(), 5)
        assert (first.kind, first.data) == ("stderr", b"ok\n")
        end = await asyncio.wait_for(stream.next(), 5)
        assert end.kind == "exit" and end.exit_code == 0
        assert client.junk_lines == 1  # the malformed event for a reader
