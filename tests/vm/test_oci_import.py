"""``forkd image import`` / ``from-image`` / ``run --image`` / ``image build --pip`` on real VMs.

The images are made here, offline, with umoci and skopeo themselves: a Debian tree with Python
(forkd's cached debootstrap tree) as the first layer and a second layer that adds files (a hard
link, a symlink, an owner and a mode) and deletes one of the first layer's (a whiteout), saved
as a docker-archive and pushed to a registry started on 127.0.0.1; and a busybox-only image
without Python. Every verb runs as the CLI in a subprocess with its own data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.config import Settings
from forkd.images import rootfs
from forkd.images.builder import DEFAULT_PACKAGES
from forkd.images.store import Image
from forkd.snapshots.memfs import release_memory_dir

pytestmark = pytest.mark.vm

WHITEOUT = "etc/debian_version"  # in the base layer, deleted by the second
SMALL_PATH = "/opt/tools:/usr/bin"


def forkd(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORKD_URL", "FORKD_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "forkd", "--local", "--home", str(home), *args],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def sh(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("oci-home")
    yield path
    forkd(path, "kill", "--all")  # sandboxes outlive the CLI: none may outlive the tests
    release_memory_dir(Settings.from_env(home=path).memory_dir)


@pytest.fixture(scope="module")
def images(
    tmp_path_factory: pytest.TempPathFactory, vm_settings: Settings, built_image: Image
) -> dict[str, Path]:
    """A two-layer Python image (OCI layout and docker-archive) and a busybox-only one."""
    d = tmp_path_factory.mktemp("oci-src")
    tree = rootfs.debootstrap_tree(vm_settings.cache_dir, DEFAULT_PACKAGES["python"])
    layout, bundle = d / "layout", d / "bundle"
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:base")
    sh("umoci", "unpack", "--image", f"{layout}:base", bundle)
    shutil.rmtree(bundle / "rootfs")
    sh("cp", "-al", tree, bundle / "rootfs")  # hard links: the cached tree is never written
    root = bundle / "rootfs"
    (root / ".forkd-complete").unlink()
    assert (root / WHITEOUT).is_file()
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:base", bundle)
    (root / WHITEOUT).unlink()
    srv = root / "srv" / "oci"
    srv.mkdir(parents=True)
    (srv / "hello.txt").write_text("hello from layer 2\n")
    os.link(srv / "hello.txt", srv / "hello-link")
    (srv / "sym").symlink_to("hello.txt")
    (srv / "secret").write_text("s\n")
    os.chown(srv / "secret", 1234, 1234)
    (srv / "secret").chmod(0o600)
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v2", bundle)
    sh("umoci", "config", "--image", f"{layout}:v2", "--config.env", "FORKD_OCI_ENV=from image")
    archive = d / "pyimg.tar"
    sh("skopeo", "copy", "--quiet", f"oci:{layout}:v2", f"docker-archive:{archive}:forkd/py:v2")

    small, sbundle = d / "small", d / "sbundle"
    sh("umoci", "init", "--layout", small)
    sh("umoci", "new", "--image", f"{small}:v1")
    sh("umoci", "unpack", "--image", f"{small}:v1", sbundle)
    for sub in ("bin", "etc", "root", "tmp"):
        (sbundle / "rootfs" / sub).mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", sbundle / "rootfs/bin/busybox")
    for applet in ("sh", "cat", "echo", "ls"):
        (sbundle / "rootfs/bin" / applet).symlink_to("busybox")
    (sbundle / "rootfs/etc/motd").write_text("busybox only\n")
    sh("umoci", "repack", "--image", f"{small}:v1", sbundle)
    # a PATH without /bin: the image's environment reaches exec, and boot does not need it
    sh("umoci", "config", "--image", f"{small}:v1", "--config.env", f"PATH={SMALL_PATH}")
    return {"layout": layout, "archive": archive, "small": small}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (plain HTTP), storage in a temp dir."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry is not installed")
    d = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([exe, "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _exec(home: Path, sid: str, script: str) -> str:
    return ok(forkd(home, "exec", sid, "--", "/bin/sh", "-c", script))


def test_python_image_from_docker_archive(home: Path, images: dict[str, Path]) -> None:
    first = json.loads(ok(forkd(home, "image", "import", str(images["archive"]), "--json")))
    assert first["name"] == "pyimg" and first["python_version"] == "3.11"
    assert first["exec_only"] is None and first["oci_config_digest"].startswith("sha256:")
    t0 = time.monotonic()
    again = forkd(home, "image", "import", str(images["archive"]), "--json")
    assert json.loads(ok(again))["digest"] == first["digest"] and "cached" in again.stderr
    assert time.monotonic() - t0 < 30

    ok(forkd(home, "from-image", str(images["archive"]), "--tag", "ocipy",
             "--warmup", "import json\nWARM = 'warm'"))  # fmt: skip
    children = json.loads(ok(forkd(home, "fork", "--tag", "ocipy", "-n", "2", "--json")))
    assert len(children) == 2
    for child in children:
        sid = child["id"]
        out = _exec(home, sid, "cat /srv/oci/hello.txt /srv/oci/sym; "
                    f"test -e /{WHITEOUT} && echo present || echo absent; "
                    "stat -c '%i' /srv/oci/hello.txt /srv/oci/hello-link | uniq | wc -l; "
                    "stat -c '%u:%g %a' /srv/oci/secret; echo \"$FORKD_OCI_ENV\"")  # fmt: skip
        assert out.splitlines() == [
            "hello from layer 2", "hello from layer 2", "absent", "1", "1234:1234 600",
            "from image",
        ]  # fmt: skip
        evaluated = ok(forkd(home, "eval", sid, "WARM + open('/srv/oci/hello.txt').read()[:5]"))
        assert evaluated.strip() == "'warmhello'"
        version = ok(forkd(home, "eval", sid, "import sys; sys.version_info[:2]"))
        assert version.strip() == "(3, 11)"
    ok(forkd(home, "kill", "--all"))


def test_run_image_one_shot_exit_code(home: Path, images: dict[str, Path]) -> None:
    src = str(images["archive"])
    done = forkd(home, "run", "--image", src, "--", "python3", "-c", "print(6 * 7)")
    assert ok(done) == "42\n"
    failed = forkd(home, "run", "--image", src, "--", "sh", "-c", "echo oops >&2; exit 3")
    assert failed.returncode == 3 and "oops" in failed.stderr
    assert json.loads(ok(forkd(home, "ls", "--json"))) == []  # every run's sandbox is gone


def test_registry_reference(home: Path, images: dict[str, Path], registry: str) -> None:
    ref = f"{registry}/forkd/py:v2"
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{images['layout']}:v2",
       f"docker://{ref}")  # fmt: skip
    info = json.loads(ok(forkd(home, "image", "import", ref, "--no-tls-verify", "--json")))
    assert info["name"] == "py-v2" and info["source"] == ref and info["python_version"] == "3.11"
    missing = forkd(home, "image", "import", f"{registry}/forkd/absent:v1", "--no-tls-verify")
    assert missing.returncode == 1 and "reading image" in missing.stderr


def test_exec_only_image(home: Path, images: dict[str, Path]) -> None:
    src = f"oci:{images['small']}:v1"
    info = json.loads(ok(forkd(home, "image", "import", src, "--name", "bbox", "--json")))
    assert info["python"] is None and "has no Python" in info["exec_only"]
    refused = forkd(home, "from-image", src, "--name", "bbox", "--tag", "bb-w", "--warmup", "1")
    assert refused.returncode == 1 and "--warmup runs Python" in refused.stderr
    ok(forkd(home, "from-image", src, "--name", "bbox", "--tag", "bbox"))
    (child,) = json.loads(ok(forkd(home, "fork", "--tag", "bbox", "--json")))
    out = _exec(home, child["id"], '/bin/cat /etc/motd; echo "$PATH"')
    assert out == f"busybox only\n{SMALL_PATH}\n"
    ev = forkd(home, "eval", child["id"], "1 + 1")
    assert ev.returncode == 1
    assert f"image {src} has no Python; this template is exec-only" in ev.stderr
    ok(forkd(home, "kill", "--all"))


def test_pip_package_in_a_built_image(home: Path, tmp_path: Path, built_image: Image) -> None:
    packages = ",".join(DEFAULT_PACKAGES["python"])  # the tree the session fixture built
    req = tmp_path / "requirements.txt"
    req.write_text("six==1.17.0\n")
    built = forkd(home, "image", "build", "pipimg", "--packages", packages, "--requirements",
                  str(req))  # fmt: skip
    ok(built)
    again = forkd(home, "image", "build", "pipimg", "--packages", packages, "--requirements",
                  str(req))  # fmt: skip
    assert "cached" in ok(again) + again.stderr
    ok(forkd(home, "snapshot", "--tag", "pipimg", "--image", "pipimg", "--warmup", "import six"))
    (child,) = json.loads(ok(forkd(home, "fork", "--tag", "pipimg", "--json")))
    where = ok(forkd(home, "eval", child["id"], "six.__version__ + ' ' + six.__file__"))
    assert where.strip() == "'1.17.0 /usr/local/lib/python3.11/dist-packages/six.py'"
    ok(forkd(home, "kill", "--all"))


def test_bad_sources_leave_nothing(home: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    before = sorted(p.name for p in (home / "images").iterdir())
    for src, says in (
        (str(tmp_path / "nope.tar"), "neither an existing file"),
        (str(tmp_path / "junk.tar"), "not an image archive"),
        ("docker-archive:" + str(tmp_path / "junk.tar"), "reading image"),
        ("127.0.0.1:9/none/here:v1", "reading image"),
    ):
        bad = forkd(home, "image", "import", src, "--no-tls-verify")
        assert bad.returncode == 1 and says in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert sorted(p.name for p in (home / "images").iterdir()) == before
