"""``forkd pack/unpack/push/pull`` refusals on an empty home: one-line errors, exit 1, nothing
left behind (no VM needed for any of them)."""

from __future__ import annotations

import socket
import tarfile
from pathlib import Path

import pytest

from forkd.cli.main import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.forkd"
    path.write_bytes(b"this is not a tar" * 100)
    return path


def _foreign_tar(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.forkd"
    (tmp_path / "hello").write_text("hi")
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "hello", arcname="hello")
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (lambda t: ["unpack", str(t / "missing.forkd")], "no pack file at"),
        (lambda t: ["unpack", str(_garbage(t))], "refusing the pack: it is not a readable tar"),
        (lambda t: ["unpack", str(_foreign_tar(t))], "its first member is 'hello'"),
        (lambda t: ["unpack", str(_garbage(t)), "--tag", "../x"], "invalid snapshot tag"),
        (lambda t: ["pack", "--tag", "nope", "-o", str(t / "p.forkd")], "not found"),
        (lambda t: ["pull", "not a ref"], "invalid registry reference"),
        (lambda t: ["push", "--tag", "nope", "a b"], "invalid registry reference"),
        (lambda t: ["pull", f"http://127.0.0.1:{_closed_port()}/p.forkd"], "ConnectError"),
    ],
)
def test_refusals(
    argv: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    code = main(["--local", "--home", str(home), *argv(tmp_path)])  # type: ignore[operator]
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err and "Traceback" not in err
    leftovers = [p for p in home.rglob("*") if p.is_file() and p.name != "forkd.db"]
    assert not [p for p in leftovers if "hub" in p.parts or ".staging-" in p.name]
    assert not (tmp_path / "p.forkd").exists()
