"""Content-addressed image store: ``images/<digest>/`` plus ``images/names/<name>`` -> digest."""

from __future__ import annotations

import builtins
import os
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, Field

from forkd.config import Settings
from forkd.errors import Conflict, NotFound
from forkd.validate import validate_image_name

IMAGE_MANIFEST = "image.json"


class ImageManifest(BaseModel):
    """On-disk description of a built image (``images/<digest>/image.json``)."""

    digest: str
    suite: str
    packages: list[str]
    kernel_identity: str
    created_at_unix: int
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    rootfs: str = "rootfs.img"
    rootfs_bytes: int = 0
    # whether the guest can drive the NIC (images built before networking cannot)
    network: bool = False
    # an imported OCI image: what was imported and its config digest (its content identity)
    source: str | None = None
    oci_config_digest: str | None = None
    # the python3 the agent runs on (None: none usable, exec-only) and its version
    python: str | None = "/usr/bin/python3"
    python_version: str | None = None
    # eval's refusal in an image without a usable Python
    exec_only: str | None = None
    # what --pip/--requirements installed
    pip: list[str] = Field(default_factory=list)


class Image:
    """A built image on disk."""

    def __init__(self, directory: Path, manifest: ImageManifest) -> None:
        self.dir = directory
        self.manifest = manifest

    @property
    def kernel(self) -> Path:
        return self.dir / self.manifest.kernel

    @property
    def initrd(self) -> Path:
        return self.dir / self.manifest.initrd

    @property
    def rootfs(self) -> Path:
        return self.dir / self.manifest.rootfs

    @property
    def digest(self) -> str:
        return self.manifest.digest


class ImageStore:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.images_dir
        self.names = self.root / "names"

    def digest_dir(self, digest: str) -> Path:
        return self.root / digest

    def load_digest(self, digest: str) -> Image | None:
        directory = self.digest_dir(digest)
        manifest_path = directory / IMAGE_MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = ImageManifest.model_validate_json(manifest_path.read_text())
        return Image(directory, manifest)

    def get(self, name: str) -> Image:
        """The image named ``name``; :class:`NotFound` with the build command if absent."""
        validate_image_name(name)
        link = self.names / name
        image = self.load_digest(link.read_text().strip()) if link.is_file() else None
        if image is None:
            raise NotFound(f"image {name!r} is not built: run 'forkd image build {name}'")
        return image

    def publish(self, name: str, directory: Path, manifest: ImageManifest) -> Image:
        """Move a fully built ``directory`` into place and point ``name`` at it, atomically."""
        (directory / IMAGE_MANIFEST).write_text(manifest.model_dump_json(indent=2))
        final = self.digest_dir(manifest.digest)
        try:
            directory.rename(final)
        except OSError:
            if not (final / IMAGE_MANIFEST).is_file():
                raise
            # built meanwhile by another build of the same inputs: same content, keep that one
            shutil.rmtree(directory)
        return self.point(name, Image(final, manifest))

    def point(self, name: str, image: Image) -> Image:
        """Make ``name`` refer to ``image`` (atomic rename of a one-line file)."""
        self.names.mkdir(parents=True, exist_ok=True)
        tmp = self.names / f".{name}.tmp"
        tmp.write_text(image.digest + "\n")
        os.replace(tmp, self.names / name)
        return image

    def list(self) -> builtins.list[tuple[str, Image]]:
        out: list[tuple[str, Image]] = []
        if self.names.is_dir():
            for link in sorted(self.names.iterdir()):
                if link.name.startswith("."):
                    continue
                image = self.load_digest(link.read_text().strip())
                if image is not None:
                    out.append((link.name, image))
        return out

    def remove(self, name: str, *, in_use_by: builtins.list[str]) -> None:
        """Drop the name, and its digest dir when no other name or template uses it."""
        image = self.get(name)
        if in_use_by:
            raise Conflict(
                f"image {name!r} is used by snapshots {', '.join(sorted(in_use_by))}: "
                "delete them first"
            )
        (self.names / name).unlink()
        if not any(img.digest == image.digest for _, img in self.list()):
            shutil.rmtree(image.dir, ignore_errors=True)


def now_unix() -> int:
    return int(time.time())
