"""Shared fixtures. VM fixtures build the real guest image and a real numpy-warm template once
per session (under TCG here) in a throw-away data dir; the build cache is shared."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image
from forkd.images.store import Image
from forkd.runtime.engine import Runtime
from forkd.snapshots.memfs import release_memory_dir

TEMPLATE_TAG = "py"
WARMUP = "import numpy\nimport random\nWARM_MARKER = 'warm'"


@pytest.fixture(scope="session")
def vm_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings.from_env(home=tmp_path_factory.mktemp("forkd-home"))
    yield settings
    release_memory_dir(settings.memory_dir)


@pytest.fixture(scope="session")
def built_image(vm_settings: Settings) -> Image:
    return build_image(vm_settings, ImageRequest.default("python", None, None), lambda _: None)


@pytest.fixture(scope="session")
async def runtime(vm_settings: Settings, built_image: Image) -> AsyncIterator[Runtime]:
    rt = Runtime(vm_settings, watch=True)
    await rt.start()
    yield rt
    await rt.close(kill_sandboxes=True)


@pytest.fixture(scope="session")
async def template(runtime: Runtime) -> str:
    await runtime.create_snapshot(TEMPLATE_TAG, warmup=WARMUP)
    return TEMPLATE_TAG


@pytest.fixture
def forkd_home(vm_settings: Settings) -> Path:
    return vm_settings.home


REGISTRY_BINARY = "/usr/bin/docker-registry"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OCI registry (Debian's docker-registry) on loopback, storage in a temp dir; its
    ``host:port`` (plain HTTP)."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                root / "registry.log"
            ).read_text()
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
