"""The guest image's ``user`` account (images/rootfs.py), added to a hard-linked staging tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forkd.images.rootfs import GUEST_HOME, add_guest_user


@pytest.mark.skipif(os.geteuid() != 0, reason="chowning the home needs root")
def test_user_account_is_added_without_touching_linked_files(tmp_path: Path) -> None:
    cached = tmp_path / "cache"
    stage = tmp_path / "stage"
    (cached / "etc").mkdir(parents=True)
    (stage / "etc").mkdir(parents=True)
    passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:5:5::/old:/bin/sh\n"
    (cached / "etc" / "passwd").write_text(passwd)
    (cached / "etc" / "group").write_text("root:x:0:")  # no trailing newline
    for name in ("passwd", "group"):
        os.link(cached / "etc" / name, stage / "etc" / name)

    add_guest_user(stage)
    add_guest_user(stage)  # idempotent

    assert (cached / "etc" / "passwd").read_text() == passwd  # the cached tree is untouched
    assert (stage / "etc" / "passwd").read_text() == (
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
    )
    assert (stage / "etc" / "group").read_text() == "root:x:0:\nuser:x:1000:\n"
    home = (stage / GUEST_HOME.lstrip("/")).stat()
    assert (home.st_uid, home.st_gid, home.st_mode & 0o7777) == (1000, 1000, 0o755)
