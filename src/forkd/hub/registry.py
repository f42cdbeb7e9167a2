"""Moving packs: to and from OCI registries (an OCI artifact whose one layer is the pack, copied
by ``skopeo``), and down from plain HTTP(S) URLs.

Registry credentials are skopeo's: the usual Docker config (``~/.docker/config.json``, or
``$DOCKER_CONFIG/config.json``) and containers' ``auth.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from forkd.errors import ForkdError, HostSetupError, InvalidInput, NotFound, PayloadTooLarge
from forkd.hub.format import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE, PACK_SUFFIX
from forkd.hub.pack import PackResult, write_pack
from forkd.hub.scratch import scratch_dir
from forkd.hub.unpack import UnpackResult, unpack
from forkd.runtime.engine import Runtime

Progress = Callable[[str], None]
SKOPEO = "skopeo"
SKOPEO_TIMEOUT_S = 3600.0
MAX_PACK_BYTES = 64 << 30  # a pulled pack (or registry layer) beyond this is refused
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}$")
_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _quiet(_: str) -> None:
    pass


class RegistryError(ForkdError):
    """The registry or URL could not be reached, or refused the transfer."""

    http_status = 502


class RegistryDenied(RegistryError):
    http_status = 403


@dataclass(frozen=True)
class PushResult:
    ref: str
    digest: str  # of the pack layer
    pack: PackResult
    seconds: float


@dataclass(frozen=True)
class PullResult:
    source: str
    downloaded_bytes: int
    download_seconds: float
    unpacked: UnpackResult


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def docker_ref(ref: str) -> str:
    """``registry/repo[:tag|@digest]`` (``docker://`` optional) as skopeo's transport string."""
    bare = ref.removeprefix("docker://")
    if not _REF_RE.fullmatch(bare) or "//" in bare:
        raise InvalidInput(f"invalid registry reference {ref!r}: use registry/repository[:tag]")
    return f"docker://{bare}"


@contextlib.asynccontextmanager
async def _workdir(runtime: Runtime) -> AsyncIterator[Path]:
    """A private scratch dir on disk under FORKD_HOME (packs are too big for /tmp)."""
    path = scratch_dir(runtime.settings.home)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _auth_args() -> list[str]:
    config = os.environ.get("DOCKER_CONFIG")
    if config and (Path(config) / "config.json").is_file():
        return ["--authfile", str(Path(config) / "config.json")]
    return []


async def _skopeo(*args: str) -> str:
    binary = shutil.which(SKOPEO)
    if binary is None:
        raise HostSetupError("skopeo is not installed (apt-get install skopeo): it moves packs "
                             "to and from registries")  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SKOPEO_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise _skopeo_error(err.decode(errors="replace"))
    return out.decode(errors="replace")


def _skopeo_error(stderr: str) -> ForkdError:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    message = (lines[-1] if lines else "skopeo failed")[:500]
    low = stderr.lower()
    if "manifest unknown" in low or "name unknown" in low or "not found" in low:
        return NotFound(f"registry: {message}")
    if "unauthorized" in low or "denied" in low or "authentication required" in low:
        return RegistryDenied(f"registry refused access (credentials?): {message}")
    return RegistryError(f"registry: {message}")


def _tls(insecure: bool, side: str) -> list[str]:
    """skopeo's flag for a registry without TLS (``side``: src, dest, or none for inspect)."""
    return [f"--{side}-tls-verify=false" if side else "--tls-verify=false"] if insecure else []


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


async def push(
    runtime: Runtime, tag: str, ref: str, *, insecure: bool = False, progress: Progress = _quiet
) -> PushResult:
    """Pack ``tag`` and copy it to ``ref`` as an OCI artifact (one layer: the pack)."""
    target = docker_ref(ref)
    t0 = time.monotonic()
    async with _workdir(runtime) as work:
        pack = await write_pack(runtime, tag, work / f"{tag}{PACK_SUFFIX}", progress=progress)
        progress("hashing the pack")
        digest = await asyncio.to_thread(_sha256_file, pack.path)
        layout = work / "layout"
        _write_layout(layout, pack, tag, digest)
        progress(f"pushing to {target.removeprefix('docker://')}")
        await _skopeo("copy", "--quiet", "--preserve-digests", *_tls(insecure, "dest"),
                      *_auth_args(), f"oci:{layout}:pack", target)  # fmt: skip
    return PushResult(ref=ref, digest=f"sha256:{digest}", pack=pack,
                      seconds=time.monotonic() - t0)  # fmt: skip


def _write_layout(layout: Path, pack: PackResult, tag: str, digest: str) -> None:
    """An OCI layout with one artifact manifest whose one layer is the pack (moved in)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    os.replace(pack.path, layout / "blobs" / "sha256" / digest)
    m = pack.manifest
    summary = {
        "tag": tag, "forkd_version": m.forkd_version, "host": m.host.model_dump(),
        "mem_mib": m.snapshot.mem_mib, "image_digest": m.image.digest,
    }  # fmt: skip
    config = {**_blob(layout, json.dumps(summary).encode()), "mediaType": CONFIG_MEDIA_TYPE}
    layer = {
        "mediaType": LAYER_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": pack.bytes,
        "annotations": {"org.opencontainers.image.title": f"{tag}{PACK_SUFFIX}"},
    }  # fmt: skip
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_at_unix))
    manifest = {
        "schemaVersion": 2, "mediaType": _MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
        "config": config, "layers": [layer],
        "annotations": {"org.opencontainers.image.created": created},
    }  # fmt: skip
    top = {
        **_blob(layout, json.dumps(manifest).encode()), "mediaType": _MANIFEST_TYPE,
        "annotations": {"org.opencontainers.image.ref.name": "pack"},
    }  # fmt: skip
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))


def _pack_layer(manifest: dict[str, Any], ref: str) -> dict[str, Any]:
    """The pack layer of an artifact manifest; refuses anything that is not a forkd pack."""
    if manifest.get("mediaType") not in (None, _MANIFEST_TYPE) or "layers" not in manifest:
        raise InvalidInput(f"{ref} is not a forkd pack (media type {manifest.get('mediaType')!r})")
    layers = manifest.get("layers") or []
    kind = manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")
    if kind not in (ARTIFACT_TYPE, CONFIG_MEDIA_TYPE) or len(layers) != 1:
        raise InvalidInput(f"{ref} is not a forkd pack (artifact type {kind!r}, "
                           f"{len(layers)} layers)")  # fmt: skip
    layer = layers[0]
    if layer.get("mediaType") != LAYER_MEDIA_TYPE:
        raise InvalidInput(f"{ref} is not a forkd pack (layer type {layer.get('mediaType')!r})")
    size = layer.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{ref}: the pack layer has no valid size")
    if size > MAX_PACK_BYTES:
        raise PayloadTooLarge(f"{ref}: the pack is {size} bytes (limit {MAX_PACK_BYTES})")
    digest = str(layer.get("digest", ""))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InvalidInput(f"{ref}: the pack layer's digest {digest!r} is not a sha256")
    return dict(layer)


async def pull(
    runtime: Runtime,
    ref: str,
    *,
    tag: str | None = None,
    force: bool = False,
    insecure: bool = False,
    progress: Progress = _quiet,
) -> PullResult:
    """Fetch a pack from a registry reference or an HTTP(S) URL and unpack it."""
    async with _workdir(runtime) as work:
        t0 = time.monotonic()
        if is_url(ref):
            path = await _download(ref, work / f"pull{PACK_SUFFIX}", insecure, progress)
        else:
            path = await _pull_artifact(ref, work, insecure, progress)
        size, seconds = path.stat().st_size, time.monotonic() - t0
        result = await unpack(runtime, path, tag=tag, force=force, progress=progress)
    return PullResult(ref, size, seconds, result)


async def _pull_artifact(ref: str, work: Path, insecure: bool, progress: Progress) -> Path:
    source = docker_ref(ref)
    # The manifest first: refuse something that is not a pack (or too big) before downloading it.
    raw = await _skopeo("inspect", "--raw", *_tls(insecure, ""), *_auth_args(), source)
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise InvalidInput(f"{ref}: the registry's manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise InvalidInput(f"{ref} is not a forkd pack")
    layer = _pack_layer(manifest, ref)
    progress(f"pulling {ref} ({layer['size'] / (1 << 20):.0f} MiB)")
    layout = work / "layout"
    await _skopeo("copy", "--quiet", "--preserve-digests", *_tls(insecure, "src"),
                  *_auth_args(), source, f"oci:{layout}:pack")  # fmt: skip
    blob = layout / "blobs" / "sha256" / str(layer["digest"]).removeprefix("sha256:")
    if not blob.is_file() or blob.stat().st_size != layer["size"]:
        raise RegistryError(f"{ref}: the pulled layout lacks the pack layer {layer['digest']}")
    # skopeo checks every blob against its digest as it copies it.
    return blob


async def _download(url: str, dest: Path, insecure: bool, progress: Progress) -> Path:
    progress(f"downloading {url}")
    size = 0
    try:
        async with (
            httpx.AsyncClient(follow_redirects=True, verify=not insecure, timeout=60.0) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code == 404:
                raise NotFound(f"{url}: 404 not found")
            if resp.status_code >= 400:
                raise RegistryError(f"{url}: HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_PACK_BYTES:
                raise PayloadTooLarge(f"{url}: {declared} bytes is over the pack limit "
                                      f"{MAX_PACK_BYTES}")  # fmt: skip
            with open(dest, "wb") as out:
                async for chunk in resp.aiter_bytes(4 << 20):
                    size += len(chunk)
                    if size > MAX_PACK_BYTES:
                        raise PayloadTooLarge(f"{url}: more than the pack limit {MAX_PACK_BYTES} "
                                              "bytes")  # fmt: skip
                    await asyncio.to_thread(out.write, chunk)
    except httpx.HTTPError as exc:
        raise RegistryError(f"{url}: {type(exc).__name__}: {exc}") from None
    return dest
