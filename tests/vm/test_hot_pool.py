"""The daemon's hot pool: pre-restored children handed out with fresh entropy, clock and network,
indistinguishable from a fresh fork."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import time

import pytest

from forkd.runtime.engine import Runtime
from forkd.runtime.pool import POOL_PREFIX

pytestmark = pytest.mark.vm

PROBE = (
    "import os, random, time, numpy\n"
    "(sorted(k for k in globals() if not k.startswith('__')), sorted(os.listdir('/tmp')),"
    " os.getpid(), random.random(), float(numpy.random.rand()), os.urandom(8).hex(), time.time())"
)


async def _probe(runtime: Runtime, sandbox_id: str) -> tuple[object, ...]:
    answer = await runtime.eval(sandbox_id, PROBE)
    assert answer.error is None and answer.result is not None, answer
    return tuple(ast.literal_eval(answer.result))


async def test_hot_children_are_fresh_forks(runtime: Runtime, template: str) -> None:
    # A first fork makes the template recent; the pool fills behind it.
    [first] = await runtime.spawn(template, 1)
    await runtime.settle()
    assert len(runtime.pooled_sandbox_ids()) >= 2
    hot = await runtime.spawn(template, 2)
    assert all(s.timing.pooled for s in hot)
    # a restore and a hello are no longer on the path: only one agent round trip
    assert all(s.timing.restore_ms < 5 for s in hot)
    cold_rt = Runtime(dataclasses.replace(runtime.settings, warm_pool_size=0))
    await cold_rt.start()
    try:
        [cold] = await cold_rt.spawn(template, 1)
        assert not cold.timing.pooled
        before = time.time()
        a, b = [await _probe(runtime, s.sandbox.id) for s in hot]
        c = await _probe(cold_rt, cold.sandbox.id)
        after = time.time()
        names, files, pid = c[0], c[1], c[2]
        for child in (a, b):
            assert child[0] == names  # the namespace: warming left nothing behind
            assert child[1] == files and child[2] == pid
            assert before - 0.5 <= float(child[6]) <= after + 0.5  # type: ignore[arg-type]
        # fresh randomness in each: Python, numpy and the kernel's
        for i in (3, 4, 5):
            assert len({a[i], b[i], c[i]}) == 3, i
    finally:
        await cold_rt.kill(cold.sandbox.id)
        await cold_rt.close()
        for s in (first, *hot):
            await runtime.kill(s.sandbox.id)


async def test_a_dead_pool_member_is_replaced(runtime: Runtime, template: str) -> None:
    [first] = await runtime.spawn(template, 1)
    await runtime.settle()
    pooled = runtime._pool._ready.get(template, [])  # the pool's own members
    assert pooled, "the pool did not fill"
    pooled[-1].qemu.kill()
    [child] = await runtime.spawn(template, 1)
    try:
        assert (await runtime.eval(child.sandbox.id, "1+1")).result == "2"
    finally:
        await runtime.kill(child.sandbox.id)
        await runtime.kill(first.sandbox.id)


async def test_a_refill_waits_until_takes_pause(runtime: Runtime, template: str) -> None:
    """The child just handed out has the machine: no QEMU starts behind it right away."""
    [first] = await runtime.spawn(template, 1)
    await runtime.settle()
    members = set(runtime.pooled_sandbox_ids())
    assert members
    run_dirs = {p.name for p in runtime.settings.run_dir.glob(f"{POOL_PREFIX}*")}
    [hot] = await runtime.spawn(template, 1)
    try:
        assert hot.timing.pooled and hot.sandbox.id in members
        refill = runtime._pool._refills[template]
        assert not refill.done()  # a refill is due ...
        await asyncio.sleep(0.1)  # time enough to begin a QEMU start
        # ... but has launched nothing yet: no new member, no new pool run dir
        assert runtime.pooled_sandbox_ids() == members - {hot.sandbox.id}
        assert {p.name for p in runtime.settings.run_dir.glob(f"{POOL_PREFIX}*")} == run_dirs
        await runtime.settle()
        assert len(runtime.pooled_sandbox_ids()) == len(members)  # then it tops the pool up
    finally:
        await runtime.kill(hot.sandbox.id)
        await runtime.kill(first.sandbox.id)
