"""Response bodies the daemon adds on top of :mod:`forkd.wire` (documentation and OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel

from forkd import wire


class Health(BaseModel):
    ok: bool


class VersionInfo(BaseModel):
    version: str
    api: str
    accel: str | None = None


class ForkTimingMs(BaseModel):
    """Per-phase times of one fork, in milliseconds."""

    qemu_up_ms: float
    restore_ms: float
    agent_ms: float
    total_ms: float
    pooled: bool = False  # handed out by the hot pool (restored and greeted before the call)


class SpawnedSandbox(wire.SandboxInfo):
    """``POST /v1/sandboxes`` item: the SandboxInfo plus how long the fork took, and a
    ``warning`` when a requested flag or limit changed nothing here."""

    fork_timing_ms: ForkTimingMs | None = None
    warning: str | None = None
