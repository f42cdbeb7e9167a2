"""A real daemon over its own home survives a simulated host reboot (sandboxes gone, tmpfs memory
dir released, daemon restarted): the template and a diff branch over it, whose template was
deleted, fork again with their state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image
from forkd.snapshots.memfs import release_memory_dir

from .conftest import DaemonProcess, clean_env, free_port, shutdown_daemon, write_token

pytestmark = [pytest.mark.daemon, pytest.mark.vm]


def ok(r: httpx.Response, status: int) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def spawn_eval(api: httpx.Client, tag: str, code: str) -> str:
    sid = ok(api.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": 1}), 201)[0]["id"]
    result = ok(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": code}), 200)["result"]
    return str(result)


def wait_disk(api: httpx.Client, tag: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = ok(api.get(f"/v1/snapshots/{tag}/info"), 200)
        if info["memory_authoritative"] == "disk" or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def reboot(daemon: DaemonProcess) -> None:
    with daemon.client() as api:
        for sb in ok(api.get("/v1/sandboxes", params={"all": "true"}), 200):
            api.delete(f"/v1/sandboxes/{sb['id']}")
    assert daemon.stop() == 0
    release_memory_dir(Settings(home=daemon.home).memory_dir)
    daemon.start()


def test_daemon_forks_after_a_reboot(tmp_path: Path) -> None:
    home = tmp_path / "home"
    build_image(Settings.from_env(home=home), ImageRequest.default("python", None, None),
                lambda _: None)  # fmt: skip
    token_file = tmp_path / "token"
    daemon = DaemonProcess(
        home=home, port=free_port(), token=write_token(token_file), token_file=token_file,
        env=clean_env(FORKD_WARM_POOL="0"),
    )  # fmt: skip
    daemon.start()
    try:
        with daemon.client(timeout=600) as api:
            ok(api.post("/v1/snapshots", json={"tag": "dd", "warmup": "WARM = 7"}), 201)
            assert wait_disk(api, "dd")["memory_authoritative"] == "disk"
            sid = ok(api.post("/v1/sandboxes", json={"snapshot_tag": "dd", "n": 1}), 201)[0]["id"]
            ok(api.post(f"/v1/sandboxes/{sid}/eval", json={"code": "GEN = 'branched'"}), 200)
            ok(api.post(f"/v1/sandboxes/{sid}/branch", json={"tag": "dd-b", "mode": "diff"}), 201)
            branch = wait_disk(api, "dd-b")
            assert branch["memory_authoritative"] == "disk" and branch["delta_path"]
        reboot(daemon)
        with daemon.client(timeout=600) as api:
            listed = {s["tag"]: s for s in ok(api.get("/v1/snapshots"), 200)}
            assert listed["dd"]["bootable"] and listed["dd-b"]["bootable"], listed
            assert spawn_eval(api, "dd", "WARM") == "7"
            assert spawn_eval(api, "dd-b", "GEN") == "'branched'"
            ok(api.delete("/v1/snapshots/dd"), 204)
        reboot(daemon)
        with daemon.client(timeout=600) as api:
            info = ok(api.get("/v1/snapshots/dd-b/info"), 200)
            assert info["bootable"], info
            assert spawn_eval(api, "dd-b", "(WARM, GEN)") == "(7, 'branched')"
    finally:
        shutdown_daemon(daemon)
