"""The Python SDK's requests, byte for byte, against a fake daemon (httpx.MockTransport)."""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkd.client import (
    AsyncController,
    AsyncSandbox,
    BranchMode,
    CommandResult,
    Controller,
    ControllerConnectionError,
    ControllerError,
    EvalError,
    EvalResult,
    Sandbox,
    SnapshotFailedError,
)
from forkd.client.sandbox import _Lease
from forkd.errors import ForkdError
from forkd.wire import FileEntry

BASE = "http://forkd.test:8889"
TOKEN = "t0ken-0123456789abcdef"

Responder = Callable[[httpx.Request], httpx.Response]


def body(req: httpx.Request) -> Any:
    return json.loads(req.content) if req.content else None


class FakeDaemon:
    """Records every request; answers from ``routes`` or plausible defaults."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], httpx.Response | Responder] = {}
        self._ids = itertools.count()

    def route(self, method: str, path: str, answer: httpx.Response | Responder) -> None:
        self.routes[(method, path)] = answer

    def handle(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        answer = self.routes.get((req.method, req.url.path))
        if answer is not None:
            return answer if isinstance(answer, httpx.Response) else answer(req)
        return self.default(req)

    def default(self, req: httpx.Request) -> httpx.Response:
        path, method = req.url.path, req.method
        if method == "DELETE":
            return httpx.Response(204)
        if method == "POST" and path == "/v1/sandboxes":
            b = body(req)
            return httpx.Response(
                201,
                json=[
                    {"id": f"sb-{next(self._ids)}", "snapshot_tag": b["snapshot_tag"], "pid": 1}
                    for _ in range(b["n"])
                ],
            )
        if path.endswith("/branch"):
            b = body(req)
            return httpx.Response(201, json={"tag": b.get("tag", "branch-auto"), "status": "ready"})
        if path.endswith("/exec"):
            return httpx.Response(
                200, json={"stdout": "hi\n", "stderr": "", "exit_code": 0, "duration_ms": 1.5}
            )
        if path.endswith("/eval"):
            return httpx.Response(
                200,
                json={
                    "result": "2",
                    "error": None,
                    "exit_code": 0,
                    "stdout": "",
                    "traceback": None,
                },
            )
        if path.endswith("/files/content"):
            if method == "PUT":
                return httpx.Response(
                    200, json={"path": req.url.params["path"], "size": len(req.content)}
                )
            return httpx.Response(
                200, content=b"\x00\xffraw", headers={"content-type": "application/octet-stream"}
            )
        if path.endswith("/files"):
            entry = {"name": "a", "path": "/a", "type": "file", "size": 1, "mode": 420, "mtime": 1}
            return httpx.Response(200, json=[entry])
        if method == "GET" and path.startswith("/v1/sandboxes/"):
            return httpx.Response(200, json={"id": path.rsplit("/", 1)[1], "snapshot_tag": "py"})
        if method == "GET" and path in ("/v1/sandboxes", "/v1/snapshots"):
            return httpx.Response(200, json=[])
        return httpx.Response(200, json={"ok": True})

    def controller(self, **kwargs: Any) -> Controller:
        kwargs.setdefault("base_url", BASE)
        kwargs.setdefault("token", TOKEN)
        return Controller(transport=httpx.MockTransport(self.handle), **kwargs)

    def async_controller(self, **kwargs: Any) -> AsyncController:
        kwargs.setdefault("base_url", BASE)
        kwargs.setdefault("token", TOKEN)
        return AsyncController(transport=httpx.MockTransport(self.handle), **kwargs)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def ctl(daemon: FakeDaemon) -> Controller:
    return daemon.controller()


# --- spawn ------------------------------------------------------------------------------------


def test_spawn_defaults_send_only_the_v05_fields(daemon: FakeDaemon, ctl: Controller) -> None:
    out = ctl.spawn_sandboxes("py")
    req = daemon.last
    assert (req.method, req.url.path) == ("POST", "/v1/sandboxes")
    assert body(req) == {"snapshot_tag": "py", "n": 1, "per_child_netns": False}
    assert out == [{"id": "sb-0", "snapshot_tag": "py", "pid": 1}]


def test_spawn_sends_flags_only_when_true(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.spawn_sandboxes(
        "py", n=3, per_child_netns=True, live_fork=True, prewarm=True, hugepages=True
    )
    assert body(daemon.last) == {
        "snapshot_tag": "py",
        "n": 3,
        "per_child_netns": True,
        "prewarm": True,
        "live_fork": True,
        "hugepages": True,
    }
    ctl.spawn_sandboxes("py", live_fork=False, prewarm=False, hugepages=False)
    assert not {"live_fork", "prewarm", "hugepages"} & set(body(daemon.last))


def test_spawn_memory_limit_only_when_not_none(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.spawn_sandboxes("py", memory_limit_mib=None)
    assert "memory_limit_mib" not in body(daemon.last)
    ctl.spawn_sandboxes("py", memory_limit_mib=0)  # falsy but given: sent
    assert body(daemon.last)["memory_limit_mib"] == 0
    ctl.spawn_sandboxes("py", memory_limit_mib=512)
    assert body(daemon.last)["memory_limit_mib"] == 512


# --- branch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {}),
        ({"tag": "cp1"}, {"tag": "cp1"}),
        ({"diff": True}, {"diff": True}),
        ({"diff": False}, {}),
        ({"mode": "live"}, {"mode": "live"}),
        ({"mode": BranchMode.DIFF}, {"mode": "diff"}),
        ({"mode": BranchMode.FULL, "diff": True}, {"mode": "full"}),  # mode wins, no legacy diff
        ({"mode": "live", "diff": True, "wait": False}, {"mode": "live", "wait": False}),
        ({"wait": True}, {}),
        ({"wait": False}, {"wait": False}),
        ({"measure_diff": True}, {"measure_diff": True}),
        ({"measure_diff": False}, {}),
        (
            {"tag": "t", "mode": "diff", "measure_diff": True, "wait": False},
            {"tag": "t", "mode": "diff", "measure_diff": True, "wait": False},
        ),
    ],
)
def test_branch_serialization(
    daemon: FakeDaemon, ctl: Controller, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    ctl.branch_sandbox("sb-1", **kwargs)
    req = daemon.last
    assert (req.method, req.url.path) == ("POST", "/v1/sandboxes/sb-1/branch")
    assert body(req) == expected


def test_branch_positional_order_matches_forkd(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.branch_sandbox("sb-1", "tag1", True, True)  # sandbox_id, tag, diff, measure_diff
    assert body(daemon.last) == {"tag": "tag1", "diff": True, "measure_diff": True}


def test_branch_rejects_unknown_mode_before_sending(daemon: FakeDaemon, ctl: Controller) -> None:
    with pytest.raises(ValueError, match="unknown branch mode"):
        ctl.branch_sandbox("sb-1", mode="turbo")
    assert daemon.requests == []


def test_branch_mode_is_a_str_enum() -> None:
    assert [m.value for m in BranchMode] == ["full", "diff", "live"]
    assert isinstance(BranchMode.LIVE, str)
    assert str(BranchMode.LIVE) == "live"
    assert json.dumps({"mode": BranchMode.LIVE}) == '{"mode": "live"}'


# --- exec / eval / ping -------------------------------------------------------------------------


def test_exec_minimal_body(daemon: FakeDaemon, ctl: Controller) -> None:
    out = ctl.exec_command("sb-1", ["echo", "hi"])
    assert daemon.last.url.path == "/v1/sandboxes/sb-1/exec"
    assert body(daemon.last) == {"args": ["echo", "hi"], "timeout_secs": 30}
    assert out["stdout"] == "hi\n"


def test_exec_extras_only_when_given(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.exec_command("sb-1", ("cat",), 5, env={"A": "1"}, cwd="/tmp", stdin="data")
    assert body(daemon.last) == {
        "args": ["cat"],
        "timeout_secs": 5,
        "env": {"A": "1"},
        "cwd": "/tmp",
        "stdin": "data",
    }
    ctl.exec_command("sb-1", ["true"], stdin="")  # empty stdin is still given
    assert body(daemon.last) == {"args": ["true"], "timeout_secs": 30, "stdin": ""}


def test_exec_refuses_a_string_argv(daemon: FakeDaemon, ctl: Controller) -> None:
    with pytest.raises(TypeError):
        ctl.exec_command("sb-1", "echo hi")
    assert daemon.requests == []


def test_exec_raises_http_timeout_above_command_timeout(
    daemon: FakeDaemon, ctl: Controller
) -> None:
    ctl.exec_command("sb-1", ["sleep", "100"], timeout_secs=100)
    assert daemon.last.extensions["timeout"]["read"] == pytest.approx(130)
    ctl.exec_command("sb-1", ["true"], timeout_secs=1)
    assert daemon.last.extensions["timeout"]["read"] == pytest.approx(60)


def test_eval_and_ping(daemon: FakeDaemon, ctl: Controller) -> None:
    assert ctl.eval_code("sb-1", "1+1")["result"] == "2"
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/sandboxes/sb-1/eval")
    assert body(daemon.last) == {"code": "1+1"}
    ctl.ping_sandbox("sb-1")
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/sandboxes/sb-1/ping")


# --- snapshots ----------------------------------------------------------------------------------


def test_create_snapshot_sends_only_given_fields(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.create_snapshot("py")
    assert body(daemon.last) == {"tag": "py"}
    ctl.create_snapshot("py", image="python", mem_mib=512, warmup="import json")
    assert body(daemon.last) == {
        "tag": "py",
        "image": "python",
        "mem_mib": 512,
        "warmup": "import json",
    }
    ctl.create_snapshot("fc", kernel="/k", rootfs="/r.ext4")
    assert body(daemon.last) == {"tag": "fc", "kernel": "/k", "rootfs": "/r.ext4"}
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/snapshots")


@pytest.mark.parametrize(
    ("kwargs", "query"),
    [({}, {}), ({"cascade": True}, {"cascade": "true"}), ({"force": True}, {"force": "true"})],
)
def test_delete_snapshot_query(
    daemon: FakeDaemon, ctl: Controller, kwargs: dict[str, bool], query: dict[str, str]
) -> None:
    assert ctl.delete_snapshot("py", **kwargs) is None
    assert (daemon.last.method, daemon.last.url.path) == ("DELETE", "/v1/snapshots/py")
    assert dict(daemon.last.url.params) == query


def test_snapshot_info_and_compact(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.snapshot_info("py")
    assert (daemon.last.method, daemon.last.url.path) == ("GET", "/v1/snapshots/py/info")
    ctl.compact_snapshot("py", "py-flat")
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/snapshots/py/compact")
    assert body(daemon.last) == {"to": "py-flat"}


def test_simple_gets(daemon: FakeDaemon, ctl: Controller) -> None:
    assert ctl.list_snapshots() == []
    assert ctl.list_sandboxes() == []
    assert ctl.get_sandbox("sb-9")["id"] == "sb-9"
    ctl.healthz()
    ctl.version()
    assert [(r.method, r.url.path) for r in daemon.requests] == [
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/sb-9"),
        ("GET", "/healthz"),
        ("GET", "/version"),
    ]
    assert ctl.kill_sandbox("sb-9") is None
    assert (daemon.last.method, daemon.last.url.path) == ("DELETE", "/v1/sandboxes/sb-9")


def test_path_segments_are_escaped_and_never_empty(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.get_sandbox("../snapshots")
    assert daemon.last.url.raw_path == b"/v1/sandboxes/..%2Fsnapshots"
    with pytest.raises(ValueError):
        ctl.get_sandbox("")  # would otherwise hit GET /v1/sandboxes (the list)
    with pytest.raises(ValueError):
        ctl.delete_snapshot("")


def test_wait_for_snapshot_polls_until_ready(daemon: FakeDaemon, ctl: Controller) -> None:
    statuses = iter(["writing", "writing", "ready"])
    daemon.route(
        "GET",
        "/v1/snapshots/b1/info",
        lambda req: httpx.Response(200, json={"tag": "b1", "status": next(statuses)}),
    )
    info = ctl.wait_for_snapshot("b1", timeout=5, poll_interval=0.001)
    assert info == {"tag": "b1", "status": "ready"}
    assert len(daemon.requests) == 3


def test_wait_for_snapshot_failed(daemon: FakeDaemon, ctl: Controller) -> None:
    daemon.route(
        "GET",
        "/v1/snapshots/b1/info",
        httpx.Response(200, json={"tag": "b1", "status": "failed", "error": "disk full"}),
    )
    with pytest.raises(SnapshotFailedError, match="disk full") as info:
        ctl.wait_for_snapshot("b1", poll_interval=0.001)
    assert isinstance(info.value, ControllerError)
    assert info.value.tag == "b1"
    assert info.value.error == "disk full"


def test_wait_for_snapshot_timeout(daemon: FakeDaemon, ctl: Controller) -> None:
    daemon.route("GET", "/v1/snapshots/b1/info", httpx.Response(200, json={"status": "writing"}))
    with pytest.raises(TimeoutError, match="writing"):
        ctl.wait_for_snapshot("b1", timeout=0.02, poll_interval=0.005)


# --- files --------------------------------------------------------------------------------------


def test_read_file_returns_raw_bytes(daemon: FakeDaemon, ctl: Controller) -> None:
    assert ctl.read_file("sb-1", "/etc/bin") == b"\x00\xffraw"
    req = daemon.last
    assert (req.method, req.url.path) == ("GET", "/v1/sandboxes/sb-1/files/content")
    assert dict(req.url.params) == {"path": "/etc/bin"}


@pytest.mark.parametrize(
    ("data", "raw"), [(b"\x00\x01\xfe", b"\x00\x01\xfe"), ("héllo", "héllo".encode())]
)
def test_write_file_sends_raw_body(
    daemon: FakeDaemon, ctl: Controller, data: bytes | str, raw: bytes
) -> None:
    out = ctl.write_file("sb-1", "/tmp/f b", data)
    req = daemon.last
    assert (req.method, req.url.path) == ("PUT", "/v1/sandboxes/sb-1/files/content")
    assert dict(req.url.params) == {"path": "/tmp/f b"}
    assert req.content == raw
    assert req.headers["content-type"] == "application/octet-stream"
    assert out == {"path": "/tmp/f b", "size": len(raw)}


def test_list_and_remove_files(daemon: FakeDaemon, ctl: Controller) -> None:
    entries = ctl.list_files("sb-1", "/")
    assert entries[0]["name"] == "a"
    assert (daemon.last.method, daemon.last.url.path) == ("GET", "/v1/sandboxes/sb-1/files")
    assert dict(daemon.last.url.params) == {"path": "/"}
    assert ctl.remove_file("sb-1", "/a") is None
    assert (daemon.last.method, daemon.last.url.path) == ("DELETE", "/v1/sandboxes/sb-1/files")
    assert dict(daemon.last.url.params) == {"path": "/a"}
    ctl.remove_file("sb-1", "/d", recursive=True)
    assert dict(daemon.last.url.params) == {"path": "/d", "recursive": "true"}


# --- configuration and auth ---------------------------------------------------------------------


def test_bearer_header_when_token(daemon: FakeDaemon) -> None:
    daemon.controller(token="secret-token-123456").list_sandboxes()
    assert daemon.last.headers["authorization"] == "Bearer secret-token-123456"


def test_no_auth_header_without_token(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    daemon.controller(token=None).list_sandboxes()
    assert "authorization" not in daemon.last.headers


def test_env_configures_url_and_token(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_URL", "http://envhost:9999/")
    monkeypatch.setenv("FORKD_TOKEN", "env-token-0123456789")
    c = Controller(transport=httpx.MockTransport(daemon.handle))
    assert c.base_url == "http://envhost:9999"
    assert c.token == "env-token-0123456789"
    c.list_snapshots()
    assert str(daemon.last.url) == "http://envhost:9999/v1/snapshots"
    assert daemon.last.headers["authorization"] == "Bearer env-token-0123456789"
    # explicit arguments beat the environment
    c2 = Controller("http://explicit:1", "arg-token-0123456789")
    assert (c2.base_url, c2.token) == ("http://explicit:1", "arg-token-0123456789")


def test_defaults_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_URL", raising=False)
    monkeypatch.setenv("FORKD_TOKEN", "")
    c = Controller()
    assert (c.base_url, c.token, c.timeout) == ("http://127.0.0.1:8889", None, 60.0)
    assert AsyncController().base_url == "http://127.0.0.1:8889"


def test_base_url_path_prefix_is_kept(daemon: FakeDaemon) -> None:
    daemon.controller(base_url="http://proxy/forkd/").list_sandboxes()
    assert str(daemon.last.url) == "http://proxy/forkd/v1/sandboxes"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [(404, "no such sandbox: sb-x"), (409, "snapshot has dependents: a, b"), (401, "bad token")],
)
def test_controller_error_fields(
    daemon: FakeDaemon, ctl: Controller, status: int, message: str
) -> None:
    daemon.route("GET", "/v1/sandboxes/sb-x", httpx.Response(status, json={"error": message}))
    with pytest.raises(ControllerError) as info:
        ctl.get_sandbox("sb-x")
    err = info.value
    assert err.status == status
    assert err.body == {"error": message}
    assert err.url == f"{BASE}/v1/sandboxes/sb-x"
    assert err.error == message
    assert message in str(err)
    assert str(status) in str(err)
    assert isinstance(err, RuntimeError)
    assert isinstance(err, ForkdError)


def test_controller_error_non_json_body(daemon: FakeDaemon, ctl: Controller) -> None:
    daemon.route("DELETE", "/v1/snapshots/py", httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(ControllerError) as info:
        ctl.delete_snapshot("py")
    assert (info.value.status, info.value.body) == (502, "Bad Gateway")
    assert "Bad Gateway" in str(info.value)


def test_unreachable_daemon_is_a_controller_error(daemon: FakeDaemon) -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=req)

    c = Controller(BASE, transport=httpx.MockTransport(refuse))
    with pytest.raises(ControllerConnectionError) as info:
        c.list_sandboxes()
    assert isinstance(info.value, ControllerError)
    assert info.value.status == 0
    assert "Connection refused" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_controller_closes_as_context_manager(daemon: FakeDaemon) -> None:
    with daemon.controller() as c:
        c.healthz()
    with pytest.raises(RuntimeError):
        c.healthz()


def test_generated_methods_have_real_signatures() -> None:
    sig = inspect.signature(Controller.spawn_sandboxes)
    assert list(sig.parameters)[:3] == ["self", "snapshot_tag", "n"]
    bound = inspect.signature(Controller(BASE).branch_sandbox)
    assert next(iter(bound.parameters)) == "sandbox_id"
    assert Controller.exec_command.__doc__ == AsyncController.exec_command.__doc__
    assert inspect.iscoroutinefunction(AsyncController.exec_command)


def test_workspace_requests(daemon: FakeDaemon, ctl: Controller) -> None:
    ctl.create_workspace("dev", "py")
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/workspaces")
    assert body(daemon.last) == {"name": "dev", "snapshot_tag": "py", "per_child_netns": False}
    ctl.create_workspace("dev", "py", per_child_netns=True, memory_limit_mib=256)
    assert body(daemon.last) == {"name": "dev", "snapshot_tag": "py", "per_child_netns": True,
                                 "memory_limit_mib": 256}  # fmt: skip
    ctl.suspend_workspace("dev")
    assert (daemon.last.url.path, body(daemon.last)) == ("/v1/workspaces/dev/suspend",
                                                         {"diff": False})  # fmt: skip
    assert daemon.last.extensions["timeout"]["read"] >= 120
    ctl.suspend_workspace("dev", diff=True)
    assert body(daemon.last) == {"diff": True}
    ctl.resume_workspace("dev")
    assert (daemon.last.method, daemon.last.url.path) == ("POST", "/v1/workspaces/dev/resume")
    assert ctl.delete_workspace("dev") is None
    assert daemon.last.method == "DELETE" and daemon.last.url.path == "/v1/workspaces/dev"
    ctl.get_workspace("a/b")
    assert daemon.last.url.raw_path == b"/v1/workspaces/a%2Fb"
    with pytest.raises(ValueError):
        ctl.get_workspace("")


# --- async twin parity --------------------------------------------------------------------------

PARITY_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("healthz", (), {}),
    ("version", (), {}),
    ("list_snapshots", (), {}),
    ("create_snapshot", ("py",), {"image": "python", "mem_mib": 256}),
    ("delete_snapshot", ("py",), {"cascade": True}),
    ("snapshot_info", ("py",), {}),
    ("compact_snapshot", ("py", "flat"), {}),
    ("spawn_sandboxes", ("py",), {"n": 2, "live_fork": True, "memory_limit_mib": 128}),
    ("spawn_sandboxes", ("py",), {"network": {"egress": "allowlist", "allow": ["host:80"]}}),
    ("spawn_sandboxes", ("py",), {"allow_internet_access": True}),
    ("list_sandboxes", (), {}),
    ("get_sandbox", ("sb-1",), {}),
    ("kill_sandbox", ("sb-1",), {}),
    ("expose_port", ("sb-1", 8000), {}),
    ("list_ports", ("sb-1",), {}),
    ("remove_port", ("sb-1", 8000), {}),
    ("branch_sandbox", ("sb-1",), {"mode": BranchMode.LIVE, "diff": True, "wait": False}),
    ("branch_sandbox", ("sb-1", "t", True), {"measure_diff": True}),
    ("exec_command", ("sb-1", ["ls"], 7), {"env": {"X": "y"}, "cwd": "/", "stdin": "in"}),
    ("eval_code", ("sb-1", "2*3"), {}),
    ("ping_sandbox", ("sb-1",), {}),
    ("read_file", ("sb-1", "/f"), {}),
    ("write_file", ("sb-1", "/f", b"\x01\x02"), {}),
    ("list_files", ("sb-1", "/"), {}),
    ("remove_file", ("sb-1", "/d"), {"recursive": True}),
    ("create_workspace", ("dev", "py"), {"memory_limit_mib": 256}),
    ("list_workspaces", (), {}),
    ("get_workspace", ("dev",), {}),
    ("delete_workspace", ("dev",), {}),
    ("suspend_workspace", ("dev",), {"diff": True}),
    ("resume_workspace", ("dev",), {}),
    ("pull", ("127.0.0.1:5000/t/py:v1", "py2"), {"force": True, "insecure": True}),
    ("pull", ("https://files.example/py.forkd",), {}),
    ("push", ("py", "127.0.0.1:5000/t/py:v1"), {"insecure": True}),
]


def _fingerprint(req: httpx.Request) -> tuple[Any, ...]:
    headers = {k: v for k, v in req.headers.items() if k in ("authorization", "content-type")}
    return (req.method, str(req.url), req.content, headers, req.extensions["timeout"]["read"])


def test_parity_table_covers_every_endpoint() -> None:
    generated = {
        name
        for name, value in vars(Controller).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__wrapped__", None)
    }
    assert generated == {name for name, _, _ in PARITY_CALLS}


async def test_async_twin_sends_identical_requests() -> None:
    sync_daemon, async_daemon = FakeDaemon(), FakeDaemon()
    sync_ctl = sync_daemon.controller()
    async with async_daemon.async_controller() as async_ctl:
        for name, args, kwargs in PARITY_CALLS:
            sync_out = getattr(sync_ctl, name)(*args, **kwargs)
            async_out = await getattr(async_ctl, name)(*args, **kwargs)
            assert sync_out == async_out, name
    assert len(sync_daemon.requests) == len(async_daemon.requests) == len(PARITY_CALLS)
    for s, a in zip(sync_daemon.requests, async_daemon.requests, strict=True):
        assert _fingerprint(s) == _fingerprint(a)


async def test_async_errors_and_wait(daemon: FakeDaemon) -> None:
    daemon.route("GET", "/v1/sandboxes/nope", httpx.Response(404, json={"error": "not found"}))
    statuses = iter(["writing", "ready"])
    daemon.route(
        "GET",
        "/v1/snapshots/b/info",
        lambda req: httpx.Response(200, json={"status": next(statuses)}),
    )
    async with daemon.async_controller() as c:
        with pytest.raises(ControllerError) as info:
            await c.get_sandbox("nope")
        assert (info.value.status, info.value.error) == (404, "not found")
        assert (await c.wait_for_snapshot("b", poll_interval=0.001))["status"] == "ready"


# --- Sandbox ------------------------------------------------------------------------------------


def test_sandbox_create_spawns_one(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create("py", timeout=300, controller=ctl, live_fork=True)
    assert body(daemon.last) == {
        "snapshot_tag": "py",
        "n": 1,
        "per_child_netns": False,
        "live_fork": True,
    }
    assert sb.id == sb.sandbox_id == "sb-0"
    assert sb.info["snapshot_tag"] == sb.template == "py"
    assert sb.timeout == 300


def test_sandbox_create_refuses_controller_and_url(ctl: Controller) -> None:
    with pytest.raises(ValueError):
        Sandbox.create("py", controller=ctl, base_url=BASE)


def test_commands_run_string_uses_sh_c(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create(controller=ctl)
    res = sb.commands.run("echo hi | tr a-z A-Z")
    assert body(daemon.last) == {
        "args": ["/bin/sh", "-c", "echo hi | tr a-z A-Z"],
        "timeout_secs": 30,
    }
    assert res == CommandResult(stdout="hi\n", stderr="", exit_code=0, duration_ms=1.5)
    assert res.ok


def test_commands_run_list_and_options(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create(controller=ctl)
    sb.commands.run(["python3", "-V"], timeout=5, envs={"K": "v"}, cwd="/srv", stdin="x")
    assert body(daemon.last) == {
        "args": ["python3", "-V"],
        "timeout_secs": 5,
        "env": {"K": "v"},
        "cwd": "/srv",
        "stdin": "x",
    }


def test_command_result_tolerates_v05_daemon() -> None:
    res = CommandResult.from_wire({"stdout": "", "stderr": "boom", "exit_code": 2})
    assert (res.exit_code, res.timed_out, res.duration_ms, res.ok) == (2, False, None, False)


def test_sandbox_files(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create(controller=ctl)
    daemon.route(
        "GET", "/v1/sandboxes/sb-0/files/content", httpx.Response(200, content="héllo".encode())
    )
    assert sb.files.read("/f") == "héllo"
    assert sb.files.read("/f", format="bytes") == "héllo".encode()
    written = sb.files.write("/g", "abc")
    assert (written.path, written.size) == ("/g", 3)
    assert daemon.last.content == b"abc"
    entries = sb.files.list("/")
    assert entries == [FileEntry(name="a", path="/a", type="file", size=1, mode=420, mtime=1)]
    sb.files.remove("/d", recursive=True)
    assert dict(daemon.last.url.params) == {"path": "/d", "recursive": "true"}
    with pytest.raises(ValueError):
        sb.files.read("/f", format="yaml")  # type: ignore[call-overload]


def test_sandbox_eval(daemon: FakeDaemon, ctl: Controller) -> None:
    """forkd v0.5's ``eval``: the result string, and a ``RuntimeError`` on a guest error."""
    sb = Sandbox.create(controller=ctl)
    assert sb.eval("1+1") == "2"
    assert body(daemon.last) == {"code": "1+1"}
    assert sb.eval_result("1+1") == EvalResult(result="2", error=None, exit_code=0)
    failed = {"result": None, "error": "ZeroDivisionError: division by zero", "exit_code": 1,
              "stdout": "before\n", "traceback": "Traceback ...\nZeroDivisionError"}  # fmt: skip
    daemon.route("POST", "/v1/sandboxes/sb-0/eval", httpx.Response(200, json=failed))
    with pytest.raises(EvalError, match=r"^forkd eval: ZeroDivisionError") as caught:
        sb.eval("1/0")
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ForkdError)
    assert caught.value.traceback == failed["traceback"]
    assert caught.value.result == EvalResult.from_wire(failed)
    rich = sb.eval_result("1/0")  # never raises on a guest error
    assert (rich.ok, rich.stdout, rich.error) == (False, "before\n", failed["error"])
    exited = {"result": None, "error": None, "exit_code": 4}
    daemon.route("POST", "/v1/sandboxes/sb-0/eval", httpx.Response(200, json=exited))
    with pytest.raises(EvalError, match="exit code 4"):
        sb.eval("import sys; sys.exit(4)")
    statement = {"result": None, "error": None, "exit_code": 0}
    daemon.route("POST", "/v1/sandboxes/sb-0/eval", httpx.Response(200, json=statement))
    assert sb.eval("x = 1") is None


def test_sandbox_v05_constructor(
    daemon: FakeDaemon, ctl: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forkd v0.5's ``Sandbox(tag=None, target=None, timeout=30, *, spawn=True)`` spawns."""
    monkeypatch.delenv("FORKD_TAG", raising=False)
    sb = Sandbox(controller=ctl)
    assert body(daemon.last)["snapshot_tag"] == "python" and sb.tag == sb.template == "python"
    monkeypatch.setenv("FORKD_TAG", "pwb")
    sb = Sandbox(timeout=60, controller=ctl)
    assert body(daemon.last)["snapshot_tag"] == "pwb" and (sb.tag, sb.timeout) == ("pwb", 60)
    assert Sandbox("t1", controller=ctl).tag == "t1"
    assert Sandbox(tag="t2", controller=ctl).tag == "t2"
    assert Sandbox.create(tag="t3", controller=ctl).tag == "t3"
    assert Sandbox.create(controller=ctl).tag == "pwb"
    assert sb.target is None  # no guest_addr in the answer
    spawned = len(daemon.requests)
    with pytest.raises(ValueError, match=r"Sandbox\.connect\(sandbox_id\)"):
        Sandbox(target="10.42.0.2:8888", spawn=False, controller=ctl)
    with pytest.raises(ValueError, match="connect"):
        Sandbox(spawn=False, controller=ctl)
    with pytest.raises(ValueError, match="disagree"):
        Sandbox.create("a", tag="b", controller=ctl)
    with pytest.raises(ValueError, match="connect"):  # v0.5's create(tag, target)
        Sandbox.create("a", "10.42.0.2:8888", controller=ctl)  # type: ignore[arg-type]
    assert len(daemon.requests) == spawned  # nothing was sent for the refused ones


def test_sandbox_branch_and_fork(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create("py", controller=ctl)
    snap = sb.branch(tag="cp", mode="diff")
    assert snap["tag"] == "cp"
    assert body(daemon.last) == {"tag": "cp", "mode": "diff"}
    daemon.requests.clear()
    kids = sb.fork(2, mode=BranchMode.LIVE)
    branch_req, spawn_req = daemon.requests
    assert branch_req.url.path == "/v1/sandboxes/sb-0/branch"
    assert body(branch_req) == {"mode": "live"}
    assert body(spawn_req) == {"snapshot_tag": "branch-auto", "n": 2, "per_child_netns": False}
    assert [k.id for k in kids] == ["sb-1", "sb-2"]
    assert all(k.template == "branch-auto" and k.controller is ctl for k in kids)
    daemon.requests.clear()
    sb.fork(1)  # the default: a diff branch, the shortest pause among modes that finish first
    assert body(daemon.requests[0]) == {"mode": "diff"}


def test_fork_waits_for_a_writing_branch(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.create("py", controller=ctl)
    daemon.route(
        "POST",
        "/v1/sandboxes/sb-0/branch",
        httpx.Response(202, json={"tag": "lb", "status": "writing"}),
    )
    daemon.route("GET", "/v1/snapshots/lb/info", httpx.Response(200, json={"status": "ready"}))
    kids = sb.fork(1, mode="live")
    assert [r.url.path for r in daemon.requests[-3:]] == [
        "/v1/sandboxes/sb-0/branch",
        "/v1/snapshots/lb/info",
        "/v1/sandboxes",
    ]
    assert kids[0].template == "lb"


def test_sandbox_context_manager_kills_and_leaves_passed_controller_open(
    daemon: FakeDaemon, ctl: Controller
) -> None:
    with Sandbox.create(controller=ctl) as sb:
        pass
    assert (daemon.last.method, daemon.last.url.path) == ("DELETE", f"/v1/sandboxes/{sb.id}")
    ctl.healthz()  # still open


def test_sandbox_kill_of_a_vanished_sandbox(daemon: FakeDaemon, ctl: Controller) -> None:
    sb = Sandbox.connect("sb-7", controller=ctl)
    assert sb.info == {"id": "sb-7", "snapshot_tag": "py"}
    daemon.route("DELETE", "/v1/sandboxes/sb-7", httpx.Response(404, json={"error": "gone"}))
    assert sb.kill() is False
    assert sb.is_running() is True  # the fake still answers GET


def test_owned_controller_closes_with_its_last_sandbox(daemon: FakeDaemon) -> None:
    owned = daemon.controller()
    parent = Sandbox._wrap({"id": "sb-p"}, _Lease(owned, owned=True))
    kids = parent.fork(2)
    assert parent.kill() is True
    owned.healthz()  # children still use it
    kids[0].kill()
    kids[1].close()  # detach without killing
    with pytest.raises(RuntimeError):
        owned.healthz()


async def test_async_sandbox_twin(daemon: FakeDaemon) -> None:
    async with daemon.async_controller() as c:
        async with await AsyncSandbox.create("py", timeout=60, controller=c) as sb:
            res = await sb.commands.run("echo hi", envs={"A": "b"})
            assert body(daemon.last) == {
                "args": ["/bin/sh", "-c", "echo hi"],
                "timeout_secs": 30,
                "env": {"A": "b"},
            }
            assert res.stdout == "hi\n"
            assert await sb.eval("1+1") == "2"
            assert (await sb.eval_result("1+1")).result == "2"
            assert await sb.files.read("/f", format="bytes") == b"\x00\xffraw"
            assert (await sb.files.write("/f", b"xy")).size == 2
            assert [e.name for e in await sb.files.list("/")] == ["a"]
            kids = await sb.fork(2, mode="diff")
            assert [k.template for k in kids] == ["branch-auto", "branch-auto"]
            for k in kids:
                assert await k.kill() is True
        assert (daemon.last.method, daemon.last.url.path) == ("DELETE", f"/v1/sandboxes/{sb.id}")


# --- hub ----------------------------------------------------------------------------------------


def test_hub_requests(daemon: FakeDaemon, ctl: Controller, tmp_path: Path) -> None:
    ctl.pull("reg.example/t/py:v1")
    assert daemon.last.url.path == "/v1/snapshots/pull"
    assert body(daemon.last) == {"ref": "reg.example/t/py:v1", "force": False, "insecure": False}
    assert daemon.last.extensions["timeout"]["read"] == 3600.0
    ctl.push("py", "reg.example/t/py:v1")
    assert daemon.last.url.path == "/v1/snapshots/py/push"

    daemon.route("GET", "/v1/snapshots/py/pack", httpx.Response(200, content=b"pack" * 1000))
    assert ctl.pack("py", tmp_path / "py.forkd", compress=False) == 4000
    assert daemon.last.url.params["compress"] == "false"
    assert (tmp_path / "py.forkd").read_bytes() == b"pack" * 1000

    daemon.route("GET", "/v1/snapshots/nope/pack", httpx.Response(404, json={"error": "gone"}))
    with pytest.raises(ControllerError, match="gone"):
        ctl.pack("nope", tmp_path / "nope.forkd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["py.forkd"]  # no partial file left

    daemon.route("POST", "/v1/snapshots/unpack", lambda req: httpx.Response(
        200, json={"tag": req.url.params["tag"], "size": len(req.read())}))  # fmt: skip
    answer = ctl.unpack(tmp_path / "py.forkd", "py2", force=True)
    assert answer == {"tag": "py2", "size": 4000}
    assert daemon.last.url.params["force"] == "true"
    assert daemon.last.headers["content-type"] == "application/octet-stream"
