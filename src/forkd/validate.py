"""Validation of every identifier and count that crosses a boundary.

Run these before any path is joined or any state is touched.
"""

from __future__ import annotations

import re

from forkd.errors import InvalidInput

TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_FORK_COUNT = 1000


def validate_tag(tag: object) -> str:
    """Return ``tag`` if it is a safe snapshot tag, else raise :class:`InvalidInput`."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise InvalidInput(
            f"invalid snapshot tag {tag!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return tag


def validate_sandbox_id(sandbox_id: object) -> str:
    """Return ``sandbox_id`` if it is well formed, else raise :class:`InvalidInput`."""
    if not isinstance(sandbox_id, str) or not SANDBOX_ID_RE.fullmatch(sandbox_id):
        raise InvalidInput(
            f"invalid sandbox id {sandbox_id!r}: use 1-128 characters from A-Z a-z 0-9 _ -"
        )
    return sandbox_id


def validate_image_name(name: object) -> str:
    """Return ``name`` if it is a safe image name, else raise :class:`InvalidInput`."""
    if not isinstance(name, str) or not IMAGE_NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid image name {name!r}: use 1-64 characters from a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def validate_count(n: object, *, limit: int = MAX_FORK_COUNT) -> int:
    """Return ``n`` if it is an integer in ``1..limit``, else raise :class:`InvalidInput`."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidInput(f"n must be an integer, got {n!r}")
    if n < 1:
        raise InvalidInput(f"n must be at least 1, got {n}")
    if n > limit:
        raise InvalidInput(f"n must be at most {limit}, got {n}")
    return n


def validate_mem_mib(mem_mib: object) -> int:
    """Return guest memory size in MiB if sensible (64..65536), else raise."""
    if isinstance(mem_mib, bool) or not isinstance(mem_mib, int):
        raise InvalidInput(f"mem_mib must be an integer, got {mem_mib!r}")
    if not 64 <= mem_mib <= 65536:
        raise InvalidInput(f"mem_mib must be between 64 and 65536, got {mem_mib}")
    return mem_mib


def validate_branch_request(mode: str | None, diff: bool, wait: bool) -> str:
    """The branch mode a request resolves to (legacy ``diff`` means "diff", else "full"), or
    :class:`InvalidInput` for a combination forkd refuses."""
    if mode is not None and diff:
        raise InvalidInput('"mode" and the legacy "diff" flag cannot be combined: send mode only')
    resolved = mode if mode is not None else ("diff" if diff else "full")
    if resolved not in ("full", "diff", "live"):
        raise InvalidInput(f'mode must be "full", "diff" or "live", got {resolved!r}')
    if not wait and resolved != "live":
        raise InvalidInput(
            'wait=false needs mode "live": only a live branch finishes in the background'
        )
    return resolved
