"""``/v1/images`` in-process: a real import (skopeo, umoci, mkfs.ext4) of a busybox-only OCI
layout made here with umoci, its cache hit, the listing, and the 4xx answers of bad sources
(nothing left behind). No VM boots: the runtime is the in-process tests' fake."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from forkd.api.app import create_app
from forkd.config import Settings
from forkd.runtime.engine import Runtime

from .test_app_inprocess import AUTH, TOKEN, FakeRuntime

pytestmark = pytest.mark.daemon


def _busybox_layout(d: Path) -> Path:
    layout, bundle = d / "layout", d / "bundle"
    for argv in (["init", "--layout", layout], ["new", "--image", f"{layout}:v1"],
                 ["unpack", "--image", f"{layout}:v1", bundle]):  # fmt: skip
        subprocess.run(["umoci", *map(str, argv)], check=True, capture_output=True)
    (bundle / "rootfs/bin").mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", bundle / "rootfs/bin/busybox")
    (bundle / "rootfs/bin/sh").symlink_to("busybox")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    return layout


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    fake = FakeRuntime()
    fake.settings = Settings.from_env(home=tmp_path / "home")
    app = create_app(cast(Runtime, fake), token=TOKEN, audit_log=tmp_path / "audit.log")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
        yield c, fake.settings


async def test_import_list_and_cache(
    api: tuple[httpx.AsyncClient, Settings], tmp_path: Path
) -> None:
    client, settings = api
    layout = _busybox_layout(tmp_path)
    body = {"source": f"oci:{layout}:v1", "name": "bbox"}
    first = await client.post("/v1/images", json=body, timeout=600)
    assert first.status_code == 201, first.text
    info = first.json()
    assert info["name"] == "bbox" and info["python"] is None
    assert info["exec_only"] == f"image oci:{layout}:v1 has no Python; this template is exec-only"
    again = await client.post("/v1/images", json=body, timeout=600)
    assert again.status_code == 201 and again.json()["digest"] == info["digest"]
    listed = (await client.get("/v1/images")).json()
    assert [(i["name"], i["digest"]) for i in listed] == [("bbox", info["digest"])]
    image = settings.images_dir / info["digest"]
    assert {p.name for p in image.iterdir()} == {"image.json", "vmlinuz", "initrd.img",
                                                 "rootfs.img"}  # fmt: skip


async def test_bad_sources_answer_4xx_and_leave_nothing(
    api: tuple[httpx.AsyncClient, Settings], tmp_path: Path
) -> None:
    client, settings = api
    (tmp_path / "junk.tar").write_bytes(b"junk")
    cases = [
        ({"source": "Not A Ref"}, 400, "neither an existing file"),
        ({"source": str(tmp_path / "junk.tar")}, 400, "not an image archive"),
        ({"source": "oci:/nonexistent/layout:v1"}, 422, "reading image"),
        ({"source": "127.0.0.1:9/none/here:v1", "tls_verify": False}, 422, "reading image"),
        ({"source": "busybox:1", "name": "Bad Name"}, 400, "invalid image name"),
        ({"source": "busybox:1", "pip": ["--index-url=x"]}, 400, "--pip takes"),
        ({"source": "busybox:1", "surprise": 1}, 400, "surprise"),
    ]
    for body, status, says in cases:
        r = await client.post("/v1/images", json=body, timeout=120)
        assert r.status_code == status, (body, r.text)
        assert says in r.json()["error"], (body, r.text)
    leftovers = (
        [p.name for p in settings.images_dir.iterdir()] if settings.images_dir.exists() else []
    )
    assert leftovers in ([], ["names"])
