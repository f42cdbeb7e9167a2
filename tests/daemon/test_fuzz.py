"""Schemathesis against ``/openapi.json`` of a real daemon: no 5xx, every status, content type,
header and body as documented. The daemon runs over an empty data dir (no image, no snapshot), so
no generated request can boot or fork a VM however lucky the generator gets: creating a snapshot
stops at "image not built", forking (and creating a workspace) at "snapshot not found".
Bounded: a few examples per operation and a time cap."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonProcess, clean_env, free_port, shutdown_daemon, write_token

pytestmark = pytest.mark.daemon

CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance",
))  # fmt: skip
EXAMPLES_PER_OPERATION = 5
MAX_SECONDS = 120  # a hang guard: the run takes seconds (--max-time would make fuzzing loop)


@pytest.fixture
def empty_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    token = write_token(tmp_path / "token")
    d = DaemonProcess(home=tmp_path / "home", port=free_port(), token=token,
                      token_file=tmp_path / "token", env=clean_env())  # fmt: skip
    d.start()
    yield d
    shutdown_daemon(d)


def test_openapi_fuzz(empty_daemon: DaemonProcess, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe is not None, "schemathesis is a dev dependency"
    argv = [
        exe, "run", f"{empty_daemon.url}/openapi.json",
        "--header", f"Authorization: Bearer {empty_daemon.token}",
        "--checks", CHECKS,
        "--phases", "examples,fuzzing",
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--request-timeout", "30",
        "--seed", "20240601",
        "--workers", "2",
        "--no-shrink",
        # pull and push reach out to whatever registry or URL they are given: tests stay on
        # loopback (they are exercised against a local registry in tests/vm/test_hub.py)
        "--exclude-path-regex", r"^/v1/snapshots/(pull|[^/]+/push)$",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=clean_env(),
                          timeout=MAX_SECONDS)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "passed" in out and "failed" not in out.split("SUMMARY")[-1], out[-3000:]
    assert "Tested: " in out
    print(out[out.find("API Operations:") :])
