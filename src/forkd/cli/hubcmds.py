"""CLI of the hub: ``forkd pack``, ``unpack``, ``push`` and ``pull``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkd.cli import render
from forkd.cli.backend import Backend
from forkd.errors import NotFound

Progress = Callable[[str], None]
MiB = 1 << 20


def add_parsers(sub: Any) -> None:
    pk = sub.add_parser("pack", help="write a template (with its image) into one pack file")
    pk.add_argument("--tag", required=True, help="the template (a delta branch is flattened)")
    pk.add_argument("-o", "--output", type=Path, help="pack file (default TAG.forkd)")
    pk.add_argument("--no-compress", action="store_true", help="plain tar, no zstd")
    pk.add_argument("--json", action="store_true")

    up = sub.add_parser("unpack", help="verify a pack file and make its template")
    up.add_argument("file", type=Path)
    up.add_argument("--tag", help="unpack as this tag (default: the packed tag)")
    up.add_argument("--force", action="store_true", help="replace an existing template")
    up.add_argument("--json", action="store_true")

    ps = sub.add_parser("push", help="push a template to an OCI registry (an OCI artifact)")
    ps.add_argument("--tag", required=True)
    ps.add_argument("ref", help="registry/repository[:tag]")
    ps.add_argument("--insecure", action="store_true",
                    help="plain HTTP or unverified TLS (a local registry)")  # fmt: skip
    ps.add_argument("--json", action="store_true")

    pl = sub.add_parser("pull", help="pull a pack from an OCI registry or an http(s) URL")
    pl.add_argument("ref", help="registry/repository[:tag], or https://.../FILE.forkd")
    pl.add_argument("--tag", help="unpack as this tag (default: the packed tag)")
    pl.add_argument("--force", action="store_true", help="replace an existing template")
    pl.add_argument("--insecure", action="store_true",
                    help="plain HTTP or unverified TLS (a local registry)")  # fmt: skip
    pl.add_argument("--json", action="store_true")


def _done(args: argparse.Namespace, result: dict[str, Any], line: str) -> int:
    if args.json:
        render.print_json(result)
    else:
        render.out.print(line, markup=False)
    return 0


def cmd_pack(args: argparse.Namespace, backend: Backend, progress: Progress) -> int:
    dest = args.output or Path(f"{args.tag}.forkd")
    r = backend.pack(args.tag, dest, not args.no_compress, progress)
    stored = f", {r['stored_bytes'] / MiB:.0f} MiB of data" if "stored_bytes" in r else ""
    line = f"packed {args.tag!r} into {r['path']}: {r['bytes'] / MiB:.1f} MiB{stored}, " \
        f"{r['seconds']:.1f} s"  # fmt: skip
    return _done(args, r, line)


def cmd_unpack(args: argparse.Namespace, backend: Backend, progress: Progress) -> int:
    if not args.file.is_file():
        raise NotFound(f"no pack file at {args.file}")
    r = backend.unpack(args.file, args.tag, args.force, progress)
    reused = " (already here)" if r.get("image_reused") else ""
    return _done(args, r, f"unpacked template {r['tag']!r} (image {r['image']!r}{reused}) in "
                          f"{r['seconds']:.1f} s")  # fmt: skip


def cmd_push(args: argparse.Namespace, backend: Backend, progress: Progress) -> int:
    r = backend.push(args.tag, args.ref, args.insecure, progress)
    return _done(args, r, f"pushed {args.tag!r} to {r['ref']} ({r['digest']}, "
                          f"{r['bytes'] / MiB:.1f} MiB) in {r['seconds']:.1f} s")  # fmt: skip


def cmd_pull(args: argparse.Namespace, backend: Backend, progress: Progress) -> int:
    r = backend.pull(args.ref, args.tag, args.force, args.insecure, progress)
    got = r.get("downloaded_bytes")
    size = f", {got / MiB:.1f} MiB in {r['download_seconds']:.1f} s" if got else ""
    return _done(args, r, f"pulled {args.ref} as template {r['tag']!r}{size}; unpacked in "
                          f"{r['seconds']:.1f} s")  # fmt: skip
