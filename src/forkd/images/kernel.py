"""The guest kernel: the distribution's cloud kernel package, downloaded and unpacked (never
installed on the host), or a user's kernel file."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import ImageError
from forkd.hostcmd import require_program, run, sha256_file

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

# Load order matters: each module's dependencies come first.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "overlay",
    # the guest NIC (virtio_net needs the failover pair first)
    "failover",
    "net_failover",
    "virtio_net",
)


@dataclass(frozen=True)
class Kernel:
    """A kernel image plus the modules the initramfs loads (empty if built in or user-given)."""

    vmlinuz: Path
    modules: tuple[Path, ...]
    identity: str  # package file name or sha256 of a user kernel: part of the image digest


def resolve_kernel_package() -> str:
    """The concrete kernel package the cloud meta package points at (e.g. linux-image-6.1.0-X)."""
    out = run(
        [require_program("apt-cache", "apt"), "depends", KERNEL_META_PACKAGE],
        error=ImageError,
        what=f"apt-cache depends {KERNEL_META_PACKAGE}",
    )
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ImageError(
        f"cannot resolve {KERNEL_META_PACKAGE}: run 'apt-get update' first, or pass --kernel PATH"
    )


def fetch_distribution_kernel(cache_dir: Path) -> Kernel:
    """Download and unpack the cloud kernel package into ``cache_dir/kernels`` (cached)."""
    package = resolve_kernel_package()
    target = cache_dir / "kernels" / package
    # The marker names the modules extracted: a new module list re-extracts the cached package.
    marker = "\n".join(GUEST_MODULES) + "\n"
    done = target / "done"
    if not done.exists() or done.read_text() != marker:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmpdir = Path(tmp)
            # _apt cannot write into root-only dirs: a world-writable download dir avoids a warning.
            tmpdir.chmod(0o777)
            run(
                [require_program("apt-get", "apt"), "download", package],
                cwd=tmpdir,
                error=ImageError,
                what=f"apt-get download {package}",
                timeout=600,
            )
            debs = sorted(tmpdir.glob("*.deb"))
            if not debs:
                raise ImageError(f"apt-get download {package} produced no .deb")
            unpacked = tmpdir / "root"
            run(
                [require_program("dpkg-deb", "dpkg"), "-x", debs[0], unpacked],
                error=ImageError,
                what=f"unpacking {debs[0].name}",
            )
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            (vmlinuz,) = unpacked.glob("boot/vmlinuz-*")
            shutil.copy2(vmlinuz, target / "vmlinuz")
            mod_root = next(unpacked.glob("lib/modules/*/kernel"), None) or next(
                unpacked.glob("usr/lib/modules/*/kernel")
            )
            (target / "modules").mkdir()
            for name in GUEST_MODULES:
                found = list(mod_root.rglob(f"{name}.ko*"))
                if found:
                    shutil.copy2(found[0], target / "modules" / found[0].name)
            (target / "package").write_text(debs[0].name + "\n")
            done.write_text(marker)
    identity = (target / "package").read_text().strip()
    modules = tuple(
        p for name in GUEST_MODULES for p in sorted((target / "modules").glob(f"{name}.ko*"))
    )
    return Kernel(vmlinuz=target / "vmlinuz", modules=modules, identity=identity)


def user_kernel(path: Path) -> Kernel:
    """A user's kernel file: virtio, virtio_console, ext4 and overlay must be built in."""
    if not path.is_file():
        raise ImageError(f"kernel file {path} does not exist")
    return Kernel(vmlinuz=path.resolve(), modules=(), identity="sha256:" + sha256_file(path))
