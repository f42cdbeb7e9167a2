"""``forkd image build``: kernel + initramfs + root image, content-addressed and cached."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd.config import Settings
from forkd.guest import AGENT_PATH, INIT_PATH
from forkd.hostcmd import require_program, sha256_file
from forkd.images import initramfs, kernel, rootfs
from forkd.images.store import Image, ImageManifest, ImageStore, now_unix
from forkd.validate import validate_image_name

BUILDER_VERSION = "3"  # 3: the `user` account (images/rootfs.py)
# pip and the CA store so a sandbox with egress can install packages (network.md).
DEFAULT_PACKAGES: dict[str, tuple[str, ...]] = {
    "python": ("ca-certificates", "python3-numpy", "python3-pip")
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageRequest:
    """What to build: a name, extra Debian packages, and optionally a user kernel."""

    name: str
    packages: tuple[str, ...] = field(default_factory=tuple)
    kernel_path: Path | None = None

    @classmethod
    def default(
        cls, name: str, packages: tuple[str, ...] | None, kernel_path: Path | None
    ) -> ImageRequest:
        validate_image_name(name)
        pkgs = packages if packages is not None else DEFAULT_PACKAGES.get(name, ())
        return cls(name=name, packages=tuple(sorted(set(pkgs))), kernel_path=kernel_path)


def image_digest(request: ImageRequest, kernel_identity: str) -> str:
    """Digest over every build input: same inputs, same digest, instant rebuild."""
    busybox = require_program("busybox", "busybox-static")
    h = hashlib.sha256()
    for part in (
        BUILDER_VERSION,
        rootfs.SUITE,
        rootfs.tree_key(request.packages),
        kernel_identity,
        sha256_file(AGENT_PATH),
        sha256_file(INIT_PATH),
        sha256_file(Path(busybox)),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:24]


def build_image(settings: Settings, request: ImageRequest, progress: Progress) -> Image:
    """Build (or find in the cache) the image for ``request`` and name it."""
    store = ImageStore(settings)
    progress("kernel")
    guest_kernel = (
        kernel.user_kernel(request.kernel_path)
        if request.kernel_path
        else kernel.fetch_distribution_kernel(settings.cache_dir)
    )
    digest = image_digest(request, guest_kernel.identity)
    existing = store.load_digest(digest)
    if existing is not None:
        progress("cached")
        return store.point(request.name, existing)
    progress("root filesystem (debootstrap)")
    tree = rootfs.debootstrap_tree(settings.cache_dir, request.packages, progress)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=settings.images_dir))
    try:
        progress("root image (mkfs.ext4)")
        rootfs.build_root_image(tree, workdir / "rootfs.img", agent=AGENT_PATH, workdir=workdir)
        progress("initramfs")
        initramfs.build_initramfs(
            workdir / "initrd.img", init_script=INIT_PATH, modules=guest_kernel.modules
        )
        shutil.copy2(guest_kernel.vmlinuz, workdir / "vmlinuz")
        manifest = ImageManifest(
            digest=digest,
            suite=rootfs.SUITE,
            packages=list(request.packages),
            kernel_identity=guest_kernel.identity,
            created_at_unix=now_unix(),
            rootfs_bytes=(workdir / "rootfs.img").stat().st_size,
            # the distribution kernel's virtio_net ships as a module; a user kernel has it built in
            network=request.kernel_path is not None
            or any(m.name.startswith("virtio_net.") for m in guest_kernel.modules),
        )
        progress("done")
        return store.publish(request.name, workdir, manifest)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
