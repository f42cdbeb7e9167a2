"""``forkd image build``: kernel + initramfs + root image, content-addressed and cached."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd.config import Settings
from forkd.errors import ImageError
from forkd.guest import AGENT_PATH, INIT_PATH
from forkd.hostcmd import require_program, sha256_file
from forkd.images import initramfs, kernel, pipinstall, rootfs
from forkd.images.guestpython import GuestPython, find_python
from forkd.images.pipinstall import PipRequest
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
    """What to build: a name, extra Debian packages, pip packages, optionally a user kernel."""

    name: str
    packages: tuple[str, ...] = field(default_factory=tuple)
    kernel_path: Path | None = None
    pip: PipRequest | None = None

    @classmethod
    def default(
        cls,
        name: str,
        packages: tuple[str, ...] | None,
        kernel_path: Path | None,
        pip: PipRequest | None = None,
    ) -> ImageRequest:
        validate_image_name(name)
        pkgs = packages if packages is not None else DEFAULT_PACKAGES.get(name, ())
        return cls(name=name, packages=tuple(sorted(set(pkgs))), kernel_path=kernel_path, pip=pip)


def guest_inputs_key(kernel_identity: str) -> list[str]:
    """The inputs every image shares: forkd's guest files, busybox and the kernel."""
    busybox = require_program("busybox", "busybox-static")
    return [
        kernel_identity,
        sha256_file(AGENT_PATH),
        sha256_file(INIT_PATH),
        sha256_file(Path(busybox)),
    ]


def digest_of(parts: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:24]


def image_digest(request: ImageRequest, kernel_identity: str) -> str:
    """Digest over every build input: same inputs, same digest, instant rebuild."""
    parts = [BUILDER_VERSION, rootfs.SUITE, rootfs.tree_key(request.packages)]
    if request.pip is not None:
        parts.append(request.pip.key())
    return digest_of(parts + guest_inputs_key(kernel_identity))


def guest_kernel(settings: Settings, kernel_path: Path | None) -> kernel.Kernel:
    return (
        kernel.user_kernel(kernel_path)
        if kernel_path
        else kernel.fetch_distribution_kernel(settings.cache_dir)
    )


def build_image(settings: Settings, request: ImageRequest, progress: Progress) -> Image:
    """Build (or find in the cache) the image for ``request`` and name it."""
    store = ImageStore(settings)
    progress("kernel")
    guest = guest_kernel(settings, request.kernel_path)
    digest = image_digest(request, guest.identity)
    existing = store.load_digest(digest)
    if existing is not None:
        progress("cached")
        return store.point(request.name, existing)
    progress("root filesystem (debootstrap)")
    tree = rootfs.debootstrap_tree(settings.cache_dir, request.packages, progress)
    manifest = ImageManifest(
        digest=digest,
        suite=rootfs.SUITE,
        packages=list(request.packages),
        kernel_identity=guest.identity,
        created_at_unix=now_unix(),
        python="/usr/bin/python3",
        pip=request.pip.describe() if request.pip else [],
    )

    def prepare(workdir: Path) -> rootfs.GuestFiles:
        python = find_python(tree)
        manifest.python_version = python.version_str if python else None
        if request.pip is None:
            return rootfs.GuestFiles()
        if python is None:
            raise ImageError("the image has no python3 to install --pip packages for")
        return rootfs.GuestFiles(merge=(pip_into(request.pip, python, workdir, progress),))

    return assemble_image(settings, request.name, tree, guest, manifest, prepare, progress)


def pip_into(
    request: PipRequest, python: GuestPython, workdir: Path, progress: Progress
) -> tuple[Path, str]:
    """Install ``request`` for ``python`` under ``workdir``: (host dir, guest site dir)."""
    progress(f"pip install {' '.join(request.describe())} (Python {python.version_str})")
    target = workdir / "pip"
    target.mkdir()
    pipinstall.install(request, target, python.version)
    return target, python.site_dir


def assemble_image(
    settings: Settings,
    name: str,
    tree: Path,
    guest: kernel.Kernel,
    manifest: ImageManifest,
    prepare: Callable[[Path], rootfs.GuestFiles],
    progress: Progress,
) -> Image:
    """Root image from ``tree`` (plus what ``prepare(workdir)`` adds), initramfs and kernel in
    a fresh work dir, published as ``manifest.digest`` and named ``name``; nothing is left
    behind on failure."""
    store = ImageStore(settings)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".build-{manifest.digest}-", dir=settings.images_dir))
    try:
        extra = prepare(workdir)
        progress("root image (mkfs.ext4)")
        rootfs.build_root_image(
            tree, workdir / "rootfs.img", agent=AGENT_PATH, workdir=workdir, extra=extra
        )
        for source, _ in extra.merge:
            if source.is_relative_to(workdir):
                shutil.rmtree(source, ignore_errors=True)
        progress("initramfs")
        initramfs.build_initramfs(
            workdir / "initrd.img", init_script=INIT_PATH, modules=guest.modules
        )
        shutil.copy2(guest.vmlinuz, workdir / "vmlinuz")
        manifest.rootfs_bytes = (workdir / "rootfs.img").stat().st_size
        # the distribution kernel's virtio_net ships as a module; a user kernel has it built in
        manifest.network = guest.modules == () or any(
            m.name.startswith("virtio_net.") for m in guest.modules
        )
        progress("done")
        return store.publish(name, workdir, manifest)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
