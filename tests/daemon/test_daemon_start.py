"""Starting and stopping the real daemon process (empty data dir, no VMs): refusals with one clear
line and a non-zero exit, the unix socket, a clean SIGTERM, and many requests on one connection."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from forkd.config import Settings

from .conftest import DaemonProcess, clean_env, forkd_argv, free_port, write_token

pytestmark = pytest.mark.daemon


def run_daemon(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        forkd_argv(home, "daemon", *args),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("token", "bind", "message"),
    [
        (None, "0.0.0.0:{port}", "refusing to listen on 0.0.0.0 without a token"),
        (None, "[::]:{port}", "refusing to listen on :: without a token"),
        ("short-tok", "0.0.0.0:{port}", "use at least 16"),
        ("short-tok", "127.0.0.1:{port}", "use at least 16"),
        ("changeme-changeme", "127.0.0.1:{port}", "placeholder"),
        ("REPLACE_ME_WITH_32_BYTES_BASE64", "127.0.0.1:{port}", "placeholder"),
        ("CHANGE_ME_TO_A_RANDOM_SECRET", "127.0.0.1:{port}", "placeholder"),
        ("x" * 32, "127.0.0.1:{port}", "too few characters"),
        ("0123456789abcdef0123", "nonsense", "HOST:PORT"),
    ],
)
def test_refuses_to_start(tmp_path: Path, token: str | None, bind: str, message: str) -> None:
    args = ["--bind", bind.format(port=free_port())]
    if token is not None:
        write_token(tmp_path / "token", token)
        args += ["--token-file", str(tmp_path / "token")]
    proc = run_daemon(tmp_path / "home", *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_refuses_missing_token_file_and_busy_port(tmp_path: Path) -> None:
    proc = run_daemon(tmp_path / "home", "--token-file", str(tmp_path / "absent"))
    assert proc.returncode == 1 and "cannot read token file" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_daemon(tmp_path / "home", "--bind", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1" in proc.stderr


def test_unix_socket_auth_and_clean_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    token = write_token(tmp_path / "token")
    sock = tmp_path / "run" / "forkd.sock"
    d = DaemonProcess(
        home=home,
        port=free_port(),
        token=token,
        token_file=tmp_path / "token",
        env=clean_env(),
        extra_args=("--unix-socket", str(sock)),
    )
    d.start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://forkd") as c:
            assert c.get("/healthz").json() == {"ok": True}
            assert c.get("/v1/sandboxes").status_code == 401
            r = c.get("/v1/sandboxes", headers=d.headers)
            assert (r.status_code, r.json()) == (200, [])
            assert c.get("/openapi.json", headers=d.headers).json()["info"]["title"] == "forkd"
        audit = Settings(home=home).audit_log_path.read_text()
        assert '"remote":"unix"' in audit
    finally:
        code = d.stop()
    assert code == 0, d.log_text()
    assert not sock.exists()
    assert "listening on http://127.0.0.1" in d.log_text()


def test_many_requests_on_one_keep_alive_connection_are_each_answered_and_audited(
    tmp_path: Path,
) -> None:
    """Hundreds of requests on one connection each get their own clean 404 and audit line.

    The latency they add is a benchmark (`bench/agent_rtt.py`), not a timed test."""
    home = tmp_path / "home"
    token = write_token(tmp_path / "token")
    d = DaemonProcess(
        home=home,
        port=free_port(),
        token=token,
        token_file=tmp_path / "token",
        env=clean_env(),
    )
    d.start()
    try:
        with d.client() as c:
            for i in range(200):
                r = c.get(f"/v1/sandboxes/sb-nope{i}")
                assert r.status_code == 404
                assert f"sb-nope{i}" in r.json()["error"]
    finally:
        assert d.stop() == 0
    audit = Settings(home=home).audit_log_path.read_text()
    assert all(f"sb-nope{i}" in audit for i in range(200))
