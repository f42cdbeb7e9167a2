"""Python clients of the forkd daemon.

- :class:`Controller` / :class:`AsyncController`: the REST API one method per endpoint, with the
  names and arguments of forkd's own SDK, returning the daemon's JSON as plain dicts and lists.
- :class:`Sandbox` / :class:`AsyncSandbox`: an E2B-style object per sandbox
  (``Sandbox.create("python")``, ``sb.commands.run(...)``, ``sb.files``, ``sb.fork(n)``).

Both read ``$FORKD_URL`` (default ``http://127.0.0.1:8889``) and ``$FORKD_TOKEN`` unless given
``base_url=`` / ``token=``.
"""

from forkd.client.controller import (
    DEFAULT_URL,
    AsyncController,
    BranchMode,
    Controller,
    ControllerConnectionError,
    ControllerError,
    SnapshotFailedError,
)
from forkd.client.sandbox import AsyncSandbox, CommandResult, EvalError, EvalResult, Sandbox

__all__ = [
    "DEFAULT_URL",
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
]
