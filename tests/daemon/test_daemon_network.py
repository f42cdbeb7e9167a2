"""Guest networking through a real daemon: policy errors on the wire, ingress forwards over
HTTP and the SDK, and a domain allow-list through the daemon's proxy (across a restart)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pip._internal.models.index import PyPI

from forkd.client import Sandbox
from forkd.net.guard import probe

from .conftest import TEMPLATE_TAG, DaemonProcess
from .test_daemon_vm import expect

pytestmark = [
    pytest.mark.daemon,
    pytest.mark.vm,
    pytest.mark.skipif(probe() is not None, reason=f"egress guard unavailable: {probe()}"),
]

INDEX_URL = f"{PyPI.simple_url}/iniconfig/"  # pip's own default index


@pytest.fixture
def sandboxes(api: httpx.Client) -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


def _spawn(api: httpx.Client, ids: list[str], **body: Any) -> dict[str, Any]:
    [child] = expect(api.post("/v1/sandboxes", json={"snapshot_tag": TEMPLATE_TAG, **body}), 201)
    ids.append(child["id"])
    return dict(child)


def test_policy_errors_on_the_wire(api: httpx.Client, sandboxes: list[str]) -> None:
    before = expect(api.get("/v1/sandboxes"), 200)
    bad = {"snapshot_tag": TEMPLATE_TAG, "network": {"egress": "allowlist", "allow": ["a b"]}}
    expect(api.post("/v1/sandboxes", json=bad), 400, "'a b'")
    clash = {"snapshot_tag": TEMPLATE_TAG, "network": {"egress": "none"},
             "allow_internet_access": True}  # fmt: skip
    expect(api.post("/v1/sandboxes", json=clash), 400, "disagree")
    unknown = {"snapshot_tag": TEMPLATE_TAG, "network": {"egres": "none"}}
    expect(api.post("/v1/sandboxes", json=unknown), 400, "egres")
    assert expect(api.get("/v1/sandboxes"), 200) == before
    child = _spawn(api, sandboxes, allow_internet_access=True)
    assert child["network"]["egress"] == "internet" and child["guest_addr"] == "10.0.2.15"
    again = expect(api.get(f"/v1/sandboxes/{child['id']}"), 200)
    assert again["network"] == child["network"]


def _serve_in_guest(api: httpx.Client, sid: str, port: int) -> None:
    cmd = f"cd /tmp && echo served > index.txt && nohup python3 -m http.server {port} " \
          f"--bind 0.0.0.0 >/dev/null 2>&1 &"  # fmt: skip
    expect(api.post(f"/v1/sandboxes/{sid}/exec", json={"args": ["sh", "-c", cmd]}), 200)
    probe_code = (
        "import socket, time\nfor _ in range(100):\n    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), 1).close(); break\n"
        "    except OSError:\n        time.sleep(0.1)\n"
    )
    expect(api.post(f"/v1/sandboxes/{sid}/exec", json={"args": ["python3", "-c", probe_code]}),
           200)  # fmt: skip


def test_ports_over_http(daemon: DaemonProcess, api: httpx.Client, sandboxes: list[str]) -> None:
    sid = _spawn(api, sandboxes)["id"]
    _serve_in_guest(api, sid, 8000)
    fwd = expect(api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 8000}), 201)
    assert set(fwd) == {"port", "host", "host_port", "url"} and fwd["host"] == "127.0.0.1"
    assert httpx.get(fwd["url"] + "/index.txt", timeout=30).text == "served\n"
    # the daemon bridges a jailed sandbox's forward: a restarted one serves it again
    daemon.restart()
    assert httpx.get(fwd["url"] + "/index.txt", timeout=30).text == "served\n"
    assert expect(api.get(f"/v1/sandboxes/{sid}/ports"), 200) == [fwd]
    expect(api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 0}), 400)
    expect(api.delete(f"/v1/sandboxes/{sid}/ports/9999"), 404, "9999")
    expect(api.delete(f"/v1/sandboxes/{sid}/ports/8000"), 204)
    assert expect(api.get(f"/v1/sandboxes/{sid}/ports"), 200) == []
    expect(api.delete(f"/v1/sandboxes/{sid}"), 204)
    expect(api.get(f"/v1/sandboxes/{sid}/ports"), 404)
    expect(api.post("/v1/sandboxes/sb-000000000000/ports", json={"port": 80}), 404)


def test_sdk_get_host(daemon: DaemonProcess) -> None:
    with Sandbox.create(TEMPLATE_TAG, base_url=daemon.url, token=daemon.token,
                        allow_internet_access=False) as sb:  # fmt: skip
        assert sb.info["network"]["egress"] == "none"
        with daemon.client() as api:
            _serve_in_guest(api, sb.id, 8080)
        host = sb.get_host(8080)
        assert host.startswith("127.0.0.1:")
        with urllib.request.urlopen(f"http://{host}/index.txt", timeout=30) as r:
            assert r.read() == b"served\n"


def _host_reaches_index() -> bool:
    done = subprocess.run(
        [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({INDEX_URL!r}, "
         "timeout=20)"], capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode == 0


FETCH = (
    "import urllib.request\ntry:\n"
    "    _r = str(urllib.request.urlopen({url!r}, timeout=30).status)\n"
    "except Exception as _e:\n    _r = 'ERROR ' + str(_e)\nprint(repr(_r))"
)


def _guest_fetch(api: httpx.Client, sid: str, url: str) -> str:
    """The guest's fetch of ``url`` (an exec: a proxied TLS fetch can outlast the daemon
    fixture's 3 s eval bound on a loaded host): ``'200'`` or ``'ERROR ...'``."""
    body = {"args": ["python3", "-c", FETCH.format(url=url)], "timeout_secs": 60}
    out = expect(api.post(f"/v1/sandboxes/{sid}/exec", json=body), 200)
    return str(out["stdout"]).strip()


def test_domain_allowlist_through_the_daemons_proxy(
    daemon: DaemonProcess, api: httpx.Client, sandboxes: list[str]
) -> None:
    if not _host_reaches_index():
        pytest.skip("this host cannot reach the package index itself")
    net = {"egress": "allowlist", "allow": [PyPI.netloc], "host_ca": True}
    sid = _spawn(api, sandboxes, network=net)["id"]
    assert _guest_fetch(api, sid, INDEX_URL) == "'200'"
    denied = _guest_fetch(api, sid, f"https://{PyPI.file_storage_domain}/")
    assert "ERROR" in denied and "403" in denied, denied
    daemon.restart()  # the proxy is served again on the port the guest knows
    deadline = time.monotonic() + 30
    while _guest_fetch(api, sid, INDEX_URL) != "'200'":
        assert time.monotonic() < deadline, "the allow-list proxy did not come back"
        time.sleep(1)
