"""``forkd daemon``: run the REST app with uvicorn on TCP and, optionally, a unix socket.

Both listeners belong to ONE uvicorn server (one lifespan, one signal handler, one app): the
sockets are bound here, so a busy port or a bad path fails before the runtime starts, and the
unix socket is created with mode 0600. SIGTERM/SIGINT stop accepting, let in-flight requests
finish (bounded), then close the runtime; sandboxes keep running unless ``kill_on_exit``, and the
next daemon re-adopts them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from forkd.api.app import create_app
from forkd.api.auth import check_bind, load_token, parse_bind
from forkd.config import Settings
from forkd.errors import HostSetupError, InvalidInput
from forkd.private import private_dir

GRACEFUL_SHUTDOWN_S = 10


@dataclass(frozen=True)
class DaemonOptions:
    bind: str
    unix_socket: Path | None = None
    token_file: Path | None = None
    kill_on_exit: bool = False


# Idle keep-alive connections stay open longer than clients keep them pooled (the E2B SDKs:
# 300 s), so a client never reuses a connection the server is closing at that moment.
KEEP_ALIVE_S = 310


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT that led to a clean shutdown ends the
    process normally (exit 0, ``finally`` blocks run) instead of being re-raised."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _tcp_socket(host: str, port: int) -> socket.socket:
    last: OSError | None = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise InvalidInput(f"cannot resolve --bind host {host!r}: {exc}") from exc
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(2048)
            sock.set_inheritable(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    reason = last.strerror if last is not None else "no address"
    raise HostSetupError(f"cannot listen on {host}:{port}: {reason}")


def _unix_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InvalidInput(f"--unix-socket {path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a daemon that is gone
        else:
            raise HostSetupError(f"another process is listening on {path}")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: the socket grants whoever can open it full access
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise HostSetupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(2048)
    return sock


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one: the daemon holds an agent socket per
    sandbox, and the usual soft limit of 1,024 would refuse the 500th sandbox."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve(settings: Settings, options: DaemonOptions) -> None:
    """Run the daemon until SIGTERM/SIGINT. Raises :class:`ForkdError` on bad options."""
    from forkd.runtime.engine import Runtime

    host, port = parse_bind(options.bind)
    token = load_token(options.token_file) if options.token_file is not None else None
    check_bind(host, token)
    limits = settings.limits
    private_dir(settings.home, "forkd home")
    raise_open_file_limit()

    sockets = [_tcp_socket(host, port)]
    if options.unix_socket is not None:
        try:
            sockets.append(_unix_socket(options.unix_socket))
        except BaseException:
            sockets[0].close()
            raise
    bound_port = sockets[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    where = [f"http://{shown_host}:{bound_port}"]
    if options.unix_socket is not None:
        where.append(f"unix:{options.unix_socket}")

    runtime = Runtime(settings, watch=True)

    def ready() -> None:
        running = len(runtime.list_sandboxes())
        auth = "bearer token required" if token else "no token (loopback only)"
        print(
            f"forkd {runtime.accel.name} daemon listening on {' and '.join(where)} "
            f"({auth}); home {settings.home}; {running} running sandbox(es) adopted",
            file=sys.stderr,
            flush=True,
        )

    app = create_app(
        runtime, token=token, audit_log=settings.audit_log_path, limits=limits,
        kill_on_exit=options.kill_on_exit, on_ready=ready,
    )  # fmt: skip
    config = uvicorn.Config(
        # The stock asyncio loop: under uvloop, waiting for a daemonizing QEMU never finishes.
        app, loop="asyncio", lifespan="on", log_level="warning", access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, h11_max_incomplete_event_size=64 * 1024,
        timeout_keep_alive=KEEP_ALIVE_S,
    )  # fmt: skip
    server = _Server(config)
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:
        if not server.started:
            raise HostSetupError("the daemon failed to start (see the error above)") from exc
        raise
    finally:
        for sock in sockets:
            sock.close()
        if options.unix_socket is not None:
            with contextlib.suppress(OSError):
                options.unix_socket.unlink()
    if not server.started:
        raise HostSetupError("the daemon failed to start (see the error above)")
