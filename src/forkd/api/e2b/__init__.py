"""E2B compatibility: the unmodified E2B SDKs drive forkd (docs/e2b.md).

Mounted by the daemon under ``/e2b``: the control plane at ``/e2b`` (``E2B_API_URL``) and every
sandbox's envd and code-interpreter traffic at ``/e2b/sandbox`` (``E2B_SANDBOX_URL``), routed by
the ``E2b-Sandbox-Id`` header. These paths skip the daemon's bearer auth: the control plane
checks ``X-API-KEY`` against the daemon token, sandbox traffic each sandbox's access token.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from forkd.api.e2b.control import Control, control_router, unsupported_router
from forkd.api.e2b.envd import Envd, envd_router
from forkd.api.e2b.interpreter import Interpreter, interpreter_router
from forkd.api.e2b.state import E2BState
from forkd.api.e2b.store import E2BStore
from forkd.config import Limits
from forkd.runtime.engine import Runtime

PREFIX = "/e2b"
SANDBOX_PREFIX = "/e2b/sandbox"


DEFAULT_TEMPLATE_ENV = "FORKD_E2B_DEFAULT_TEMPLATE"
STATE_FILE = "e2b.db"  # under FORKD_HOME (forkd.api.e2b.store)


def mount_e2b(app: FastAPI, runtime: Runtime, *, token: str | None, limits: Limits) -> E2BState:
    """Add the E2B routes to ``app``; the state (start it once the runtime has started: it
    takes up the stored sandboxes, and its reaper runs while sandboxes have one).

    ``$FORKD_E2B_DEFAULT_TEMPLATE`` names the snapshot that ``Sandbox.create()`` without a
    template (the SDKs ask for ``base`` / ``code-interpreter-v1``) forks.
    """
    state = E2BState(runtime, E2BStore(runtime.settings.home / STATE_FILE))
    control = Control(state, token, limits, os.environ.get(DEFAULT_TEMPLATE_ENV))
    envd = Envd(state, limits)
    app.include_router(interpreter_router(Interpreter(envd)), prefix=SANDBOX_PREFIX)
    app.include_router(envd_router(envd), prefix=SANDBOX_PREFIX)
    app.include_router(control_router(control), prefix=PREFIX)
    app.include_router(unsupported_router(control), prefix=PREFIX)
    return state


__all__ = ["PREFIX", "SANDBOX_PREFIX", "E2BState", "mount_e2b"]
