"""CLI pieces for guest networking: egress flags, ``forkd port`` and ``forkd snapshot-diff``."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from forkd.cli import render
from forkd.cli.backend import Backend
from forkd.errors import AgentError, InvalidInput

DEFAULT_EXEC_TIMEOUT_S = 600.0


def add_network_args(p: argparse.ArgumentParser, *, what: str) -> None:
    g = p.add_argument_group("network")
    g.add_argument(
        "--egress", choices=("none", "internet", "allowlist"),
        help=f"what {what} may reach (default: the template's or the daemon's, else none)",
    )  # fmt: skip
    g.add_argument(
        "--allow", action="append", default=[], metavar="ENTRY",
        help="allow-list entry: example.com, *.example.com, 203.0.113.0/24 or host:PORT "
        "(repeatable; implies --egress allowlist)",
    )  # fmt: skip
    g.add_argument("--host-ca", action="store_true", help="give the guest the host's CA bundle")


def network_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.egress is None and not args.allow and not args.host_ca:
        return None
    egress = args.egress or ("allowlist" if args.allow else None)
    out: dict[str, Any] = {"allow": list(args.allow), "host_ca": bool(args.host_ca)}
    if egress is not None:
        out["egress"] = egress
    return out


def add_parsers(sub: Any) -> None:
    pt = sub.add_parser("port", help="forward a guest TCP port to this host's 127.0.0.1")
    pt.add_argument("id")
    pt.add_argument("port", nargs="?", type=int, help="guest port (omit with --list)")
    pt.add_argument("--list", action="store_true", help="list the sandbox's forwards")
    pt.add_argument("--remove", action="store_true", help="stop forwarding PORT")
    pt.add_argument("--json", action="store_true")

    sd = sub.add_parser(
        "snapshot-diff",
        help="fork BASE, run a command in it, save the result as template NEW, kill the fork",
    )
    sd.add_argument("--from", dest="base", required=True, metavar="BASE")
    sd.add_argument("--tag", required=True, metavar="NEW")
    sd.add_argument("--exec", dest="exec_command", required=True, metavar="CMD",
                    help="shell command run in the fork (e.g. 'pip install requests')")  # fmt: skip
    sd.add_argument("--exec-timeout-secs", type=float, default=DEFAULT_EXEC_TIMEOUT_S)
    sd.add_argument("--json", action="store_true")
    add_network_args(sd, what="the command")


def cmd_port(args: argparse.Namespace, backend: Backend) -> int:
    if args.list:
        if args.port is not None or args.remove:
            raise InvalidInput("--list takes no PORT and no --remove")
        rows = backend.list_ports(args.id)
        if args.json:
            render.print_json(rows)
        else:
            render.table(rows, (("port", "GUEST PORT"), ("url", "URL")), empty="no forwards")
        return 0
    if args.port is None:
        raise InvalidInput("give the guest PORT to forward (or --list)")
    if args.remove:
        backend.remove_port(args.id, args.port)
        render.out.print(f"guest port {args.port} of {args.id} is no longer forwarded")
        return 0
    info = backend.expose_port(args.id, args.port)
    if args.json:
        render.print_json(info)
    else:
        render.out.print(info["url"])
    return 0


def cmd_snapshot_diff(args: argparse.Namespace, backend: Backend) -> int:
    """The original's verb: spawn from BASE, run CMD, diff-branch into NEW, kill the fork."""
    if not args.exec_command.strip():
        raise InvalidInput("--exec needs a command")
    [child] = backend.spawn(args.base, 1, None, network=network_from_args(args))
    sandbox_id = str(child["id"])
    try:
        render.err.print(f"running in {sandbox_id}: {args.exec_command}", markup=False)
        result = backend.exec(sandbox_id, ["/bin/sh", "-c", args.exec_command],
                              args.exec_timeout_secs, None, None)  # fmt: skip
        if result.get("timed_out") or result.get("exit_code") != 0:
            tail = (result.get("stderr") or result.get("stdout") or "").strip()[-2000:]
            why = "timed out" if result.get("timed_out") else f"exit {result.get('exit_code')}"
            raise AgentError(
                f"{shlex.quote(args.exec_command)} failed in the fork ({why}); no snapshot was "
                f"made: {tail}"
            )
        info = backend.branch(sandbox_id, args.tag, "diff", False, True)
    finally:
        backend.kill(sandbox_id)
    if args.json:
        render.print_json(info)
    else:
        render.out.print(f"snapshot {info['tag']} {info['status']}: {info['dir']}")
    return 0
