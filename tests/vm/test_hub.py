"""The hub with real VMs and a real OCI registry (Debian's docker-registry on 127.0.0.1): a
template pushed, deleted with its image, pulled and forked has the original's state; packs that
are corrupt, name ``../x`` or come from an incompatible machine are refused and leave nothing
behind; a delta branch packs flattened and keeps its state."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.errors import Conflict, InvalidInput
from forkd.hub.format import DIGEST_MEMBER, MANIFEST_MEMBER
from forkd.hub.pack import write_pack
from forkd.hub.registry import pull
from forkd.hub.unpack import unpack
from forkd.images.builder import ImageRequest, build_image
from forkd.runtime.engine import Runtime
from forkd.snapshots.memfs import release_memory_dir

pytestmark = pytest.mark.vm

TAG = "hub-src"
WARMUP = ("import numpy\nHUB_STATE = 'warm-' + str(numpy.arange(4).sum())\n"
          "open('/root/hub.txt', 'w').write('from the template')")  # fmt: skip


@pytest.fixture(scope="module")
async def hub_rt(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """A runtime over its own home (its image and templates are deleted and pulled back)."""
    settings = Settings.from_env(home=tmp_path_factory.mktemp("hub-home"))
    build_image(settings, ImageRequest.default("python", None, None), lambda _: None)
    rt = Runtime(settings, watch=True)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close(kill_sandboxes=True)
        release_memory_dir(settings.memory_dir)


def _footprint(rt: Runtime) -> dict[str, list[str]]:
    """Every file and registry row a snapshot or image could leave."""

    def names(d: Path) -> list[str]:
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    return {
        "snapshots": names(rt.snapshots.root),
        "memory": names(rt.snapshots.memory_root),
        "images": names(rt.images.root),
        "image names": names(rt.images.names),
        "hub scratch": names(rt.settings.home / "hub"),
        "rows": sorted(r.tag for r in rt.registry.list_snapshots()),
    }


async def _state(rt: Runtime, tag: str) -> tuple[str | None, str]:
    kid = (await rt.spawn(tag, 1))[0].sandbox.id
    try:
        var = (await rt.eval(kid, "HUB_STATE")).result
        text = (await rt.read_file(kid, "/root/hub.txt")).decode()
        return var, text
    finally:
        await rt.kill(kid)


def _rewrite(src: Path, dest: Path, *, manifest: dict[str, object] | None = None,
             rename: dict[str, str] | None = None) -> None:  # fmt: skip
    """A copy of an uncompressed pack with another manifest and/or renamed members."""
    rename = rename or {}
    new_digest = b""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member)
            assert data is not None
            body = data.read()
            if member.name == MANIFEST_MEMBER and manifest is not None:
                body = json.dumps(manifest).encode()
                new_digest = hashlib.sha256(body).hexdigest().encode()
            if member.name == DIGEST_MEMBER and manifest is not None:
                body = new_digest
            copy = tarfile.TarInfo(rename.get(member.name, member.name))
            copy.size = len(body)
            tout.addfile(copy, io.BytesIO(body))


def _flip(src: Path, dest: Path, offset: int) -> None:
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _cli(rt: Runtime, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "forkd", "--home", str(rt.settings.home), "--local", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900)


async def test_push_delete_pull_fork_and_refusals(
    hub_rt: Runtime, registry: str, tmp_path: Path
) -> None:
    rt = hub_rt
    await rt.create_snapshot(TAG, warmup=WARMUP)
    original = await _state(rt, TAG)
    assert original == ("'warm-6'", "from the template")
    ref = f"{registry}/forkd/{TAG}:v1"

    pushed = _cli(rt, "push", "--tag", TAG, "--insecure", "--json", ref)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["digest"].startswith("sha256:")
    plain = tmp_path / "plain.forkd"
    packed = await write_pack(rt, TAG, plain, compress=False)
    packed_z = await write_pack(rt, TAG, tmp_path / "zstd.forkd")
    assert packed_z.compressed and packed_z.bytes < packed.bytes
    assert packed.stored_bytes < packed.logical_bytes  # holes and zero pages are not stored
    assert oct(plain.stat().st_mode & 0o777) == "0o600"

    # Delete the template and its image: this home has neither any more.
    image = rt.snapshots.load(TAG).image_name
    assert image is not None
    await rt.delete_snapshot(TAG)
    rt.images.remove(image, in_use_by=[])
    clean = _footprint(rt)
    assert not rt.images.list() and TAG not in clean["rows"]

    # One flipped byte, in the middle of the memory part, in the manifest's warm-up text, or
    # anywhere in a compressed pack: refused, nothing left behind.
    with tarfile.open(plain) as tar:
        memory, head = tar.getmember("memory"), tar.getmember(MANIFEST_MEMBER)
        warmup_at = tar.extractfile(head).read().index(b"HUB_STATE")  # type: ignore[union-attr]
    for source, offset, reason in (
        (plain, memory.offset_data + memory.size // 2, "part 'memory' fails its sha256 check"),
        (plain, head.offset_data + warmup_at, "manifest fails its sha256 check"),
        (packed_z.path, packed_z.bytes * 2 // 3, "refusing the pack"),
        (packed_z.path, packed_z.bytes - 2, "refusing the pack"),  # its frame checksum
    ):
        corrupt = tmp_path / "corrupt.forkd"
        _flip(source, corrupt, offset)
        with pytest.raises(InvalidInput, match=reason):
            await unpack(rt, corrupt)
        assert _footprint(rt) == clean

    # A member named ../x (first, or after the manifest): refused before it is written.
    with tarfile.open(plain) as tar:
        manifest = json.loads(tar.extractfile(MANIFEST_MEMBER).read())  # type: ignore[union-attr]
    for renamed in ({"memory": "../x"}, {MANIFEST_MEMBER: "../x"}):
        crafted = tmp_path / "traversal.forkd"
        _rewrite(plain, crafted, rename=renamed)
        with pytest.raises(InvalidInput, match=r"member '\.\./x' has a path that leaves"):
            await unpack(rt, crafted)
        assert _footprint(rt) == clean
    assert not (rt.settings.home / "x").exists() and not (rt.snapshots.root.parent / "x").exists()

    # A pack from a machine type this QEMU does not have: refused with that reason.
    alien = json.loads(json.dumps(manifest))
    args = alien["snapshot"]["machine_args"]
    i = args.index("-machine")
    args[i + 1] = "pc-q35-99.0," + args[i + 1].split(",", 1)[1]
    alien["host"]["machine_type"] = "pc-q35-99.0"
    crafted = tmp_path / "alien.forkd"
    _rewrite(plain, crafted, manifest=alien)
    with pytest.raises(InvalidInput, match=r"machine type 'pc-q35-99\.0' is not supported"):
        await unpack(rt, crafted)
    # ... and one made under another accelerator
    other = json.loads(json.dumps(manifest))
    other["snapshot"]["accel"] = other["host"]["accel"] = "kvm" if rt.accel.name == "tcg" else "tcg"
    _rewrite(plain, crafted, manifest=other)
    with pytest.raises(InvalidInput, match="device state does not move between accelerators"):
        await unpack(rt, crafted)
    assert _footprint(rt) == clean

    # Pull from the registry: the child's state is the original template's.
    pulled = await pull(rt, ref, insecure=True)
    assert pulled.unpacked.tag == TAG and not pulled.unpacked.image_reused
    assert rt.get_snapshot(TAG).bootable
    assert await _state(rt, TAG) == original
    assert rt.images.get(image).digest == manifest["image"]["digest"]

    # The tag exists now: 409 unless forced; a new tag reuses the image.
    with pytest.raises(Conflict, match="already exists"):
        await unpack(rt, plain)
    again = await unpack(rt, plain, tag="hub-copy")
    assert again.image_reused and await _state(rt, "hub-copy") == original
    forced = await unpack(rt, plain, tag="hub-copy", force=True)
    assert forced.tag == "hub-copy" and await _state(rt, "hub-copy") == original
    assert not list((rt.settings.home / "hub").iterdir())
    await rt.delete_snapshot("hub-copy")


async def test_delta_branch_packs_flattened(hub_rt: Runtime, tmp_path: Path) -> None:
    rt = hub_rt
    if not rt.snapshots.exists(TAG):
        await rt.create_snapshot(TAG, warmup=WARMUP)
    kid = (await rt.spawn(TAG, 1))[0].sandbox.id
    try:
        assert (await rt.eval(kid, "HUB_STATE = 'branched'")).error is None
        await rt.write_file(kid, "/root/hub.txt", b"from the branch")
        await rt.branch(kid, tag="hub-br", mode="diff")
    finally:
        await rt.kill(kid)
    assert rt.snapshots.load("hub-br").delta is not None
    pack = tmp_path / "branch.forkd"
    result = await write_pack(rt, "hub-br", pack)
    assert result.manifest.flattened_from == TAG and result.compressed
    assert not any(p.name.startswith(".staging-") for p in rt.snapshots.memory_root.iterdir())
    await rt.delete_snapshot("hub-br")

    await unpack(rt, pack, tag="hub-br2")
    m = rt.snapshots.load("hub-br2")
    assert m.delta is None and m.root_tag is None and m.parent_tag is None
    assert await _state(rt, "hub-br2") == ("'branched'", "from the branch")
    await rt.delete_snapshot("hub-br2")
