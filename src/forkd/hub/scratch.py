"""Scratch dirs for packs in flight, on disk under ``FORKD_HOME/hub`` (packs are too big for
tmpfs). Each is named after the pid that made it; those of dead processes are removed whenever
a new one is made."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from forkd.private import private_dir
from forkd.vmm.qemu import pid_alive

PREFIX = ".work-"


def scratch_dir(home: Path) -> Path:
    root = home / "hub"
    private_dir(home, "forkd home")
    private_dir(root, "hub scratch dir")
    for entry in root.iterdir():
        pid = entry.name.removeprefix(PREFIX).split("-", 1)[0]
        if entry.name.startswith(PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
