"""``forkd image build|ls|rm|import``, ``forkd from-image`` and ``forkd run --image``.

Images are built and imported in this process, under this ``FORKD_HOME`` (as ``image build``
always was); templates and sandboxes go through the chosen backend (in-process or daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkd.cli import render
from forkd.cli.backend import Backend
from forkd.config import DEFAULT_IMAGE, DEFAULT_MEM_MIB, Settings
from forkd.errors import ForkdError, InvalidInput
from forkd.images.pipinstall import PipRequest
from forkd.images.store import Image, ImageStore

Progress = Callable[[str], None]
RUN_TAG_PREFIX = "run-"  # forkd run's cached template per image: run-<image digest>


def add_parsers(sub: Any) -> None:
    img = sub.add_parser("image", help="build, import, list and remove guest images")
    isub = img.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build a guest image (cached by content)")
    b.add_argument("name", nargs="?", default=DEFAULT_IMAGE)
    b.add_argument(
        "--packages", help="comma-separated Debian packages (default for 'python': python3-numpy)"
    )
    b.add_argument("--kernel", type=Path, help="use this kernel file instead of the distribution's")
    _add_pip_args(b)
    im = isub.add_parser(
        "import", help="make a guest image from an OCI/Docker image (cached by image digest)"
    )
    _add_source_args(im)
    _add_pip_args(im)
    im.add_argument("--json", action="store_true")
    il = isub.add_parser("ls", help="list built images")
    il.add_argument("--json", action="store_true")
    ir = isub.add_parser("rm", help="remove an image")
    ir.add_argument("name")

    fi = sub.add_parser("from-image", help="import an OCI/Docker image and make a template of it")
    _add_source_args(fi)
    fi.add_argument("--tag", required=True, help="the template's tag")
    fi.add_argument("--warmup", help="Python code run in the image's interpreter before the pause")
    fi.add_argument(
        "--mem-mib", "--mem-size-mib", dest="mem_mib", type=int, default=DEFAULT_MEM_MIB
    )
    fi.add_argument("--cpus", type=int)
    _add_pip_args(fi)
    fi.add_argument("--json", action="store_true")

    r = sub.add_parser(
        "run", help="one-shot: run a command in a fresh sandbox of an image, then remove it"
    )
    r.add_argument("--image", required=True, metavar="SRC",
                   help="an OCI/Docker image source (as for 'forkd image import') or, with "
                   "--built, the name of a built image")  # fmt: skip
    r.add_argument("--built", action="store_true", help="--image names a built forkd image")
    r.add_argument("--name", help="image name to import as (default: from SRC)")
    r.add_argument(
        "--no-tls-verify", action="store_true", help="plain-HTTP or self-signed registry"
    )
    r.add_argument("--timeout", type=float, default=300.0, help="seconds for the command")
    r.add_argument("--mem-mib", type=int, default=DEFAULT_MEM_MIB)
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("--cwd")
    r.add_argument("cmd", nargs="*", help="the command, after --")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="SRC",
        help="docker-archive or OCI archive file, OCI layout dir, registry/repo:tag, or a "
        "skopeo transport (docker://, oci:DIR:REF, docker-daemon:, containers-storage:)",
    )  # fmt: skip
    p.add_argument("--name", help="image name (default: from SRC, e.g. python-3.12-slim)")
    p.add_argument(
        "--no-tls-verify", action="store_true", help="plain-HTTP or self-signed registry"
    )


def _add_pip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pip", action="extend", nargs="+", default=[], metavar="PKG[==V]",
        help="Python packages installed at build time with this host's pip and its configuration",
    )  # fmt: skip
    p.add_argument("--requirements", type=Path, metavar="FILE", help="a pip requirements file")


def _pip(args: argparse.Namespace) -> PipRequest | None:
    return PipRequest.from_args(args.pip, args.requirements)


def _status_progress(what: str) -> tuple[contextlib.AbstractContextManager[Any], Progress]:
    """A status line for ``what`` and a progress callback that also logs each step's time."""
    status = render.err.status(what)
    start = time.monotonic()

    def progress(msg: str) -> None:
        status.update(f"{what}: {msg}")
        render.err.print(f"[dim]{time.monotonic() - start:7.1f}s[/dim] {msg}")

    return status, progress


def import_source(
    settings: Settings, args: argparse.Namespace, source_text: str, pip: PipRequest | None
) -> tuple[str, Image]:
    """Import ``source_text`` (cached): (image name, image)."""
    from forkd.images.oci import import_image, parse_source

    source = parse_source(source_text)
    name = args.name or source.default_name
    status, progress = _status_progress(f"importing {source.display} as image {name}")
    with status:
        image = import_image(
            settings, source, name, progress, pip=pip, tls_verify=not args.no_tls_verify
        )
    return name, image


def _describe(image: Image) -> str:
    m = image.manifest
    if m.exec_only:
        return "exec-only (no usable Python)"
    return f"Python {m.python_version}" if m.python_version else "Python"


def cmd_image(args: argparse.Namespace, settings: Settings) -> int:
    store = ImageStore(settings)
    action = args.image_command
    if action == "build":
        from forkd.images.builder import ImageRequest, build_image

        packages = (
            tuple(p.strip() for p in args.packages.split(",") if p.strip())
            if args.packages is not None
            else None
        )
        req = ImageRequest.default(args.name, packages, args.kernel, _pip(args))
        status, progress = _status_progress(f"building image {req.name}")
        with status:
            image = build_image(settings, req, progress)
        render.out.print(f"image {req.name} ready: {image.dir}", markup=False)
        return 0
    if action == "import":
        name, image = import_source(settings, args, args.source, _pip(args))
        if args.json:
            render.print_json({"name": name, "dir": str(image.dir), **image.manifest.model_dump()})
        else:
            render.out.print(f"image {name} ready ({_describe(image)}): {image.dir}", markup=False)
        return 0
    if action == "ls":
        rows = [
            {"name": name, "digest": img.digest, "source": img.manifest.source or "debootstrap",
             "packages": ",".join(img.manifest.packages + img.manifest.pip),
             "python": "exec-only" if img.manifest.exec_only else img.manifest.python_version,
             "kernel": img.manifest.kernel_identity, "dir": str(img.dir)}
            for name, img in store.list()
        ]  # fmt: skip
        if args.json:
            render.print_json(rows)
        else:
            columns = (("name", "NAME"), ("digest", "DIGEST"), ("source", "SOURCE"),
                       ("python", "PYTHON"), ("packages", "PACKAGES"))  # fmt: skip
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


def cmd_from_image(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    """forkd's ``from-image``: import (cached), then make template ``--tag`` of it."""
    from forkd.validate import validate_tag

    validate_tag(args.tag)
    name, image = import_source(settings, args, args.source, _pip(args))
    if args.warmup and image.manifest.exec_only:
        raise InvalidInput(f"--warmup runs Python: {image.manifest.exec_only}")
    status, progress = _status_progress(f"template {args.tag} from image {name}")
    with status:
        info = backend.create_snapshot(
            args.tag, name, args.mem_mib, args.warmup, progress, None, args.cpus
        )
    if args.json:
        render.print_json(info)
    else:
        render.out.print(
            f"snapshot {info['tag']} {info['status']} from image {name} ({_describe(image)})",
            markup=False,
        )
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    """One-shot: a sandbox of the image runs ``cmd``; its output and exit code are ours. The
    image's template (``run-<digest>``) is kept, so the next run only forks."""
    cmd = list(args.cmd)
    if not cmd:
        raise InvalidInput("no command given: forkd run --image SRC -- CMD [ARGS...]")
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--env takes K=V, got {item!r}")
        env[key] = value
    if args.built:
        name, image = args.image, ImageStore(settings).get(args.image)
    else:
        name, image = import_source(settings, args, args.image, None)
    tag = RUN_TAG_PREFIX + image.digest
    if not any(s.get("tag") == tag for s in backend.list_snapshots()):
        status, progress = _status_progress(f"template {tag} from image {name}")
        with status:
            backend.create_snapshot(tag, name, args.mem_mib, None, progress)
    (child,) = backend.spawn(tag, 1, None)
    sandbox_id = str(child["id"])
    try:
        r = backend.exec(sandbox_id, cmd, args.timeout, env or None, args.cwd)
    finally:
        with contextlib.suppress(ForkdError):
            backend.kill(sandbox_id)
    sys.stdout.write(r["stdout"])
    sys.stderr.write(r["stderr"])
    if r.get("timed_out"):
        render.err.print(f"forkd: command timed out after {args.timeout:g} s and was killed")
    code = int(r["exit_code"])
    return code if 0 <= code < 256 else 128 + (-code % 128)
