"""Finding a root tree's Python without running anything from the tree."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from forkd.images import treepath

# the oldest Python forkd's guest agent runs on (src/forkd/guest/agent.py)
AGENT_MIN_PYTHON = (3, 9)
CANDIDATES = ("usr/local/bin/python3", "usr/bin/python3", "bin/python3")
VERSIONED = re.compile(r"python(\d+)\.(\d+)")


@dataclass(frozen=True)
class GuestPython:
    """A tree's python3: its guest path, version and where packages go."""

    path: str  # e.g. /usr/local/bin/python3
    version: tuple[int, int]
    site_dir: str  # guest dir on that Python's sys.path for added packages, e.g. usr/local/...

    @property
    def usable(self) -> bool:
        return self.version >= AGENT_MIN_PYTHON

    @property
    def version_str(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


def find_python(tree: Path) -> GuestPython | None:
    """The first python3 on the usual PATH of ``tree`` whose standard library is there too."""
    for candidate in CANDIDATES:
        binary = treepath.resolve(tree, candidate)
        if not binary.is_file():
            continue
        prefix = candidate.rsplit("/bin/", 1)[0] if "/bin/" in candidate else ""
        lib = f"{prefix}/lib" if prefix else "lib"
        versions = []
        named = VERSIONED.fullmatch(binary.name)
        if named:
            versions.append((int(named[1]), int(named[2])))
        else:
            libdir = treepath.resolve(tree, lib)
            for d in libdir.glob("python3.*") if libdir.is_dir() else ():
                if m := VERSIONED.fullmatch(d.name):
                    versions.append((int(m[1]), int(m[2])))
        for version in sorted(versions, reverse=True):
            stdlib = f"{lib}/python{version[0]}.{version[1]}"
            if treepath.resolve(tree, f"{stdlib}/os.py").is_file():
                return GuestPython("/" + candidate, version, _site_dir(tree, prefix, version))
    return None


def _site_dir(tree: Path, prefix: str, version: tuple[int, int]) -> str:
    pyver = f"python{version[0]}.{version[1]}"
    if prefix == "usr" and treepath.resolve(tree, "usr/lib/python3/dist-packages").is_dir():
        # Debian's python3 reads /usr/local/lib/pythonX.Y/dist-packages before its own packages
        return f"usr/local/lib/{pyver}/dist-packages"
    lib = f"{prefix}/lib" if prefix else "lib"
    return f"{lib}/{pyver}/site-packages"
