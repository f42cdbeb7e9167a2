"""forkd v0.5's own published clients against a real daemon of ours.

The original Python SDK (``forkd==0.5.3``: ``Controller``) and MCP server (``forkd-mcp==0.2.1``:
its tool functions, called directly) are installed into a separate venv, cached under
``~/.cache/forkd/compat-venv-<key>`` and made by this module itself, so a fresh clone needs
nothing set up beforehand. A script run with that venv's interpreter drives a real daemon whose
``FORKD_CGROUPS=0`` makes it behave as a host without a writable cgroup, prints what every call
answered as JSON, and the tests assert on that. Skipped (saying so) only when pip cannot reach
the package index. The original TypeScript SDK (never published) runs too when
``FORKD_ORIGINAL_SRC`` names a checkout of the original repository.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image

from .conftest import (
    WARMUP,
    DaemonProcess,
    clean_env,
    free_port,
    shutdown_daemon,
    write_token,
)

pytestmark = [pytest.mark.daemon, pytest.mark.vm]

ORIGINAL_CLIENTS = ("forkd==0.5.3", "forkd-mcp==0.2.1")
TEMPLATE = "orig"
# What pip prints when it cannot reach an index at all (as opposed to a real install failure).
_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
    "ConnectTimeoutError",
    "Read timed out",
)


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "forkd"


def compat_venv() -> Path:
    """The interpreter of a venv holding the original clients (made once, then reused)."""
    key_text = " ".join((*ORIGINAL_CLIENTS, sys.version))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    root = _cache_root() / f"compat-venv-{key}"
    python = root / "bin" / "python"
    done = root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build it at once
        if done.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--retries",
             "2", "--timeout", "30", *ORIGINAL_CLIENTS],
            capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
        if pip.returncode != 0:
            said = pip.stdout + pip.stderr
            shutil.rmtree(root, ignore_errors=True)
            if any(sign in said for sign in _OFFLINE_SIGNS):
                pytest.skip(f"pip cannot reach the package index: {said.strip()[-400:]}")
            raise AssertionError(f"installing {ORIGINAL_CLIENTS} failed:\n{said}")
        done.write_text(" ".join(ORIGINAL_CLIENTS) + "\n")
    return python


@pytest.fixture(scope="module")
def original_python() -> Path:
    return compat_venv()


@pytest.fixture(scope="module")
def nocgroup_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon of ours that behaves as a host without a writable cgroup (``FORKD_CGROUPS=0``),
    with template ``orig`` made through the REST API."""
    home = tmp_path_factory.mktemp("forkd-orig") / "home"
    build_image(
        Settings.from_env(home=home), ImageRequest.default("python", None, None), lambda _: None
    )
    token_file = home.parent / "token"
    proc = DaemonProcess(
        home=home,
        port=free_port(),
        token=write_token(token_file),
        token_file=token_file,
        env=clean_env(FORKD_CGROUPS="0"),
    )
    proc.start()
    try:
        with proc.client(timeout=600) as c:
            r = c.post("/v1/snapshots", json={"tag": TEMPLATE, "warmup": WARMUP})
            assert r.status_code == 201, r.text
        yield proc
    finally:
        shutdown_daemon(proc)


def run_original(python: Path, daemon: DaemonProcess, script: str, *args: str) -> Any:
    """Run ``script`` with the original clients' interpreter; its last stdout line is JSON."""
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FORKD_URL=daemon.url, FORKD_TOKEN=daemon.token or "", FORKD_HTTP_TIMEOUT="600")
    proc = subprocess.run(
        [str(python), "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd="/",  # never import this checkout's forkd by accident
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The original Controller, every method it has, plus the routes it has no method for (snapshot
# info) through its own request helper, as a caller of v0.5 would.
CONTROLLER_SCRIPT = r"""
import json, sys
import forkd
from forkd import Controller, ControllerError

assert "site-packages" in forkd.__file__, forkd.__file__   # the published package, not ours
tag = sys.argv[1]
c = Controller(timeout=300)
out = {"module": forkd.__file__}
out["snapshots"] = c.list_snapshots()
kids = c.spawn_sandboxes(tag, n=2, memory_limit_mib=256)
out["spawn"] = kids
sid = kids[0]["id"]
out["exec"] = c.exec_command(sid, ["python3", "-c", "print(6 * 7)"])
out["exec_fail"] = c.exec_command(sid, ["sh", "-c", "echo oops >&2; exit 3"], timeout_secs=10)
out["eval"] = c.eval_code(sid, "numpy.arange(5).sum()")
out["eval_error"] = c.eval_code(sid, "1 / 0")
c.eval_code(sid, "STATE = 41")
out["ping"] = c.ping_sandbox(sid)
out["get"] = c.get_sandbox(sid)
out["branch_legacy_diff"] = c.branch_sandbox(sid, diff=True)
out["branch_full"] = c.branch_sandbox(sid, tag="orig-full", mode="full", measure_diff=True)
out["branch_live"] = c.branch_sandbox(sid, tag="orig-live", mode="live", wait=False)
child = c.spawn_sandboxes(out["branch_legacy_diff"]["tag"], n=1)[0]
out["child_eval"] = c.eval_code(child["id"], "STATE + 1")
out["list"] = c.list_sandboxes()
out["info"] = c._request("GET", f"/v1/snapshots/{tag}/info")
out["branch_info"] = c._request("GET", "/v1/snapshots/orig-full/info")
for s in [*kids, child]:
    c.kill_sandbox(s["id"])
out["list_after_kill"] = c.list_sandboxes()
try:
    c.get_sandbox(sid)
except ControllerError as exc:
    out["get_killed"] = {"status": exc.status, "body": exc.body}
try:
    c.spawn_sandboxes("no-such-tag")
except ControllerError as exc:
    out["spawn_unknown"] = {"status": exc.status, "body": exc.body}
import time
deadline = time.time() + 120
while any(s["tag"] == "orig-live" and s["status"] == "writing" for s in c.list_snapshots()):
    assert time.time() < deadline, "live branch still writing"
    time.sleep(0.2)
for t in (out["branch_legacy_diff"]["tag"], "orig-full", "orig-live"):
    c.delete_snapshot(t)
out["snapshots_after_delete"] = [s["tag"] for s in c.list_snapshots()]
try:
    c.delete_snapshot("orig-full")
except ControllerError as exc:
    out["delete_again"] = {"status": exc.status, "body": exc.body}
print(json.dumps(out))
"""


def test_original_controller(original_python: Path, nocgroup_daemon: DaemonProcess) -> None:
    out = run_original(original_python, nocgroup_daemon, CONTROLLER_SCRIPT, TEMPLATE)
    assert "site-packages" in out["module"]
    assert [s["tag"] for s in out["snapshots"]] == [TEMPLATE]
    assert out["snapshots"][0]["status"] == "ready" and out["snapshots"][0]["bootable"] is True

    # memory_limit_mib=256 on a host without a writable cgroup: accepted, not enforced, said so.
    assert len(out["spawn"]) == 2
    for sb in out["spawn"]:
        assert sb["snapshot_tag"] == TEMPLATE and sb["pid"] > 0
        assert "memory_limit_mib=256 is not enforced" in sb["warning"]
        assert "FORKD_CGROUPS=0" in sb["warning"]
        assert sb["memory_limit_mib"] is None
    assert out["exec"]["stdout"] == "42\n" and out["exec"]["exit_code"] == 0
    assert out["exec_fail"]["exit_code"] == 3 and out["exec_fail"]["stderr"] == "oops\n"
    assert out["eval"]["result"] == "np.int64(10)" or out["eval"]["result"] == "10"
    assert out["eval"]["error"] is None and out["eval"]["exit_code"] == 0
    assert "ZeroDivisionError" in out["eval_error"]["error"]
    assert out["ping"]["pong"] is True and "numpy_version" in out["ping"]
    assert out["get"]["id"] == out["spawn"][0]["id"]

    legacy = out["branch_legacy_diff"]
    assert legacy["status"] == "ready" and legacy["mode"] == "diff"
    assert legacy["tag"].startswith("branch-") and legacy["pause_ms"] >= 0
    full = out["branch_full"]
    assert (full["tag"], full["mode"], full["status"]) == ("orig-full", "full", "ready")
    assert full["diff_ms"] is not None and full["diff_physical_bytes"] is not None
    assert (out["branch_live"]["tag"], out["branch_live"]["status"]) == ("orig-live", "writing")
    assert out["child_eval"]["result"] == "42"

    listed = {s["id"] for s in out["list"]}
    assert {s["id"] for s in out["spawn"]} <= listed and len(listed) == 3
    assert out["list_after_kill"] == []
    assert out["get_killed"]["status"] == 404 and "error" in out["get_killed"]["body"]
    assert out["spawn_unknown"]["status"] == 404

    info = out["info"]
    assert info["tag"] == TEMPLATE and info["chain_depth"] == 0
    assert {"ancestors", "dependents", "dir"} <= set(info)
    assert out["branch_info"]["tag"] == "orig-full"
    assert out["snapshots_after_delete"] == [TEMPLATE]
    assert out["delete_again"]["status"] == 404


# forkd-mcp 0.2.1's tool functions, called as the MCP server calls them (defaults included:
# spawn_sandboxes sends memory_limit_mib=256 every time).
MCP_SCRIPT = r"""
import json, sys
import forkd_mcp.server as m

tag = sys.argv[1]
out = {"module": m.__file__}
out["list_snapshots"] = m.list_snapshots()
kids = m.spawn_sandboxes(tag, n=1)
out["spawn"] = kids
sid = kids[0]["id"]
out["spawn_flags"] = m.spawn_sandboxes(tag, n=1, per_child_netns=True, prewarm=True,
                                       live_fork=True)
out["exec"] = m.exec_command(sid, ["python3", "-c", "print(2 + 2)"])
out["eval"] = m.eval_code(sid, "'mcp-' + str(3 * 3)")
out["ping"] = m.ping_sandbox(sid)
out["get"] = m.get_sandbox(sid)
out["list"] = m.list_sandboxes()
m.exec_command(sid, ["sh", "-c", "echo READY_TO_BRANCH > /tmp/progress.log"])
out["wait_for_text"] = m.wait_for_text(sid, "/tmp/progress.log", "READY_TO_BRANCH",
                                       timeout_secs=60)
out["branch"] = m.branch_sandbox(sid, tag="mcp-branch", mode="diff")
out["branch_legacy"] = m.branch_sandbox(sid, diff=True, measure_diff=False)
for s in [*kids, *out["spawn_flags"]]:
    out.setdefault("kill", []).append(m.kill_sandbox(s["id"]))
out["list_after"] = m.list_sandboxes()
# v0.5's form: host kernel + rootfs paths and a boot sleep; this daemon boots its image instead.
out["create_snapshot"] = m.create_snapshot("orig-mcp-made", kernel="/nonexistent/vmlinux",
                                           rootfs="/nonexistent/rootfs.ext4", boot_wait_secs=5)
made = m.spawn_sandboxes("orig-mcp-made", n=1, memory_limit_mib=512)[0]
out["made_eval"] = m.eval_code(made["id"], "6 * 7")
m.kill_sandbox(made["id"])
print(json.dumps(out))
"""


def test_original_mcp_tools(original_python: Path, nocgroup_daemon: DaemonProcess) -> None:
    out = run_original(original_python, nocgroup_daemon, MCP_SCRIPT, TEMPLATE)
    assert "forkd_mcp" in out["module"]
    assert TEMPLATE in [s["tag"] for s in out["list_snapshots"]]
    (sb,) = out["spawn"]
    assert "memory_limit_mib=256 is not enforced" in sb["warning"]
    (flagged,) = out["spawn_flags"]
    assert "per_child_netns changes nothing" in flagged["warning"]
    assert "prewarm changes nothing" in flagged["warning"]
    assert "live_fork" not in flagged["warning"]  # any sandbox can be live-branched
    assert out["exec"] == {**out["exec"], "stdout": "4\n", "stderr": "", "exit_code": 0}
    assert out["eval"]["result"] == "'mcp-9'"
    assert out["ping"]["pong"] is True
    assert out["get"]["id"] == sb["id"] and len(out["list"]) == 2
    assert out["wait_for_text"]["found"] is True
    assert "READY_TO_BRANCH" in out["wait_for_text"]["last_excerpt"]
    assert (out["branch"]["tag"], out["branch"]["status"]) == ("mcp-branch", "ready")
    assert out["branch_legacy"]["mode"] == "diff"
    assert out["kill"] == [{"id": s["id"], "killed": True} for s in (sb, flagged)]
    assert out["list_after"] == []
    made = out["create_snapshot"]
    assert (made["tag"], made["status"], made["bootable"]) == ("orig-mcp-made", "ready", True)
    for said in ("kernel and rootfs paths are ignored", "boot_wait_secs=5 is ignored"):
        assert said in made["warning"]
    assert out["made_eval"]["result"] == "42"
    with contextlib.suppress(Exception), nocgroup_daemon.client() as c:
        for t in ("mcp-branch", out["branch_legacy"]["tag"], "orig-mcp-made"):
            c.delete(f"/v1/snapshots/{t}")


def test_v05_sandbox_code_runs_on_our_sdk(
    nocgroup_daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forkd v0.5's ``Sandbox`` usage, unchanged, on this package's SDK (the original class
    shelled out to ``forkd fork`` and spoke TCP to the guest; ours spawns through the daemon)."""
    from forkd import EvalError, Sandbox

    monkeypatch.setenv("FORKD_URL", nocgroup_daemon.url)
    monkeypatch.setenv("FORKD_TOKEN", nocgroup_daemon.token or "")
    monkeypatch.setenv("FORKD_TAG", TEMPLATE)
    with Sandbox() as sb:  # template from $FORKD_TAG
        assert sb.tag == TEMPLATE
        assert sb.commands.run("python3 -c 'print(1 + 1)'").stdout == "2\n"
        assert sb.eval("numpy.zeros(3).tolist()") == "[0.0, 0.0, 0.0]"
        try:
            sb.eval("undefined_name")
        except RuntimeError as exc:  # how v0.5 code catches it
            assert isinstance(exc, EvalError) and "NameError" in str(exc)
        else:
            raise AssertionError("eval of a failing expression did not raise")
        assert sb.ping()["pong"] is True
        sid = sb.id
    monkeypatch.delenv("FORKD_TAG")
    with Sandbox(tag=TEMPLATE, timeout=60, memory_limit_mib=256) as sb2:
        assert "memory_limit_mib=256 is not enforced" in sb2.info["warning"]
        assert sb2.eval_result("1 / 0").error is not None  # the rich result never raises
    with nocgroup_daemon.client() as c:
        assert {s["id"] for s in c.get("/v1/sandboxes").json()}.isdisjoint({sid, sb2.id})


# forkd v0.5's TypeScript SDK was never published: given a checkout of the original repository
# (FORKD_ORIGINAL_SRC), its sdk/typescript/src is compiled with this repo's TypeScript and run.
TS_SCRIPT = r"""
import { Controller, Sandbox } from "./dist/index.js";
const tag = process.argv[2];
const ctrl = new Controller({ timeoutMs: 300_000 });
const out = {};
out.snapshots = (await ctrl.listSnapshots()).map((s) => s.tag);
const [info] = await ctrl.spawnSandboxes({ snapshotTag: tag, n: 1, memoryLimitMib: 256 });
out.spawn = info;
const sb = new Sandbox(ctrl, info);
out.exec = await sb.exec(["python3", "-c", "print(3 * 3)"], { timeoutSecs: 10 });
out.eval = await sb.eval("'ts-' + str(1 + 1)");
out.evalError = null;
try { await sb.eval("1 / 0"); } catch (e) { out.evalError = String(e.message); }
out.ping = await sb.ping();
await sb.eval("STATE = 'from-ts'");
out.branch = await sb.branch({ diff: true });
out.branchMeasured = await ctrl.branchSandbox(sb.id, { tag: "ts-full", measure_diff: true });
const [kid] = await ctrl.spawnSandboxes({ snapshotTag: out.branch.tag, n: 1 });
out.kidEval = await ctrl.evalCode(kid.id, "STATE");
await ctrl.killSandbox(kid.id);
await sb.kill();
await sb.kill();  // idempotent
out.withResult = await Sandbox.with({ snapshotTag: tag, memoryLimitMib: 256 }, async (s) => {
  const r = await s.exec(["echo", "with"]);
  return r.stdout;
});
out.left = (await ctrl.listSandboxes()).map((s) => s.id);
await ctrl.deleteSnapshot(out.branch.tag);
await ctrl.deleteSnapshot("ts-full");
try { await ctrl.getSandbox(sb.id); } catch (e) { out.gone = { status: e.status, body: e.body }; }
console.log(JSON.stringify(out));
"""


def test_original_typescript_sdk(nocgroup_daemon: DaemonProcess, tmp_path: Path) -> None:
    src = os.environ.get("FORKD_ORIGINAL_SRC")
    if not src:
        pytest.skip("FORKD_ORIGINAL_SRC (a checkout of the original forkd repository) not set")
    ts_src = Path(src) / "sdk" / "typescript" / "src"
    sdk = Path(__file__).resolve().parents[2] / "sdk" / "typescript"
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node/npm are not installed (scripts/setup.sh test installs them)")
    if not (sdk / "node_modules").is_dir():
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"], cwd=sdk, check=True)
    shutil.copytree(ts_src, tmp_path / "src")
    config = {
        "compilerOptions": {
            "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
            "lib": ["ES2022"], "outDir": "./dist", "rootDir": "./src", "strict": True,
            "skipLibCheck": True, "types": ["node"],
            "typeRoots": [str(sdk / "node_modules" / "@types")],
        },
        "include": ["src/**/*"],
    }  # fmt: skip
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    (tmp_path / "package.json").write_text('{"type": "module"}')
    tsc = subprocess.run(
        [str(sdk / "node_modules" / ".bin" / "tsc"), "-p", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr
    (tmp_path / "run.mjs").write_text(TS_SCRIPT)
    env = {**clean_env(), "FORKD_URL": nocgroup_daemon.url,
           "FORKD_TOKEN": nocgroup_daemon.token or ""}  # fmt: skip
    proc = subprocess.run(
        [node, "run.mjs", TEMPLATE], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert TEMPLATE in out["snapshots"]
    assert "memory_limit_mib=256 is not enforced" in out["spawn"]["warning"]
    assert out["exec"]["stdout"] == "9\n" and out["eval"] == "'ts-2'"
    assert out["evalError"] is not None and "ZeroDivisionError" in out["evalError"]
    assert out["ping"]["pong"] is True
    assert out["branch"]["mode"] == "diff" and out["branchMeasured"]["diff_ms"] is not None
    assert out["kidEval"]["result"] == "'from-ts'"
    assert out["withResult"] == "with\n" and out["left"] == []
    assert out["gone"]["status"] == 404
