"""Bounds on real VMs: a per-sandbox cgroup memory limit, and the sandbox cap."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from forkd.errors import InvalidInput, Unavailable
from forkd.runtime import cgroups
from forkd.runtime.engine import Runtime

pytestmark = pytest.mark.vm


async def test_memory_limit_puts_qemu_in_a_limited_cgroup(runtime: Runtime, template: str) -> None:
    found = cgroups.detect()
    if found is None:
        pytest.skip("this host offers no writable cgroup memory controller")
    sb = (await runtime.spawn(template, 1, memory_limit_mib=300))[0].sandbox
    assert sb.memory_limit_mib == 300
    leaf = found.leaf(sb.id)
    assert str(sb.pid) in (leaf / "cgroup.procs").read_text().split()
    limit_file = "memory.max" if found.version == "v2" else "memory.limit_in_bytes"
    assert int((leaf / limit_file).read_text()) == 300 * 1024 * 1024
    # The guest asks for more than the limit allows: the kernel stops the QEMU, forkd says so.
    with pytest.raises(Exception):  # noqa: B017 - the agent connection dies with the VM
        await runtime.eval(sb.id, "import numpy; HOG = numpy.ones(400 << 17)")
    deadline = time.monotonic() + 30
    while runtime.get_sandbox(sb.id).state != "dead":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await runtime.kill(sb.id)
    assert not leaf.exists()


async def test_sandbox_cap_answers_unavailable(runtime: Runtime, template: str) -> None:
    saved = runtime.settings
    running = len(runtime.list_sandboxes())
    runtime.settings = dataclasses.replace(saved, max_sandboxes=running + 1)
    try:
        with pytest.raises(Unavailable, match=r"max .* \(--max-sandboxes\)"):
            await runtime.spawn(template, 2)
    finally:
        runtime.settings = saved


async def test_memory_limit_without_cgroups_is_accepted_with_a_warning(
    runtime: Runtime, template: str
) -> None:
    """forkd v0.5 (and its MCP server, which asks for 256 MiB on every spawn) only warns."""
    saved = runtime.settings
    runtime.settings = dataclasses.replace(saved, cgroups=False)
    try:
        spawned = (await runtime.spawn(template, 1, memory_limit_mib=256))[0]
    finally:
        runtime.settings = saved
    assert spawned.warning is not None and "memory_limit_mib=256 is not enforced" in spawned.warning
    assert spawned.sandbox.memory_limit_mib is None
    assert (await runtime.eval(spawned.sandbox.id, "1+1")).result == "2"
    await runtime.kill(spawned.sandbox.id)


async def test_memory_limit_is_validated(runtime: Runtime, template: str) -> None:
    with pytest.raises(InvalidInput, match="memory_limit_mib"):
        await runtime.spawn(template, 1, memory_limit_mib=8)
