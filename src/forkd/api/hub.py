"""The hub routes: download a template as a pack, pull one (registry or URL), push one, and
unpack an uploaded pack. Thin: the work is :mod:`forkd.hub`'s, each call under a time bound."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.responses import FileResponse, Response

from forkd import wire
from forkd.api.routing import bounded, error_responses, json_response
from forkd.config import Limits
from forkd.errors import InvalidInput, PayloadTooLarge
from forkd.hub.format import PACK_SUFFIX
from forkd.hub.pack import write_pack
from forkd.hub.registry import MAX_PACK_BYTES, PullResult, pull, push
from forkd.hub.scratch import scratch_dir
from forkd.hub.unpack import UnpackResult, unpack
from forkd.runtime.engine import Runtime
from forkd.validate import validate_tag

T = TypeVar("T")
JSON = "application/json"
PACK_MEDIA_TYPE = "application/vnd.forkd.pack.v1.tar"
UNPACK_PATH = "/v1/snapshots/unpack"

_DESCRIPTIONS = {
    400: "Invalid input or a refused pack (the message says why: corrupt part, bad path, "
    "incompatible QEMU / machine type / CPU / accelerator)",
    401: "Missing or invalid bearer token",
    403: "The registry refused the credentials",
    404: "No such snapshot, or nothing at the reference / URL",
    409: "The tag exists (pass force) or the snapshot is not ready",
    413: "The pack is over the size limit",
    502: "The registry or URL could not be reached",
    504: "The operation did not finish within the daemon's time bound",
}


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="registry/repository[:tag], or an http(s):// URL of a pack")
    tag: str | None = Field(None, description="unpack as this tag (default: the packed tag)")
    force: bool = Field(False, description="replace an existing snapshot of that tag")
    insecure: bool = Field(False, description="plain HTTP / unverified TLS to the registry")


class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="registry/repository[:tag]")
    insecure: bool = False


class UnpackAnswer(BaseModel):
    tag: str
    image: str
    image_reused: bool
    seconds: float
    downloaded_bytes: int | None = None
    download_seconds: float | None = None
    snapshot: wire.SnapshotInfo


class PushAnswer(BaseModel):
    ref: str
    digest: str
    bytes: int
    stored_bytes: int
    logical_bytes: int
    seconds: float


def _errors(*codes: int) -> dict[int | str, Any]:
    return error_responses(_DESCRIPTIONS, *codes)


def _answer(runtime: Runtime, u: UnpackResult, pulled: PullResult | None = None) -> Response:
    return json_response(UnpackAnswer(
        tag=u.tag, image=u.image_name, image_reused=u.image_reused, seconds=round(u.seconds, 3),
        downloaded_bytes=pulled.downloaded_bytes if pulled else None,
        download_seconds=round(pulled.download_seconds, 3) if pulled else None,
        snapshot=runtime.get_snapshot(u.tag),
    ))  # fmt: skip


def _scratch(runtime: Runtime) -> Path:
    return scratch_dir(runtime.settings.home)


def hub_router(runtime: Runtime, lim: Limits) -> APIRouter:
    r = APIRouter(tags=["hub"])
    seconds = lim.snapshot_timeout_s

    @r.get(
        "/v1/snapshots/{tag}/pack",
        response_class=Response,
        responses={
            200: {"content": {PACK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(400, 401, 404, 409, 504),
        },
    )  # fmt: skip
    async def pack(
        tag: str,
        compress: Annotated[bool, Query(description="zstd-compress the pack")] = True,
    ) -> Response:
        """The template as one pack file (with its image; a delta branch flattened)."""
        validate_tag(tag)
        work = _scratch(runtime)
        try:
            dest = work / f"{tag}{PACK_SUFFIX}"
            call = write_pack(runtime, tag, dest, compress=compress)
            result = await bounded(call, seconds, f"packing {tag!r}")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return FileResponse(
            result.path, media_type=PACK_MEDIA_TYPE, filename=dest.name,
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )  # fmt: skip

    @r.post(
        "/v1/snapshots/pull",
        response_model=UnpackAnswer,
        responses=_errors(400, 401, 403, 404, 409, 413, 502, 504),
    )
    async def pull_snapshot(req: PullRequest) -> Response:
        """Fetch a pack from an OCI registry or an http(s) URL, verify it, unpack it."""
        if req.tag is not None:
            validate_tag(req.tag)
        call = pull(runtime, req.ref, tag=req.tag, force=req.force, insecure=req.insecure)
        pulled = await bounded(call, seconds, f"pulling {req.ref!r}")
        return _answer(runtime, pulled.unpacked, pulled)

    @r.post(
        "/v1/snapshots/{tag}/push",
        response_model=PushAnswer,
        responses=_errors(400, 401, 403, 404, 409, 502, 504),
    )
    async def push_snapshot(tag: str, req: PushRequest) -> Response:
        """Pack the template and push it to an OCI registry as an artifact."""
        validate_tag(tag)
        pushed = await bounded(push(runtime, tag, req.ref, insecure=req.insecure), seconds,
                                f"pushing {tag!r}")  # fmt: skip
        p = pushed.pack
        return json_response(PushAnswer(
            ref=pushed.ref, digest=pushed.digest, bytes=p.bytes, stored_bytes=p.stored_bytes,
            logical_bytes=p.logical_bytes, seconds=round(pushed.seconds, 3),
        ))  # fmt: skip

    @r.post(
        UNPACK_PATH,
        response_model=UnpackAnswer,
        responses=_errors(400, 401, 409, 413, 504),
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )  # fmt: skip
    async def unpack_upload(
        request: Request,
        tag: Annotated[str | None, Query(description="unpack as this tag")] = None,
        force: Annotated[bool, Query(description="replace an existing snapshot")] = False,
    ) -> Response:
        """Unpack a pack sent as the raw request body (streamed to disk, up to the pack limit)."""
        if tag is not None:
            validate_tag(tag)
        work = _scratch(runtime)
        try:
            path = work / f"upload{PACK_SUFFIX}"
            size = 0
            with open(path, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_PACK_BYTES:
                        raise PayloadTooLarge(f"the pack is over the limit of {MAX_PACK_BYTES} "
                                              "bytes")  # fmt: skip
                    await asyncio.to_thread(out.write, chunk)
            if size == 0:
                raise InvalidInput("the request body must be a pack file")
            call = unpack(runtime, path, tag=tag, force=force)
            result = await bounded(call, seconds, "unpacking the upload")
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
        return _answer(runtime, result)

    return r
