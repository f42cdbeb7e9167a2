"""``--pip`` / ``--requirements``: Python packages installed into an image at build time.

The host's own pip does the work (``pip install --target`` into a directory that is then merged
into the guest's site-packages), so the host's pip configuration applies as it is: pip.conf,
``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, certificates, proxies. The guest itself reaches nothing.
When the guest's Python version differs from the host's, pip is asked for wheels of the guest's
version and platform (``--python-version``, ``--only-binary=:all:``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from forkd.errors import ImageError, InvalidInput
from forkd.hostcmd import run

PIP_TIMEOUT_S = 1800
# manylinux tags a glibc x86_64 guest accepts (pure-Python wheels match any of them)
GUEST_PLATFORMS = (
    "manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
)  # fmt: skip


@dataclass(frozen=True)
class PipRequest:
    """Package specs and an optional requirements file; :meth:`key` is their content digest."""

    specs: tuple[str, ...] = ()
    requirements: Path | None = None
    requirements_text: bytes = field(default=b"", compare=False)

    @classmethod
    def from_args(cls, specs: list[str] | None, requirements: Path | None) -> PipRequest | None:
        """The request of ``--pip`` and ``--requirements``, or None when neither is given."""
        cleaned = tuple(s.strip() for s in specs or ())
        for spec in cleaned:
            if not spec or spec.startswith("-") or any(c.isspace() for c in spec):
                raise InvalidInput(
                    f"--pip takes a package spec such as name or name==1.2, got {spec!r}"
                )
        text = b""
        if requirements is not None:
            try:
                text = requirements.read_bytes()
            except OSError as exc:
                raise InvalidInput(f"--requirements {requirements}: {exc.strerror}") from exc
        if not cleaned and requirements is None:
            return None
        return cls(cleaned, requirements.resolve() if requirements else None, text)

    def key(self) -> str:
        """Same specs (in any order) and same requirements content: same key."""
        h = hashlib.sha256(b"pip\0")
        for spec in sorted(set(self.specs)):
            h.update(spec.encode() + b"\0")
        h.update(b"requirements\0" + hashlib.sha256(self.requirements_text).digest())
        return h.hexdigest()[:16]

    def describe(self) -> list[str]:
        """What the image manifest records."""
        out = list(self.specs)
        if self.requirements is not None:
            digest = hashlib.sha256(self.requirements_text).hexdigest()[:12]
            out.append(f"-r {self.requirements.name} (sha256 {digest})")
        return out


def pip_argv(request: PipRequest, target: Path, guest_version: tuple[int, int]) -> list[str]:
    """The host pip command that installs ``request`` for a guest Python ``guest_version``."""
    argv = [
        sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
        "--no-warn-script-location", "--target", str(target),
    ]  # fmt: skip
    if guest_version != sys.version_info[:2]:
        major, minor = guest_version
        argv += ["--python-version", f"{major}.{minor}", "--implementation", "cp",
                 "--only-binary=:all:", "--no-compile"]  # fmt: skip
        for platform in GUEST_PLATFORMS:
            argv += ["--platform", platform]
    argv += list(request.specs)
    if request.requirements is not None:
        argv += ["-r", str(request.requirements)]
    return argv


def install(request: PipRequest, target: Path, guest_version: tuple[int, int]) -> None:
    """Install ``request`` into the empty directory ``target`` with the host's pip."""
    run(
        pip_argv(request, target, guest_version),
        error=ImageError,
        what="pip install (host pip, into the image)",
        timeout=PIP_TIMEOUT_S,
    )
    # Console scripts name the host's interpreter in their #! line: of no use in the guest
    # (``python3 -m NAME`` runs the module).
    shutil.rmtree(target / "bin", ignore_errors=True)
