"""The pure parts of image import and --pip: source parsing, default names, cache keys, the
environment script, guest path resolution and Python detection on trees made here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from forkd.errors import ImageError, InvalidInput
from forkd.images import oci, pipinstall, rootfs, treepath
from forkd.images.guestpython import find_python
from forkd.images.pipinstall import PipRequest

KERNEL = "linux-image-test.deb"


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    return path


@pytest.mark.parametrize(
    ("src", "ref", "name"),
    [
        ("python:3.12-slim", "docker://python:3.12-slim", "python-3.12-slim"),
        ("busybox", "docker://busybox", "busybox-latest"),
        ("localhost:5000/team/agent:v1", "docker://localhost:5000/team/agent:v1", "agent-v1"),
        ("reg.example/a/b@sha256:" + "ab" * 32, "docker://reg.example/a/b@sha256:" + "ab" * 32,
         "b-abababababab"),
        ("docker://reg.example/x:1", "docker://reg.example/x:1", "x-1"),
        ("oci:/some/layout:v2", "oci:/some/layout:v2", "layout"),
        ("docker-daemon:myimg:latest", "docker-daemon:myimg:latest", "myimg-latest"),
        ("python", "docker://python", "python-latest"),
    ],
)  # fmt: skip
def test_references_and_transports(src: str, ref: str, name: str) -> None:
    source = oci.parse_source(src)
    assert (source.ref, source.default_name, source.display) == (ref, name, src)


def test_files_and_directories(tmp_path: Path) -> None:
    docker = oci.parse_source(str(_tar(tmp_path / "App.tar", ["abc/layer.tar", "manifest.json"])))
    assert docker.ref == f"docker-archive:{tmp_path}/App.tar" and docker.default_name == "app"
    archive = oci.parse_source(str(_tar(tmp_path / "o.tar", ["oci-layout", "index.json"])))
    assert archive.ref.startswith("oci-archive:")
    (tmp_path / "lay").mkdir()
    (tmp_path / "lay" / "oci-layout").write_text("{}")
    assert oci.parse_source(str(tmp_path / "lay")).ref == f"oci:{tmp_path}/lay"
    # forkd's default image is never taken over by a derived name
    assert oci.parse_source(str(_tar(tmp_path / "python.tar", ["manifest.json"]))).default_name == (
        "python-oci"
    )


@pytest.mark.parametrize("bad", ["", "Not/Valid:Ref", "../nowhere", "/no/such/file.tar", "a b"])
def test_bad_sources_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        oci.parse_source(bad)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notar").write_bytes(b"plain bytes")
    (tmp_path / "dir").mkdir()
    with pytest.raises(InvalidInput, match="not an image archive"):
        oci.parse_source(str(tmp_path / "notar"))
    with pytest.raises(InvalidInput, match="neither a docker nor an OCI"):
        oci.parse_source(str(_tar(tmp_path / "other.tar", ["etc/passwd"])))
    with pytest.raises(InvalidInput, match="not an OCI layout"):
        oci.parse_source(str(tmp_path / "dir"))


def test_import_key_is_content_and_forkd_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci.builder, "guest_inputs_key", lambda k: [k, "agent", "init"])
    a = oci.image_key("sha256:" + "1" * 64, KERNEL, None)
    assert a == oci.image_key("sha256:" + "1" * 64, KERNEL, None)
    assert a != oci.image_key("sha256:" + "2" * 64, KERNEL, None)
    assert a != oci.image_key("sha256:" + "1" * 64, "other-kernel", None)
    assert a != oci.image_key("sha256:" + "1" * 64, KERNEL, PipRequest(("six",)))


def test_pip_key_is_order_free_and_covers_the_requirements_content(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("six==1.17.0\n")
    one = PipRequest.from_args(["a==1", "b"], req)
    assert one is not None
    two = PipRequest.from_args(["b", "a==1"], req)
    assert two is not None and one.key() == two.key()
    req.write_text("six==1.16.0\n")
    changed = PipRequest.from_args(["a==1", "b"], req)
    assert changed is not None and changed.key() != one.key()
    assert PipRequest.from_args(None, None) is None
    for bad in ("--index-url=x", "", "a b"):
        with pytest.raises(InvalidInput):
            PipRequest.from_args([bad], None)
    with pytest.raises(InvalidInput, match="--requirements"):
        PipRequest.from_args([], tmp_path / "missing.txt")


def test_pip_argv_same_and_other_guest_version(tmp_path: Path) -> None:
    req = PipRequest(("six==1.17.0",))
    same = pipinstall.pip_argv(req, tmp_path, sys.version_info[:2])
    assert same[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--target" in same and "--only-binary=:all:" not in same and same[-1] == "six==1.17.0"
    other = pipinstall.pip_argv(req, tmp_path, (3, 99))
    assert other[other.index("--python-version") + 1] == "3.99"
    assert "--only-binary=:all:" in other and "--platform" in other


def test_env_script_is_quoted_for_sh(tmp_path: Path) -> None:
    env = {"A": "plain", "B": "it's $(touch /tmp/x) `y`", "1BAD": "x", "BAD-NAME": "x"}
    script = rootfs.env_script(env)
    assert "1BAD" not in script and "BAD-NAME" not in script
    out = subprocess.run(
        ["sh", "-c", f'{script}\nprintf "%s|%s" "$A" "$B"'], capture_output=True, text=True
    ).stdout
    assert out == "plain|it's $(touch /tmp/x) `y`"


def test_resolve_never_leaves_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "opt").symlink_to("/etc")  # absolute: the guest's /etc
    (root / "up").symlink_to("../../../..")
    (root / "loop").symlink_to("loop")
    assert treepath.resolve(root, "opt/forkd") == root / "etc" / "forkd"
    assert treepath.resolve(root, "up/etc/passwd") == root / "etc" / "passwd"
    with pytest.raises(ImageError, match="symbolic links"):
        treepath.resolve(root, "loop/x")
    treepath.write_file(root, "opt/forkd/agent.py", b"x")
    assert (root / "etc" / "forkd" / "agent.py").read_bytes() == b"x"
    assert not Path("/etc/forkd").exists()


def test_find_python(tmp_path: Path) -> None:
    assert find_python(tmp_path) is None
    official = tmp_path / "official"
    (official / "usr/local/bin").mkdir(parents=True)
    (official / "usr/local/lib/python3.12").mkdir(parents=True)
    (official / "usr/local/lib/python3.12/os.py").write_text("")
    (official / "usr/local/bin/python3.12").write_text("")
    (official / "usr/local/bin/python3").symlink_to("python3.12")
    py = find_python(official)
    assert py is not None and py.path == "/usr/local/bin/python3" and py.version == (3, 12)
    assert py.usable and py.site_dir == "usr/local/lib/python3.12/site-packages"
    debian = tmp_path / "debian"
    for d in ("usr/bin", "usr/lib/python3.8", "usr/lib/python3/dist-packages"):
        (debian / d).mkdir(parents=True)
    (debian / "usr/lib/python3.8/os.py").write_text("")
    (debian / "usr/bin/python3.8").write_text("")
    (debian / "usr/bin/python3").symlink_to("/usr/bin/python3.8")  # absolute, inside the tree
    py = find_python(debian)
    assert py is not None and py.version == (3, 8) and not py.usable
    assert py.site_dir == "usr/local/lib/python3.8/dist-packages"
    assert "older than the 3.9" in oci.exec_only_reason("img", py)
    assert (
        oci.exec_only_reason("img", None) == "image img has no Python; this template is exec-only"
    )


def test_read_layout_refuses_odd_digests(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(
        json.dumps({"manifests": [{"digest": "sha256:../../etc/passwd"}]})
    )
    with pytest.raises(ImageError, match="unsupported blob digest"):
        oci.read_layout(tmp_path, tmp_path)
    assert os.path.exists("/etc/passwd")


def test_merge_never_follows_the_trees_symlinks(tmp_path: Path) -> None:
    host = tmp_path / "host-lib"
    host.mkdir()
    (host / "libc.so.6").write_text("the host's")
    root = tmp_path / "root"
    (root / "opt/forkd/rt").mkdir(parents=True)
    (root / "opt/forkd/rt/lib").symlink_to(host)  # an image's trap
    (root / "opt/forkd/rt/bin").write_text("not a dir")
    src = tmp_path / "runtime"
    (src / "lib").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "lib/libc.so.6").write_text("forkd's")
    (src / "bin/python3").write_text("py")
    treepath.merge_tree(src, root, "opt/forkd/rt")
    assert (host / "libc.so.6").read_text() == "the host's"
    lib = root / "opt/forkd/rt/lib"
    assert not lib.is_symlink() and (lib / "libc.so.6").read_text() == "forkd's"
    assert (root / "opt/forkd/rt/bin/python3").read_text() == "py"
    assert (lib / "libc.so.6").stat().st_ino == (src / "lib/libc.so.6").stat().st_ino
