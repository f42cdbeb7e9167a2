"""Streamed exec on forkd's own API: ``POST /v1/sandboxes/{id}/exec/stream`` and the SDK's
``commands.run(on_stdout=...)``, against the tier's daemon and real VMs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from forkd.client import Sandbox

from .conftest import TEMPLATE_TAG, DaemonProcess

pytestmark = [pytest.mark.daemon, pytest.mark.vm]


@pytest.fixture
def sandbox_id(api: httpx.Client) -> Iterator[str]:
    r = api.post("/v1/sandboxes", json={"snapshot_tag": TEMPLATE_TAG, "n": 1})
    assert r.status_code in (200, 201), r.text
    sid = str(r.json()[0]["id"])
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def stream(api: httpx.Client, sid: str, body: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    out = []
    with api.stream("POST", f"/v1/sandboxes/{sid}/exec/stream", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            out.append((time.monotonic(), json.loads(line)))
    return out


def test_output_streams_as_produced(api: httpx.Client, sandbox_id: str) -> None:
    script = "echo a; sleep 1.5; echo b; echo err >&2; exit 2"
    events = stream(api, sandbox_id, {"args": ["/bin/sh", "-c", script]})
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "start" and events[0][1]["pid"] > 1
    assert kinds[-1] == "exit"
    first_out = next(t for t, e in events if e["type"] == "stdout")
    assert events[-1][0] - first_out > 1.0, "stdout arrived only at the end"
    stdout = "".join(e["data"] for _, e in events if e["type"] == "stdout")
    stderr = "".join(e["data"] for _, e in events if e["type"] == "stderr")
    assert (stdout, stderr) == ("a\nb\n", "err\n")
    end = events[-1][1]
    assert end["exit_code"] == 2 and end["timed_out"] is False


def test_stdin_env_cwd_and_timeout(api: httpx.Client, sandbox_id: str) -> None:
    body = {"args": ["/bin/sh", "-c", "cat; echo $X; pwd"], "stdin": "in\n", "env": {"X": "y"}}
    events = stream(api, sandbox_id, {**body, "cwd": "/tmp"})
    assert "".join(e.get("data", "") for _, e in events) == "in\ny\n/tmp\n"
    events = stream(api, sandbox_id, {"args": ["sleep", "30"], "timeout_secs": 0.5})
    assert events[-1][1]["timed_out"] is True and events[-1][1]["exit_code"] == -9


def test_errors_before_start(api: httpx.Client, sandbox_id: str) -> None:
    r = api.post("/v1/sandboxes/sb-nosuch/exec/stream", json={"args": ["true"]})
    assert r.status_code == 404 and "error" in r.json()
    r = api.post(f"/v1/sandboxes/{sandbox_id}/exec/stream", json={"args": []})
    assert r.status_code == 400
    r = api.post(f"/v1/sandboxes/{sandbox_id}/exec/stream",
                 json={"args": ["true"], "timeout_secs": -1})  # fmt: skip
    assert r.status_code == 400
    r = api.post(f"/v1/sandboxes/{sandbox_id}/exec/stream", json={"args": ["/no/such"]})
    assert r.status_code == 404 and "/no/such" in r.json()["error"]


def test_sdk_on_stdout(daemon: DaemonProcess) -> None:
    with Sandbox.create(TEMPLATE_TAG, base_url=daemon.url, token=daemon.token) as sb:
        seen: list[tuple[float, str]] = []
        result = sb.commands.run(
            "echo x; sleep 1.5; echo y >&2; exit 1",
            on_stdout=lambda s: seen.append((time.monotonic(), s)),
            on_stderr=lambda s: seen.append((time.monotonic(), "E:" + s)),
        )
        done = time.monotonic()
        assert [s for _, s in seen] == ["x\n", "E:y\n"]
        assert done - seen[0][0] > 1.0
        assert (result.stdout, result.stderr, result.exit_code) == ("x\n", "y\n", 1)
        plain = sb.commands.run("echo plain")
        assert plain.stdout == "plain\n"
