"""Shared fixtures. VM fixtures build the real guest image and a real numpy-warm template once
per session (under TCG here) in a throw-away data dir; the build cache is shared."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
