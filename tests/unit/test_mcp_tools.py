"""The MCP server over the SDK's in-process client: tool listing, calls, daemon errors."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.types import CallToolResult, TextContent

from forkd.client import AsyncController
from forkd.mcp_server import TOOL_NAMES, create_server, run

REQUIRED_TOOLS = {
    "list_snapshots",
    "create_snapshot",
    "spawn_sandboxes",
    "list_sandboxes",
    "get_sandbox",
    "kill_sandbox",
    "exec_command",
    "eval_code",
    "ping_sandbox",
    "branch_sandbox",
    "wait_for_snapshot",
    "read_file",
    "write_file",
    "wait_for_text",
}


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


class Recorder:
    """A fake daemon for the server's AsyncController."""

    def __init__(self, answer: Any = None, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.answers: dict[str, httpx.Response] = {}
        self.default = httpx.Response(status, json=answer if answer is not None else {})

    def handle(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        return self.answers.get(req.url.path, self.default)

    def controller(self) -> AsyncController:
        return AsyncController("http://forkd.test", transport=httpx.MockTransport(self.handle))

    def body(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)


async def test_lists_every_tool_with_description_and_schema() -> None:
    async with Client(create_server(base_url="http://127.0.0.1:1")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) >= REQUIRED_TOOLS
    assert set(tools) == set(TOOL_NAMES)
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert tool.input_schema["type"] == "object"
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} lacks a description"
    spawn = tools["spawn_sandboxes"].input_schema
    assert spawn["required"] == ["snapshot_tag"]
    assert spawn["properties"]["live_fork"]["default"] is False
    branch = tools["branch_sandbox"].input_schema["properties"]
    assert {"mode", "wait", "tag"} <= set(branch)
    assert "live" in json.dumps(branch["mode"])
    assert set(tools["exec_command"].input_schema["required"]) == {"sandbox_id", "args"}
    assert set(tools["wait_for_text"].input_schema["required"]) == {"sandbox_id", "path", "marker"}
    assert tools["list_sandboxes"].annotations is not None
    assert tools["list_sandboxes"].annotations.read_only_hint is True
    assert tools["kill_sandbox"].annotations is not None
    assert tools["kill_sandbox"].annotations.destructive_hint is True


async def test_unreachable_daemon_is_a_tool_error_not_a_crash() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    async with Client(create_server(base_url=url)) as client:
        result = await client.call_tool("list_sandboxes", {})
        assert result.is_error
        assert "cannot connect" in text(result)
        assert url in text(result)
        result = await client.call_tool("exec_command", {"sandbox_id": "sb-1", "args": ["ls"]})
        assert result.is_error
        # the server survives and still answers
        assert len((await client.list_tools()).tools) == len(TOOL_NAMES)


async def test_daemon_error_message_reaches_the_model() -> None:
    daemon = Recorder({"error": "no sandbox with id sb-x"}, status=404)
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool("get_sandbox", {"sandbox_id": "sb-x"})
    assert result.is_error
    assert "no sandbox with id sb-x" in text(result)
    assert "404" in text(result)


async def test_bad_arguments_are_a_tool_error() -> None:
    daemon = Recorder()
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool("branch_sandbox", {"sandbox_id": "a", "mode": "turbo"})
        assert result.is_error
        result = await client.call_tool("spawn_sandboxes", {"snapshot_tag": "py", "n": 0})
        assert result.is_error
    assert daemon.requests == []


async def test_exec_command_string_runs_through_sh() -> None:
    daemon = Recorder({"stdout": "x\n", "stderr": "", "exit_code": 0})
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool(
            "exec_command", {"sandbox_id": "sb-1", "args": "ls | wc -l", "cwd": "/tmp"}
        )
    assert not result.is_error
    assert daemon.requests[0].url.path == "/v1/sandboxes/sb-1/exec"
    assert daemon.body() == {
        "args": ["/bin/sh", "-c", "ls | wc -l"],
        "timeout_secs": 30,
        "cwd": "/tmp",
    }
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == "x\n"


async def test_spawn_and_branch_serialization() -> None:
    daemon = Recorder([{"id": "sb-1", "snapshot_tag": "py"}])
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool(
            "spawn_sandboxes", {"snapshot_tag": "py", "live_fork": True}
        )
        assert not result.is_error
        assert json.loads(text(result)) == [{"id": "sb-1", "snapshot_tag": "py"}]
        assert daemon.body() == {
            "snapshot_tag": "py",
            "n": 1,
            "per_child_netns": False,
            "live_fork": True,
        }
        await client.call_tool(
            "branch_sandbox", {"sandbox_id": "sb-1", "mode": "live", "wait": False, "diff": True}
        )
        assert daemon.requests[-1].url.path == "/v1/sandboxes/sb-1/branch"
        assert daemon.body() == {"mode": "live", "wait": False}


async def test_workspace_tools() -> None:
    ws = {"name": "dev", "status": "running", "live_sandbox_id": "sb-1"}
    daemon = Recorder(ws)
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool(
            "create_workspace", {"name": "dev", "snapshot_tag": "py", "memory_limit_mib": 256}
        )
        assert not result.is_error and result.structured_content == ws
        assert (daemon.requests[-1].method, daemon.requests[-1].url.path) == (
            "POST", "/v1/workspaces",
        )  # fmt: skip
        assert daemon.body() == {"name": "dev", "snapshot_tag": "py", "per_child_netns": False,
                                 "memory_limit_mib": 256}  # fmt: skip
        await client.call_tool("suspend_workspace", {"name": "dev", "diff": True})
        assert daemon.requests[-1].url.path == "/v1/workspaces/dev/suspend"
        assert daemon.body() == {"diff": True}
        await client.call_tool("resume_workspace", {"name": "dev"})
        assert daemon.requests[-1].url.path == "/v1/workspaces/dev/resume"
        await client.call_tool("get_workspace", {"name": "dev"})
        assert daemon.requests[-1].method == "GET"
        result = await client.call_tool("delete_workspace", {"name": "dev"})
        assert daemon.requests[-1].method == "DELETE"
        assert result.structured_content == {"name": "dev", "deleted": True}
    daemon = Recorder({"error": "workspace 'dev' is suspended: only a running ..."}, status=409)
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool("suspend_workspace", {"name": "dev"})
    assert result.is_error and "409" in text(result) and "is suspended" in text(result)


async def test_empty_list_is_readable() -> None:
    daemon = Recorder([])
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool("list_snapshots", {})
    assert not result.is_error
    assert text(result) == "[]"


async def test_read_and_write_file() -> None:
    daemon = Recorder({"path": "/f", "size": 3})
    daemon.answers["/v1/sandboxes/sb-1/files/content"] = httpx.Response(200, content=b"\xff\x00ab")
    async with Client(create_server(daemon.controller())) as client:
        read = await client.call_tool("read_file", {"sandbox_id": "sb-1", "path": "/f"})
        assert read.structured_content is not None
        assert read.structured_content["encoding"] == "base64"  # not UTF-8
        assert read.structured_content["content"] == "/wBhYg=="
        assert read.structured_content["size"] == 4
        del daemon.answers["/v1/sandboxes/sb-1/files/content"]
        wrote = await client.call_tool(
            "write_file", {"sandbox_id": "sb-1", "path": "/f", "content": "abc"}
        )
        assert not wrote.is_error
        assert daemon.requests[-1].method == "PUT"
        assert daemon.requests[-1].content == b"abc"


async def test_wait_for_text_polls_until_marker() -> None:
    contents = iter([b"booting\n", b"booting\nREADY\n"])

    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/files/content"):
            return httpx.Response(200, content=next(contents))
        return httpx.Response(200, json={})

    ctl = AsyncController("http://forkd.test", transport=httpx.MockTransport(handle))
    async with Client(create_server(ctl)) as client:
        result = await client.call_tool(
            "wait_for_text",
            {"sandbox_id": "sb-1", "path": "/log", "marker": "READY", "poll_interval_ms": 10},
        )
    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["found"] is True
    assert result.structured_content["last_excerpt"].endswith("READY\n")


async def test_wait_for_snapshot_failure_carries_daemon_error() -> None:
    daemon = Recorder({"tag": "b", "status": "failed", "error": "guest agent died"})
    async with Client(create_server(daemon.controller())) as client:
        result = await client.call_tool("wait_for_snapshot", {"tag": "b"})
    assert result.is_error
    assert "guest agent died" in text(result)


def test_run_refuses_bad_transport_and_remote_http() -> None:
    with pytest.raises(ValueError, match="transport"):
        run("carrier-pigeon")
    with pytest.raises(ValueError, match="non-loopback"):
        run("streamable-http", host="0.0.0.0")


async def test_spawn_egress_and_expose_port_reach_the_daemon() -> None:
    daemon = Recorder(answer=[{"id": "sb-1", "snapshot_tag": "py", "pid": 1}])
    forward = {"port": 8000, "host": "127.0.0.1", "host_port": 4000, "url": "http://127.0.0.1:4000"}
    daemon.answers["/v1/sandboxes/sb-1/ports"] = httpx.Response(201, json=forward)
    async with Client(create_server(daemon.controller())) as client:
        await client.call_tool(
            "spawn_sandboxes", {"snapshot_tag": "py", "allow": ["host:8080", "example.com"]}
        )
        assert daemon.body()["network"] == {"egress": "allowlist",
                                            "allow": ["host:8080", "example.com"]}  # fmt: skip
        await client.call_tool("spawn_sandboxes", {"snapshot_tag": "py"})
        assert "network" not in daemon.body()
        result = await client.call_tool("expose_port", {"sandbox_id": "sb-1", "port": 8000})
        assert not result.is_error and "http://127.0.0.1:4000" in text(result)
        assert daemon.requests[-1].url.path == "/v1/sandboxes/sb-1/ports"
        assert daemon.body() == {"port": 8000}
