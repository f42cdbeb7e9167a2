"""The daemon app in-process over a fake runtime (no VMs, milliseconds): error mapping, auth,
audit, body cap, timeouts, OpenAPI shape, token and bind rules, and the added latency."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from forkd import wire
from forkd.api.app import create_app
from forkd.api.auth import check_bind, parse_bind, token_problem
from forkd.config import Limits, Settings
from forkd.errors import (
    AgentError,
    AgentProtocolError,
    GuestOSError,
    InvalidInput,
    NotFound,
    QemuGone,
    VMError,
)
from forkd.runtime.engine import ForkTiming, Runtime, Spawned

pytestmark = pytest.mark.daemon

TOKEN = "c0ffee-7a1b2c3d4e5f60718293"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _sandbox(sid: str, state: str = "running") -> wire.SandboxInfo:
    return wire.SandboxInfo(
        id=sid,
        snapshot_tag="py",
        created_at_unix=1,
        pid=42,
        state=state,
        dead_reason="QEMU exited" if state == "dead" else None,
    )  # type: ignore[arg-type]


class FakeRuntime:
    """Just enough of :class:`Runtime` for the routes; records calls."""

    def __init__(self) -> None:
        self.accel = SimpleNamespace(name="tcg", reason="test")
        self.on_sandbox_death: Any = None
        self.branches_in_flight = 0
        self.calls: list[tuple[str, Any]] = []
        self.dead: set[str] = set()
        self.eval_delay = 0.0
        # A memory dir that is not a huge-page tmpfs, and a cap the metrics must report.
        self.settings = Settings(home=Path("/nonexistent/forkd"), shm_dir=Path("/proc"))
        self.settings = dataclasses.replace(self.settings, branch_concurrency=7)
        self.spawn_warning: str | None = None

    async def start(self) -> None: ...
    async def close(self, *, kill_sandboxes: bool = False) -> None: ...

    def list_snapshots(self) -> list[wire.SnapshotInfo]:
        return [wire.SnapshotInfo(tag="py", dir="/x/py", created_at_unix=1)]

    def list_sandboxes(self, *, include_dead: bool = False) -> list[wire.SandboxInfo]:
        return [_sandbox("sb-1")]

    def get_sandbox(self, sandbox_id: str) -> wire.SandboxInfo:
        if sandbox_id not in ("sb-1", *self.dead):
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return _sandbox(sandbox_id, "dead" if sandbox_id in self.dead else "running")

    async def create_snapshot(self, tag: str, **kw: Any) -> wire.SnapshotInfo:
        self.calls.append(("create_snapshot", {"tag": tag, **kw}))
        return wire.SnapshotInfo(
            tag=tag, dir=f"/x/{tag}", created_at_unix=1, image=kw["image"], mem_mib=kw["mem_mib"]
        )

    async def spawn(self, tag: str, n: int = 1, **kw: Any) -> list[Spawned]:
        self.calls.append(("spawn", (tag, n, kw)))
        timing = ForkTiming(1.04, 2.0, 3.0, 6.04)
        return [Spawned(_sandbox(f"sb-{i}"), timing, self.spawn_warning) for i in range(n)]

    async def eval(self, sandbox_id: str, code: str) -> wire.EvalResponse:
        if sandbox_id in self.dead:
            raise AgentError("agent connection lost")
        if sandbox_id == "sb-gone":  # deleted by another request meanwhile
            raise AgentError("agent client closed")
        if code == "abuse":
            raise AgentProtocolError("agent flooded the channel: connection closed")
        await asyncio.sleep(self.eval_delay)
        return wire.EvalResponse(result=repr(code), error=None, exit_code=0)

    async def exec(self, sandbox_id: str, args: list[str], **kw: Any) -> wire.ExecResponse:
        self.calls.append(("exec", (args, kw)))
        if not args:
            raise InvalidInput("args must be a non-empty list of strings")
        return wire.ExecResponse(stdout="", stderr="", exit_code=0)

    async def branch(self, sandbox_id: str, **kw: Any) -> wire.SnapshotInfo:
        self.calls.append(("branch", kw))
        if sandbox_id in self.dead:
            raise VMError("QMP getfd failed on QEMU pid 42: Disconnected")
        if kw.get("tag") == "gone":
            raise QemuGone("QEMU pid 43 exited during QMP getfd (killed or crashed)")
        status = "writing" if kw["mode"] == "live" and not kw["wait"] else "ready"
        return wire.SnapshotInfo(tag="b", dir="/x/b", created_at_unix=1, status=status)

    async def write_file(self, sandbox_id: str, path: str, data: bytes) -> int:
        self.calls.append(("write_file", (path, len(data))))
        return len(data)


@pytest.fixture
def fake() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
async def client(fake: FakeRuntime, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    limits = Limits(max_body_bytes=1024, eval_timeout_s=0.3)
    app = create_app(
        cast(Runtime, fake), token=TOKEN, audit_log=tmp_path / "audit.log", limits=limits
    )
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_auth_rules(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"ok": True}
    r = await client.get("/v1/sandboxes")
    assert (r.status_code, r.json()) == (401, {"error": "missing bearer token"})
    r = await client.get("/v1/sandboxes", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert (r.status_code, r.json()) == (401, {"error": "invalid bearer token"})
    r = await client.get("/v1/sandboxes", headers={"Authorization": "Bearer"})
    assert r.json() == {"error": "missing bearer token"}
    r = await client.get("/openapi.json")
    assert r.status_code == 401
    assert (await client.get("/v1/sandboxes", headers=AUTH)).status_code == 200


async def test_error_mapping(client: httpx.AsyncClient, fake: FakeRuntime) -> None:
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        (
            "POST",
            "/v1/sandboxes",
            {"json": {"snapshot_tag": "py", "n": "many"}},
            400,
            "invalid request: field 'n': ",
        ),
        ("POST", "/v1/sandboxes", {}, 400, "request body is required"),
        ("POST", "/v1/sandboxes", {"json": [1, 2]}, 400, "must be a JSON object"),
        ("POST", "/v1/sandboxes", {"content": b"n=1"}, 400, "Content-Type: application/json"),
        (
            "POST",
            "/v1/sandboxes",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("GET", "/v1/sandboxes", {"params": {"all": "perhaps"}}, 400, "query parameter 'all'"),
        ("GET", "/v1/sandboxes/sb-1/files", {}, 400, "query parameter 'path': Field required"),
        ("GET", "/v1/sandboxes/sb-9", {}, 404, "'sb-9' not found"),
        ("GET", "/nowhere", {}, 404, "no such endpoint: GET /nowhere"),
        ("DELETE", "/v1/sandboxes", {}, 405, "method DELETE is not allowed"),
        ("POST", "/v1/sandboxes/sb-1/exec", {"json": {"args": []}}, 400, "non-empty"),
        (
            "POST",
            "/v1/sandboxes/sb-1/exec",
            {"json": {"args": ["x"], "env": {"A=B": "1"}}},
            400,
            "env name",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-1/exec",
            {"json": {"args": ["x"], "cwd": "/\u0000"}},
            400,
            "NUL",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-1/branch",
            {"json": {"mode": "live", "diff": True}},
            400,
            "cannot be combined",
        ),
        ("POST", "/v1/sandboxes/sb-1/branch", {"json": {"wait": False}}, 400, 'needs mode "live"'),
        (
            "DELETE",
            "/v1/snapshots/py",
            {"params": {"cascade": "1", "force": "1"}},
            400,
            "either cascade or force",
        ),
        ("POST", "/v1/workspaces/bad%20name/resume", {}, 400, "invalid workspace name"),
        ("POST", "/v1/workspaces", {"json": {"name": "w"}}, 400, "'snapshot_tag'"),
    ]
    for method, path, kwargs, status, fragment in cases:
        kwargs.setdefault("headers", {})
        kwargs["headers"].update(AUTH)
        r = await client.request(method, path, **kwargs)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"error"} and fragment in body["error"], (path, body)
    assert not [c for c in fake.calls if c[0] == "branch"]  # refused before the runtime


async def test_routes_answer_wire_shapes(client: httpx.AsyncClient, fake: FakeRuntime) -> None:
    r = await client.post(
        "/v1/sandboxes",
        headers=AUTH,
        json={
            "snapshot_tag": "py",
            "n": 2,
            "per_child_netns": True,
            "prewarm": True,
            "live_fork": True,
            "hugepages": True,
        },
    )
    assert r.status_code == 201
    assert [s["fork_timing_ms"]["qemu_up_ms"] for s in r.json()] == [1.0, 1.0]
    assert fake.calls[-1] == (
        "spawn",
        ("py", 2, {"memory_limit_mib": None, "network": None, "allow_internet_access": None}),
    )
    warning = r.json()[0]["warning"]
    assert "per_child_netns changes nothing" in warning and "prewarm changes nothing" in warning
    assert "hugepages is not in effect" in warning and "live_fork" not in warning

    # forkd-mcp 0.2 sends memory_limit_mib=256 on every spawn: without a cgroup the runtime
    # accepts it and says so, and the answer carries that note beside the flags' notes.
    fake.spawn_warning = "memory_limit_mib=256 is not enforced: cgroups are disabled"
    body = {"snapshot_tag": "py", "memory_limit_mib": 256, "prewarm": False}
    r = await client.post("/v1/sandboxes", headers=AUTH, json=body)
    assert r.status_code == 201
    assert r.json()[0]["warning"] == fake.spawn_warning
    assert fake.calls[-1] == (
        "spawn",
        ("py", 1, {"memory_limit_mib": 256, "network": None, "allow_internet_access": None}),
    )
    fake.spawn_warning = None
    r = await client.post("/v1/sandboxes", headers=AUTH, json={"snapshot_tag": "py"})
    assert r.json()[0]["warning"] is None

    r = await client.post(
        "/v1/snapshots",
        headers=AUTH,
        json={"tag": "t", "kernel": "/k", "rootfs": "/r", "tap": "tap0"},
    )
    assert r.status_code == 201
    assert "kernel and rootfs paths are ignored" in r.json()["warning"]
    assert "tap is ignored" in r.json()["warning"]
    assert "boot_wait_secs" not in r.json()["warning"]
    r = await client.post("/v1/snapshots", headers=AUTH, json={"tag": "t", "boot_wait_secs": 30})
    assert r.json()["warning"].startswith("boot_wait_secs=30 is ignored")
    r = await client.post("/v1/snapshots", headers=AUTH, json={"tag": "t", "rw": True})
    assert r.json()["warning"].startswith("rw is ignored")
    assert fake.calls[-1] == (
        "create_snapshot",
        {
            "tag": "t",
            "image": "python",
            "mem_mib": 512,
            "warmup": None,
            "network": None,
            "cpus": None,
        },
    )

    r = await client.post(
        "/v1/sandboxes/sb-1/branch", headers=AUTH, json={"mode": "live", "wait": False}
    )
    assert (r.status_code, r.json()["status"]) == (202, "writing")
    r = await client.post("/v1/sandboxes/sb-1/branch", headers=AUTH)  # no body at all
    assert (r.status_code, r.json()["status"]) == (201, "ready")

    r = await client.post(
        "/v1/sandboxes/sb-1/exec",
        headers=AUTH,
        json={"args": ["cat"], "stdin": "héllo", "timeout_secs": 5},
    )
    assert r.status_code == 200
    assert fake.calls[-1] == (
        "exec",
        (
            ["cat"],
            {"timeout_s": 5, "env": None, "cwd": None, "stdin": "héllo".encode(), "user": None},
        ),
    )

    r = await client.put(
        "/v1/sandboxes/sb-1/files/content", params={"path": "/a"}, headers=AUTH, content=b"x" * 1000
    )
    assert (r.status_code, r.json()) == (200, {"path": "/a", "size": 1000})

    r = await client.get("/version", headers=AUTH)
    assert r.json() == {"version": "0.6.0", "api": "v1", "accel": "tcg"}


async def test_timeouts_dead_sandboxes_and_body_cap(
    client: httpx.AsyncClient, fake: FakeRuntime
) -> None:
    fake.eval_delay = 30
    t0 = time.monotonic()
    r = await client.post("/v1/sandboxes/sb-1/eval", headers=AUTH, json={"code": "x"})
    assert r.status_code == 504 and "did not finish within 0.3 s" in r.json()["error"]
    assert time.monotonic() - t0 < 5

    fake.dead.add("sb-dead")
    r = await client.post("/v1/sandboxes/sb-dead/eval", headers=AUTH, json={"code": "x"})
    assert r.status_code == 410 and "QEMU exited" in r.json()["error"]
    r = await client.post("/v1/sandboxes/sb-gone/eval", headers=AUTH, json={"code": "x"})
    assert r.status_code == 410 and "deleted while this request ran" in r.json()["error"]
    # a QMP failure racing the QEMU's death: the sandbox is dead, not the daemon broken
    r = await client.post("/v1/sandboxes/sb-dead/branch", headers=AUTH, json={"mode": "full"})
    assert r.status_code == 410 and "is dead: QEMU exited" in r.json()["error"], r.text
    r = await client.post(
        "/v1/sandboxes/sb-1/branch", headers=AUTH, json={"mode": "full", "tag": "gone"}
    )
    assert r.status_code == 503 and "killed or crashed" in r.json()["error"], r.text

    big = {"path": "/a"}
    r = await client.put(
        "/v1/sandboxes/sb-1/files/content", params=big, headers=AUTH, content=b"x" * 1025
    )
    assert r.status_code == 413 and "too large" in r.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 300

    r = await client.put(
        "/v1/sandboxes/sb-1/files/content", params=big, headers=AUTH, content=chunks()
    )
    assert r.status_code == 413

    async def small() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    r = await client.put(
        "/v1/sandboxes/sb-1/files/content", params=big, headers=AUTH, content=small()
    )
    assert (r.status_code, r.json()["size"]) == (200, 4)


async def test_audit_log_records_every_request(client: httpx.AsyncClient, tmp_path: Path) -> None:
    await client.get("/healthz", headers={"User-Agent": "ua-1"})
    await client.get("/v1/snapshots", headers={"User-Agent": "ua-2"})
    await client.get("/v1/snapshots", headers={"User-Agent": "ua-3", **AUTH})
    await client.put(
        "/v1/sandboxes/sb-1/files/content?path=/a",
        headers={"User-Agent": "ua-4", **AUTH},
        content=b"z" * 5000,
    )
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(x["user_agent"], x["path"], x["status"]) for x in lines] == [
        ("ua-1", "/healthz", 200),
        ("ua-2", "/v1/snapshots", 401),
        ("ua-3", "/v1/snapshots", 200),
        ("ua-4", "/v1/sandboxes/sb-1/files/content", 413),
    ]
    assert all(x["remote"] == "10.1.2.3:5555" and x["method"] in ("GET", "PUT") for x in lines)
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600


async def test_openapi_and_metrics(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json", headers=AUTH)).json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    for path in (
        "/v1/snapshots",
        "/v1/sandboxes",
        "/v1/sandboxes/{sandbox_id}/branch",
        "/v1/snapshots/{tag}/compact",
        "/v1/sandboxes/{sandbox_id}/files/content",
    ):
        assert path in schema["paths"]
    branch = schema["paths"]["/v1/sandboxes/{sandbox_id}/branch"]["post"]["responses"]
    assert {"201", "202", "400", "401", "404", "409", "410", "503"} <= set(branch)
    m = await client.get("/metrics", headers=AUTH)
    assert "forkd_sandboxes_active 1.0" in m.text and "forkd_snapshots_total 1.0" in m.text
    assert "\nforkd_branch_concurrency_cap 7.0\n" in m.text


async def test_abusive_agent_is_a_clean_502(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/sandboxes/sb-1/eval", headers=AUTH, json={"code": "abuse"})
    assert r.status_code == 502
    assert r.json() == {"error": "agent flooded the channel: connection closed"}


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("short", "at least 16"),
        ("changemechangeme", "placeholder"),
        ("my-secret-password-123", "placeholder"),
        ("xxxxxxxxxxxxxxxxxxxx", "too few"),
        ("abababababababababab", "too few"),
        ("has spaces in the token 123", "printable"),
        ("9f86d081884c7d659a2feaa0c55ad015", None),
        ("Zq3-vN8_r2Lx0pW7", None),
    ],
)
def test_token_rules(token: str, problem: str | None) -> None:
    found = token_problem(token)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_bind_rules() -> None:
    assert parse_bind("127.0.0.1:8889") == ("127.0.0.1", 8889)
    assert parse_bind("[::1]:9") == ("::1", 9)
    for bad in ("8889", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(InvalidInput):
            parse_bind(bad)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
        with pytest.raises(InvalidInput, match="without a token"):
            check_bind(host, None)
        check_bind(host, "a-real-token-0123456789")


def test_limits_from_env() -> None:
    lim = Limits.from_env({"FORKD_EVAL_TIMEOUT_S": "2.5", "FORKD_MAX_BODY_BYTES": "100"})
    assert (lim.eval_timeout_s, lim.max_body_bytes) == (2.5, 100)
    with pytest.raises(InvalidInput):
        Limits.from_env({"FORKD_EVAL_TIMEOUT_S": "-1"})
    with pytest.raises(InvalidInput):
        Limits.from_env({"FORKD_MAX_BODY_BYTES": "lots"})


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (errno.ENOTEMPTY, 409),
        (errno.EISDIR, 400),
        (errno.EACCES, 400),
        (errno.ENOSPC, 413),
        (errno.EIO, 500),
        (None, 500),
    ],
)
def test_guest_os_refusals_are_caller_errors(code: int | None, status: int) -> None:
    err = GuestOSError("refused in the guest", code)
    assert err.http_status == status
    assert err.errno == code
