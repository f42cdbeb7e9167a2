"""BRANCH on real VMs: every mode captures the pause instant, the source never stops counting,
every validation rule, and failures (full tmpfs, killed materializer) leave the source intact."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from forkd.errors import Conflict, ForkdError, InvalidInput, NotFound, Unavailable
from forkd.runtime.engine import Runtime

pytestmark = pytest.mark.vm

COUNTING_LOOP = """
import threading, time
COUNTER = 0
STOP = False
def _count():
    global COUNTER
    while not STOP:
        COUNTER += 1
        with open('/root/counter.txt', 'w') as f:
            f.write(str(COUNTER))
        time.sleep(0.02)
threading.Thread(target=_count, daemon=True).start()
"""


async def counter(runtime: Runtime, sid: str) -> int:
    return int((await runtime.eval(sid, "COUNTER")).result or "0")


async def wait_status(runtime: Runtime, tag: str, *, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := runtime.get_snapshot(tag).status) == "writing":
        assert time.monotonic() < deadline, f"{tag} still writing after {timeout} s"
        await asyncio.sleep(0.1)
    return status


@pytest.fixture
async def source(runtime: Runtime, template: str) -> AsyncIterator[str]:
    sid = (await runtime.spawn(template, 1))[0].sandbox.id
    await runtime.eval(sid, COUNTING_LOOP)
    while await counter(runtime, sid) < 3:
        await asyncio.sleep(0.05)
    yield sid
    await runtime.kill(sid)


async def check_children(runtime: Runtime, tag: str, before: int) -> list[str]:
    children = [s.sandbox.id for s in await runtime.spawn(tag, 2)]
    for child in children:
        await runtime.eval(child, "STOP = True")
        await asyncio.sleep(0.2)  # let the loop finish its iteration and see STOP
        r = await runtime.eval(
            child, "COUNTER, open('/root/counter.txt').read(), 'AFTER_BRANCH' in globals()"
        )
        count, file_count, saw_after = ast.literal_eval(r.result or "")
        assert int(file_count) == count, "memory and files must come from the same instant"
        assert count >= before, "state older than the branch call"
        assert saw_after is False, "state from after the branch returned leaked into a child"
        probe = await runtime.exec(child, ["test", "-e", "/root/after-branch"])
        assert probe.exit_code == 1
    return children


@contextlib.contextmanager
def live_streamed(runtime: Runtime, streamed: bool) -> Iterator[None]:
    """With ``streamed``, live branches take QEMU's background-snapshot path whatever the size
    of the source's own memory (a just-forked source is otherwise taken during its pause)."""
    saved = runtime.settings
    if streamed:
        runtime.settings = dataclasses.replace(saved, live_inline_mib=0)
    try:
        yield
    finally:
        runtime.settings = saved


@pytest.mark.parametrize(("mode", "wait", "streamed"), [
    ("full", True, False), ("diff", True, False), ("live", True, False), ("live", False, False),
    ("live", True, True), ("live", False, True),
])  # fmt: skip
async def test_branch_captures_the_pause_instant(
    runtime: Runtime, source: str, mode: str, wait: bool, streamed: bool
) -> None:
    before = await counter(runtime, source)
    with live_streamed(runtime, streamed):
        info = await runtime.branch(source, mode=mode, wait=wait)
    # Marks made after the branch returned must not be in its children.
    await runtime.eval(source, "AFTER_BRANCH = True")
    await runtime.write_file(source, "/root/after-branch", b"later")
    after = await counter(runtime, source)
    assert info.status == ("ready" if wait else "writing")
    assert info.branched_from == source and info.mode == mode and info.parent_tag == "py"
    if wait:
        assert info.pause_ms is not None and info.pause_ms > 0
    else:
        if streamed:  # answered at the snapshot instant: RAM is still streaming
            with pytest.raises(Conflict, match="not ready"):
                await runtime.spawn(info.tag, 1)
        assert await wait_status(runtime, info.tag) == "ready"
    final = runtime.get_snapshot(info.tag)
    assert final.bootable and final.total_ms and final.bytes_written
    assert final.pause_ms is not None and final.pause_ms > 0
    children = await check_children(runtime, info.tag, before)
    await asyncio.sleep(0.2)
    assert await counter(runtime, source) > after, "the source must keep running"
    assert runtime.get_sandbox(source).branch_count >= 1
    for child in children:
        await runtime.kill(child)
    await runtime.delete_snapshot(info.tag)


async def test_child_of_a_branch_can_branch_again(runtime: Runtime, source: str) -> None:
    first = await runtime.branch(source, tag="gen1", mode="diff", measure_diff=True)
    assert first.diff_physical_bytes and first.diff_logical_bytes
    child = (await runtime.spawn("gen1", 1))[0].sandbox.id
    await runtime.eval(child, "GENERATION = 2")
    second = await runtime.branch(child, tag="gen2", mode="live")
    assert second.parent_tag == "gen1"
    grandchild = (await runtime.spawn("gen2", 1))[0].sandbox.id
    assert (await runtime.eval(grandchild, "GENERATION")).result == "2"
    detail = runtime.snapshot_detail("gen2")
    assert detail.ancestors == ["py", "gen1"] and detail.chain_depth == 2  # root -> parent
    assert detail.dependents == [] and runtime.snapshot_detail("gen1").dependents == ["gen2"]
    for sid in (child, grandchild):
        await runtime.kill(sid)
    await runtime.delete_snapshot("gen1", cascade=True)
    assert {"gen1", "gen2"}.isdisjoint(s.tag for s in runtime.list_snapshots())


async def test_branch_validation(runtime: Runtime, source: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be combined"):
        await runtime.branch(source, mode="full", diff=True)
    with pytest.raises(InvalidInput, match='wait=false needs mode "live"'):
        await runtime.branch(source, mode="diff", wait=False)
    with pytest.raises(InvalidInput, match="wait=false"):
        await runtime.branch(source, wait=False)
    with pytest.raises(InvalidInput, match="invalid snapshot tag"):
        await runtime.branch(source, tag="../evil")
    with pytest.raises(InvalidInput, match="mode must be"):
        await runtime.branch(source, mode="sideways")
    with pytest.raises(InvalidInput, match="parent_tag must be the source's template"):
        await runtime.branch(source, mode="full", parent_tag="py")
    with pytest.raises(NotFound):
        await runtime.branch("sb-doesnotexist")
    with pytest.raises(Conflict, match="already exists"):
        await runtime.branch(source, tag="py")
    in_flight = await runtime.branch(source, tag="inflight", mode="live", wait=False)
    with pytest.raises(Conflict, match="already exists or is being written"):
        await runtime.branch(source, tag="inflight", mode="live", wait=False)
    saved = runtime.settings
    runtime.settings = dataclasses.replace(saved, branch_concurrency=1)
    try:
        with pytest.raises(Unavailable, match=r"cap is 1 \(--branch-concurrency\)"):
            await runtime.branch(source, mode="full")
    finally:
        runtime.settings = saved
    # Another forkd process starting up meanwhile must leave the in-flight branch alone.
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forkd", "--local", "--home", str(runtime.settings.home),
        "images", "--json", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    listed, _ = await other.communicate()
    seen = {s["tag"]: s["status"] for s in json.loads(listed)}
    assert seen["inflight"] in ("writing", "ready")
    assert await wait_status(runtime, in_flight.tag) == "ready"
    assert await counter(runtime, source) > 0
    await runtime.delete_snapshot("inflight")


def _pids_matching(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def test_killed_materializer_fails_the_branch_not_the_source(
    runtime: Runtime, source: str
) -> None:
    with live_streamed(runtime, True):
        info = await runtime.branch(source, tag="doomed", mode="live", wait=False)
    deadline = time.monotonic() + 120
    while not (pids := _pids_matching("materialize-doomed")):
        assert time.monotonic() < deadline, "materializer never started"
        assert runtime.get_snapshot(info.tag).status == "writing"
        await asyncio.sleep(0.02)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert await wait_status(runtime, "doomed") == "failed"
    failed = runtime.get_snapshot("doomed")
    assert failed.error and not failed.bootable
    assert not (runtime.settings.snapshots_dir / "doomed").exists()
    assert (await runtime.ping(source))["pong"] is True
    assert await counter(runtime, source) > 0
    await runtime.delete_snapshot("doomed")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> AsyncIterator[Path]:
    mnt = tmp_path / "small-shm"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt  # type: ignore[misc]
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_branch_into_full_tmpfs_fails_cleanly(
    runtime: Runtime, template: str, small_tmpfs: Path
) -> None:
    """A runtime whose memory dir is a small tmpfs: the template fits, the branch does not."""
    small = Runtime(dataclasses.replace(runtime.settings, shm_dir=small_tmpfs))
    await small.start()
    sid: str | None = None
    try:
        await small.create_snapshot("tinyshm", mem_mib=256)
        sid = (await small.spawn("tinyshm", 1))[0].sandbox.id
        await small.eval(sid, "import os; BUF = os.urandom(48 << 20)")
        st = os.statvfs(small_tmpfs)
        filler = small_tmpfs / "filler"
        with filler.open("wb") as f:
            f.truncate(0)
        subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (8 << 20)), str(filler)],
                       check=True)  # fmt: skip
        with pytest.raises(ForkdError, match="no space left"):
            await small.branch(sid, tag="nospace", mode="full")
        failed = small.get_snapshot("nospace")
        assert failed.status == "failed" and failed.error and "no space" in failed.error
        assert not small.snapshots.exists("nospace")
        assert (await small.eval(sid, "len(BUF)")).result == str(48 << 20)
        filler.unlink()
        await small.delete_snapshot("nospace")
    finally:
        if sid is not None:
            await small.kill(sid)
        if small.registry.get_snapshot("tinyshm") is not None:
            await small.delete_snapshot("tinyshm")
        await small.close()


async def test_live_pauses_for_a_small_source_and_streams_a_large_one(
    runtime: Runtime, template: str
) -> None:
    """The size of what the source holds of its own picks the path; both give the same state."""
    sid = (await runtime.spawn(template, 1))[0].sandbox.id
    try:
        small = await runtime.branch(sid, tag="live-small", mode="live")
        assert small.bytes_written is not None and small.bytes_written < 64 << 20
        # 96 MiB of the source's own, non-zero pages: past the 64 MiB default, so streamed
        await runtime.eval(sid, "import hashlib; BIG = bytes(range(256)) * (96 << 12)")
        digest = (await runtime.eval(sid, "hashlib.sha256(BIG).hexdigest()")).result
        large = await runtime.branch(sid, tag="live-large", mode="live")
        assert large.bytes_written is not None and large.bytes_written > 96 << 20
        probes = {
            "live-small": ("'BIG' in globals()", "False"),
            "live-large": ("hashlib.sha256(BIG).hexdigest()", digest),
        }
        for tag, (probe, expected) in probes.items():
            child = (await runtime.spawn(tag, 1))[0].sandbox.id
            assert (await runtime.eval(child, probe)).result == expected
            await runtime.kill(child)
    finally:
        await runtime.kill(sid)
        for tag in ("live-small", "live-large"):
            with contextlib.suppress(ForkdError):
                await runtime.delete_snapshot(tag)
