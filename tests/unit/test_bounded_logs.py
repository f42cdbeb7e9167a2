"""Bounded host files of a QEMU: the serial console is a ring buffer inside QEMU, and every
QEMU's file writes stop at QEMU_FILE_CAP_BYTES (RLIMIT_FSIZE with SIGXFSZ ignored) without
killing it. The VM side is in tests/vm/test_hostile.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forkd.vmm.qemu import QEMU_FILE_CAP_BYTES, cap_file_size, qemu_binary
from forkd.vmm.spec import CONSOLE_RING_BYTES, MachineSpec, RunPaths, instance_args


def test_console_is_a_ring_buffer_not_a_host_file(tmp_path: Path) -> None:
    spec = MachineSpec(tmp_path / "k", tmp_path / "i", tmp_path / "r", 256, ("-accel", "tcg"))
    paths = RunPaths(tmp_path / "run")
    argv = instance_args(spec.machine_args(), mem_mib=256, memory_path=tmp_path / "m",
                         share=False, paths=paths, incoming=True)  # fmt: skip
    serial = argv[argv.index("-serial") + 1]
    assert serial == "chardev:console"
    assert f"ringbuf,id=console,size={CONSOLE_RING_BYTES}" in argv
    assert not any("file:" in a for a in argv)
    assert CONSOLE_RING_BYTES & (CONSOLE_RING_BYTES - 1) == 0  # QEMU wants a power of two


WRITER = """
import errno, sys, time
time.sleep(0.3)  # the cap is set after start, as for a daemonized QEMU
written = 0
with open(sys.argv[1], "ab", buffering=0) as f:
    try:
        while written < 64 << 20:
            written += f.write(b"x" * 65536)
    except OSError as e:
        print(errno.errorcode[e.errno], written)
"""


def test_file_cap_fails_writes_and_keeps_the_process(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log)],
        stdout=subprocess.PIPE,
        text=True,
        restore_signals=False,  # as QemuProcess.launch: SIGXFSZ stays ignored
    )
    cap_file_size(proc.pid, 1 << 20)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "the process was killed instead of getting EFBIG"
    assert out.split()[0] == "EFBIG"
    assert log.stat().st_size == 1 << 20


def test_cap_on_a_gone_process_is_ignored() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    cap_file_size(proc.pid, 1 << 20)


def _qmp(sock: socket.socket, command: str, arguments: dict[str, object] | None = None) -> object:
    msg: dict[str, object] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    sock.sendall(json.dumps(msg).encode() + b"\n")
    f = sock.makefile("r")
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            return reply.get("return", reply)


def test_real_qemu_log_stops_at_the_cap(tmp_path: Path) -> None:
    """A QEMU made to log (trace events to its -D log) stops at the cap and keeps answering."""
    try:
        qemu = qemu_binary()
    except Exception:
        pytest.skip("no QEMU on this host")
    qmp_path, log, pidfile = tmp_path / "qmp.sock", tmp_path / "qemu.log", tmp_path / "qemu.pid"
    subprocess.run(
        [qemu, "-machine", "none", "-S", "-nodefaults", "-display", "none",
         "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
         "-mon", "chardev=qmp,mode=control", "-daemonize", "-pidfile", str(pidfile),
         "-D", str(log)],
        check=True, restore_signals=False, timeout=30,
    )  # fmt: skip
    pid = int(pidfile.read_text())
    cap = 64 << 10
    cap_file_size(pid, cap)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(qmp_path))
            sock.makefile("r").readline()
            _qmp(sock, "qmp_capabilities")
            traced = _qmp(sock, "human-monitor-command", {"command-line": "trace-event * on"})
            if traced != "":
                pytest.skip(f"this QEMU cannot trace to its log: {traced}")
            deadline = time.monotonic() + 20
            while log.stat().st_size < cap and time.monotonic() < deadline:
                _qmp(sock, "query-status")
            for _ in range(200):
                _qmp(sock, "query-status")
            assert log.stat().st_size == cap
            assert Path(f"/proc/{pid}").exists()
            status = _qmp(sock, "query-status")
            assert isinstance(status, dict) and status["status"] == "prelaunch"
            _qmp(sock, "quit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert QEMU_FILE_CAP_BYTES >= 1 << 20
