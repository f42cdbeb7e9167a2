"""Daemon tier fixtures: a real ``forkd daemon`` process over a fresh data dir with a real image
and a numpy-warm template made through the REST API. Teardown kills every sandbox, stops the
daemon, checks that no QEMU process of that data dir survived, and frees its tmpfs memory dir."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from forkd.config import Settings
from forkd.images.builder import ImageRequest, build_image
from forkd.snapshots.memfs import release_memory_dir

TEMPLATE_TAG = "py"
WARMUP = "import numpy\nimport random\nWARM_MARKER = 'warm'"
# Short enough for the 504 test to be cheap, long enough for every other eval of the tier.
EVAL_TIMEOUT_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKD_")}
    cache = os.environ.get("FORKD_CACHE_DIR")
    if cache:
        env["FORKD_CACHE_DIR"] = cache
    env.update(extra)
    return env


def write_token(path: Path, token: str | None = None) -> str:
    token = token or secrets.token_hex(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def forkd_argv(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "forkd", "--home", str(home), *args]


def qemu_pids(home: Path) -> list[int]:
    """Processes whose command line names ``home`` (QEMU run dirs live under it)."""
    out = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


@dataclass
class DaemonProcess:
    """One ``forkd daemon`` subprocess; restartable on the same port and data dir."""

    home: Path
    port: int
    token: str | None
    token_file: Path | None
    env: dict[str, str]
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home.parent / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self, timeout: float = 30.0) -> None:
        args = ["daemon", "--bind", f"127.0.0.1:{self.port}", *self.extra_args]
        if self.token_file is not None:
            args += ["--token-file", str(self.token_file)]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                forkd_argv(self.home, *args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                text=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not healthy within {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def restart(self) -> None:
        code = self.stop()
        assert code == 0, f"daemon exited {code} on SIGTERM:\n{self.log_text()}"
        self.start()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)


def shutdown_daemon(daemon: DaemonProcess) -> None:
    """Kill every sandbox through the API, stop the daemon, and make sure no QEMU survives."""
    try:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with daemon.client(timeout=60) as c:
                for sb in c.get("/v1/sandboxes", params={"all": "true"}).json():
                    c.delete(f"/v1/sandboxes/{sb['id']}")
    finally:
        if daemon.proc is not None:
            daemon.stop()
        leaked = qemu_pids(daemon.home)
        if leaked:
            ps = ["ps", "-o", "pid,ppid,stat,lstart,args", "-p", ",".join(map(str, leaked))]
            leaked_info = subprocess.run(ps, capture_output=True, text=True).stdout
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        release_memory_dir(Settings(home=daemon.home).memory_dir)
    assert not leaked, f"processes outlived the daemon:\n{leaked_info}"


@pytest.fixture(scope="session")
def daemon_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data dir with the default image built (cached by content, so seconds)."""
    home = tmp_path_factory.mktemp("forkd-daemon") / "home"
    settings = Settings.from_env(home=home)
    build_image(settings, ImageRequest.default("python", None, None), lambda _: None)
    return home


@pytest.fixture(scope="session")
def daemon(daemon_home: Path) -> Iterator[DaemonProcess]:
    """The tier's daemon, with template ``py`` made through ``POST /v1/snapshots``."""
    token_file = daemon_home.parent / "token"
    token = write_token(token_file)
    proc = DaemonProcess(
        home=daemon_home,
        port=free_port(),
        token=token,
        token_file=token_file,
        # E2B's Sandbox.create() without a template forks ours (tests/daemon/test_e2b_sdk.py)
        env=clean_env(
            FORKD_EVAL_TIMEOUT_S=str(EVAL_TIMEOUT_S), FORKD_E2B_DEFAULT_TEMPLATE=TEMPLATE_TAG
        ),
    )
    proc.start()
    try:
        with proc.client(timeout=600) as c:
            r = c.post("/v1/snapshots", json={"tag": TEMPLATE_TAG, "warmup": WARMUP})
            assert r.status_code == 201, r.text
        yield proc
    finally:
        shutdown_daemon(proc)


@pytest.fixture
def api(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c
