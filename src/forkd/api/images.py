"""``/v1/images``: list guest images and import one from an OCI/Docker source (what ``forkd
image import`` does, on the daemon's host and under its ``FORKD_HOME``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import TypeAdapter
from starlette.responses import Response

from forkd import wire
from forkd.config import Limits, Settings
from forkd.errors import GatewayTimeout
from forkd.images.store import Image, ImageStore

JSON = "application/json"
_LIST = TypeAdapter(list[wire.ImageInfo])
_DESCRIPTIONS = {
    400: "Invalid input (source, name or pip spec)",
    401: "Missing or invalid bearer token",
    422: "The source cannot be read or used (no such image, unreachable registry, not an "
    "image, not linux/amd64)",
    500: "Building the image failed",
    504: "The import did not finish within the daemon's time bound (it goes on, and a retry "
    "finds it cached)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": wire.ErrorBody, "description": _DESCRIPTIONS[c]} for c in sorted(codes)}


def image_info(name: str, image: Image) -> wire.ImageInfo:
    m = image.manifest
    return wire.ImageInfo(
        name=name, digest=m.digest, source=m.source, oci_config_digest=m.oci_config_digest,
        python=m.python, python_version=m.python_version, exec_only=m.exec_only,
        packages=m.packages, pip=m.pip, rootfs_bytes=m.rootfs_bytes,
        created_at_unix=m.created_at_unix,
    )  # fmt: skip


def _import(settings: Settings, req: wire.ImportImageRequest) -> wire.ImageInfo:
    from forkd.images.oci import import_image, parse_source
    from forkd.images.pipinstall import PipRequest

    source = parse_source(req.source)
    name = req.name or source.default_name
    pip = PipRequest.from_args(req.pip, None)
    image = import_image(settings, source, name, lambda _: None, pip=pip,
                         tls_verify=req.tls_verify)  # fmt: skip
    return image_info(name, image)


def image_router(settings: Settings, lim: Limits) -> APIRouter:
    r = APIRouter(tags=["images"])

    @r.get("/v1/images", response_model=list[wire.ImageInfo], responses=_errors(401, 500))
    async def list_images() -> Response:
        rows = [image_info(name, image) for name, image in ImageStore(settings).list()]
        return Response(_LIST.dump_json(rows), media_type=JSON)

    @r.post(
        "/v1/images",
        status_code=201,
        response_model=wire.ImageInfo,
        responses=_errors(400, 401, 422, 500, 504),
    )
    async def import_image(req: wire.ImportImageRequest) -> Response:
        """Import an OCI/Docker image as a guest image, cached by its digest (a second import
        of the same image answers at once). Credentials are those of the daemon's user."""
        seconds = lim.snapshot_timeout_s
        try:
            async with asyncio.timeout(seconds):
                info = await asyncio.to_thread(_import, settings, req)
        except TimeoutError:
            raise GatewayTimeout(f"importing {req.source!r} took over {seconds:g} s") from None
        return Response(info.__pydantic_serializer__.to_json(info), 201, media_type=JSON)

    return r
