"""forkd: copy-on-write microVM sandboxes for AI-agent fan-out.

``from forkd import Controller, Sandbox`` gives the clients of the daemon (loaded on first use,
so the engine and the CLI do not pay for the HTTP stack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.6.0"
API_VERSION = "v1"

if TYPE_CHECKING:
    from forkd.client import (
        AsyncController,
        AsyncSandbox,
        BranchMode,
        CommandResult,
        Controller,
        ControllerConnectionError,
        ControllerError,
        EvalError,
        EvalResult,
        Sandbox,
        SnapshotFailedError,
    )


def __getattr__(name: str) -> Any:
    import forkd.client

    if name in forkd.client.__all__:
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
    "EvalError",
    "EvalResult",
    "Sandbox",
    "SnapshotFailedError",
    "__version__",
]
