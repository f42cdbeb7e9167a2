"""``forkd-controller``: forkd v0.5's daemon command, so its systemd units and scripts keep working.

``forkd-controller serve [--bind] [--token-file] [--branch-concurrency N] ...`` runs the same
daemon as ``forkd daemon``. Its other flags are accepted with a note where this forkd keeps
that state elsewhere (``--state``, ``--snapshot-root``, ``--audit-log`` live under
``$FORKD_HOME``; ``--prewarm-scratch-dir`` has nothing to hold), and ``--tls-cert``/``--tls-key``
are refused: this daemon speaks plain HTTP only, and silently serving plaintext to a client that
asked for TLS would be worse than not starting. Environment as in v0.5: ``FORKD_BIND``,
``FORKD_TOKEN_FILE``, ``FORKD_BRANCH_CONCURRENCY`` (plus ``FORKD_HOME`` and the other
``FORKD_*`` settings).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from forkd import __version__
from forkd.cli.main import main as forkd_main

EXIT_USAGE = 2

_KEPT_ELSEWHERE = {
    "state": "the registry is SQLite at $FORKD_HOME/forkd.db",
    "snapshot_root": "snapshots live under $FORKD_HOME/snapshots (memory on FORKD_SHM_DIR)",
    "audit_log": "the audit log is $FORKD_HOME/audit.log",
    "prewarm_scratch_dir": "prewarm needs no scratch snapshots here",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkd-controller", description="the forkd daemon")
    p.add_argument("--version", action="version", version=f"forkd-controller {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the REST daemon (same as 'forkd daemon')")
    s.add_argument("--bind", default=os.environ.get("FORKD_BIND"), help="HOST:PORT")
    s.add_argument("--token-file", type=Path, default=os.environ.get("FORKD_TOKEN_FILE") or None)
    s.add_argument("--branch-concurrency", type=int, default=_env_int("FORKD_BRANCH_CONCURRENCY"))
    s.add_argument("--home", help="data dir (env FORKD_HOME)")
    s.add_argument("--unix-socket", type=Path, help="also listen on this unix socket")
    s.add_argument("--kill-on-exit", action="store_true", help="kill sandboxes on shutdown")
    s.add_argument("--max-sandboxes", type=int)
    for name in _KEPT_ELSEWHERE:
        flag = "--" + name.replace("_", "-")
        s.add_argument(flag, dest=name, default=os.environ.get(f"FORKD_{name.upper()}"))
    s.add_argument("--tls-cert", default=os.environ.get("FORKD_TLS_CERT"))
    s.add_argument("--tls-key", default=os.environ.get("FORKD_TLS_KEY"))
    return p


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"forkd-controller: {name} must be an integer, got {raw!r}") from None


def daemon_argv(args: argparse.Namespace) -> list[str]:
    """The ``forkd`` command line that runs the daemon ``args`` ask for."""
    argv = ["--home", args.home] if args.home else []
    argv.append("daemon")
    if args.bind:
        argv += ["--bind", args.bind]
    if args.token_file:
        argv += ["--token-file", str(args.token_file)]
    if args.branch_concurrency is not None:
        argv += ["--branch-concurrency", str(args.branch_concurrency)]
    if args.unix_socket:
        argv += ["--unix-socket", str(args.unix_socket)]
    if args.kill_on_exit:
        argv.append("--kill-on-exit")
    if args.max_sandboxes is not None:
        argv += ["--max-sandboxes", str(args.max_sandboxes)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.tls_cert or args.tls_key:
        sys.stderr.write(
            "forkd-controller: TLS is not supported by this daemon (plain HTTP only); put a "
            "TLS-terminating reverse proxy in front of it, or bind to loopback\n"
        )
        return EXIT_USAGE
    if args.branch_concurrency is not None and args.branch_concurrency < 1:
        sys.stderr.write("forkd-controller: --branch-concurrency must be at least 1\n")
        return EXIT_USAGE
    for name, where in _KEPT_ELSEWHERE.items():
        if getattr(args, name):
            flag = "--" + name.replace("_", "-")
            sys.stderr.write(f"forkd-controller: note: {flag} is ignored: {where}\n")
    return forkd_main(daemon_argv(args))
