"""A child's wall clock is the host's, not its template's: every fork, branch child and branch
source reads the host's time, however old the template is."""

from __future__ import annotations

import asyncio
import time

import pytest

from forkd.runtime.engine import Runtime

pytestmark = pytest.mark.vm

MIN_TEMPLATE_AGE_S = 5.0
TOLERANCE_S = 0.5


async def _guest_clock_error(runtime: Runtime, sandbox_id: str) -> float:
    """Seconds the guest's ``time.time()`` lies outside the host's window around the call."""
    before = time.time()
    answer = await runtime.eval(sandbox_id, "__import__('time').time()")
    after = time.time()
    assert answer.error is None and answer.result is not None, answer
    guest = float(answer.result)
    if guest < before:
        return guest - before
    if guest > after:
        return guest - after
    return 0.0


async def _age(runtime: Runtime, tag: str, seconds: float) -> None:
    created = runtime.snapshots.load(tag).created_at_unix
    wait = created + seconds - time.time()
    if wait > 0:
        await asyncio.sleep(wait)


async def test_children_of_an_old_template_read_the_host_clock(
    runtime: Runtime, template: str
) -> None:
    await _age(runtime, template, MIN_TEMPLATE_AGE_S)
    child = (await runtime.spawn(template, 1))[0].sandbox.id
    try:
        assert abs(await _guest_clock_error(runtime, child)) <= TOLERANCE_S
        # A command's clock is the kernel's, so exec agrees with eval.
        run = await runtime.exec(child, ["python3", "-c", "import time; print(time.time())"])
        assert run.exit_code == 0
        assert abs(float(run.stdout) - time.time()) <= TOLERANCE_S + 1.0

        # Branch children, however old the branch, and the branch source after its pause.
        for mode in ("full", "diff", "live"):
            snap = await runtime.branch(child, mode=mode)
            assert snap.status == "ready"
            await _age(runtime, snap.tag, MIN_TEMPLATE_AGE_S)
            grandchild = (await runtime.spawn(snap.tag, 1))[0].sandbox.id
            try:
                assert abs(await _guest_clock_error(runtime, grandchild)) <= TOLERANCE_S, mode
            finally:
                await runtime.kill(grandchild)
                await runtime.delete_snapshot(snap.tag)
        assert abs(await _guest_clock_error(runtime, child)) <= TOLERANCE_S
    finally:
        await runtime.kill(child)
