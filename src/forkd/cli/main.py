"""Argument parsing and the command implementations of ``forkd``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from forkd import __version__
from forkd.cli import hubcmds, netcmds, render
from forkd.cli.backend import Backend, SpawnFlags, choose_backend
from forkd.config import DEFAULT_IMAGE, DEFAULT_MEM_MIB, Settings
from forkd.errors import ForkdError, InvalidInput

EXIT_ERROR = 1
EXIT_USAGE = 2


class Usage(InvalidInput):
    """A flag combination the command refuses (exit 2)."""


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forkd",
        description="Copy-on-write microVM sandboxes: boot once, warm, fork hundreds.",
    )
    p.add_argument("--version", action="version", version=f"forkd {__version__}")
    p.add_argument("--home", help="data dir (env FORKD_HOME)")
    p.add_argument("--daemon-url", help="talk to this daemon (env FORKD_URL)")
    p.add_argument("--daemon-token", help="bearer token for the daemon (env FORKD_TOKEN)")
    p.add_argument("--local", action="store_true", help="never use a daemon; run in this process")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    img = sub.add_parser("image", help="build, list and remove guest images")
    isub = img.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build a guest image (cached by content)")
    b.add_argument("name", nargs="?", default=DEFAULT_IMAGE)
    b.add_argument(
        "--packages", help="comma-separated Debian packages (default for 'python': python3-numpy)"
    )
    b.add_argument("--kernel", type=Path, help="use this kernel file instead of the distribution's")
    il = isub.add_parser("ls", help="list built images")
    il.add_argument("--json", action="store_true")
    ir = isub.add_parser("rm", help="remove an image")
    ir.add_argument("name")

    s = sub.add_parser(
        "snapshot", help="make a template from an image, or BRANCH a running sandbox"
    )
    s.add_argument("--tag", help="snapshot tag (required for templates; generated for branches)")
    s.add_argument("--image", default=None, help=f"image to boot (default {DEFAULT_IMAGE})")
    s.add_argument(
        "--mem-mib", "--mem-size-mib", dest="mem_mib", type=int, default=None,
        help=f"guest memory (default {DEFAULT_MEM_MIB})",
    )  # fmt: skip
    s.add_argument("--warmup", help="Python code run in the guest's interpreter before the pause")
    s.add_argument("--cpus", type=int, help="vCPUs of the template and its children "
                   "(default 2 on KVM, 1 on TCG: 'forkd doctor' says which)")  # fmt: skip
    s.add_argument("--from-sandbox", metavar="ID", help="BRANCH this running sandbox")
    s.add_argument(
        "--diff", action="store_true", help="branch writing only memory changed since the fork"
    )
    s.add_argument(
        "--live", action="store_true", help="live branch: pause only to arm write-protect"
    )
    s.add_argument(
        "--no-wait", action="store_true", help="with --live: return while memory is copied"
    )
    s.add_argument("--json", action="store_true")
    netcmds.add_network_args(s, what="the warm-up")
    v05 = s.add_argument_group("forkd v0.5 template flags (accepted; a note says they are ignored)")
    v05.add_argument("--kernel", help="ignored: templates boot a built image (see --image)")
    v05.add_argument("--rootfs", help="ignored: templates boot a built image (see --image)")
    v05.add_argument("--rw", action="store_true", help="ignored: the root is read-only")
    v05.add_argument("--tap", help="ignored")
    v05.add_argument("--boot-wait-secs", type=int, help="ignored: --warmup runs code instead")
    v05.add_argument("--keep-workdir", action="store_true", help="ignored")
    v05.add_argument("--volume", action="append", default=[], help="not supported: refused")

    for name, helptext in (("fork", "fork N children from a template"), ("spawn", "same as fork")):
        f = sub.add_parser(name, help=helptext)
        f.add_argument("--tag", required=True)
        f.add_argument("-n", "--n", dest="n", type=int, default=1, help="how many children")
        f.add_argument("--memory-limit-mib", type=int)
        f.add_argument(
            "--settle-secs", type=float, metavar="S",
            help="forkd v0.5's foreground fork: keep the children S seconds, then kill them "
            "(without it they run until 'forkd kill')",
        )  # fmt: skip
        for flag, what in V05_SPAWN_FLAGS.items():
            f.add_argument(flag, action="store_true", help=what)
        f.add_argument(
            "--keep-workdir", action="store_true",
            help="accepted for forkd v0.5: a sandbox's run dir is always kept until it is killed",
        )  # fmt: skip
        f.add_argument("--json", action="store_true")
        netcmds.add_network_args(f, what="the children")
    netcmds.add_parsers(sub)
    hubcmds.add_parsers(sub)

    ls = sub.add_parser("ls", help="list sandboxes")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all", action="store_true", help="include dead sandboxes")

    ims = sub.add_parser("images", help="list templates (snapshots)")
    ims.add_argument("--json", action="store_true")

    si = sub.add_parser("snapshot-info", help="one snapshot's lineage and sizes")
    si.add_argument("tag")
    si.add_argument("--json", action="store_true")

    sc = sub.add_parser("snapshot-compact", help="write a standalone copy of a snapshot")
    sc.add_argument("--from", dest="src", required=True, metavar="TAG")
    sc.add_argument("--to", required=True, metavar="TAG")

    rmi = sub.add_parser("rmi", help="delete snapshots")
    rmi.add_argument("tags", nargs="+", metavar="TAG")
    g = rmi.add_mutually_exclusive_group()
    g.add_argument("--cascade", action="store_true", help="also delete dependent snapshots")
    g.add_argument("--force", action="store_true", help="delete even with dependents")

    e = sub.add_parser("exec", help="run a command in a sandbox")
    e.add_argument("id")
    e.add_argument("--timeout", "--timeout-secs", dest="timeout", type=float, default=30.0)
    e.add_argument("--cwd")
    e.add_argument("--env", action="append", default=[], metavar="K=V")
    e.add_argument("--json", action="store_true")
    e.add_argument("cmd", nargs="*", help="the command, after -- (forkd exec ID -- CMD ARGS...)")

    ev = sub.add_parser("eval", help="evaluate Python in a sandbox's warm interpreter")
    ev.add_argument("id")
    ev.add_argument("code", nargs="?", help="the code (or after --: forkd eval ID -- EXPR)")
    ev.add_argument("--json", action="store_true")

    pg = sub.add_parser("ping", help="round trip to a sandbox's agent")
    pg.add_argument("id")

    k = sub.add_parser("kill", help="stop sandboxes")
    k.add_argument("ids", nargs="*")
    k.add_argument("--all", action="store_true")
    k.add_argument("--tag", help="kill every sandbox forked from this snapshot")

    ws = sub.add_parser("workspace", help="named, durable sandboxes: suspend and resume them")
    wsub = ws.add_subparsers(dest="workspace_command", required=True, metavar="ACTION")
    wc = wsub.add_parser("create", help="fork a sandbox from a snapshot as workspace NAME")
    wc.add_argument("name")
    wc.add_argument("--snapshot", "--snapshot-tag", dest="snapshot", required=True, metavar="T")
    wc.add_argument("--per-child-netns", action="store_true")
    wc.add_argument("--memory-limit-mib", type=int, help="kept for every resume")
    wsp = wsub.add_parser("suspend", help="snapshot the workspace's sandbox, then stop it")
    wsp.add_argument("name")
    wsp.add_argument("--diff", action="store_true", help="write the snapshot in diff mode")
    wr = wsub.add_parser("resume", help="fork a sandbox from the workspace's latest suspend")
    wr.add_argument("name")
    wsub.add_parser("list", help="list workspaces")
    wdel = wsub.add_parser("delete", help="kill its sandbox and delete its suspend snapshots")
    wdel.add_argument("name")
    for action in (wc, wsp, wr, wsub.choices["list"]):
        action.add_argument("--json", action="store_true")

    d = sub.add_parser("doctor", help="check this host")
    d.add_argument("--json", action="store_true")

    for name in ("daemon", "serve"):
        dm = sub.add_parser(
            name, help="run the REST daemon" + (" (alias)" if name == "serve" else "")
        )
        dm.add_argument(
            "--bind", default=None, help="HOST:PORT (env FORKD_BIND, default 127.0.0.1:8889)"
        )
        dm.add_argument("--unix-socket", type=Path, help="also listen on this unix socket")
        dm.add_argument(
            "--token-file", type=Path, help="file holding the bearer token (>= 16 bytes)"
        )
        dm.add_argument("--kill-on-exit", action="store_true", help="kill sandboxes on shutdown")
        dm.add_argument("--max-sandboxes", type=int)
        dm.add_argument("--branch-concurrency", type=int)
        dm.add_argument(
            "--default-egress", choices=("none", "internet"),
            help="egress of sandboxes whose request names none (default none; env "
            "FORKD_DEFAULT_EGRESS)",
        )  # fmt: skip

    m = sub.add_parser("mcp", help="run the MCP server (stdio by default)")
    m.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8890)

    demo = sub.add_parser("demo", help="build the image, make a warm template, fork, run code")
    demo.add_argument("-n", type=int, default=3)
    demo.add_argument("--tag", default="demo")

    qs = sub.add_parser(
        "quickstart", help="check the host, then the demo (reusing its template when it exists)"
    )
    qs.add_argument("-n", "--n", dest="n", type=int, default=10, help="children to fork")
    qs.add_argument("--tag", default="quickstart")
    qs.add_argument("-y", "--yes", action="store_true", help="do not ask before building")
    qs.add_argument("--image", help="forkd v0.5's Docker image: not supported (refused)")

    sub.add_parser("where", help="print the data dir (FORKD_HOME)").add_argument(
        "--json", action="store_true", help="also the memory, cache, database and log paths"
    )

    cl = sub.add_parser(
        "cleanup", help="list leftovers of dead forkd processes (dry run); -y removes them"
    )
    cl.add_argument("-y", "--yes", action="store_true", help="remove what is listed")

    # forkd v0.5 took the daemon flags after the verb (`forkd ls --daemon-url URL`): accept both.
    for name, verb in sub.choices.items():
        if name not in ("daemon", "serve", "mcp", "image"):
            verb.add_argument("--daemon-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            verb.add_argument("--daemon-token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


V05_SPAWN_FLAGS = {
    "--per-child-netns": "accepted for forkd v0.5; changes nothing (no shared network stack)",
    "--prewarm": "accepted for forkd v0.5; changes nothing (branches need no warm-up)",
    "--live-fork": "accepted for forkd v0.5; any sandbox can be live-branched",
    "--hugepages": "accepted for forkd v0.5; guest memory is on huge pages when forkd runs as "
    "root (a note says when it is not)",
}


# --- helpers -----------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(home=Path(args.home) if args.home else None)


@contextlib.contextmanager
def _backend(args: argparse.Namespace) -> Iterator[Backend]:
    backend = choose_backend(
        _settings(args), daemon_url=args.daemon_url, token=args.daemon_token, local=args.local
    )
    try:
        yield backend
    finally:
        backend.close()


def _listing(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    columns: tuple[tuple[str, str], ...],
    empty: str,
) -> int:
    if args.json:
        render.print_json(rows)
    else:
        render.table(rows, columns, empty=empty)
    return 0


def _step_printer() -> Callable[[str], None]:
    start = time.monotonic()

    def step(msg: str) -> None:
        render.err.print(f"[dim]{time.monotonic() - start:7.1f}s[/dim] {msg}")

    return step


SANDBOX_COLUMNS = (("id", "ID"), ("snapshot_tag", "SNAPSHOT"), ("pid", "PID"),
                   ("state", "STATE"), ("created_at_unix", "CREATED"))  # fmt: skip
WORKSPACE_COLUMNS = (("name", "NAME"), ("status", "STATUS"), ("source_snapshot_tag", "SOURCE"),
                     ("current_state_tag", "STATE"), ("live_sandbox_id", "SANDBOX"),
                     ("last_active_unix", "ACTIVE"))  # fmt: skip
SNAPSHOT_COLUMNS = (("tag", "TAG"), ("status", "STATUS"), ("bootable", "BOOTABLE"),
                    ("mode", "MODE"), ("branched_from", "FROM"), ("image", "IMAGE"),
                    ("mem_mib", "MEM MiB"))  # fmt: skip


# --- commands ----------------------------------------------------------------------------------


def cmd_image(args: argparse.Namespace) -> int:
    from forkd.images.builder import ImageRequest, build_image
    from forkd.images.store import ImageStore

    settings = _settings(args)
    store = ImageStore(settings)
    if args.image_command == "build":
        packages = (
            tuple(p.strip() for p in args.packages.split(",") if p.strip())
            if args.packages is not None
            else None
        )
        req = ImageRequest.default(args.name, packages, args.kernel)
        with render.err.status(f"building image {req.name}") as status:
            step = _step_printer()

            def progress(msg: str) -> None:
                status.update(f"building image {req.name}: {msg}")
                step(msg)

            image = build_image(settings, req, progress)
        render.out.print(f"image {req.name} ready: {image.dir}")
        return 0
    if args.image_command == "ls":
        rows = [
            {"name": name, "digest": img.digest, "packages": ",".join(img.manifest.packages),
             "kernel": img.manifest.kernel_identity, "dir": str(img.dir)}
            for name, img in store.list()
        ]  # fmt: skip
        if args.json:
            render.print_json(rows)
        else:
            columns = (("name", "NAME"), ("digest", "DIGEST"), ("packages", "PACKAGES"),
                       ("kernel", "KERNEL"))  # fmt: skip
            render.table(rows, columns, empty="no images: run 'forkd image build'")
        return 0
    # rm
    from forkd.snapshots.store import SnapshotStore

    image = store.get(args.name)
    snaps = SnapshotStore(settings)
    users = [t for t in snaps.tags_on_disk() if snaps.load(t).image_digest == image.digest]
    store.remove(args.name, in_use_by=users)
    render.out.print(f"removed image {args.name}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    branch_flags = [f for f, on in (("--diff", args.diff), ("--live", args.live),
                                    ("--no-wait", args.no_wait)) if on]  # fmt: skip
    if args.from_sandbox is None:
        if branch_flags:
            verb = "applies" if len(branch_flags) == 1 else "apply"
            raise Usage(f"{', '.join(branch_flags)} only {verb} with --from-sandbox ID")
        if not args.tag:
            raise Usage("--tag is required to make a template (e.g. forkd snapshot --tag py)")
    else:
        if args.diff and args.live:
            raise Usage("--live conflicts with --diff: choose one branch mode")
        if args.no_wait and not args.live:
            raise Usage(
                "--no-wait requires --live (only a live branch can finish in the background)"
            )
        if (
            args.image
            or args.mem_mib
            or args.warmup
            or args.cpus
            or netcmds.network_from_args(args)
        ):
            raise Usage(
                "--image, --mem-mib, --warmup and the network flags apply to templates, not to "
                "--from-sandbox"
            )
    if args.volume:
        raise Usage(
            "--volume is not supported: a sandbox has no persistent volumes here (use the files "
            "API, or bake the data into the template with --warmup)"
        )
    _v05_template_notes(args)
    with _backend(args) as backend:
        if args.from_sandbox is None:
            step = _step_printer()
            info = backend.create_snapshot(
                args.tag, args.image or DEFAULT_IMAGE, args.mem_mib or DEFAULT_MEM_MIB,
                args.warmup, step, netcmds.network_from_args(args), args.cpus,
            )  # fmt: skip
        else:
            info = backend.branch(
                args.from_sandbox, args.tag, "live" if args.live else None, args.diff,
                not args.no_wait,
            )  # fmt: skip
    if args.json:
        render.print_json(info)
    else:
        extra = f" (pause {info['pause_ms']:.1f} ms)" if info.get("pause_ms") is not None else ""
        render.out.print(f"snapshot {info['tag']} {info['status']}{extra}: {info['dir']}")
    return 0


def _v05_template_notes(args: argparse.Namespace) -> None:
    """Say which of forkd v0.5's template flags change nothing here (one line each)."""
    from forkd import compat, wire

    given: dict[str, Any] = {"tag": args.tag or "-"}
    for name in ("kernel", "rootfs", "tap", "boot_wait_secs"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    given["rw"] = args.rw
    notes = compat.snapshot_notes(wire.CreateSnapshotRequest(**given), args.image or DEFAULT_IMAGE)
    if args.keep_workdir:
        notes.append("--keep-workdir is ignored: nothing is left to keep once a template is saved")
    for note in notes:
        render.err.print(f"forkd: note: {note}", markup=False)


def cmd_fork(args: argparse.Namespace) -> int:
    if args.settle_secs is not None and not args.settle_secs >= 0:
        raise Usage(f"--settle-secs must be >= 0, got {args.settle_secs:g}")
    flags = SpawnFlags(
        per_child_netns=args.per_child_netns, prewarm=args.prewarm, live_fork=args.live_fork,
        hugepages=args.hugepages,
    )  # fmt: skip
    with _backend(args) as backend:
        t0 = time.monotonic()
        children = backend.spawn(
            args.tag, args.n, args.memory_limit_mib, flags, network=netcmds.network_from_args(args)
        )
        wall_ms = (time.monotonic() - t0) * 1000
        notes = dict.fromkeys(str(c["warning"]) for c in children if c.get("warning"))
        if args.keep_workdir:
            notes[
                "--keep-workdir changes nothing: a sandbox's run dir is kept until it is killed"
            ] = None
        for note in notes:
            render.err.print(f"forkd: note: {note}", markup=False)
        if args.json:
            render.print_json(children)
        else:
            _print_forked(args.tag, children, wall_ms)
        if args.settle_secs is not None:
            _settle_then_kill(backend, [str(c["id"]) for c in children], args.settle_secs)
    return 0


def _print_forked(tag: str, children: list[dict[str, Any]], wall_ms: float) -> None:
    for c in children:
        t = c.get("fork_timing_ms")
        phases = (
            f"  qemu up {t['qemu_up_ms']:.0f} ms, restored {t['restore_ms']:.0f} ms, "
            f"agent {t['agent_ms']:.0f} ms, total {t['total_ms']:.0f} ms"
            if t
            else ""
        )
        render.out.print(f"{c['id']}{phases}")
    render.out.print(f"forked {len(children)} from {tag} in {wall_ms:.0f} ms wall")


def _settle_then_kill(backend: Backend, ids: list[str], seconds: float) -> None:
    """forkd v0.5's ``fork --settle-secs``: the children live ``seconds`` (Ctrl-C ends it early),
    then they are killed."""
    render.err.print(
        f"keeping {len(ids)} children for {seconds:g} s (--settle-secs), then killing them"
    )
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        for sandbox_id in ids:
            with contextlib.suppress(ForkdError):
                backend.kill(sandbox_id)
        render.err.print(f"killed {len(ids)} children")


def cmd_ls(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        rows = backend.list_sandboxes(args.all)
    return _listing(args, rows, SANDBOX_COLUMNS, "no sandboxes")


def cmd_images(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        rows = backend.list_snapshots()
    return _listing(args, rows, SNAPSHOT_COLUMNS, "no snapshots: run 'forkd snapshot --tag T'")


def cmd_snapshot_info(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        info = backend.snapshot_info(args.tag)
    if args.json:
        render.print_json(info)
    else:
        for key, value in info.items():
            if value not in (None, [], {}):
                render.out.print(f"{key:22} {value}")
    return 0


def cmd_snapshot_compact(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        info = backend.compact_snapshot(args.src, args.to)
    render.out.print(f"snapshot {info['tag']} {info['status']}: {info['dir']}")
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    """Delete every named snapshot in order; one that fails does not stop the others."""
    failed = 0
    with _backend(args) as backend:
        for tag in args.tags:
            try:
                backend.delete_snapshot(tag, args.cascade, args.force)
            except Exception as exc:
                message = _error_message(exc)
                if message is None:
                    raise
                failed += 1
                render.err.print(f"forkd: error: {tag}: {message}", markup=False)
            else:
                render.out.print(f"deleted snapshot {tag}")
    if failed and len(args.tags) > 1:
        render.err.print(f"forkd: {failed} of {len(args.tags)} deletions failed")
    return EXIT_ERROR if failed else 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if not cmd:
        raise Usage("no command given: forkd exec ID -- CMD [ARGS...]")
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Usage(f"--env takes K=V, got {item!r}")
        env[key] = value
    with _backend(args) as backend:
        r = backend.exec(args.id, cmd, args.timeout, env or None, args.cwd)
    if args.json:
        render.print_json(r)
        return 0
    sys.stdout.write(r["stdout"])
    sys.stderr.write(r["stderr"])
    if r.get("timed_out"):
        render.err.print(f"forkd: command timed out after {args.timeout:g} s and was killed")
    code = int(r["exit_code"])
    return code if 0 <= code < 256 else 128 + (-code % 128)


def cmd_eval(args: argparse.Namespace) -> int:
    if not args.code:
        raise Usage("no code given: forkd eval ID CODE, or forkd eval ID -- EXPR")
    with _backend(args) as backend:
        r = backend.eval(args.id, args.code)
    if args.json:
        render.print_json(r)
        return 0
    if r.get("stdout"):
        sys.stdout.write(r["stdout"])
    if r.get("error"):
        sys.stderr.write((r.get("traceback") or r["error"]).rstrip() + "\n")
        return 1
    if r.get("result") is not None:
        sys.stdout.write(str(r["result"]) + "\n")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        t0 = time.perf_counter()
        r = backend.ping(args.id)
        ms = (time.perf_counter() - t0) * 1000
    render.out.print(f"pong from {args.id} in {ms:.1f} ms: {r}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    if not (args.ids or args.all or args.tag):
        raise Usage("name sandbox ids, or --all, or --tag T")
    if args.all and (args.ids or args.tag):
        raise Usage("--all takes no ids and no --tag")
    with _backend(args) as backend:
        ids = list(args.ids)
        if args.all or args.tag:
            ids += [
                s["id"] for s in backend.list_sandboxes(True)
                if args.all or s["snapshot_tag"] == args.tag
            ]  # fmt: skip
        for sandbox_id in ids:
            backend.kill(sandbox_id)
            render.out.print(f"killed {sandbox_id}")
    if not ids:
        render.err.print("no sandboxes to kill")
    return 0


def cmd_workspace(args: argparse.Namespace) -> int:
    action = args.workspace_command
    with _backend(args) as backend:
        if action == "list":
            return _listing(args, backend.list_workspaces(), WORKSPACE_COLUMNS, "no workspaces")
        if action == "delete":
            backend.delete_workspace(args.name)
            render.out.print(f"deleted workspace {args.name}")
            return 0
        if action == "create":
            ws = backend.create_workspace(
                args.name, args.snapshot, args.per_child_netns, args.memory_limit_mib
            )
        elif action == "suspend":
            ws = backend.suspend_workspace(args.name, args.diff)
        else:
            ws = backend.resume_workspace(args.name)
    if args.json:
        render.print_json(ws)
        return 0
    where = (f"sandbox {ws['live_sandbox_id']}" if ws.get("live_sandbox_id")
             else f"state {ws.get('current_state_tag')}")  # fmt: skip
    render.out.print(f"workspace {ws['name']} {ws['status']}: {where}")
    if ws.get("warning"):
        render.err.print(f"forkd: warning: {ws['warning']}", markup=False)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from forkd.doctor import run_checks

    checks = run_checks(_settings(args))
    if args.json:
        render.print_json([c.__dict__ for c in checks])
    else:
        colors = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
        for c in checks:
            hint = f"  [dim]({c.hint})[/dim]" if c.hint else ""
            render.out.print(f"[{colors[c.status]}]{c.status}[/] {c.name}: {c.detail}{hint}")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from forkd.api.server import DaemonOptions, serve

    bind = args.bind or os.environ.get("FORKD_BIND") or "127.0.0.1:8889"
    overrides: dict[str, Any] = {
        "home": Path(args.home) if args.home else None,
        "max_sandboxes": args.max_sandboxes,
        "branch_concurrency": args.branch_concurrency,
        "default_egress": args.default_egress,
    }
    settings = Settings.from_env(**overrides)
    opts = DaemonOptions(
        bind=bind, unix_socket=args.unix_socket, token_file=args.token_file,
        kill_on_exit=args.kill_on_exit,
    )  # fmt: skip
    serve(settings, opts)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from forkd.mcp_server import run

    run("streamable-http" if args.http else "stdio", host=args.host, port=args.port)
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return netcmds.cmd_port(args, backend)


def cmd_snapshot_diff(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return netcmds.cmd_snapshot_diff(args, backend)


def cmd_pack(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return hubcmds.cmd_pack(args, backend, _step_printer())


def cmd_unpack(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return hubcmds.cmd_unpack(args, backend, _step_printer())


def cmd_push(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return hubcmds.cmd_push(args, backend, _step_printer())


def cmd_pull(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        return hubcmds.cmd_pull(args, backend, _step_printer())


def cmd_demo(args: argparse.Namespace) -> int:
    from forkd.demo import run_demo

    return asyncio.run(run_demo(_settings(args), n=args.n, tag=args.tag))


def cmd_quickstart(args: argparse.Namespace) -> int:
    from forkd.demo import run_quickstart

    if args.image is not None:
        raise Usage(
            f"--image {args.image}: Docker images are not supported; quickstart uses the "
            "built-in 'python' image (forkd image build --packages adds Debian packages)"
        )
    if args.n < 1:
        raise Usage(f"-n must be at least 1, got {args.n}")
    return run_quickstart(_settings(args), n=args.n, tag=args.tag, assume_yes=args.yes)


def cmd_where(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.json:
        render.print_json({
            "home": str(settings.home), "memory_dir": str(settings.memory_dir),
            "cache_dir": str(settings.cache_dir), "database": str(settings.db_path),
            "audit_log": str(settings.audit_log_path),
        })  # fmt: skip
    else:
        sys.stdout.write(f"{settings.home}\n")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from forkd.runtime import leftovers

    settings = _settings(args)
    found = leftovers.find(settings)
    if not found:
        render.out.print(f"nothing to clean up under {settings.home}")
        return 0
    verb = "removing" if args.yes else "would remove"
    render.out.print(f"{verb} {len(found)} leftover(s):", markup=False)
    for item in found:
        line = f"  {item.kind:12} {item.path}  {item.size_bytes / (1 << 20):.1f} MiB  ({item.why})"
        render.out.print(line, markup=False)
        if args.yes:
            leftovers.remove(settings, item)
    if not args.yes:
        render.out.print("dry run: pass -y (--yes) to remove them")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "image": cmd_image, "snapshot": cmd_snapshot, "fork": cmd_fork, "spawn": cmd_fork,
    "ls": cmd_ls, "images": cmd_images, "snapshot-info": cmd_snapshot_info, "rmi": cmd_rmi,
    "snapshot-compact": cmd_snapshot_compact,
    "exec": cmd_exec, "eval": cmd_eval, "ping": cmd_ping, "kill": cmd_kill,
    "doctor": cmd_doctor, "daemon": cmd_daemon, "serve": cmd_daemon, "mcp": cmd_mcp,
    "demo": cmd_demo, "port": cmd_port, "snapshot-diff": cmd_snapshot_diff,
    "workspace": cmd_workspace,
    "quickstart": cmd_quickstart, "where": cmd_where, "cleanup": cmd_cleanup,
    "pack": cmd_pack, "unpack": cmd_unpack, "push": cmd_push, "pull": cmd_pull,
}  # fmt: skip
SEPARATED = {"exec", "eval"}  # the commands that take what follows "--" verbatim


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the sandbox command, verbatim (argparse mangles it in subparsers).
    tail: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, tail = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if tail is not None:
        if args.command not in SEPARATED:
            parser.error("'--' separates the command of 'forkd exec' and the code of 'forkd eval'")
        if args.command == "exec":
            args.cmd = [*args.cmd, *tail]
        elif args.code is not None:
            parser.error("forkd eval: give the code either as an argument or after --, not both")
        else:
            args.code = " ".join(tail)
    try:
        return COMMANDS[args.command](args)
    except Usage as exc:
        render.err.print(f"forkd {args.command}: {exc}", markup=False)
        return EXIT_USAGE
    except ForkdError as exc:
        render.err.print(f"forkd: error: {exc}", markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _error_message(exc)
        if message is None:
            raise
        render.err.print(f"forkd: error: {message}", markup=False)
        return EXIT_ERROR


def _error_message(exc: Exception) -> str | None:
    """The one-line message of an error forkd raised on purpose (None for a bug)."""
    if isinstance(exc, ForkdError) and not hasattr(exc, "body"):
        return str(exc)
    # Errors from the daemon arrive as the SDK's ControllerError: the daemon's message.
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    if isinstance(exc, ForkdError):
        return str(exc)
    return None
