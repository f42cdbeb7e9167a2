"""What forkd v0.5's request flags mean on this daemon, as notes for the answer's ``warning``.

forkd v0.5 clients send flags that steer mechanisms this build does not have (per-child network
namespaces, a throw-away prewarm snapshot, hugetlbfs memfds, a blind boot sleep). They are
accepted, never refused; where a flag changes nothing here the answer says why in ``warning``,
and where this build already does what the flag asks for there is no note.
"""

from __future__ import annotations

from pathlib import Path

from forkd import wire
from forkd.snapshots.memfs import mount_of


def huge_page_memory(memory_dir: Path) -> bool:
    """Whether guest memory files land on a tmpfs with transparent huge pages."""
    where = mount_of(memory_dir)
    return where is not None and where.fstype == "tmpfs" and where.huge != "never"


def spawn_notes(req: wire.SpawnRequest, *, memory_dir: Path) -> list[str]:
    """Notes on the spawn flags that do nothing here (``live_fork`` needs none: any sandbox
    can be live-branched)."""
    notes: list[str] = []
    if req.per_child_netns:
        notes.append(
            "per_child_netns changes nothing: a sandbox here never shares a network stack with "
            "its siblings (and a jailed one has a network namespace of its own already), so "
            "'netns' stays null"
        )
    if req.prewarm:
        notes.append(
            "prewarm changes nothing: a branch here needs no throw-away warm-up snapshot (the "
            "daemon's warm pool pre-starts QEMUs instead)"
        )
    if req.hugepages and not huge_page_memory(memory_dir):
        notes.append(
            f"hugepages is not in effect: guest memory lives on {memory_dir}, a tmpfs without "
            "huge pages (forkd mounts a huge-page tmpfs there itself when it runs as root and "
            "FORKD_SHM_DIR is not set)"
        )
    return notes


def snapshot_notes(req: wire.CreateSnapshotRequest, image: str) -> list[str]:
    """Notes on forkd v0.5's kernel/rootfs/rw/tap/boot_wait_secs form of ``POST /v1/snapshots``."""
    notes: list[str] = []
    if req.kernel is not None or req.rootfs is not None:
        notes.append(
            "kernel and rootfs paths are ignored: this forkd builds templates from guest "
            f"images (used image {image!r}; see 'forkd image build')"
        )
    if req.rw:
        notes.append("rw is ignored: a template's root is read-only, with a writable overlay")
    if req.tap is not None:
        notes.append("tap is ignored: every template gets its own user-mode NIC (see 'network')")
    if "boot_wait_secs" in req.model_fields_set:
        notes.append(
            f"boot_wait_secs={req.boot_wait_secs} is ignored: the template is saved as soon as "
            "its agent answers and the 'warmup' code (if any) has run"
        )
    return notes


def join(*notes: str | None) -> str | None:
    """One ``warning`` string from several notes (None when there are none)."""
    kept = [n for n in notes if n]
    return "; ".join(kept) if kept else None
