"""The hub's pure logic: tar member and manifest checks, host compatibility, data extents."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from forkd.errors import InvalidInput
from forkd.hub import compat
from forkd.hub.checks import check_member, member_problem, parse_manifest
from forkd.hub.extents import ExtentReader, ExtentWriter, check_extents, scan_extents
from forkd.hub.format import HostFacts, PackManifest, PackPart
from forkd.hub.registry import _pack_layer, docker_ref
from forkd.hub.unpack import _Budget
from forkd.images.store import ImageManifest
from forkd.snapshots.manifest import Artifact, SnapshotManifest

MiB = 1 << 20
ARGS = ["-machine", "pc-q35-10.0,memory-backend=mem", "-accel", "tcg", "-cpu", "max"]
HERE = {"pc-q35-10.0": "pc-q35-10.0", "q35": "pc-q35-10.0", "pc-q35-9.2": "pc-q35-9.2"}


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 10
    return info


@pytest.mark.parametrize(
    ("name", "kind", "fragment"),
    [
        ("../x", tarfile.REGTYPE, "escapes"),
        ("memory/../../etc/passwd", tarfile.REGTYPE, "escapes"),
        ("/etc/passwd", tarfile.REGTYPE, "absolute"),
        ("./memory", tarfile.REGTYPE, "escapes"),
        ("memory", tarfile.SYMTYPE, "link"),
        ("memory", tarfile.LNKTYPE, "link"),
        ("memory", tarfile.CHRTYPE, "device"),
        ("memory", tarfile.FIFOTYPE, "fifo"),
        ("memory", tarfile.DIRTYPE, "not a regular file"),
    ],
)
def test_member_problems(name: str, kind: bytes, fragment: str) -> None:
    problem = member_problem(_info(name, kind, "/etc/shadow"))
    assert problem is not None and fragment in problem


def test_plain_member_passes_and_must_be_the_expected_one() -> None:
    assert member_problem(_info("memory")) is None
    check_member(_info("memory"), "memory", 10)
    with pytest.raises(InvalidInput, match="where 'devstate' belongs"):
        check_member(_info("memory"), "devstate", 10)
    with pytest.raises(InvalidInput, match="has 10 bytes, its manifest says 11"):
        check_member(_info("memory"), "memory", 11)


def test_extent_lists_are_checked() -> None:
    check_extents([(0, 4096), (8192, 4096)], 16384, 8192, "memory")
    for bad, stored in (([(4096, 4096), (0, 4096)], 8192), ([(0, 4096)], 1),
                        ([(12288, 8192)], 8192), ([(0, 0)], 0)):  # fmt: skip
        with pytest.raises(InvalidInput, match="memory"):
            check_extents(bad, 16384, stored, "memory")


def _pack(**snapshot: object) -> PackManifest:
    snap = SnapshotManifest(
        tag="py", created_at_unix=1, memory=Artifact(path="/m", bytes=64 * MiB),
        devstate=Artifact(path="devstate", bytes=1), mem_mib=64, machine_args=ARGS,
        accel="tcg", qemu_version="10.0.2", image_name="python", image_digest="ab" * 12,
        kernel="/k", initrd="/i", rootfs="/r",
    ).model_copy(update=snapshot)  # fmt: skip
    parts = [PackPart(name=n, size=64 * MiB if n == "memory" else 4096, extents=[(0, 4096)],
                      stored=4096, sha256="0" * 64)
             for n in ("memory", "devstate", "kernel", "initrd", "rootfs")]  # fmt: skip
    return PackManifest(
        forkd_version="0.6.0", created_at_unix=1, tag="py", snapshot=snap,
        host=compat.facts_of(snap),
        image=ImageManifest(digest="ab" * 12, suite="bookworm", packages=[],
                            kernel_identity="k", created_at_unix=1),
        parts=parts,
    )  # fmt: skip


def test_a_good_manifest_parses() -> None:
    pack = _pack()
    assert parse_manifest(pack.model_dump_json().encode()) == pack
    assert pack.host.machine_type == "pc-q35-10.0" and pack.host.cpu_model == "max"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(tag="../x"), "invalid snapshot tag"),
        (lambda d: d["snapshot"].update(tag="a/b"), "invalid snapshot tag"),
        (lambda d: d.update(version=99), "newer than this forkd reads"),
        (lambda d: d.update(format="tar"), "manifest is invalid at format"),
        (lambda d: d["image"].update(kernel="../../etc/x"), "not a plain name"),
        (lambda d: d["image"].update(rootfs="/etc/passwd"), "not a plain name"),
        (lambda d: d["image"].update(digest="../.."), "digest"),
        (lambda d: d["snapshot"].update(image_name="../x"), "invalid image name"),
        (lambda d: d["parts"].pop(), "its parts are"),
        (lambda d: d["parts"][0].update(name="../x"), "manifest is invalid at parts"),
        (lambda d: d["parts"][4].update(size=1 << 40), "limit"),
        (lambda d: d["parts"][1].update(size=100), "extent"),
        (lambda d: d["parts"][0].update(size=4096), "for a 64 MiB guest"),
        (lambda d: d["host"].update(machine_type="pc-q35-2.0"), "disagree"),
        (lambda d: d["snapshot"].update(mem_mib=1 << 30), "mem_mib"),
        (lambda d: d["snapshot"].update(cpus=100000), "cpus"),
    ],
)
def test_bad_manifests_are_refused(mutate: object, fragment: str) -> None:
    data = _pack().model_dump()
    mutate(data)  # type: ignore[operator]
    raw = json.dumps(data).encode()
    with pytest.raises(InvalidInput, match="refusing the pack") as err:
        parse_manifest(raw)
    assert fragment in str(err.value)


def test_not_json_is_refused() -> None:
    with pytest.raises(InvalidInput, match="manifest is invalid"):
        parse_manifest(b"{not json")


def _facts(**kw: object) -> HostFacts:
    base: dict[str, object] = {"qemu_version": "10.0.2", "machine_type": "pc-q35-10.0",
                               "accel": "tcg", "cpu_model": "max"}  # fmt: skip
    return HostFacts.model_validate({**base, **kw})


def _why(facts: HostFacts, **kw: object) -> str | None:
    opts: dict[str, object] = {"accel": "tcg", "qemu_version": (10, 0, 2), "machine_types": HERE,
                               "cpu": ("GenuineIntel", ["sse2", "avx"])}  # fmt: skip
    opts.update(kw)
    return compat.incompatibility(facts, **opts)  # type: ignore[arg-type]


def test_compatible_hosts() -> None:
    assert _why(_facts()) is None
    assert _why(_facts(qemu_version="9.2.0", machine_type="pc-q35-9.2")) is None
    host = _facts(accel="kvm", cpu_model="host", cpu_flags=["sse2"], cpu_vendor="GenuineIntel")
    assert _why(host, accel="kvm") is None


@pytest.mark.parametrize(
    ("facts", "kw", "fragment"),
    [
        (_facts(accel="kvm"), {}, "made under kvm"),
        (_facts(machine_type="pc-q35-99.0"), {}, "machine type 'pc-q35-99.0' is not supported"),
        (_facts(qemu_version="11.0.0"), {}, "older QEMU cannot load newer state"),
        (_facts(qemu_version="9.2.0", machine_type="q35"), {}, "alias"),
        (_facts(accel="kvm", cpu_model="host", cpu_flags=["avx512f"], cpu_vendor="GenuineIntel"),
         {"accel": "kvm"}, "lacks features the template's guest uses: avx512f"),
        (_facts(accel="kvm", cpu_model="host", cpu_flags=[], cpu_vendor="AuthenticAMD"),
         {"accel": "kvm"}, "AuthenticAMD"),
    ],
)  # fmt: skip
def test_incompatible_hosts(facts: HostFacts, kw: dict[str, object], fragment: str) -> None:
    why = _why(facts, **kw)
    assert why is not None and fragment in why


def test_machine_type_and_cpu_model_from_args() -> None:
    assert compat.machine_type(["-machine", "q35,memory-backend=mem"]) == "q35"
    assert compat.machine_type(["-M", "type=pc-q35-10.0,smm=off"]) == "pc-q35-10.0"
    assert compat.cpu_model(["-cpu", "host,+x2apic"]) == "host"
    assert compat.parse_version("10.0.2") == (10, 0, 2)


def test_extents_round_trip_a_sparse_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(4096)
        f.write(b"a" * 5000)  # pages 1 and 2
        f.seek(10 * MiB)
        f.write(bytes(4096) + b"b")  # a written zero page is skipped
        f.seek(64 * MiB - 1)
        f.write(b"z")
    scan = scan_extents(src)
    assert scan.size == 64 * MiB
    assert scan.extents == [(4096, 8192), (10 * MiB + 4096, 4096), (64 * MiB - 4096, 4096)]
    reader = ExtentReader(src, scan.extents)
    data = b"".join(iter(lambda: reader.read(3000), b""))
    reader.close()
    assert len(data) == scan.stored and reader.sha256.hexdigest() == scan.sha256
    dest = tmp_path / "dest"
    writer = ExtentWriter(dest, scan.size, scan.extents)
    writer.write(data)
    writer.close()
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_blocks * 512 < MiB  # still sparse


def test_budget_stops_a_stream_that_claims_more() -> None:
    b = _Budget(io.BytesIO(b"x" * 100))
    b.limit = 10
    assert b.read(50) == b"x" * 10
    with pytest.raises(InvalidInput, match="more data than its manifest"):
        b.read(1)


def test_registry_references() -> None:
    assert docker_ref("127.0.0.1:5000/forkd/py:v1") == "docker://127.0.0.1:5000/forkd/py:v1"
    assert docker_ref("docker://ghcr.example/a/b@sha256:" + "0" * 64).startswith("docker://")
    for bad in ("-v", "a b", "x;rm", "", "a//b"):
        with pytest.raises(InvalidInput):
            docker_ref(bad)


def test_only_forkd_pack_artifacts_are_pulled() -> None:
    layer = {"mediaType": "application/vnd.forkd.pack.v1.tar", "size": 5,
             "digest": "sha256:" + "a" * 64}  # fmt: skip
    good = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.forkd.pack.v1", "layers": [layer]}  # fmt: skip
    assert _pack_layer(good, "r")["size"] == 5
    image = {**good, "artifactType": None,
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}}  # fmt: skip
    with pytest.raises(InvalidInput, match="not a forkd pack"):
        _pack_layer(image, "r")
    with pytest.raises(InvalidInput, match="not a forkd pack"):
        _pack_layer({**good, "layers": [layer, layer]}, "r")
