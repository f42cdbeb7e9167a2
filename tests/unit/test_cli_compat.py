"""forkd v0.5's CLI spellings and verbs (``--n``, ``--timeout-secs``, ``eval ID -- EXPR``,
``rmi T1 T2``, the spawn flags, ``--settle-secs``, ``where``, ``cleanup``, ``quickstart``) and the
``forkd-controller``/``forkd-mcp`` commands, over a recording backend (no VMs)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkd.cli.backend import NO_FLAGS, SpawnFlags
from forkd.cli.main import main
from forkd.config import Settings
from forkd.doctor import Check
from forkd.errors import NotFound
from forkd.runtime.pool import POOL_PREFIX
from forkd.runtime.registry import Registry, SandboxRow
from forkd.snapshots.store import STAGING_PREFIX

REPO = Path(__file__).resolve().parents[2]
# The module (``forkd.cli.main`` the attribute is the function it re-exports).
cli_main = importlib.import_module("forkd.cli.main")
GONE_PID = 999_999_999  # above any pid_max: no such process


class FakeBackend:
    kind = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.missing: set[str] = set()
        self.warning: str | None = None

    def spawn(
        self,
        tag: str,
        n: int,
        memory_limit_mib: int | None,
        flags: SpawnFlags = NO_FLAGS,
        network: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        assert network is None  # these tests give no network flags
        self.calls.append(("spawn", (tag, n, memory_limit_mib, flags)))
        return [{"id": f"sb-{i}", "warning": self.warning} for i in range(n)]

    def kill(self, sandbox_id: str) -> None:
        self.calls.append(("kill", sandbox_id))

    def create_snapshot(
        self,
        tag: str,
        image: str,
        mem_mib: int,
        warmup: str | None,
        progress: Any,
        network: dict[str, Any] | None = None,
        cpus: int | None = None,
    ) -> dict[str, Any]:
        assert network is None and cpus is None
        self.calls.append(("create_snapshot", (tag, image, mem_mib, warmup)))
        return {"tag": tag, "status": "ready", "dir": f"/x/{tag}"}

    def delete_snapshot(self, tag: str, cascade: bool, force: bool) -> None:
        if tag in self.missing:
            raise NotFound(f"snapshot {tag!r} not found")
        self.calls.append(("delete", (tag, cascade, force)))

    def exec(self, sandbox_id: str, args: list[str], timeout: float, env: Any, cwd: Any) -> Any:
        self.calls.append(("exec", (args, timeout)))
        return {"stdout": "", "stderr": "", "exit_code": 0}

    def eval(self, sandbox_id: str, code: str) -> dict[str, Any]:
        self.calls.append(("eval", code))
        return {"result": "2", "error": None, "exit_code": 0}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend()

    @contextlib.contextmanager
    def use(_args: Any) -> Iterator[FakeBackend]:
        yield backend

    monkeypatch.setattr(cli_main, "_backend", use)
    return backend


def test_fork_takes_v05_spellings_and_says_what_they_mean(
    fake: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.warning = "per_child_netns changes nothing: ..."
    argv = ["fork", "--tag", "py", "--n", "2", "--per-child-netns", "--prewarm", "--live-fork",
            "--hugepages", "--keep-workdir"]  # fmt: skip
    assert main(argv) == 0
    flags = SpawnFlags(per_child_netns=True, prewarm=True, live_fork=True, hugepages=True)
    assert fake.calls == [("spawn", ("py", 2, None, flags))]
    err = capsys.readouterr().err
    assert err.count("per_child_netns changes nothing") == 1  # one note, not one per child
    assert "--keep-workdir changes nothing" in err
    assert main(["spawn", "--tag", "py", "-n", "3", "--memory-limit-mib", "256"]) == 0
    assert fake.calls[-1] == ("spawn", ("py", 3, 256, SpawnFlags()))


def test_snapshot_takes_v05_template_flags(
    fake: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["snapshot", "--tag", "t", "--kernel", "/k", "--rootfs", "/r.ext4", "--rw", "--tap",
            "forkd-tap0", "--boot-wait-secs", "20", "--mem-size-mib", "256"]  # fmt: skip
    assert main(argv) == 0
    assert fake.calls == [("create_snapshot", ("t", "python", 256, None))]
    err = capsys.readouterr().err
    for said in ("kernel and rootfs paths are ignored", "tap is ignored",
                 "boot_wait_secs=20 is ignored", "rw is ignored"):  # fmt: skip
        assert said in err
    assert main(["snapshot", "--tag", "t", "--volume", "/data:/data"]) == 2
    assert "--volume is not supported" in capsys.readouterr().err
    assert len(fake.calls) == 1


def test_settle_secs_keeps_the_children_then_kills_them(
    fake: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fork", "--tag", "py", "-n", "2", "--settle-secs", "0.05", "--json"]) == 0
    assert [c[0] for c in fake.calls] == ["spawn", "kill", "kill"]
    out = capsys.readouterr()
    assert [c["id"] for c in json.loads(out.out)] == ["sb-0", "sb-1"]
    assert "--settle-secs" in out.err and "killed 2 children" in out.err
    assert main(["fork", "--tag", "py", "--settle-secs", "-1"]) == 2


def test_exec_timeout_secs_and_eval_after_double_dash(fake: FakeBackend) -> None:
    assert main(["exec", "sb-1", "--timeout-secs", "7", "--", "true"]) == 0
    assert fake.calls[-1] == ("exec", (["true"], 7.0))
    assert main(["eval", "sb-1", "--", "1", "+", "1"]) == 0
    assert fake.calls[-1] == ("eval", "1 + 1")
    assert main(["eval", "sb-1", "numpy.zeros(2)"]) == 0
    assert fake.calls[-1] == ("eval", "numpy.zeros(2)")


def test_eval_needs_code_once(fake: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "sb-1"]) == 2
    assert "no code given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["eval", "sb-1", "1", "--", "2"])
    assert exited.value.code == 2
    assert fake.calls == []


def test_rmi_takes_many_tags_and_goes_on_after_a_failure(
    fake: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.missing = {"b"}
    assert main(["rmi", "a", "b", "c", "--cascade"]) == 1
    assert fake.calls == [("delete", ("a", True, False)), ("delete", ("c", True, False))]
    out = capsys.readouterr()
    assert "deleted snapshot a" in out.out and "deleted snapshot c" in out.out
    assert "b: snapshot 'b' not found" in out.err and "1 of 3 deletions failed" in out.err
    assert main(["rmi", "a"]) == 0


def test_daemon_flags_after_the_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    """forkd v0.5 spelled them per verb (``forkd ls --daemon-url URL``); before it works too."""
    seen: list[tuple[str | None, str | None]] = []

    def choose(_settings: Any, *, daemon_url: Any, token: Any, local: bool) -> FakeBackend:
        seen.append((daemon_url, token))
        return FakeBackend()

    monkeypatch.setattr(cli_main, "choose_backend", choose)
    monkeypatch.setattr(FakeBackend, "close", lambda self: None, raising=False)
    main(["rmi", "t", "--daemon-url", "http://h:1", "--daemon-token", "tok"])
    main(["--daemon-url", "http://g:2", "rmi", "t"])
    assert seen == [("http://h:1", "tok"), ("http://g:2", None)]


def test_quickstart_refuses_a_docker_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", "--image", "python:3.12-slim"]) == 2
    assert "Docker images are not supported" in capsys.readouterr().err


def test_where_prints_the_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path / "h"), "where"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'h'}\n"
    assert main(["--home", str(tmp_path / "h"), "where", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths["home"] == str(tmp_path / "h") and paths["database"].endswith("forkd.db")


def _leftovers(settings: Settings) -> list[Path]:
    """A dead pool child, a live one, a half-written snapshot, and a dead sandbox record."""
    dead_pool = settings.run_dir / f"{POOL_PREFIX}{GONE_PID}-a"
    live_pool = settings.run_dir / f"{POOL_PREFIX}{os.getppid()}-b"  # an owner that runs
    staging = settings.snapshots_dir / f"{STAGING_PREFIX}{GONE_PID}-t"
    dead_sb = settings.run_dir / "sb-dead"
    for d in (dead_pool, live_pool, staging, dead_sb):
        d.mkdir(parents=True)
        (d / "f").write_bytes(b"x" * 5000)
    registry = Registry(settings.db_path)
    registry.put_sandbox(SandboxRow(
        id="sb-dead", snapshot_tag="py", pid=GONE_PID, run_dir=str(dead_sb), created_at_unix=1,
        state="dead", dead_reason="QEMU exited with 9",
    ))  # fmt: skip
    registry.close()
    return [dead_pool, live_pool, staging, dead_sb]


def test_cleanup_is_a_dry_run_unless_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(home=tmp_path / "h", shm_dir=tmp_path / "shm")
    dead_pool, live_pool, staging, dead_sb = _leftovers(settings)
    home = ["--home", str(settings.home)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORKD_SHM_DIR", str(tmp_path / "shm"))
        mp.setenv("FORKD_CGROUPS", "0")  # the host's empty cgroup leaves are not this test's
        assert main([*home, "cleanup"]) == 0
        out = capsys.readouterr().out
        assert "would remove 3 leftover(s)" in out and "dry run" in out
        assert str(dead_pool) in out and str(staging) in out and "QEMU exited with 9" in out
        assert str(live_pool) not in out
        assert all(p.exists() for p in (dead_pool, live_pool, staging, dead_sb))

        assert main([*home, "cleanup", "-y"]) == 0
        assert "removing 3 leftover(s)" in capsys.readouterr().out
        assert not dead_pool.exists() and not staging.exists() and not dead_sb.exists()
        assert live_pool.exists()
        registry = Registry(settings.db_path)
        assert registry.list_sandboxes() == []
        registry.close()
        assert main([*home, "cleanup"]) == 0
        assert "nothing to clean up" in capsys.readouterr().out


def test_quickstart_stops_at_a_failed_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import forkd.demo

    failing = [Check("qemu", "FAIL", "qemu-system-x86_64 not found", "apt install qemu")]
    monkeypatch.setattr(forkd.demo, "run_checks", lambda _s: failing)
    monkeypatch.setattr(forkd.demo, "run_demo", _must_not_run)
    assert main(["--home", str(tmp_path / "h"), "quickstart", "-y"]) == 1
    out = capsys.readouterr().out
    assert "FAIL qemu" in out and "preflight failed (qemu)" in out


def test_quickstart_asks_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forkd.demo

    monkeypatch.setattr(forkd.demo, "run_checks", lambda _s: [Check("qemu", "PASS", "ok")])
    monkeypatch.setattr(forkd.demo, "run_demo", _must_not_run)
    settings = Settings(home=tmp_path / "h")
    asked: list[str] = []

    def no(question: str) -> str:
        asked.append(question)
        return "n"

    assert forkd.demo.run_quickstart(settings, n=1, tag="q", assume_yes=False, ask=no) == 2
    assert len(asked) == 1 and "build the guest image" in asked[0]
    ran: list[tuple[int, str, bool]] = []

    async def fake_demo(_s: Settings, *, n: int, tag: str, reuse: bool = False) -> int:
        ran.append((n, tag, reuse))
        return 0

    monkeypatch.setattr(forkd.demo, "run_demo", fake_demo)
    assert main(["--home", str(settings.home), "quickstart", "-n", "4", "-y"]) == 0
    assert ran == [(4, "quickstart", True)]  # reuse: a second run keeps the template


async def _must_not_run(*_a: Any, **_k: Any) -> int:
    raise AssertionError("the demo must not run")


def test_console_scripts_are_declared() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "forkd": "forkd.cli:main",
        "forkd-controller": "forkd.cli.controller:main",
        "forkd-mcp": "forkd.mcp_server:main",
    }
    from forkd import mcp_server
    from forkd.cli import controller

    assert callable(controller.main) and callable(mcp_server.main)


def test_forkd_controller_serve_maps_to_the_daemon(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from forkd.api import server
    from forkd.cli import controller

    served: list[tuple[Settings, Any]] = []
    monkeypatch.setattr(server, "serve", lambda s, o: served.append((s, o)))
    token = tmp_path / "token"
    monkeypatch.setenv("FORKD_TOKEN_FILE", str(token))
    monkeypatch.setenv("FORKD_BRANCH_CONCURRENCY", "3")
    argv = ["serve", "--bind", "127.0.0.1:9999", "--state", "/var/lib/forkd/state.json",
            "--home", str(tmp_path / "h")]  # fmt: skip
    assert controller.main(argv) == 0
    ((settings, opts),) = served
    assert (opts.bind, opts.token_file, settings.branch_concurrency) == ("127.0.0.1:9999", token, 3)
    assert settings.home == tmp_path / "h"
    assert "--state is ignored" in capsys.readouterr().err
    assert controller.main(["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 2
    assert "TLS is not supported" in capsys.readouterr().err
    monkeypatch.setenv("FORKD_BRANCH_CONCURRENCY", "0")
    assert controller.main(["serve"]) == 2
    assert len(served) == 1


def test_settings_read_v05_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.errors import InvalidInput

    monkeypatch.setenv("FORKD_BRANCH_CONCURRENCY", "6")
    monkeypatch.setenv("FORKD_CGROUPS", "0")
    settings = Settings.from_env()
    assert (settings.branch_concurrency, settings.cgroups) == (6, False)
    assert Settings.from_env(branch_concurrency=2).branch_concurrency == 2
    for bad in ("0", "many"):
        monkeypatch.setenv("FORKD_BRANCH_CONCURRENCY", bad)
        with pytest.raises(InvalidInput, match=r"FORKD_BRANCH_CONCURRENCY|at least 1"):
            Settings.from_env()
    monkeypatch.delenv("FORKD_BRANCH_CONCURRENCY")
    with pytest.raises(InvalidInput, match="at least 1"):
        Settings.from_env(branch_concurrency=0)
    monkeypatch.setenv("FORKD_CGROUPS", "maybe")
    with pytest.raises(InvalidInput, match="FORKD_CGROUPS"):
        Settings.from_env()


def test_forkd_mcp_http_timeout() -> None:
    from forkd.mcp_server import http_timeout

    assert http_timeout({}) == 60.0
    assert http_timeout({"FORKD_HTTP_TIMEOUT": "5"}) == 5.0
    for bad in ("soon", "0"):
        with pytest.raises(ValueError, match="FORKD_HTTP_TIMEOUT"):
            http_timeout({"FORKD_HTTP_TIMEOUT": bad})


def test_forkd_mcp_command_serves_stdio(tmp_path: Path) -> None:
    """``forkd-mcp`` (the console script's function) answers an MCP initialize over stdio."""
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}}  # fmt: skip
    env = {**os.environ, "FORKD_URL": "http://127.0.0.1:9", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", "from forkd.mcp_server import main; main()"],
        input=json.dumps(hello) + "\n", capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    answer = json.loads(proc.stdout.splitlines()[0])
    assert answer["id"] == 1 and answer["result"]["serverInfo"]["name"] == "forkd"


def test_a_sweep_takes_only_its_own_pools_dirs_of_this_process(tmp_path: Path) -> None:
    """Two runtimes in one process share a home: one's sweep (at its start or close) must not
    remove the run dirs of the other's live pool, only its own pool's and dead owners'."""
    from forkd.runtime.leftovers import orphan_run_dirs
    from forkd.runtime.pool import pool_dir_token

    me = os.getpid()
    mine = tmp_path / f"{POOL_PREFIX}{me}-aaaaaa-1"
    other = tmp_path / f"{POOL_PREFIX}{me}-bbbbbb-2"  # another live runtime of this process
    dead = tmp_path / f"{POOL_PREFIX}{GONE_PID}-cccccc-3"
    old_dead = tmp_path / f"{POOL_PREFIX}{GONE_PID}-4"  # a name from before pool tokens
    for d in (mine, other, dead, old_dead):
        d.mkdir()
    assert pool_dir_token(mine.name) == "aaaaaa" and pool_dir_token(old_dead.name) is None
    assert orphan_run_dirs(tmp_path, set(), own_pool="aaaaaa") == sorted([mine, dead, old_dead])
    assert orphan_run_dirs(tmp_path, set()) == sorted([dead, old_dead])
