"""What the route modules share: JSON responses, documented error bodies, time bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import Response

from forkd import wire
from forkd.errors import GatewayTimeout

T = TypeVar("T")
JSON = "application/json"


def json_response(model: BaseModel, status: int = 200) -> Response:
    """``model`` serialized straight to JSON bytes (no dict round trip)."""
    return Response(model.__pydantic_serializer__.to_json(model), status, media_type=JSON)


def error_responses(descriptions: Mapping[int, str], *codes: int) -> dict[int | str, Any]:
    """OpenAPI ``responses`` for ``codes``: the ``{"error": ...}`` body, described per route."""
    return {
        code: {"model": wire.ErrorBody, "description": descriptions[code]}
        for code in sorted(set(codes))
    }


async def bounded(call: Awaitable[T], seconds: float, what: str) -> T:
    """``call``, or 504 (GatewayTimeout) naming ``what`` once ``seconds`` pass."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            return await call
    except TimeoutError:
        if timeout.expired():
            raise GatewayTimeout(f"{what} did not finish within {seconds:g} s") from None
        raise
