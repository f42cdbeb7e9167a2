"""The daemon over real VMs: every endpoint through raw HTTP, the Python SDK (Controller,
Sandbox, AsyncSandbox) and the CLI; the error rows of the wire API; auth and the audit log; a
sandbox killed behind the daemon's back; a daemon restart with sandboxes running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkd import wire
from forkd.api.models import SpawnedSandbox
from forkd.client import AsyncSandbox, Controller, ControllerError, Sandbox
from forkd.config import Settings

from .conftest import EVAL_TIMEOUT_S, TEMPLATE_TAG, DaemonProcess, clean_env

pytestmark = [pytest.mark.daemon, pytest.mark.vm]


def expect(r: httpx.Response, status: int, fragment: str | None = None) -> Any:
    """Assert the status (and, for errors, the ``{"error"}`` shape); the parsed body."""
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    if status == 204:
        assert r.content == b""
        return None
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        if status >= 400:
            assert set(body) == {"error"} and isinstance(body["error"], str), body
            if fragment is not None:
                assert fragment in body["error"], body
        return body
    return r.content


def spawn(api: httpx.Client, n: int = 1, tag: str = TEMPLATE_TAG) -> list[dict[str, Any]]:
    return list(expect(api.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": n}), 201))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a non-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def metric(api: httpx.Client, name: str) -> float:
    text = expect(api.get("/metrics"), 200).decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def sandboxes(api: httpx.Client) -> Iterator[list[str]]:
    """Ids appended here are killed after the test (whatever state they are in)."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


@pytest.fixture
def snapshots(api: httpx.Client) -> Iterator[list[str]]:
    """Tags appended here are deleted (with their dependents) after the test."""
    tags: list[str] = []
    yield tags
    for tag in reversed(tags):
        api.delete(f"/v1/snapshots/{tag}", params={"cascade": "true"})


# --- raw HTTP ------------------------------------------------------------------------------------


def test_raw_http_round_trip(api: httpx.Client, sandboxes: list[str]) -> None:
    children = spawn(api, 2)
    sandboxes += [c["id"] for c in children]
    for c in children:
        SpawnedSandbox.model_validate(c)
        assert c["snapshot_tag"] == TEMPLATE_TAG and c["state"] == "running"
        assert c["fork_timing_ms"]["total_ms"] > 0
    a, b = (c["id"] for c in children)

    listed = {s["id"] for s in expect(api.get("/v1/sandboxes"), 200)}
    assert {a, b} <= listed
    info = wire.SandboxInfo.model_validate(expect(api.get(f"/v1/sandboxes/{a}"), 200))
    assert info.id == a and info.pid > 0

    assert expect(api.post(f"/v1/sandboxes/{a}/ping"), 200)["pong"] is True
    run = expect(
        api.post(f"/v1/sandboxes/{a}/exec", json={"args": ["python3", "-c", "print(6 * 7)"]}), 200
    )
    assert (run["stdout"], run["stderr"], run["exit_code"]) == ("42\n", "", 0)
    run = expect(
        api.post(
            f"/v1/sandboxes/{a}/exec",
            json={
                "args": ["/bin/sh", "-c", 'cat; echo "$GREETING"; pwd; exit 3'],
                "env": {"GREETING": "hello"},
                "cwd": "/tmp",
                "stdin": "from stdin\n",
                "timeout_secs": 20,
            },
        ),
        200,
    )
    assert run["stdout"] == "from stdin\nhello\n/tmp\n" and run["exit_code"] == 3

    warm = expect(api.post(f"/v1/sandboxes/{a}/eval", json={"code": "WARM_MARKER"}), 200)
    assert warm == {**warm, "result": "'warm'", "error": None, "exit_code": 0}
    failed = expect(api.post(f"/v1/sandboxes/{a}/eval", json={"code": "1/0"}), 200)
    assert failed["result"] is None and "ZeroDivisionError" in failed["error"]

    # files: write, read back, list, remove; the other child never sees them
    payload = bytes(range(256)) * 64
    q = {"path": "/root/data/blob.bin"}
    written = expect(api.put(f"/v1/sandboxes/{a}/files/content", params=q, content=payload), 200)
    assert written == {"path": "/root/data/blob.bin", "size": len(payload)}
    r = api.get(f"/v1/sandboxes/{a}/files/content", params=q)
    assert expect(r, 200) == payload
    assert r.headers["content-type"] == "application/octet-stream"
    entries = expect(api.get(f"/v1/sandboxes/{a}/files", params={"path": "/root/data"}), 200)
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [
        ("blob.bin", "file", len(payload))
    ]
    for e in entries:
        wire.FileEntry.model_validate(e)
    expect(api.get(f"/v1/sandboxes/{b}/files/content", params=q), 404)
    expect(api.delete(f"/v1/sandboxes/{a}/files", params={"path": "/root/data"}), 409, "not empty")
    put_dir = api.put(
        f"/v1/sandboxes/{a}/files/content", params={"path": "/root/data"}, content=b"x"
    )
    expect(put_dir, 400, "Is a directory")
    read_dir = api.get(f"/v1/sandboxes/{a}/files/content", params={"path": "/root/data"})
    assert 400 <= read_dir.status_code < 500, read_dir.text
    expect(
        api.delete(f"/v1/sandboxes/{a}/files", params={"path": "/root/data", "recursive": "true"}),
        204,
    )
    expect(api.get(f"/v1/sandboxes/{a}/files/content", params=q), 404)

    expect(api.delete(f"/v1/sandboxes/{a}"), 204)
    expect(api.get(f"/v1/sandboxes/{a}"), 404, "not found")
    expect(api.post(f"/v1/sandboxes/{a}/ping"), 404)
    assert a not in {s["id"] for s in expect(api.get("/v1/sandboxes?all=true"), 200)}
    assert expect(api.post(f"/v1/sandboxes/{b}/eval", json={"code": "2+2"}), 200)["result"] == "4"


def test_error_rows(api: httpx.Client, sandboxes: list[str], snapshots: list[str]) -> None:
    [child] = spawn(api)
    sid = child["id"]
    sandboxes.append(sid)
    sb = f"/v1/sandboxes/{sid}"
    rows: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "py", "n": 0}}, 400, "at least 1"),
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "py", "n": 1001}}, 400, "at most"),
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "../etc"}}, 400, "invalid snapshot"),
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "nope"}}, 404, "'nope' not found"),
        ("POST", "/v1/sandboxes", {"json": {"n": 1}}, 400, "snapshot_tag"),
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "py", "n": "x"}}, 400, "'n'"),
        (
            "POST",
            "/v1/sandboxes",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("POST", "/v1/sandboxes", {"json": {"snapshot_tag": "py", "n": 300}}, 503, "limit"),
        ("POST", "/v1/snapshots", {"json": {"tag": "py"}}, 409, "already exists"),
        ("POST", "/v1/snapshots", {"json": {"tag": "a/b"}}, 400, "invalid snapshot tag"),
        ("POST", "/v1/snapshots", {"json": {"tag": "x", "image": "nosuch"}}, 404, "not built"),
        ("DELETE", "/v1/snapshots/nope", {}, 404, "not found"),
        (
            "DELETE",
            "/v1/snapshots/py",
            {"params": {"cascade": "true", "force": "true"}},
            400,
            "either cascade or force",
        ),
        ("GET", "/v1/snapshots/nope/info", {}, 404, "not found"),
        ("POST", "/v1/snapshots/py/compact", {"json": {"to": "py"}}, 400, "equals the source"),
        ("POST", "/v1/snapshots/py/compact", {"json": {"to": "../x"}}, 400, "invalid"),
        ("GET", "/v1/sandboxes/sb-000000000000", {}, 404, "not found"),
        ("GET", "/v1/sandboxes/bad.id", {}, 400, "invalid sandbox id"),
        ("DELETE", "/v1/sandboxes/sb-000000000000", {}, 404, "not found"),
        ("POST", "/v1/sandboxes/sb-000000000000/exec", {"json": {"args": ["true"]}}, 404, ""),
        ("POST", f"{sb}/exec", {"json": {"args": []}}, 400, "non-empty"),
        ("POST", f"{sb}/exec", {"json": {"args": ["true"], "timeout_secs": -1}}, 400, "timeout"),
        ("POST", f"{sb}/exec", {"json": {"args": ["a\u0000b"]}}, 400, "NUL"),
        ("POST", f"{sb}/exec", {"json": {}}, 400, "'args'"),
        ("POST", f"{sb}/eval", {"json": {"code": 5}}, 400, "'code'"),
        (
            "POST",
            f"{sb}/branch",
            {"json": {"mode": "full", "diff": True}},
            400,
            "cannot be combined",
        ),
        ("POST", f"{sb}/branch", {"json": {"mode": "diff", "wait": False}}, 400, "needs mode"),
        ("POST", f"{sb}/branch", {"json": {"mode": "fast"}}, 400, "'mode'"),
        ("POST", f"{sb}/branch", {"json": {"tag": "../x"}}, 400, "invalid snapshot tag"),
        ("POST", f"{sb}/branch", {"json": {"tag": "py"}}, 409, "already exists"),
        ("POST", "/v1/sandboxes/sb-000000000000/branch", {}, 404, "not found"),
        ("GET", f"{sb}/files", {}, 400, "'path'"),
        ("GET", f"{sb}/files/content", {"params": {"path": "relative"}}, 400, "absolute"),
        ("GET", f"{sb}/files/content", {"params": {"path": "/no/such"}}, 404, ""),
        ("GET", "/v1/nothing-here", {}, 404, "no such endpoint"),
        ("PATCH", "/v1/snapshots", {}, 405, "not allowed"),
        ("POST", "/v1/workspaces", {"json": {"name": "a b", "snapshot_tag": "py"}}, 400, "name"),
        ("POST", "/v1/workspaces", {"json": {"name": "w", "snapshot_tag": "nope"}}, 404, ""),
        ("GET", "/v1/workspaces/w", {}, 404, "workspace 'w' not found"),
        ("DELETE", "/v1/workspaces/w", {}, 404, ""),
        ("POST", "/v1/workspaces/w/suspend", {"json": {"diff": True}}, 404, ""),
        ("POST", "/v1/workspaces/w/resume", {}, 404, ""),
    ]
    for method, path, kwargs, status, fragment in rows:
        expect(api.request(method, path, **kwargs), status, fragment)

    # A snapshot that is not bootable (its memory is gone: tmpfs file and disk copy) is refused
    # with 409.
    snapshots.append("broken")
    expect(api.post("/v1/snapshots/py/compact", json={"to": "broken"}), 200)
    broken = expect(api.get("/v1/snapshots/broken/info"), 200)
    assert broken["memory_disk_path"], "compact writes a durable copy"
    os.unlink(broken["memory_path"])
    os.unlink(broken["memory_disk_path"])
    info = next(s for s in expect(api.get("/v1/snapshots"), 200) if s["tag"] == "broken")
    assert info["bootable"] is False
    expect(api.post("/v1/sandboxes", json={"snapshot_tag": "broken"}), 409, "not bootable")
    # Nothing above left a sandbox behind.
    assert [s["id"] for s in expect(api.get("/v1/sandboxes"), 200)] == [sid]


def test_create_snapshot_accepts_forkd_v05_form(api: httpx.Client, snapshots: list[str]) -> None:
    """kernel/rootfs paths are ignored with a warning and an image is used (a small guest)."""
    snapshots.append("v05")
    body = {
        "tag": "v05",
        "kernel": "/boot/vmlinux",
        "rootfs": "/tmp/rootfs.ext4",
        "rw": False,
        "boot_wait_secs": 10,
        "mem_mib": 256,
    }
    info = expect(api.post("/v1/snapshots", json=body), 201)
    wire.SnapshotInfo.model_validate(info)
    assert info["tag"] == "v05" and info["status"] == "ready" and info["bootable"] is True
    assert "ignored" in info["warning"] and "python" in info["warning"]
    assert info["image"] == "python" and info["mem_mib"] == 256
    expect(api.delete("/v1/snapshots/v05"), 204)
    expect(api.get("/v1/snapshots/v05/info"), 404)


def test_branch_dependents_and_live_branch(
    api: httpx.Client, sandboxes: list[str], snapshots: list[str]
) -> None:
    before = metric(api, "forkd_branch_seconds_count")
    [src] = spawn(api)
    sandboxes.append(src["id"])
    sb = f"/v1/sandboxes/{src['id']}"
    expect(api.post(f"{sb}/eval", json={"code": "STATE = 'before-branch'"}), 200)

    snapshots.append("br-full")
    full = expect(api.post(f"{sb}/branch", json={"tag": "br-full", "mode": "full"}), 201)
    wire.SnapshotInfo.model_validate(full)
    assert (full["status"], full["branched_from"], full["mode"]) == ("ready", src["id"], "full")
    [kid] = spawn(api, tag="br-full")
    sandboxes.append(kid["id"])
    state = expect(api.post(f"/v1/sandboxes/{kid['id']}/eval", json={"code": "STATE"}), 200)
    assert state["result"] == "'before-branch'"
    assert expect(api.get(sb), 200)["branch_count"] == 1

    detail = expect(api.get("/v1/snapshots/br-full/info"), 200)
    assert detail["ancestors"] == [TEMPLATE_TAG] and detail["chain_depth"] == 1
    assert "br-full" in expect(api.get(f"/v1/snapshots/{TEMPLATE_TAG}/info"), 200)["dependents"]

    snapshots.append("br-live")
    live = api.post(f"{sb}/branch", json={"tag": "br-live", "mode": "live", "wait": False})
    assert expect(live, 202)["status"] in ("writing", "ready")
    deadline = time.monotonic() + 120
    while (status := expect(api.get("/v1/snapshots/br-live/info"), 200)["status"]) == "writing":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == "ready"
    assert metric(api, "forkd_branch_seconds_count") >= before + 2


# --- SDKs ----------------------------------------------------------------------------------------


def test_controller_sdk(daemon: DaemonProcess) -> None:
    with Controller(daemon.url, daemon.token) as c:
        assert c.healthz() == {"ok": True}
        assert c.version()["api"] == "v1"
        assert TEMPLATE_TAG in {s["tag"] for s in c.list_snapshots()}
        [child] = c.spawn_sandboxes(TEMPLATE_TAG, n=1, live_fork=True, prewarm=True)
        sid = child["id"]
        try:
            assert c.get_sandbox(sid)["id"] == sid
            assert c.ping_sandbox(sid)["pong"] is True
            assert c.exec_command(sid, ["echo", "sdk"])["stdout"] == "sdk\n"
            assert c.eval_code(sid, "21 * 2")["result"] == "42"
            assert c.write_file(sid, "/tmp/s.txt", "text")["size"] == 4
            assert c.read_file(sid, "/tmp/s.txt") == b"text"
            assert "s.txt" in {e["name"] for e in c.list_files(sid, "/tmp")}
            c.remove_file(sid, "/tmp/s.txt")
            with pytest.raises(ControllerError) as err:
                c.read_file(sid, "/tmp/s.txt")
            assert err.value.status == 404
        finally:
            c.kill_sandbox(sid)
        with pytest.raises(ControllerError) as err:
            c.get_sandbox(sid)
        assert err.value.status == 404 and "not found" in err.value.error
        with pytest.raises(ControllerError) as err:
            c.spawn_sandboxes(TEMPLATE_TAG, n=0)
        assert err.value.status == 400
    with (
        Controller(daemon.url, "wrong-token-0123456789") as bad,
        pytest.raises(ControllerError) as e,
    ):
        bad.list_sandboxes()
    assert e.value.status == 401 and e.value.error == "invalid bearer token"


def test_sandbox_sdk_and_fork(daemon: DaemonProcess) -> None:
    with Sandbox.create(TEMPLATE_TAG, base_url=daemon.url, token=daemon.token) as sb:
        assert sb.is_running()
        r = sb.commands.run("echo $X; cat", envs={"X": "env-ok"}, stdin="piped")
        assert (r.stdout, r.exit_code, r.ok) == ("env-ok\npiped", 0, True)
        sb.files.write("/root/state.txt", "parent state")
        assert sb.files.read("/root/state.txt") == "parent state"
        assert "state.txt" in {e.name for e in sb.files.list("/root")}
        assert sb.eval("WARM_MARKER") == "'warm'"
        assert sb.eval_result("print('out'); 5").stdout == "out\n"
        kids = sb.fork(2, tag="sdk-fork")
        try:
            for kid in kids:
                assert kid.files.read("/root/state.txt") == "parent state"
                assert kid.id != sb.id
        finally:
            for kid in kids:
                kid.kill()
            sb.controller.delete_snapshot("sdk-fork", cascade=True)
        sb.files.remove("/root/state.txt")
        sid = sb.id
    with Controller(daemon.url, daemon.token) as c:
        assert sid not in {s["id"] for s in c.list_sandboxes()}


async def test_async_sandbox_sdk(daemon: DaemonProcess) -> None:
    async with await AsyncSandbox.create(
        TEMPLATE_TAG, base_url=daemon.url, token=daemon.token
    ) as sb:
        assert (await sb.ping())["pong"] is True
        assert (await sb.commands.run(["python3", "-c", "print('async')"])).stdout == "async\n"
        await sb.files.write("/tmp/a.bin", b"\x00\x01")
        assert await sb.files.read("/tmp/a.bin", format="bytes") == b"\x00\x01"
        assert [e.name for e in await sb.files.list("/tmp") if e.name == "a.bin"] == ["a.bin"]
        await sb.files.remove("/tmp/a.bin")
        assert await sb.eval("import numpy; int(numpy.arange(5).sum())") == "10"
        assert await sb.is_running()
    with Controller(daemon.url, daemon.token) as c:
        assert sb.id not in {s["id"] for s in c.list_sandboxes()}


# --- liveness, bounds ----------------------------------------------------------------------------


def test_qemu_killed_behind_the_daemons_back(api: httpx.Client, sandboxes: list[str]) -> None:
    victim, survivor = spawn(api, 2)
    sandboxes += [victim["id"], survivor["id"]]
    os.kill(victim["pid"], 9)
    deadline = time.monotonic() + 5
    while (info := expect(api.get(f"/v1/sandboxes/{victim['id']}"), 200))["state"] != "dead":
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info["dead_reason"]
    assert victim["id"] not in {s["id"] for s in expect(api.get("/v1/sandboxes"), 200)}
    assert victim["id"] in {s["id"] for s in expect(api.get("/v1/sandboxes?all=true"), 200)}
    sb = f"/v1/sandboxes/{victim['id']}"
    for method, path, body in (
        ("POST", f"{sb}/exec", {"args": ["true"]}),
        ("POST", f"{sb}/eval", {"code": "1"}),
        ("POST", f"{sb}/ping", None),
        ("POST", f"{sb}/branch", {}),
    ):
        t0 = time.monotonic()
        expect(api.request(method, path, json=body), 410, "is dead")
        assert time.monotonic() - t0 < 2, f"{path} took too long to fail"
    run = api.post(f"/v1/sandboxes/{survivor['id']}/exec", json={"args": ["echo", "alive"]})
    assert expect(run, 200)["stdout"] == "alive\n"
    expect(api.delete(sb), 204)
    assert metric(api, "forkd_sandbox_deaths_total") >= 1


def test_slow_eval_answers_504_not_a_hang(api: httpx.Client, sandboxes: list[str]) -> None:
    [child] = spawn(api)
    sandboxes.append(child["id"])
    sb = f"/v1/sandboxes/{child['id']}"
    t0 = time.monotonic()
    slow = api.post(f"{sb}/eval", json={"code": f"import time; time.sleep({EVAL_TIMEOUT_S + 2})"})
    elapsed = time.monotonic() - t0
    expect(slow, 504, "did not finish within")
    assert EVAL_TIMEOUT_S - 0.5 < elapsed < EVAL_TIMEOUT_S + 5
    # The sandbox is still usable once the guest finishes the abandoned call.
    deadline = time.monotonic() + 30
    while True:
        r = api.post(f"{sb}/eval", json={"code": "'still here'"})
        if r.status_code == 200:
            break
        assert r.status_code == 504 and time.monotonic() < deadline, r.text
    assert r.json()["result"] == "'still here'"


def test_body_over_the_cap_is_413(daemon: DaemonProcess) -> None:
    head = (
        "PUT /v1/sandboxes/sb-000000000000/files/content?path=/tmp/x HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {daemon.token}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 200000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(head.encode())
        reply = b""
        while chunk := s.recv(65536):  # the daemon closes the connection after a 413
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line, reply
    assert b"request body too large" in rest


# --- auth, audit, metrics ------------------------------------------------------------------------


def test_auth_and_audit_log(daemon: DaemonProcess) -> None:
    agent = f"audit-probe-{time.time_ns()}"
    url = daemon.url
    h = {"User-Agent": agent}
    assert httpx.get(f"{url}/healthz", headers=h).json() == {"ok": True}
    missing = httpx.get(f"{url}/v1/sandboxes", headers=h)
    assert (missing.status_code, missing.json()) == (401, {"error": "missing bearer token"})
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(f"{url}/v1/sandboxes", headers={**h, "Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid bearer token"})
    basic = httpx.get(f"{url}/version", headers={**h, "Authorization": "Basic dXNlcjpwYXNz"})
    assert (basic.status_code, basic.json()["error"]) == (401, "missing bearer token")
    unknown = httpx.get(f"{url}/no/such/route", headers=h)
    assert unknown.status_code == 401  # auth comes before routing: no endpoint probing
    lower = httpx.get(f"{url}/version", headers={**h, "Authorization": f"bearer {daemon.token}"})
    assert lower.status_code == 200
    ok = httpx.get(f"{url}/v1/snapshots", headers={**h, **daemon.headers})
    assert ok.status_code == 200
    expected = [
        ("GET", "/healthz", 200),
        ("GET", "/v1/sandboxes", 401),
        ("GET", "/v1/sandboxes", 401),
        ("GET", "/version", 401),
        ("GET", "/no/such/route", 401),
        ("GET", "/version", 200),
        ("GET", "/v1/snapshots", 200),
    ]
    audit = Settings(home=daemon.home).audit_log_path
    assert audit.stat().st_mode & 0o077 == 0
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(ln) for ln in audit.read_text().splitlines()]
        mine = [ln for ln in lines if ln["user_agent"] == agent]
        if len(mine) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(m["method"], m["path"], m["status"]) for m in mine] == expected
    for m in mine:
        assert set(m) == {"ts", "method", "path", "status", "latency_us", "user_agent", "remote"}
        assert m["remote"].startswith("127.0.0.1:") and m["latency_us"] >= 0
        assert abs(m["ts"] - time.time()) < 60
    assert daemon.token not in audit.read_text()


def test_metrics(api: httpx.Client, sandboxes: list[str]) -> None:
    [child] = spawn(api)
    sandboxes.append(child["id"])
    r = api.get("/metrics")
    text = expect(r, 200).decode()
    assert r.headers["content-type"].startswith("text/plain")
    values = {
        ln.split()[0]: float(ln.split()[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    assert values["forkd_snapshots_total"] >= 1
    assert values["forkd_sandboxes_active"] >= 1
    assert values["forkd_branches_in_flight"] == 0
    assert values["forkd_branch_concurrency_cap"] == 4
    assert values["forkd_spawn_seconds_count"] >= 1
    assert values['forkd_build_info{version="0.6.0"}'] == 1
    assert "forkd_agent_errors_total" in values


# --- restart -------------------------------------------------------------------------------------


def test_restart_keeps_sandboxes_running(daemon: DaemonProcess) -> None:
    with daemon.client() as api:
        children = spawn(api, 2)
        ids = [c["id"] for c in children]
        try:
            for sid in ids:
                expect(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": f"MINE = {sid!r}"}), 200)
            daemon.restart()
            listed = {s["id"]: s for s in expect(api.get("/v1/sandboxes"), 200)}
            assert set(ids) <= set(listed)
            for sid in ids:
                assert listed[sid]["state"] == "running"
                run = api.post(f"/v1/sandboxes/{sid}/exec", json={"args": ["echo", sid]})
                assert expect(run, 200)["stdout"] == f"{sid}\n"
                mine = api.post(f"/v1/sandboxes/{sid}/eval", json={"code": "MINE"})
                assert expect(mine, 200)["result"] == repr(sid)
        finally:
            for sid in ids:
                api.delete(f"/v1/sandboxes/{sid}")


def test_kill_on_exit_stops_sandboxes(daemon: DaemonProcess) -> None:
    """With --kill-on-exit a stopping daemon takes its sandboxes down (default: they live on)."""
    normal = daemon.extra_args
    daemon.extra_args = (*normal, "--kill-on-exit")
    try:
        daemon.restart()
        with daemon.client() as api:
            [child] = spawn(api)
        assert daemon.stop() == 0, daemon.log_text()
        deadline = time.monotonic() + 5
        while alive(child["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child["pid"])
    finally:
        daemon.extra_args = normal
        daemon.start()
    with daemon.client() as api:
        expect(api.get(f"/v1/sandboxes/{child['id']}"), 404)


# --- CLI over the daemon -------------------------------------------------------------------------


def test_cli_over_the_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    env = clean_env()

    def forkd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "forkd",
            "--daemon-url",
            daemon.url,
            "--daemon-token",
            str(daemon.token),
            "--home",
            str(tmp_path),
            *args,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    [child] = json.loads(forkd("spawn", "--tag", TEMPLATE_TAG, "-n", "1", "--json").stdout)
    sid = child["id"]
    try:
        assert sid in {s["id"] for s in json.loads(forkd("ls", "--json").stdout)}
        assert sid in forkd("ls").stdout
        assert forkd("exec", sid, "--", "echo", "via-cli").stdout == "via-cli\n"
        assert forkd("exec", sid, "--", "sh", "-c", "exit 4", check=False).returncode == 4
        assert forkd("eval", sid, "6 * 7").stdout.strip() == "42"
        assert "pong" in forkd("ping", sid).stdout
        tags = {s["tag"] for s in json.loads(forkd("images", "--json").stdout)}
        assert TEMPLATE_TAG in tags
        with daemon.client() as api:
            expect(api.post(f"/v1/snapshots/{TEMPLATE_TAG}/compact", json={"to": "cli-rmi"}), 200)
        assert "cli-rmi" in forkd("rmi", "cli-rmi").stdout
        missing = forkd("rmi", "cli-rmi", check=False)
        assert missing.returncode == 1 and "'cli-rmi' not found" in missing.stderr
        bad = forkd("exec", "sb-000000000000", "--", "true", check=False)
        assert bad.returncode == 1 and "not found" in bad.stderr
    finally:
        forkd("kill", sid)
    assert sid not in {s["id"] for s in json.loads(forkd("ls", "--json").stdout)}
