"""Templates take a vCPU count (children have the same); the default follows the accelerator."""

from __future__ import annotations

import pytest

from forkd.errors import InvalidInput
from forkd.runtime.engine import Runtime

pytestmark = pytest.mark.vm


async def _guest_cpus(runtime: Runtime, tag: str) -> str | None:
    [child] = await runtime.spawn(tag, 1)
    try:
        return (await runtime.eval(child.sandbox.id, "__import__('os').cpu_count()")).result
    finally:
        await runtime.kill(child.sandbox.id)


async def test_cpus_of_a_template_and_its_children(runtime: Runtime, template: str) -> None:
    default = runtime.accel.default_cpus
    assert runtime.get_snapshot(template).cpus == default
    assert await _guest_cpus(runtime, template) == str(default)
    with pytest.raises(InvalidInput, match="cpus must be between 1 and 64"):
        await runtime.create_snapshot("cpus-bad", cpus=0)
    info = await runtime.create_snapshot("cpus-3", cpus=3)
    try:
        assert info.cpus == 3
        assert await _guest_cpus(runtime, "cpus-3") == "3"
        [src] = await runtime.spawn("cpus-3", 1)
        branch = await runtime.branch(src.sandbox.id, tag="cpus-3-b", mode="diff")
        await runtime.kill(src.sandbox.id)
        assert branch.cpus == 3 and await _guest_cpus(runtime, "cpus-3-b") == "3"
        await runtime.delete_snapshot("cpus-3-b")
    finally:
        await runtime.delete_snapshot("cpus-3")
