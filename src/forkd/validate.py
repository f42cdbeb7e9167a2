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


MAX_CPUS = 64


def validate_cpus(cpus: object) -> int:
    """Return a template's vCPU count if sensible (1..64), else raise."""
    if isinstance(cpus, bool) or not isinstance(cpus, int):
        raise InvalidInput(f"cpus must be an integer, got {cpus!r}")
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidInput(f"cpus must be between 1 and {MAX_CPUS}, got {cpus}")
    return cpus


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


# Workspaces: each suspend writes template ``ws-<name>-s<generation>``. A name is short enough that
# this tag fits the tag rule for every generation up to WORKSPACE_MAX_GENERATION, and the tag
# decomposes uniquely (the generation is all digits after the last "-s"), so two workspaces never
# derive the same tag.
WORKSPACE_TAG_PREFIX = "ws-"
WORKSPACE_GENERATION_DIGITS = 11
WORKSPACE_MAX_GENERATION = 10**WORKSPACE_GENERATION_DIGITS - 1
MAX_WORKSPACE_NAME = 64 - len(WORKSPACE_TAG_PREFIX) - len("-s") - WORKSPACE_GENERATION_DIGITS
WORKSPACE_NAME_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_WORKSPACE_NAME}}}$")


def validate_workspace_name(name: object) -> str:
    """Return ``name`` if it is a valid workspace name, else raise :class:`InvalidInput`."""
    if not isinstance(name, str) or not WORKSPACE_NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid workspace name {name!r}: use 1-{MAX_WORKSPACE_NAME} characters from "
            "A-Z a-z 0-9 _ - (its suspend snapshots are tagged ws-<name>-s<N>)"
        )
    return name


def workspace_state_tag(name: str, generation: int) -> str:
    """The tag of a workspace's ``generation``-th suspend snapshot."""
    validate_workspace_name(name)
    if isinstance(generation, bool) or not 1 <= generation <= WORKSPACE_MAX_GENERATION:
        raise InvalidInput(
            f"workspace {name!r} has used up its {WORKSPACE_MAX_GENERATION} suspend snapshots"
        )
    return validate_tag(f"{WORKSPACE_TAG_PREFIX}{name}-s{generation}")
