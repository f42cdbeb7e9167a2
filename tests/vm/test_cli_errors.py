"""Bad input through the real CLI: one clear line, non-zero exit, nothing created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forkd.runtime.engine import Runtime
from forkd.runtime.registry import SnapshotRow

pytestmark = pytest.mark.vm


def forkd(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORKD_URL", "FORKD_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "forkd", "--local", "--home", str(home), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


async def state(runtime: Runtime) -> tuple[list[str], list[str], list[str], list[str]]:
    """Everything a command could create; pre-launched (pooled) children are not sandboxes."""
    await runtime.settle()
    s = runtime.settings
    pooled = runtime.pooled_sandbox_ids()
    return (
        sorted(p.name for p in s.snapshots_dir.iterdir()),
        sorted(p.name for p in s.memory_dir.iterdir()),
        sorted(p.name for p in s.run_dir.iterdir() if p.name not in pooled),
        sorted(r.id for r in runtime.registry.list_sandboxes()),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fork", "--tag", "../x"], "invalid snapshot tag '../x'"),
        (["fork", "--tag", ""], "invalid snapshot tag ''"),
        (["fork", "--tag", "a" * 65], "invalid snapshot tag"),
        (["snapshot", "--tag", "../x"], "invalid snapshot tag '../x'"),
        (["fork", "--tag", "py", "-n", "0"], "n must be at least 1"),
        (["fork", "--tag", "py", "-n", "1001"], "n must be at most 1000"),
        (["fork", "--tag", "no-such-tag"], "snapshot 'no-such-tag' not found"),
        (["exec", "sb-nope", "--", "true"], "sandbox 'sb-nope' not found"),
        (["rmi", "../etc"], "invalid snapshot tag"),
    ],
)
async def test_bad_input_is_refused_cleanly(
    runtime: Runtime, template: str, args: list[str], message: str
) -> None:
    before = await state(runtime)
    proc = forkd(runtime.settings.home, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert await state(runtime) == before


async def test_template_whose_memory_is_gone_is_refused(runtime: Runtime, template: str) -> None:
    snaps = runtime.settings.snapshots_dir
    shutil.copytree(snaps / template, snaps / "gone")
    manifest_path = snaps / "gone" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tag"] = "gone"
    manifest["memory"]["path"] = str(runtime.settings.memory_dir / "gone.mem")
    manifest_path.write_text(json.dumps(manifest))
    runtime.registry.put_snapshot(SnapshotRow(tag="gone", status="ready", created_at_unix=0))
    try:
        before = await state(runtime)
        proc = forkd(runtime.settings.home, "fork", "--tag", "gone")
        assert proc.returncode == 1
        assert "not bootable" in proc.stderr and "gone.mem" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert await state(runtime) == before
        listed = {
            s["tag"]: s for s in json.loads(forkd(runtime.settings.home, "images", "--json").stdout)
        }
        assert listed["gone"]["bootable"] is False
    finally:
        runtime.registry.delete_snapshot("gone")
        shutil.rmtree(snaps / "gone")


def test_cli_round_trip_between_commands(runtime: Runtime, template: str) -> None:
    """A sandbox forked by one CLI command is reachable from the next ones."""
    home = runtime.settings.home
    forked = forkd(home, "fork", "--tag", template, "-n", "1", "--json")
    assert forked.returncode == 0, forked.stderr
    sid = json.loads(forked.stdout)[0]["id"]
    assert sid in forkd(home, "ls").stdout
    out = forkd(home, "exec", sid, "--", "sh", "-c", "echo $((40+2))")
    assert (out.returncode, out.stdout) == (0, "42\n")
    ev = forkd(home, "eval", sid, "sum(range(10))")
    assert ev.stdout.strip() == "45"
    failing = forkd(home, "exec", sid, "--", "sh", "-c", "exit 3")
    assert failing.returncode == 3
    assert forkd(home, "kill", sid).returncode == 0
    assert sid not in forkd(home, "ls", "--all").stdout


def test_snapshot_compact_makes_a_forkable_copy(runtime: Runtime, template: str) -> None:
    home = runtime.settings.home
    made = forkd(home, "snapshot-compact", "--from", template, "--to", "pycopy")
    assert made.returncode == 0, made.stderr
    forked = forkd(home, "fork", "--tag", "pycopy", "--json")
    assert forked.returncode == 0, forked.stderr
    sid = json.loads(forked.stdout)[0]["id"]
    assert forkd(home, "eval", sid, "WARM_MARKER").stdout.strip() == "'warm'"
    info = json.loads(forkd(home, "snapshot-info", "pycopy", "--json").stdout)
    # parentless, as forkd v0.5's compact: the source may be deleted afterwards
    assert info["parent_tag"] is None and info["branched_from"] == f"compact:{template}"
    assert info["bootable"] is True
    assert forkd(home, "kill", sid).returncode == 0
    assert forkd(home, "rmi", "pycopy").returncode == 0
    again = forkd(home, "snapshot-compact", "--from", template, "--to", template)
    assert again.returncode == 1 and "equals the source tag" in again.stderr
