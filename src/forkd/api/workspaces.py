"""The ``/v1/workspaces`` routes (forkd v0.5 wire shapes): thin calls into
:class:`~forkd.runtime.workspaces.Workspaces`, each under the daemon's time bound."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body
from pydantic import TypeAdapter
from starlette.responses import Response

from forkd import wire
from forkd.api.routing import bounded, error_responses, json_response
from forkd.config import Limits
from forkd.runtime.workspaces import Workspaces

T = TypeVar("T")
JSON = "application/json"
_LIST = TypeAdapter(list[wire.WorkspaceInfo])

_DESCRIPTIONS = {
    400: "Invalid input (bad workspace name, tag or memory limit)",
    401: "Missing or invalid bearer token",
    404: "No such workspace (or, on create, no such snapshot)",
    409: "Wrong state: the name exists, the workspace is not running (suspend) or already "
    "running (resume), another operation on it is in progress, or its state tag is taken",
    500: "The VM failed",
    503: "A capacity bound is in force; retry later",
    504: "The operation did not finish within the daemon's time bound",
}


def _errors(*codes: int) -> dict[int | str, Any]:
    return error_responses(_DESCRIPTIONS, *codes)


def workspace_router(workspaces: Workspaces, lim: Limits) -> APIRouter:
    r = APIRouter(tags=["workspaces"])
    base = (400, 401, 404, 500)

    @r.get(
        "/v1/workspaces",
        response_model=list[wire.WorkspaceInfo],
        responses=_errors(401, 500),
        operation_id="workspaces_list",
    )
    async def list_workspaces() -> Response:
        return Response(_LIST.dump_json(workspaces.list()), media_type=JSON)

    @r.post(
        "/v1/workspaces",
        status_code=201,
        response_model=wire.WorkspaceInfo,
        responses=_errors(*base, 409, 503, 504),
        operation_id="workspaces_create",
    )
    async def create_workspace(req: wire.CreateWorkspaceRequest) -> Response:
        """Fork a sandbox from ``snapshot_tag`` and track it as workspace ``name``."""
        call = workspaces.create(
            req.name, req.snapshot_tag, per_child_netns=req.per_child_netns,
            memory_limit_mib=req.memory_limit_mib,
        )  # fmt: skip
        return json_response(
            await bounded(call, lim.spawn_timeout_s, f"creating workspace {req.name!r}"), 201
        )

    @r.get(
        "/v1/workspaces/{name}",
        response_model=wire.WorkspaceInfo,
        responses=_errors(*base),
        operation_id="workspaces_get",
    )
    async def get_workspace(name: str) -> Response:
        return json_response(workspaces.get(name))

    @r.delete(
        "/v1/workspaces/{name}",
        status_code=204,
        response_class=Response,
        responses=_errors(*base, 409, 504),
        operation_id="workspaces_delete",
    )
    async def delete_workspace(name: str) -> Response:
        """Kill the live sandbox and delete the workspace's suspend snapshots (not its source)."""
        seconds = lim.kill_timeout_s + lim.snapshot_timeout_s
        await bounded(workspaces.delete(name), seconds, f"deleting workspace {name!r}")
        return Response(status_code=204)

    @r.post(
        "/v1/workspaces/{name}/suspend",
        response_model=wire.WorkspaceInfo,
        responses=_errors(*base, 409, 503, 504),
        operation_id="workspaces_suspend",
    )
    async def suspend_workspace(
        name: str, req: Annotated[wire.SuspendWorkspaceRequest | None, Body()] = None
    ) -> Response:
        """Snapshot the running sandbox into ``ws-<name>-s<N>``, then stop it. A failure keeps
        the workspace running on its previous state."""
        req = req or wire.SuspendWorkspaceRequest()
        seconds = lim.branch_timeout_s + lim.kill_timeout_s
        call = workspaces.suspend(name, diff=req.diff)
        return json_response(await bounded(call, seconds, f"suspending workspace {name!r}"))

    @r.post(
        "/v1/workspaces/{name}/resume",
        response_model=wire.WorkspaceInfo,
        responses=_errors(*base, 409, 503, 504),
        operation_id="workspaces_resume",
    )
    async def resume_workspace(name: str) -> Response:
        """Fork a sandbox from the latest suspend snapshot, with the workspace's limits."""
        call = workspaces.resume(name)
        return json_response(
            await bounded(call, lim.spawn_timeout_s, f"resuming workspace {name!r}")
        )

    return r
