"""forkd: copy-on-write microVM sandboxes for AI-agent fan-out.

``from forkd import Controller, Sandbox`` gives the clients of the daemon (loaded on first use,
so the engine and the CLI do not pay for the HTTP stack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.6.0"
API_VERSION = "v1"

_CLIENT_NAMES = (
    "AsyncController", "AsyncSandbox", "BranchMode", "CommandResult", "Controller",
    "ControllerConnectionError", "ControllerError", "EvalResult", "Sandbox",
    "SnapshotFailedError",
)  # fmt: skip

if TYPE_CHECKING:
    from forkd.client import (
        AsyncController,
        AsyncSandbox,
        BranchMode,
        CommandResult,
        Controller,
        ControllerConnectionError,
        ControllerError,
        EvalResult,
        Sandbox,
        SnapshotFailedError,
    )


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import forkd.client

        return getattr(forkd.client, name)
    raise AttributeError(f"module 'forkd' has no attribute {name!r}")


__all__ = [
    "API_VERSION",
    "AsyncController",
    "AsyncSandbox",
    "BranchMode",
    "CommandResult",
    "Controller",
    "ControllerConnectionError",
    "ControllerError",
    "EvalResult",
    "Sandbox",
    "SnapshotFailedError",
    "__version__",
]
