"""The forkd daemon: REST API over the runtime (``forkd daemon``).

- :mod:`forkd.api.app`: ``create_app(runtime, token=..., audit_log=...)``, the FastAPI app.
- :mod:`forkd.api.server`: ``serve(settings, DaemonOptions(...))``, uvicorn on TCP + unix socket.
- :mod:`forkd.api.auth`, :mod:`forkd.api.audit`, :mod:`forkd.api.metrics`,
  :mod:`forkd.api.limits`: bearer auth, JSON-lines audit log, Prometheus metrics, body cap and
  per-request timeouts (all plain ASGI / per-app state, no globals).
"""

from forkd.api.app import create_app

__all__ = ["create_app"]
