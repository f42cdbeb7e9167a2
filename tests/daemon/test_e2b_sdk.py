"""The unmodified E2B SDKs drive a real daemon and real VMs (docs/e2b.md).

Each pinned SDK version gets its own venv under ~/.cache/forkd (made here with pip, once); a
driver script in tests/daemon/e2b/ runs with that venv's python against the tier's daemon and
prints what it observed as JSON. e2b 2.50 calls the v1 control-plane paths, 2.63 the v2 ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import TEMPLATE_TAG, DaemonProcess

pytestmark = [pytest.mark.daemon, pytest.mark.vm]

SCRIPTS = Path(__file__).parent / "e2b_scripts"
SDK_CORE_NEW = ("e2b==2.63.*", "e2b-code-interpreter==2.11.*")
SDK_CORE_OLD = ("e2b==2.50.*",)
SDK_JS = ("e2b@~2.51.0", "@e2b/code-interpreter@~2.8.0")
_UNREACHABLE = (
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Could not fetch URL",
    "No route to host",
)


def _cache_dir() -> Path:
    base = os.environ.get("FORKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forkd"
    )
    return Path(base)


def sdk_python(specs: tuple[str, ...]) -> Path:
    """The python of a venv with ``specs`` installed (made on first use; skip if no index)."""
    key = hashlib.sha256("\n".join((sys.version, *specs)).encode()).hexdigest()[:12]
    venv = _cache_dir() / f"e2b-sdk-{key}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *specs],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            output = r.stdout + r.stderr
            if any(marker in output for marker in _UNREACHABLE):
                pytest.skip(f"package index unreachable, cannot install {specs}: {output[-300:]}")
            raise AssertionError(f"pip install {specs} failed:\n{output[-3000:]}")
        done.write_text("\n".join(specs) + "\n")
    return python


def js_project(specs: tuple[str, ...]) -> Path:
    """A node project dir with the npm ``specs`` installed (once; skip without node or npm)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are needed for the JS SDK tests")
    key = hashlib.sha256("\n".join(specs).encode()).hexdigest()[:12]
    project = _cache_dir() / f"e2b-js-{key}"
    done = project / ".complete"
    project.parent.mkdir(parents=True, exist_ok=True)
    with open(str(project) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return project
        shutil.rmtree(project, ignore_errors=True)
        project.mkdir()
        (project / "package.json").write_text('{"name": "forkd-e2b-js", "private": true}\n')
        r = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *specs],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            shutil.rmtree(project, ignore_errors=True)
            output = r.stdout + r.stderr
            if any(m in output for m in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT")):
                pytest.skip(f"npm registry unreachable, cannot install {specs}: {output[-300:]}")
            raise AssertionError(f"npm install {specs} failed:\n{output[-3000:]}")
        done.write_text("\n".join(specs) + "\n")
    return project


def e2b_env(daemon: DaemonProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "PYTHON"))}
    env.update(
        E2B_API_URL=f"{daemon.url}/e2b",
        E2B_SANDBOX_URL=f"{daemon.url}/e2b/sandbox",
        E2B_API_KEY=daemon.token or "unused-without-a-daemon-token",
    )
    return env


def run_script(python: Path, script: str, daemon: DaemonProcess) -> dict[str, Any]:
    r = subprocess.run(
        [str(python), str(SCRIPTS / script), TEMPLATE_TAG],
        capture_output=True,
        text=True,
        timeout=600,
        env=e2b_env(daemon),
    )
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    assert "fatal" not in out, out["fatal"]
    return out


@pytest.fixture(scope="module")
def new_sdk() -> Path:
    return sdk_python(SDK_CORE_NEW)


@pytest.fixture(scope="module")
def old_sdk() -> Path:
    return sdk_python(SDK_CORE_OLD)


def check_core(out: dict[str, Any]) -> None:
    assert out["echo"] == {"stdout": "hi\n", "stderr": "", "exit_code": 0}
    assert out["failing"] == {
        "exception": "CommandExitException",
        "exit_code": 3,
        "stderr": "oops\n",
    }
    assert out["env"] == "bar-baz\n"  # create's envVars under the command's own envs
    assert out["cwd"] == "/home/user\n"
    streaming = out["streaming"]
    assert streaming["chunks"] == ["one\n", "two\n"] and streaming["stdout"] == "one\ntwo\n"
    assert streaming["first_before_end_s"] > 1.5, "on_stdout only saw output at the end"
    bg = out["background"]
    assert bg["listed"] and bg["killed"] is True and not bg["listed_after"]
    assert bg["waited"] == "exit 137"
    assert out["stdin"] == "got:hello\n"
    assert out["files"] == {
        "path": "/home/user/notes/hello.txt",
        "content": "hello file",
        "names": ["hello.txt"],
        "exists": True,
        "moved": "hello file",
        "gone": True,
        "via_shell": "missing\n",
    }
    # commands and files act as E2B's default user, or as root when asked
    assert out["users"] == {
        "default": "user\n/home/user\n/home/user\n",
        "root": "root\n/root\n/root\n",
        "owner": "1000:1000\n",
        "info_owner": "user",
        "root_dir": "CommandExitException",
        "root_file": "InvalidArgumentException",
        "root_reads": "s",
        "unknown_command": "InvalidArgumentException",
        "unknown_file": "InvalidArgumentException",
    }
    # a PTY: a terminal of the size asked for, as the default user, resized, killed
    assert out["pty"] == {"tty": True, "size": True, "user": True, "resized": True, "killed": True}
    # several files in one multipart upload; file-like (octet-stream) and gzip uploads; depth
    assert out["more_files"] == {
        "many": ["/tmp/many/a.txt", "/tmp/many/sub/b.txt"],
        "streamed": "/tmp/many/c.bin",
        "zipped": "gzipped",
        "raw_ok": True,
        "deep": [f"/tmp/many/{p}" for p in ("a.txt", "c.bin", "d.txt", "sub", "sub/b.txt")],
        "dir_type": "dir",
    }
    # watch_dir polls (CreateWatcher / GetWatcherEvents): the net change between two looks
    assert out["watch"] == {
        "first": [["a.txt", "create"], ["d", "create"], ["d/b.txt", "create"]],
        "second": [["d/b.txt", "remove"], ["a.txt", "write"]],
    }
    assert out["missing_file"] == "FileNotFoundException"
    assert out["connect"] == {"same_id": True, "stdout": "from-second\n"}
    assert out["info"] == {
        "template": TEMPLATE_TAG,
        "metadata": {"suite": "e2b"},
        "extended": True,
        "listed": True,
        "running": True,
    }
    # fork = BRANCH + spawn: each child sees the parent's files and env; the parent is unchanged
    assert out["fork"] == {
        "children": ["parent-state\nbar\n"] * 2,
        "parent_after": "parent-state\n",
    }
    # pause = BRANCH + stop; connect resumes it under the same id with its files and env
    assert out["pause_resume"] == {
        "paused": True,
        "state": "paused",
        "pause_again": False,
        "same_id": True,
        "kept": "kept\npaused\n",
        "running": "running",
        "killed": True,
    }
    assert out["unknown_connect"] == "SandboxNotFoundException"
    # timeout=2: the daemon's reaper killed it; killing it again finds nothing
    assert out["short_timeout"] == {"running_after": False, "killed_again": False}
    assert out["kill"] == {"first": True, "second": False}


def test_e2b_sdk_v2_paths(new_sdk: Path, daemon: DaemonProcess, api: httpx.Client) -> None:
    out = run_script(new_sdk, "sdk_core.py", daemon)
    check_core(out)
    ids = {sb["id"] for sb in api.get("/v1/sandboxes").json()}
    assert out["sandbox_id"] not in ids
    # the templates made for forks and pauses went with the sandboxes that needed them
    tags = {s["tag"] for s in api.get("/v1/snapshots").json()}
    assert not [t for t in tags if t.startswith("e2b-")], tags


def test_e2b_sdk_v1_paths(old_sdk: Path, daemon: DaemonProcess) -> None:
    check_core(run_script(old_sdk, "sdk_core.py", daemon))


def test_e2b_code_interpreter(new_sdk: Path, daemon: DaemonProcess) -> None:
    out = run_script(new_sdk, "sdk_interpreter.py", daemon)
    assert out["template"] == TEMPLATE_TAG  # Sandbox.create(): FORKD_E2B_DEFAULT_TEMPLATE
    assert out["first"] == "2"
    assert out["assign"] is None
    assert out["use"] == "2"
    assert out["string"] == "abc"
    assert out["warm"] == "warm"  # the template's warm-up state
    err = out["error"]
    assert err["name"] == "ZeroDivisionError" and err["value"] == "division by zero"
    assert "return 1 / 0" in err["traceback"] and "in f" in err["traceback"]
    prints = out["prints"]
    assert prints["stdout"] == ["hello\n"] and prints["stderr"] == ["warn\n"]
    assert prints["text"] == "42" and prints["callback"] == ["hello\n"]
    live = out["live"]  # print output reaches on_stdout while the cell still runs
    assert live["lines"] == ["one\n", "two\n"] and live["stdout"] == ["one\n", "two\n"]
    assert live["first_before_end_s"] > 1.0
    assert out["contexts"] == {"in_ctx": "10", "default_error": "NameError", "listed": True}
    assert out["language"] == "SandboxException"
    assert out["commands"] == "hi\n"
    assert out["fork"] == {"child": "42", "parent": "41"}
    assert out["kill"] is True


def test_e2b_js_sdks(daemon: DaemonProcess) -> None:
    project = js_project(SDK_JS)
    node = shutil.which("node")
    assert node is not None
    r = subprocess.run(
        [node, str(SCRIPTS / "sdk_js.cjs"), TEMPLATE_TAG, str(project)],
        capture_output=True,
        text=True,
        timeout=600,
        env=e2b_env(daemon),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "fatal" not in out, out["fatal"]
    assert out["echo"] == {"stdout": "hi\n", "exit_code": 0}
    assert out["failing"] == {"exception": "CommandExitError", "exit_code": 3}
    assert out["env"] == "bar\n"
    assert out["streaming"]["chunks"] == ["one\n", "two\n"]
    assert out["streaming"]["first_before_end_s"] > 1.5
    assert out["background"] == {"listed": True, "killed": True, "waited": "exit 137"}
    assert out["files"] == {"content": "from js", "names": ["js.txt"], "exists": False}
    assert out["connect"] == "second\n"
    assert out["kill"] == {"first": True, "second": False}
    assert out["interpreter"] == {
        "text": "2",
        "error": "ZeroDivisionError",
        "traceback": True,
        "stdout": ["hello\n"],
    }


# --- the wire, without an SDK ----------------------------------------------------------------


@contextlib.contextmanager
def e2b_sandbox(daemon: DaemonProcess) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    headers = {"X-API-KEY": daemon.token or ""}
    with httpx.Client(base_url=f"{daemon.url}/e2b", headers=headers, timeout=120) as c:
        r = c.post("/v2/sandboxes", json={"templateID": TEMPLATE_TAG, "metadata": {}})
        assert r.status_code == 201, r.text
        body = r.json()
        try:
            yield c, body
        finally:
            c.delete(f"/sandboxes/{body['sandboxID']}")


def test_e2b_wire_errors(daemon: DaemonProcess) -> None:
    base = f"{daemon.url}/e2b"
    # the control plane: X-API-KEY is the daemon token; errors are {"code", "message"}
    r = httpx.post(f"{base}/v2/sandboxes", json={"templateID": TEMPLATE_TAG})
    assert r.status_code == 401 and r.json()["code"] == 401
    r = httpx.post(f"{base}/v2/sandboxes", json={"templateID": TEMPLATE_TAG},
                   headers={"X-API-KEY": "wrong-key-0123456789"})  # fmt: skip
    assert r.status_code == 401
    with e2b_sandbox(daemon) as (c, sb):
        sid, token = sb["sandboxID"], sb["envdAccessToken"]
        assert sb["envdVersion"] and sb["clientID"] and sb["templateID"] == TEMPLATE_TAG
        assert c.post("/v2/sandboxes", json={"templateID": "no-such-tag"}).status_code == 404
        r = c.post("/v2/sandboxes", json={"templateID": "base"})  # the SDK's default: ours
        assert r.status_code == 201 and r.json()["templateID"] == TEMPLATE_TAG
        assert c.delete(f"/sandboxes/{r.json()['sandboxID']}").status_code == 204
        assert c.post("/v2/sandboxes", content=b"{nope").status_code == 400
        assert c.post("/v2/sandboxes", json={"timeout": 5}).status_code == 400
        r = c.post(f"/sandboxes/{sid}/timeout", json={"timeout": -1})
        assert r.status_code == 400 and "timeout" in r.json()["message"]
        r = c.get("/templates")
        assert r.status_code == 501 and "not supported" in r.json()["message"]
        assert c.get("/sandboxes/sb-nosuch").status_code == 404

        sbx = f"{daemon.url}/e2b/sandbox"
        good = {"E2b-Sandbox-Id": sid, "X-Access-Token": token}
        # sandbox traffic needs the sandbox's own token
        assert httpx.get(f"{sbx}/health", headers={"E2b-Sandbox-Id": sid}).status_code == 401
        bad = {"E2b-Sandbox-Id": sid, "X-Access-Token": daemon.token or "x"}
        assert httpx.get(f"{sbx}/health", headers=bad).status_code == 401
        assert httpx.get(f"{sbx}/health", headers=good).status_code == 204
        gone = {"E2b-Sandbox-Id": "sb-nosuch", "X-Access-Token": token}
        assert httpx.get(f"{sbx}/health", headers=gone).status_code == 502

        # Connect unary: errors are {"code": "<connect code>", "message"}
        unary = {**good, "Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        r = httpx.post(f"{sbx}/filesystem.Filesystem/Stat", json={"path": "/nope"}, headers=unary)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        r = httpx.post(f"{sbx}/filesystem.Filesystem/Stat", content=b"[1]", headers=unary)
        assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
        r = httpx.post(f"{sbx}/process.Process/StreamInput", json={}, headers=unary)
        assert r.status_code == 501 and r.json()["code"] == "unimplemented"
        r = httpx.post(f"{sbx}/process.Process/Update", json={}, headers=unary)
        assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
        r = httpx.post(f"{sbx}/process.Process/SendSignal",
                       json={"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"},
                       headers=unary)  # fmt: skip
        assert r.status_code == 404 and r.json()["code"] == "not_found"

        # Connect server stream: envelopes, the start event first, end-of-stream last
        stream = {**good, "Content-Type": "application/connect+json"}
        msg = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "echo a; exit 4"]}})
        body = struct.pack(">BI", 0, len(msg)) + msg.encode()
        r = httpx.post(f"{sbx}/process.Process/Start", content=body, headers=stream)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/connect+json"
        frames = _frames(r.content)
        assert frames[0] == (
            0,
            {"event": {"start": {"pid": frames[0][1]["event"]["start"]["pid"]}}},
        )
        assert (0, {"event": {"data": {"stdout": "YQo="}}}) in frames
        assert frames[-2] == (0, {"event": {"end": {"exited": True, "exitCode": 4,
                                                     "status": "exit status 4"}}})  # fmt: skip
        assert frames[-1] == (2, {})
        r = httpx.post(f"{sbx}/process.Process/Start", content=b"\x00\x00", headers=stream)
        assert r.status_code == 200 and _frames(r.content)[-1][1]["error"]["code"] == (
            "invalid_argument"
        )

        # code interpreter errors are plain text with the status the SDK maps
        r = httpx.post(f"{sbx}/execute", json={"code": "1", "context_id": "nosuch"}, headers=good)
        assert r.status_code == 404
        r = httpx.get(f"{sbx}/nosuch", headers=good)
        assert r.status_code == 404 and "message" in r.json()


def _frames(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        flags, n = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + n])))
        data = data[5 + n :]
    return out


def test_e2b_egress_maps_onto_forkd_policies(daemon: DaemonProcess, api: httpx.Client) -> None:
    headers = {"X-API-KEY": daemon.token or ""}
    cases = [
        ({"allow_internet_access": False}, ("none", [])),
        ({"network": {"allowOut": ["example.com"]}}, ("allowlist", ["example.com"])),
        ({"network": {"denyOut": ["0.0.0.0/0"]}}, ("none", [])),
    ]
    with httpx.Client(base_url=f"{daemon.url}/e2b", headers=headers, timeout=120) as c:
        for extra, (egress, allow) in cases:
            r = c.post("/v2/sandboxes", json={"templateID": TEMPLATE_TAG, **extra})
            assert r.status_code == 201, r.text
            sid = r.json()["sandboxID"]
            try:
                net = api.get(f"/v1/sandboxes/{sid}").json()["network"]
                assert (net["egress"], net["allow"]) == (egress, allow), extra
                detail = c.get(f"/sandboxes/{sid}").json()
                assert detail["allowInternetAccess"] is False
            finally:
                assert c.delete(f"/sandboxes/{sid}").status_code == 204
        r = c.post("/v2/sandboxes", json={"templateID": TEMPLATE_TAG,
                                          "network": {"denyOut": ["10.0.0.0/8"]}})  # fmt: skip
        assert r.status_code == 400 and "denyOut" in r.json()["message"]


def test_forkd_exec_runs_as_root_or_the_named_user(api: httpx.Client) -> None:
    """forkd's own exec stays root by default (as in v0.5); ``user`` names another account."""
    r = api.post("/v1/sandboxes", json={"snapshot_tag": TEMPLATE_TAG})
    assert r.status_code == 201, r.text
    sid = r.json()[0]["id"]
    try:
        who = ["/bin/sh", "-c", "id -un; echo $HOME"]
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"args": who})
        assert r.status_code == 200 and r.json()["stdout"] == "root\n/root\n", r.text
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"args": who, "user": "user"})
        assert r.status_code == 200 and r.json()["stdout"] == "user\n/home/user\n", r.text
        r = api.post(
            f"/v1/sandboxes/{sid}/exec/stream", json={"args": ["id", "-u"], "user": "user"}
        )
        assert r.status_code == 200 and '"data":"1000\\n"' in r.text, r.text
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"args": ["true"], "user": "nobody-here"})
        assert r.status_code == 400 and "unknown user" in r.json()["error"], r.text
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def _execute(sbx: str, headers: dict[str, str], code: str) -> list[dict[str, Any]]:
    r = httpx.post(f"{sbx}/execute", json={"code": code}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_e2b_sandbox_survives_a_daemon_restart(daemon: DaemonProcess) -> None:
    """E2B state is kept in the daemon's home (e2b.db): after a restart a running sandbox is
    served with its token, metadata and deadline, and a paused one resumes with its memory and
    files."""
    with e2b_sandbox(daemon) as (c, sb):
        sid, token = sb["sandboxID"], sb["envdAccessToken"]
        body = {"templateID": TEMPLATE_TAG, "timeout": 900, "metadata": {"role": "paused"}}
        r = c.post("/v2/sandboxes", json=body)
        assert r.status_code == 201, r.text
        pid, ptoken = r.json()["sandboxID"], r.json()["envdAccessToken"]
        try:
            sbx = f"{daemon.url}/e2b/sandbox"
            p_headers = {"E2b-Sandbox-Id": pid, "X-Access-Token": ptoken}
            files = {"file": ("kept.txt", b"kept on disk")}
            assert httpx.post(f"{sbx}/files", files=files, headers=p_headers).status_code == 200
            _execute(sbx, p_headers, "kept_in_memory = 41")
            assert c.post(f"/sandboxes/{pid}/pause", json={}).status_code == 204
            before = c.get(f"/sandboxes/{pid}").json()
            running_before = c.get(f"/sandboxes/{sid}").json()

            daemon.restart()
            c.headers["X-API-KEY"] = daemon.token or ""

            # the running one: same token, metadata and deadline
            assert c.get(f"/sandboxes/{sid}").json()["endAt"] == running_before["endAt"]
            r = c.post(f"/v2/sandboxes/{sid}/connect", json={})
            assert r.status_code == 200 and r.json()["envdAccessToken"] == token, r.text
            good = {"E2b-Sandbox-Id": sid, "X-Access-Token": token}
            assert httpx.get(f"{sbx}/health", headers=good).status_code == 204
            r = httpx.post(f"{sbx}/filesystem.Filesystem/Stat", json={"path": "/tmp"},
                           headers={**good, "Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200 and r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"

            # the paused one: listed as paused with its metadata, then resumed by connect
            detail = c.get(f"/sandboxes/{pid}").json()
            assert detail["state"] == "paused" and detail["metadata"] == {"role": "paused"}
            assert detail["endAt"] == before["endAt"]
            listed = c.get("/v2/sandboxes", params={"state": "paused"}).json()
            assert pid in {x["sandboxID"] for x in listed}
            r = c.post(f"/v2/sandboxes/{pid}/connect", json={})
            assert r.status_code == 201 and r.json()["envdAccessToken"] == ptoken, r.text
            r = httpx.get(f"{sbx}/files", params={"path": "kept.txt"}, headers=p_headers)
            assert r.status_code == 200 and r.content == b"kept on disk"
            results = _execute(sbx, p_headers, "kept_in_memory + 1")
            assert {"type": "result", "text": "42", "is_main_result": True}.items() <= next(
                x for x in results if x["type"] == "result"
            ).items()
        finally:
            c.delete(f"/sandboxes/{pid}")


def test_e2b_async_sdks(new_sdk: Path, daemon: DaemonProcess) -> None:
    out = run_script(new_sdk, "sdk_async.py", daemon)
    assert out["stdout"] == "a\nb\n" and out["chunks"] == ["a\n", "b\n"]
    assert out["first_before_end_s"] > 1.0
    assert (out["content"], out["killed"], out["text"]) == ("async", True, "21")
    assert out["watched"] == ["z.txt"]  # the streaming WatchDir
