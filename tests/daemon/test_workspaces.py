"""Workspaces over a real daemon and real VMs: state written in a workspace survives suspend, a
daemon restart (a real process stop and start) and resume; suspends that fail (their state tag
taken by another snapshot, the guest-memory tmpfs full) leave the workspace running on its
previous state, VM included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkd.client import Controller, ControllerError
from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image

from .conftest import (
    TEMPLATE_TAG,
    DaemonProcess,
    clean_env,
    free_port,
    shutdown_daemon,
    write_token,
)

pytestmark = [pytest.mark.daemon, pytest.mark.vm]

FILE = "/root/notes.txt"


def expect(r: httpx.Response, status: int, fragment: str | None = None) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    if status == 204:
        return None
    body = r.json()
    if status >= 400:
        assert set(body) == {"error"}, body
        if fragment is not None:
            assert fragment in body["error"], body
    return body


def write(api: httpx.Client, sandbox_id: str, text: str) -> None:
    r = api.put(f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": FILE}, content=text)
    expect(r, 200)


def read(api: httpx.Client, sandbox_id: str) -> str:
    r = api.get(f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": FILE})
    assert r.status_code == 200, r.text
    return r.text


def evaluate(api: httpx.Client, sandbox_id: str, code: str) -> str:
    out = expect(api.post(f"/v1/sandboxes/{sandbox_id}/eval", json={"code": code}), 200)
    assert out["error"] is None, out
    return str(out["result"])


def tags(api: httpx.Client) -> set[str]:
    return {s["tag"] for s in expect(api.get("/v1/snapshots"), 200)}


@pytest.fixture
def workspaces(api: httpx.Client) -> Iterator[list[str]]:
    """Names to delete afterwards (with their sandboxes and state snapshots)."""
    names: list[str] = []
    yield names
    for name in names:
        api.delete(f"/v1/workspaces/{name}")


def test_state_survives_suspend_daemon_restart_and_resume(
    daemon: DaemonProcess, api: httpx.Client, workspaces: list[str]
) -> None:
    workspaces.append("dev")
    body = {"name": "dev", "snapshot_tag": TEMPLATE_TAG, "memory_limit_mib": 1024}
    ws = expect(api.post("/v1/workspaces", json=body), 201)
    assert ws["name"] == "dev" and ws["id"].startswith("ws-")
    assert (ws["status"], ws["source_snapshot_tag"], ws["current_state_tag"]) == (
        "running", TEMPLATE_TAG, None,
    )  # fmt: skip
    assert ws["memory_limit_mib"] == 1024 and ws["per_child_netns"] is False
    first = ws["live_sandbox_id"]
    assert expect(api.get(f"/v1/sandboxes/{first}"), 200)["memory_limit_mib"] == 1024
    expect(api.post("/v1/workspaces", json=body), 409, "already exists")
    expect(api.post("/v1/workspaces/dev/resume"), 409, "already running")
    assert [w["name"] for w in expect(api.get("/v1/workspaces"), 200)] == ["dev"]

    # State on disk and in the warm interpreter's memory.
    write(api, first, "written before suspend")
    evaluate(api, first, "WS_STATE = 'kept in RAM'")

    ws = expect(api.post("/v1/workspaces/dev/suspend", json={"diff": False}), 200)
    assert (ws["status"], ws["live_sandbox_id"], ws["current_state_tag"]) == (
        "suspended", None, "ws-dev-s1",
    )  # fmt: skip
    assert ws["last_branch_memory_path"]
    expect(api.get(f"/v1/sandboxes/{first}"), 404)  # the VM is gone
    expect(api.post("/v1/workspaces/dev/suspend", json={}), 409, "is suspended")

    daemon.restart()  # a real process stop and start over the same data dir

    with daemon.client() as api2:
        ws = expect(api2.get("/v1/workspaces/dev"), 200)
        assert (ws["status"], ws["current_state_tag"]) == ("suspended", "ws-dev-s1")
        ws = expect(api2.post("/v1/workspaces/dev/resume", json={}), 200)
        assert ws["status"] == "running" and ws["warning"] is None
        second = ws["live_sandbox_id"]
        assert second not in (None, first)
        assert expect(api2.get(f"/v1/sandboxes/{second}"), 200)["memory_limit_mib"] == 1024
        assert read(api2, second) == "written before suspend"
        assert evaluate(api2, second, "WS_STATE") == "'kept in RAM'"

        # A diff suspend supersedes the first state snapshot, which is then deleted.
        write(api2, second, "written after resume")
        ws = expect(api2.post("/v1/workspaces/dev/suspend", json={"diff": True}), 200)
        assert (ws["status"], ws["current_state_tag"]) == ("suspended", "ws-dev-s2")
        info = expect(api2.get("/v1/snapshots/ws-dev-s2/info"), 200)
        assert info["mode"] == "diff"
        assert "ws-dev-s1" not in tags(api2)
        third = expect(api2.post("/v1/workspaces/dev/resume"), 200)["live_sandbox_id"]
        assert read(api2, third) == "written after resume"

        # Delete: VM and the workspace's own snapshots go, the source template stays.
        expect(api2.delete("/v1/workspaces/dev"), 204)
        expect(api2.get("/v1/workspaces/dev"), 404, "workspace 'dev' not found")
        expect(api2.get(f"/v1/sandboxes/{third}"), 404)
        assert "ws-dev-s2" not in tags(api2) and TEMPLATE_TAG in tags(api2)
    workspaces.clear()


def test_suspend_onto_a_taken_tag_keeps_the_workspace_running(
    api: httpx.Client, workspaces: list[str]
) -> None:
    workspaces.append("keep")
    expect(api.post("/v1/workspaces", json={"name": "keep", "snapshot_tag": TEMPLATE_TAG}), 201)
    sandbox = expect(api.get("/v1/workspaces/keep"), 200)["live_sandbox_id"]
    write(api, sandbox, "v1")
    expect(api.post("/v1/workspaces/keep/suspend"), 200)
    sandbox = expect(api.post("/v1/workspaces/keep/resume"), 200)["live_sandbox_id"]
    write(api, sandbox, "v2 (not yet suspended)")
    before = expect(api.get("/v1/workspaces/keep"), 200)
    assert before["current_state_tag"] == "ws-keep-s1"

    def still_running(c: httpx.Client) -> None:
        ws = expect(c.get("/v1/workspaces/keep"), 200)
        assert ws == before, (ws, before)
        assert read(c, sandbox) == "v2 (not yet suspended)"  # the same VM, still answering
        assert "ws-keep-s1" in tags(c)  # the previous state is intact

    # The next state tag is taken by a snapshot that is not the workspace's.
    expect(api.post(f"/v1/snapshots/{TEMPLATE_TAG}/compact", json={"to": "ws-keep-s2"}), 200)
    try:
        expect(api.post("/v1/workspaces/keep/suspend"), 409, "'ws-keep-s2' exists")
        still_running(api)
        assert "ws-keep-s2" in tags(api)  # someone else's snapshot is left alone
    finally:
        api.delete("/v1/snapshots/ws-keep-s2")

    # Suspend works again once the tag is free of the collision (under the next generation).
    ws = expect(api.post("/v1/workspaces/keep/suspend"), 200)
    assert ws["status"] == "suspended" and ws["current_state_tag"] == "ws-keep-s3"
    assert "ws-keep-s1" not in tags(api)
    sandbox = expect(api.post("/v1/workspaces/keep/resume"), 200)["live_sandbox_id"]
    assert read(api, sandbox) == "v2 (not yet suspended)"


@pytest.fixture
def small_tmpfs_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon of its own whose guest memory lives on a tmpfs this test mounts (and may shrink)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(shm)], check=True)
    home = tmp_path / "home"
    try:
        build_image(Settings.from_env(home=home), ImageRequest.default("python", None, None),
                    lambda _: None)  # fmt: skip
        token = write_token(tmp_path / "token")
        d = DaemonProcess(home=home, port=free_port(), token=token, token_file=tmp_path / "token",
                          env=clean_env(FORKD_SHM_DIR=str(shm)))  # fmt: skip
        d.start()
        try:
            yield d, shm
        finally:
            shutdown_daemon(d)
    finally:
        subprocess.run(["umount", "--lazy", str(shm)], check=False)


def test_suspend_on_a_full_tmpfs_keeps_the_workspace_running(
    small_tmpfs_daemon: tuple[DaemonProcess, Path],
) -> None:
    daemon, shm = small_tmpfs_daemon
    with daemon.client(timeout=600) as api:
        expect(api.post("/v1/snapshots", json={"tag": "base", "warmup": "import numpy"}), 201)
        expect(api.post("/v1/workspaces", json={"name": "full", "snapshot_tag": "base"}), 201)
        sandbox = expect(api.get("/v1/workspaces/full"), 200)["live_sandbox_id"]
        write(api, sandbox, "v1")
        expect(api.post("/v1/workspaces/full/suspend"), 200)
        sandbox = expect(api.post("/v1/workspaces/full/resume"), 200)["live_sandbox_id"]
        write(api, sandbox, "v2")
        before = expect(api.get("/v1/workspaces/full"), 200)

        # Leave the tmpfs no room: the branch runs out of space writing memory (a diff suspend
        # writes only a delta of a few MiB, so any room at all would let it through).
        st = os.statvfs(shm)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        remount = ["mount", "-o", f"remount,size={used}", str(shm)]
        subprocess.run(remount, check=True)
        try:
            for diff in (False, True):
                r = api.post("/v1/workspaces/full/suspend", json={"diff": diff})
                expect(r, 503, "keeps running on its previous state")
                assert "no space left" in r.json()["error"]
                assert expect(api.get("/v1/workspaces/full"), 200) == before
                assert read(api, sandbox) == "v2"  # the same VM, still answering
                assert tags(api) == {"base", "ws-full-s1"}  # previous state kept, no debris
                staged = [p.name for p in shm.iterdir() if p.name.startswith(".staging")]
                assert staged == []
        finally:
            subprocess.run(["mount", "-o", "remount,size=4g", str(shm)], check=True)

        ws = expect(api.post("/v1/workspaces/full/suspend"), 200)
        assert ws["current_state_tag"] == "ws-full-s4" and tags(api) == {"base", "ws-full-s4"}
        sandbox = expect(api.post("/v1/workspaces/full/resume"), 200)["live_sandbox_id"]
        assert read(api, sandbox) == "v2"
        expect(api.delete("/v1/workspaces/full"), 204)


def test_stale_workspace_resumes_from_its_last_suspend(
    api: httpx.Client, workspaces: list[str]
) -> None:
    """A workspace whose sandbox was killed behind its back is stale; resume says what it lost."""
    workspaces.append("gone")
    body = {"name": "gone", "snapshot_tag": TEMPLATE_TAG}
    ws = expect(api.post("/v1/workspaces", json=body), 201)
    expect(api.delete(f"/v1/sandboxes/{ws['live_sandbox_id']}"), 204)
    ws = expect(api.get("/v1/workspaces/gone"), 200)
    assert (ws["status"], ws["live_sandbox_id"]) == ("stale", None)
    expect(api.post("/v1/workspaces/gone/suspend"), 409, "is stale")
    ws = expect(api.post("/v1/workspaces/gone/resume"), 200)
    assert ws["status"] == "running" and "its source snapshot" in ws["warning"]


def test_cli_and_sdk(daemon: DaemonProcess, tmp_path: Path, workspaces: list[str]) -> None:
    """``forkd workspace ...`` over the daemon, then the Python SDK on the same workspace."""
    workspaces.append("cli")

    def forkd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "forkd", "--daemon-url", daemon.url, "--daemon-token",
                str(daemon.token), "--home", str(tmp_path), "workspace", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=300)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    created = json.loads(forkd("create", "cli", "--snapshot", TEMPLATE_TAG, "--json").stdout)
    assert created["status"] == "running"
    assert "workspace cli suspended: state ws-cli-s1" in forkd("suspend", "cli", "--diff").stdout
    again = forkd("suspend", "cli", check=False)
    assert again.returncode == 1 and "is suspended" in again.stderr
    listed = json.loads(forkd("list", "--json").stdout)
    assert [(w["name"], w["status"]) for w in listed if w["name"] == "cli"] == [
        ("cli", "suspended"),
    ]  # fmt: skip
    assert "ws-cli-s1" in forkd("list").stdout
    assert "workspace cli running: sandbox sb-" in forkd("resume", "cli").stdout
    bad = forkd("create", "no/slash", "--snapshot", TEMPLATE_TAG, check=False)
    assert bad.returncode == 1 and "invalid workspace name" in bad.stderr

    with Controller(daemon.url, daemon.token, timeout=300) as c:
        ws = c.get_workspace("cli")
        assert ws["status"] == "running"
        c.write_file(ws["live_sandbox_id"], FILE, "sdk")
        assert c.suspend_workspace("cli")["current_state_tag"] == "ws-cli-s2"
        with pytest.raises(ControllerError) as err:
            c.suspend_workspace("cli")
        assert err.value.status == 409
        ws = c.resume_workspace("cli")
        assert c.read_file(ws["live_sandbox_id"], FILE) == b"sdk"
        assert "cli" in {w["name"] for w in c.list_workspaces()}
    assert "deleted workspace cli" in forkd("delete", "cli").stdout
    missing = forkd("delete", "cli", check=False)
    assert missing.returncode == 1 and "'cli' not found" in missing.stderr
    workspaces.clear()


def test_running_workspace_keeps_its_sandbox_across_a_restart(
    daemon: DaemonProcess, api: httpx.Client, workspaces: list[str]
) -> None:
    workspaces.append("live")
    body = {"name": "live", "snapshot_tag": TEMPLATE_TAG}
    sandbox = expect(api.post("/v1/workspaces", json=body), 201)["live_sandbox_id"]
    write(api, sandbox, "unsaved")
    daemon.restart()
    with daemon.client() as api2:
        ws = expect(api2.get("/v1/workspaces/live"), 200)
        assert (ws["status"], ws["live_sandbox_id"]) == ("running", sandbox)
        assert read(api2, sandbox) == "unsaved"  # re-adopted, not restarted


def test_concurrent_suspends_one_wins_the_other_is_409(
    api: httpx.Client, daemon: DaemonProcess, workspaces: list[str]
) -> None:
    workspaces.append("race")
    expect(api.post("/v1/workspaces", json={"name": "race", "snapshot_tag": TEMPLATE_TAG}), 201)

    def suspend() -> httpx.Response:
        with daemon.client() as c:
            return c.post("/v1/workspaces/race/suspend")

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: suspend(), range(2)))
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    loser = next(r for r in answers if r.status_code == 409).json()["error"]
    assert "busy: a suspend is in progress" in loser or "is suspended" in loser
    ws = expect(api.get("/v1/workspaces/race"), 200)
    assert (ws["status"], ws["current_state_tag"]) == ("suspended", "ws-race-s1")
