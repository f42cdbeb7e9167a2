"""Issue 5's clients against the real daemon: the MCP server over stdio, and the TypeScript SDK."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

from .conftest import TEMPLATE_TAG, DaemonProcess

pytestmark = [pytest.mark.daemon, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]


def payload(result: CallToolResult) -> Any:
    assert not result.is_error, [c.text for c in result.content if isinstance(c, TextContent)]
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if set(content) == {"result"} else content
    text = "\n".join(c.text for c in result.content if isinstance(c, TextContent))
    return json.loads(text)


async def test_mcp_server_over_stdio_drives_a_real_daemon(daemon: DaemonProcess) -> None:
    env = {"FORKD_URL": daemon.url, "FORKD_TOKEN": daemon.token or ""}
    params = StdioServerParameters(command=sys.executable, args=["-m", "forkd", "mcp"], env=env)
    branch_tag = f"mcp-{uuid.uuid4().hex[:8]}"
    async with Client(params, read_timeout_seconds=600) as mcp:

        async def call(tool: str, **args: Any) -> Any:
            return payload(await mcp.call_tool(tool, args))

        names = {t.name for t in (await mcp.list_tools()).tools}
        assert {"spawn_sandboxes", "branch_sandbox", "wait_for_snapshot", "wait_for_text"} <= names

        sid = (await call("spawn_sandboxes", snapshot_tag=TEMPLATE_TAG, n=1))[0]["id"]
        ran = await call("exec_command", sandbox_id=sid, args=["sh", "-c", "echo mcp"])
        assert ran["stdout"] == "mcp\n" and ran["exit_code"] == 0
        assert (await call("eval_code", sandbox_id=sid, code="6 * 7"))["result"] == "42"
        await call("write_file", sandbox_id=sid, path="/root/note.txt", content="hi")
        assert (await call("read_file", sandbox_id=sid, path="/root/note.txt"))["content"] == "hi"
        await call("exec_command", sandbox_id=sid, args=["sh", "-c", "echo READY >> /root/log"])
        waited = await call("wait_for_text", sandbox_id=sid, path="/root/log", marker="READY")
        assert waited["found"] is True

        branch = await call("branch_sandbox", sandbox_id=sid, tag=branch_tag, mode="live",
                            wait=False)  # fmt: skip
        assert branch["status"] == "writing"
        assert (await call("wait_for_snapshot", tag=branch_tag))["status"] == "ready"
        kid = (await call("spawn_sandboxes", snapshot_tag=branch_tag))[0]["id"]
        assert (await call("read_file", sandbox_id=kid, path="/root/note.txt"))["content"] == "hi"

        bad = await mcp.call_tool("spawn_sandboxes", {"snapshot_tag": "no-such-tag"})
        assert bad.is_error and "not found" in str(bad.content)

        for s in (sid, kid):
            await call("kill_sandbox", sandbox_id=s)
        listed = await call("list_sandboxes")
        assert {sid, kid}.isdisjoint(s["id"] for s in listed)
    with daemon.client() as c:
        assert c.delete(f"/v1/snapshots/{branch_tag}").status_code == 204


def test_typescript_sdk_integration(daemon: DaemonProcess) -> None:
    sdk = REPO / "sdk" / "typescript"
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (scripts/setup.sh test installs it)")
    if not (sdk / "node_modules").is_dir():
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"], cwd=sdk, check=True)
    env = {**os.environ, "FORKD_URL": daemon.url, "FORKD_TOKEN": daemon.token or "",
           "FORKD_TEST_TAG": TEMPLATE_TAG}  # fmt: skip
    proc = subprocess.run([npm, "run", "--silent", "test:integration"], cwd=sdk, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "# fail 0" in out and "# skipped 0" in out, out
    assert "# pass 0" not in out, out
