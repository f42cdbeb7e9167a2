"""Running host programs with errors that say what failed and how to fix it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from forkd.errors import ForkdError, HostSetupError


def require_program(name: str, package: str) -> str:
    """Return the path of ``name`` or raise with the package that provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise HostSetupError(
            f"{name} not found: install the {package} package (apt-get install {package})"
        )
    return path


def run(
    argv: Sequence[str | Path],
    *,
    error: type[ForkdError],
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``argv``; on failure raise ``error`` naming ``what`` with the tail of stderr."""
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: timed out after {timeout} s") from exc
    except OSError as exc:
        raise error(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise error(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout


def sha256_file(path: Path, *, chunk: int = 4 * 1024 * 1024) -> str:
    """sha256 of a file's content, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
