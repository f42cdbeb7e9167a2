"""``forkd image import``: a guest image from an OCI or Docker image.

skopeo reads the source (registry, archive, layout, local docker/podman) into an OCI layout
whose blobs live in a shared cache; umoci applies the layers (whiteouts, owners, modes, links);
forkd adds its init and agent and packs the tree exactly as ``forkd image build`` does. The
image is cached by its config digest (plus forkd's own inputs), so importing it again only
re-reads the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from forkd.config import DEFAULT_IMAGE, Settings
from forkd.errors import ImageError, ImageSourceError, InvalidInput
from forkd.hostcmd import require_program, run
from forkd.images import agentrt, builder, rootfs
from forkd.images.guestpython import AGENT_MIN_PYTHON, GuestPython, find_python
from forkd.images.pipinstall import PipRequest
from forkd.images.store import Image, ImageManifest, ImageStore, now_unix
from forkd.validate import validate_image_name

OCI_VERSION = "1"
LAYOUT_REF = "forkd"
COPY_TIMEOUT_S = 3600
TRANSPORTS = ("docker://", "docker-archive:", "oci-archive:", "oci:", "docker-daemon:",
              "containers-storage:")  # fmt: skip
# the distribution reference grammar: [domain[:port]/]path[/path...][:tag][@digest]
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"  # noqa: E501
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    """An image source as skopeo names it, and what the user wrote."""

    ref: str  # skopeo's transport:reference
    display: str
    default_name: str


def parse_source(src: str) -> Source:
    """Which kind of source ``src`` is: an explicit skopeo transport, an existing file (docker
    or OCI archive) or directory (OCI layout), or a registry reference."""
    src = src.strip()
    if not src:
        raise InvalidInput("no image source given")
    if src.startswith(TRANSPORTS):
        transport, _, rest = src.partition(":")
        rest = rest.removeprefix("//")
        if transport in ("docker-archive", "oci-archive", "oci"):
            name = _name_from_path(Path(rest.split(":", 1)[0]).name)
        else:
            name = _name_from_reference(rest) if REFERENCE.match(rest) else _sanitize(rest)
        return Source(src, src, name)
    path = Path(src)
    if path.exists():
        if ":" in str(path.resolve()):
            raise InvalidInput(f"{src}: a path with ':' cannot be named to skopeo")
        resolved = path.resolve()
        if path.is_dir():
            if not (path / "oci-layout").is_file():
                raise InvalidInput(f"{src} is a directory but not an OCI layout (no oci-layout)")
            return Source(f"oci:{resolved}", src, _name_from_path(resolved.name))
        return Source(f"{_archive_kind(path)}:{resolved}", src, _name_from_path(resolved.name))
    m = REFERENCE.match(src)
    if m is None or src.startswith(("/", ".")):
        raise InvalidInput(
            f"image source {src!r} is neither an existing file or directory nor an image "
            "reference such as registry.example/repo:tag"
        )
    return Source(f"docker://{src}", src, _name_from_reference(src))


def _archive_kind(path: Path) -> str:
    """docker-archive or oci-archive, from the names inside the tar (headers only)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name == "manifest.json":
                    return "docker-archive"
                if name == "oci-layout":
                    return "oci-archive"
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"{path} is not an image archive (tar): {exc}") from exc
    raise InvalidInput(f"{path} is a tar file but neither a docker nor an OCI image archive")


def _name_from_reference(ref: str) -> str:
    m = REFERENCE.match(ref)
    assert m is not None
    last = m["name"].rsplit("/", 1)[-1]
    suffix = m["tag"] or (m["digest"][7:19] if m["digest"] else "latest")
    return _sanitize(f"{last}-{suffix}")


def _name_from_path(name: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar", ".oci"):
        if name.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return _sanitize(name)


def _sanitize(text: str) -> str:
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.lower())
    name = re.sub(r"^[^a-z0-9]+", "", name)[:64] or "image"
    # never take over forkd's own default image by accident
    return name + "-oci" if name == DEFAULT_IMAGE else name


# --- the layout skopeo writes ------------------------------------------------------------------


class Descriptor(BaseModel):
    mediaType: str = ""
    digest: str
    size: int = 0


class Index(BaseModel):
    manifests: list[Descriptor]


class Manifest(BaseModel):
    config: Descriptor
    layers: list[Descriptor] = Field(default_factory=list)


class RunConfig(BaseModel):
    Env: list[str] | None = None


class Config(BaseModel):
    architecture: str = ""
    os: str = ""
    config: RunConfig | None = None


@dataclass(frozen=True)
class LayoutImage:
    config_digest: str
    config: Config
    layers: int


def read_layout(layout: Path, blobs: Path) -> LayoutImage:
    """The one image skopeo wrote to ``layout`` (its blobs under ``blobs``)."""
    try:
        index = Index.model_validate_json((layout / "index.json").read_bytes())
        if len(index.manifests) != 1:
            raise ImageError(
                f"expected one image in the copied layout, found {len(index.manifests)}"
            )
        manifest = Manifest.model_validate_json(_blob(blobs, index.manifests[0].digest))
        config = Config.model_validate_json(_blob(blobs, manifest.config.digest))
    except (OSError, ValidationError) as exc:
        raise ImageError(f"unreadable OCI layout: {exc}") from exc
    return LayoutImage(manifest.config.digest, config, len(manifest.layers))


def _blob(blobs: Path, digest: str) -> bytes:
    if not DIGEST.match(digest):
        raise ImageError(f"unsupported blob digest {digest!r}")
    return (blobs / "sha256" / digest[7:]).read_bytes()


def config_env(config: Config) -> dict[str, str]:
    """The image's configured environment (``ENV`` lines), as init.sh will export it."""
    env: dict[str, str] = {}
    for item in (config.config.Env if config.config else None) or []:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    return env


def image_key(config_digest: str, kernel_identity: str, pip: PipRequest | None) -> str:
    """The forkd image digest of an imported image: its content identity and forkd's inputs."""
    parts = [OCI_VERSION, "oci", config_digest, agentrt.runtime_key()]
    if pip is not None:
        parts.append(pip.key())
    return builder.digest_of(parts + builder.guest_inputs_key(kernel_identity))


def exec_only_reason(display: str, python: GuestPython | None) -> str:
    if python is None:
        return f"image {display} has no Python; this template is exec-only"
    need = ".".join(map(str, AGENT_MIN_PYTHON))
    return (
        f"image {display} has Python {python.version_str}, older than the {need} forkd's agent "
        "needs; this template is exec-only"
    )


# --- import ------------------------------------------------------------------------------------


def import_image(
    settings: Settings,
    source: Source,
    name: str,
    progress: builder.Progress,
    *,
    pip: PipRequest | None = None,
    tls_verify: bool = True,
) -> Image:
    """Import ``source`` as image ``name`` (or find it in the cache). On failure nothing is
    left but blobs in the shared cache."""
    validate_image_name(name)
    skopeo = require_program("skopeo", "skopeo")
    umoci = require_program("umoci", "umoci")
    store = ImageStore(settings)
    progress("kernel")
    guest = builder.guest_kernel(settings, None)
    blobs = settings.cache_dir / "oci" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.images_dir))
    try:
        layout = scratch / "layout"
        progress(f"reading {source.display} (skopeo)")
        argv: list[str | Path] = [skopeo, "copy", "--quiet", "--dest-shared-blob-dir", blobs]
        if not tls_verify:
            argv.append("--src-tls-verify=false")
        run(
            [*argv, source.ref, f"oci:{layout}:{LAYOUT_REF}"],
            error=ImageSourceError,
            what=f"reading image {source.display}",
            timeout=COPY_TIMEOUT_S,
        )
        image = read_layout(layout, blobs)
        if (image.config.os, image.config.architecture) != ("linux", "amd64"):
            raise ImageSourceError(
                f"image {source.display} is for {image.config.os}/{image.config.architecture}: "
                "forkd guests are linux/amd64"
            )
        digest = image_key(image.config_digest, guest.identity, pip)
        existing = store.load_digest(digest)
        if existing is not None:
            progress("cached")
            return store.point(name, existing)
        # umoci reads blobs from the layout itself: point it at the shared cache
        with_blobs = layout / "blobs"
        if with_blobs.is_dir() and not any(with_blobs.iterdir()):
            with_blobs.rmdir()
        with_blobs.symlink_to(blobs)
        tree = scratch / "rootfs"
        progress(f"applying {image.layers} layer(s) (umoci)")
        rootless = ["--rootless"] if os.geteuid() != 0 else []
        run(
            [umoci, "raw", "unpack", *rootless, "--image", f"{layout}:{LAYOUT_REF}", tree],
            error=ImageError,
            what="applying the image's layers (umoci)",
            timeout=COPY_TIMEOUT_S,
        )
        python = find_python(tree)
        usable = python if python is not None and python.usable else None
        manifest = ImageManifest(
            digest=digest,
            suite="oci",
            packages=[],
            kernel_identity=guest.identity,
            created_at_unix=now_unix(),
            source=source.display,
            oci_config_digest=image.config_digest,
            python=usable.path if usable else None,
            python_version=python.version_str if python else None,
            exec_only=None if usable else exec_only_reason(source.display, python),
            pip=pip.describe() if pip else [],
        )
        env = config_env(image.config)

        def prepare(workdir: Path) -> rootfs.GuestFiles:
            merge: list[tuple[Path, str]] = []
            if usable is None:
                if pip is not None:
                    raise ImageError(f"{manifest.exec_only}: --pip needs the image's Python")
                merge.append(
                    (agentrt.agent_runtime(settings.cache_dir, progress), agentrt.GUEST_DIR)
                )
                launch = agentrt.LAUNCH
            else:
                launch = f"{usable.path} -u"
                if pip is not None:
                    merge.append(builder.pip_into(pip, usable, workdir, progress))
            return rootfs.GuestFiles(
                launch=launch, env=env, exec_only=manifest.exec_only, merge=tuple(merge)
            )

        return builder.assemble_image(settings, name, tree, guest, manifest, prepare, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
