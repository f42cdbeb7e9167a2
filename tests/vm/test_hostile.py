"""A hostile guest on real VMs: it floods its console and abuses the agent channel from inside
the agent process (eval code writes straight to the agent's virtio port). The host's files stay
bounded, the abusive sandbox gets a bounded AgentProtocolError, and another sandbox's ping stays
fast meanwhile."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from forkd.errors import AgentError, AgentProtocolError
from forkd.runtime.engine import Runtime
from forkd.vmm.qemu import QemuProcess
from forkd.vmm.spec import CONSOLE_RING_BYTES, RunPaths

pytestmark = pytest.mark.vm

# Runs inside the guest agent: write ``payload`` to the agent's own port, past the agent's lock.
RAW_WRITE = """
import os, time
_fd = next(int(n) for n in os.listdir("/proc/self/fd")
           if os.readlink("/proc/self/fd/" + n).startswith("/dev/vport"))
_view = memoryview({payload})
while _view:
    try:
        _view = _view[os.write(_fd, _view[: 1 << 20]):]
    except BlockingIOError:
        time.sleep(0.002)
"""


def _run_dir_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())


async def _pings_while(runtime: Runtime, sandbox_id: str, task: asyncio.Future[Any]) -> list[float]:
    """Ping ``sandbox_id`` every 20 ms until ``task`` is done (its outcome is left in it)."""
    times: list[float] = []
    deadline = time.monotonic() + 600
    while not task.done() and time.monotonic() < deadline:
        t = time.perf_counter()
        await runtime.ping(sandbox_id)
        times.append(time.perf_counter() - t)
        await asyncio.sleep(0.02)
    return times


async def _reachable(runtime: Runtime, sandbox_id: str) -> None:
    """The abusive sandbox answers again once the rest of its junk has drained (bounded)."""
    for _ in range(20):
        try:
            assert (await runtime.eval(sandbox_id, "6 * 7")).result == "42"
            return
        except AgentError:
            await asyncio.sleep(0.5)
    raise AssertionError("the sandbox never answered again")


async def test_console_flood_stays_in_qemus_ring(runtime: Runtime, template: str) -> None:
    sb = (await runtime.spawn(template, 1))[0].sandbox
    assert sb.run_dir is not None
    run_dir = Path(sb.run_dir)
    flood = "head -c 20000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done"
    t = time.monotonic()
    r = await runtime.exec(sb.id, ["sh", "-c", flood], timeout_s=900)
    elapsed = time.monotonic() - t
    assert (r.exit_code, r.stdout) == (0, "done\n"), r
    assert not (run_dir / "serial.log").exists()
    assert _run_dir_bytes(run_dir) < 64 << 10, sorted(run_dir.iterdir())
    qemu = QemuProcess(sb.pid, RunPaths(run_dir))
    try:
        tail = await qemu.console_tail(CONSOLE_RING_BYTES)
    finally:
        await qemu.close_qmp()
    assert tail.endswith("x" * 1000) and len(tail) <= CONSOLE_RING_BYTES
    assert (await runtime.ping(sb.id))["pong"]
    print(f"20 MB to the console in {elapsed:.1f} s")
    await runtime.kill(sb.id)


async def test_agent_abuse_is_bounded_and_others_stay_fast(runtime: Runtime, template: str) -> None:
    bad, good = (s.sandbox.id for s in await runtime.spawn(template, 2))
    await runtime.ping(good)
    calm: list[float] = []
    for _ in range(10):
        t = time.perf_counter()
        await runtime.ping(good)
        calm.append(time.perf_counter() - t)

    cases = {
        # 20 MiB without a newline, then one: the host stops at the 8 MiB cap
        "longer than": "b'x' * (20 << 20) + b'\\n'",
        # 100,000-deep nesting under an id nobody sent, then a flood of forged replies
        "flooded": (
            "b'{\"id\":\"forged-0\",\"ok\":true,\"x\":' + b'[' * 100000 + b']' * 100000 + b'}\\n'"
            ' + b\'\'.join(b\'{"id":"forged-%d","ok":true}\\n\' % i for i in range(1500))'
        ),
    }
    for fragment, payload in cases.items():
        abuse = asyncio.ensure_future(runtime.eval(bad, RAW_WRITE.format(payload=payload)))
        times = await _pings_while(runtime, good, abuse)
        with pytest.raises(AgentProtocolError, match=fragment) as info:
            await abuse
        assert len(str(info.value)) < 300
        recover = asyncio.ensure_future(_reachable(runtime, bad))
        times += await _pings_while(runtime, good, recover)
        await recover
        assert times, fragment
        print(
            fragment, f"calm max {max(calm) * 1000:.0f} ms, during max {max(times) * 1000:.0f} ms"
        )
        assert max(times) < max(1.0, 10 * max(calm)), (fragment, times)
    for sid in (bad, good):
        await runtime.kill(sid)


async def test_state_is_private(runtime: Runtime, template: str) -> None:
    settings = runtime.settings
    manifest = runtime.snapshots.load(template)
    sb = (await runtime.spawn(template, 1))[0].sandbox
    assert sb.run_dir is not None
    for d in (settings.home, settings.run_dir, settings.snapshots_dir, settings.memory_dir):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert Path(sb.run_dir).stat().st_mode & 0o777 == 0o700
    devstate = runtime.snapshots.devstate_path(template)
    assert devstate.stat().st_mode & 0o777 == 0o600, devstate
    # A forked template's memory: 0600, or (jailed) root-owned 0640 with a group of its own that
    # only the children mapping it have.
    memory = Path(manifest.memory.path).stat()
    assert memory.st_uid == os.getuid()
    jail = runtime.jail
    if jail is None:
        assert memory.st_mode & 0o777 == 0o600
    else:
        assert memory.st_mode & 0o777 in (0o600, 0o640)
        assert memory.st_mode & 0o777 == 0o600 or jail.is_template_gid(memory.st_gid)
    assert settings.db_path.stat().st_mode & 0o777 == 0o600
    await runtime.kill(sb.id)
