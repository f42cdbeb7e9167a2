"""The hub over a real daemon: the SDK downloads a template as a pack, the daemon pulls it back
from a real HTTP server on loopback and from an upload, children of the copies have the
template's state, and every bad request answers 4xx with the reason."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkd.client import Controller, ControllerError

from .conftest import TEMPLATE_TAG, DaemonProcess

pytestmark = [pytest.mark.daemon, pytest.mark.vm]


def expect(r: httpx.Response, status: int, fragment: str | None = None) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    body = r.json()
    if fragment is not None:
        assert fragment in body["error"], body
    return body


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain HTTP server on loopback serving ``tmp_path``: (its dir, its URL)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _warm_marker(api: httpx.Client, tag: str) -> str:
    [kid] = expect(api.post("/v1/sandboxes", json={"snapshot_tag": tag}), 201)
    try:
        return str(expect(api.post(f"/v1/sandboxes/{kid['id']}/eval",
                                   json={"code": "WARM_MARKER"}), 200)["result"])  # fmt: skip
    finally:
        api.delete(f"/v1/sandboxes/{kid['id']}")


def test_pack_download_then_pull_by_url_and_upload(
    daemon: DaemonProcess, api: httpx.Client, file_server: tuple[Path, str]
) -> None:
    served, base = file_server
    with Controller(daemon.url, daemon.token, timeout=600) as c:
        size = c.pack(TEMPLATE_TAG, served / "py.forkd")
        assert size == (served / "py.forkd").stat().st_size > 1 << 20
        assert not list(served.glob(".*partial"))

        pulled = c.pull(f"{base}/py.forkd", "py-http")
        assert pulled["tag"] == "py-http" and pulled["image_reused"]
        assert pulled["downloaded_bytes"] == size and pulled["snapshot"]["bootable"]
        assert _warm_marker(api, "py-http") == "'warm'"

        uploaded = c.unpack(served / "py.forkd", "py-up")
        assert uploaded["snapshot"]["tag"] == "py-up" and uploaded["snapshot"]["bootable"]
        assert _warm_marker(api, "py-up") == "'warm'"

        with pytest.raises(ControllerError) as err:
            c.pull(f"{base}/py.forkd", "py-http")
        assert err.value.status == 409 and "already exists" in err.value.error
        assert c.pull(f"{base}/py.forkd", "py-http", force=True)["tag"] == "py-http"

    try:
        expect(api.post("/v1/snapshots/pull", json={"ref": f"{base}/missing.forkd"}), 404, "404")
        expect(api.post("/v1/snapshots/pull", json={"ref": "-rf /", "tag": "x"}), 400,
               "invalid registry reference")  # fmt: skip
        expect(api.post("/v1/snapshots/pull", json={"ref": f"{base}/py.forkd", "tag": "../x"}),
               400, "invalid snapshot tag")  # fmt: skip
        expect(api.get("/v1/snapshots/nope/pack"), 404, "not found")
        expect(api.post("/v1/snapshots/unpack", content=b"not a pack at all" * 100), 400,
               "refusing the pack")  # fmt: skip
        expect(api.post("/v1/snapshots/unpack", content=b""), 400, "must be a pack")
        listed = {s["tag"] for s in expect(api.get("/v1/snapshots"), 200)}
        assert "x" not in listed and {"py-http", "py-up"} <= listed
    finally:
        for tag in ("py-http", "py-up"):
            api.delete(f"/v1/snapshots/{tag}")


def test_push_and_pull_through_a_registry(api: httpx.Client, registry: str) -> None:
    ref = f"{registry}/forkd/daemon-py:v1"
    pushed = expect(api.post(f"/v1/snapshots/{TEMPLATE_TAG}/push",
                             json={"ref": ref, "insecure": True}), 200)  # fmt: skip
    assert pushed["digest"].startswith("sha256:")
    assert pushed["stored_bytes"] < pushed["logical_bytes"]
    try:
        body = {"ref": ref, "tag": "py-reg", "insecure": True}
        pulled = expect(api.post("/v1/snapshots/pull", json=body), 200)
        assert pulled["snapshot"]["bootable"] and pulled["image_reused"]
        assert _warm_marker(api, "py-reg") == "'warm'"
        missing = {"ref": f"{registry}/forkd/nothing:v1", "tag": "py-none", "insecure": True}
        expect(api.post("/v1/snapshots/pull", json=missing), 404, "registry")
        expect(api.post("/v1/snapshots/pull", json={"ref": ref, "insecure": True}), 409,
               "already exists")  # fmt: skip
    finally:
        api.delete("/v1/snapshots/py-reg")
