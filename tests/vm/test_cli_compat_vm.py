"""forkd v0.5's first-run and foreground verbs on real VMs: ``quickstart`` (idempotent: the
second run reuses the template) and ``fork --settle-secs`` (the children are gone afterwards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.images.store import Image

pytestmark = pytest.mark.vm


def forkd(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORKD_URL", "FORKD_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "forkd", "--local", "--home", str(home), *args],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_quickstart_twice_and_a_settled_fork(vm_settings: Settings, built_image: Image) -> None:
    home = vm_settings.home
    tag = "qs-compat"
    first = forkd(home, "quickstart", "-n", "2", "-y", "--tag", tag)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "preflight:" in first.stdout and "cold boot" in first.stdout
    assert first.stdout.count("sb-") >= 2
    second = forkd(home, "quickstart", "-n", "1", "--tag", tag)  # built already: nothing to ask
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"template {tag!r} exists: reusing it" in second.stdout
    assert "cold boot" not in second.stdout

    settled = forkd(home, "fork", "--tag", tag, "--n", "2", "--settle-secs", "1", "--json")
    assert settled.returncode == 0, settled.stderr
    ids = {c["id"] for c in json.loads(settled.stdout)}
    assert len(ids) == 2 and "killed 2 children" in settled.stderr
    listed = forkd(home, "ls", "--all", "--json")
    assert ids.isdisjoint({s["id"] for s in json.loads(listed.stdout)})
    assert forkd(home, "rmi", tag).returncode == 0
