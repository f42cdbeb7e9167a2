"""Flag rules of ``forkd snapshot`` and friends: refused before anything runs (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkd.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["snapshot", "--tag", "t", "--diff"], "--diff only applies with --from-sandbox"),
        (["snapshot", "--tag", "t", "--live"], "--live only applies with --from-sandbox"),
        (["snapshot", "--tag", "t", "--no-wait"], "--no-wait only applies with --from-sandbox"),
        (["snapshot", "--live", "--no-wait"], "--live, --no-wait only apply with --from-sandbox"),
        (
            ["snapshot", "--from-sandbox", "sb-1", "--live", "--diff"],
            "--live conflicts with --diff",
        ),
        (["snapshot", "--from-sandbox", "sb-1", "--no-wait"], "--no-wait requires --live"),
        (
            ["snapshot", "--from-sandbox", "sb-1", "--diff", "--no-wait"],
            "--no-wait requires --live",
        ),
        (["snapshot"], "--tag is required"),
        (["kill"], "name sandbox ids, or --all"),
        (["exec", "sb-1"], "no command given"),
        (["exec", "sb-1", "--env", "NOEQUALS", "--", "true"], "--env takes K=V"),
    ],
)
def test_refused_flag_combinations(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--local", "--home", str(tmp_path / "h"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "h" / "snapshots").exists()


def test_tables_never_shorten_ids_or_tags(capsys: pytest.CaptureFixture[str]) -> None:
    from forkd.cli import render

    tag = "branch-sb-92f2e8c56804-1796135977-389c"
    rows = [{"tag": tag, "status": "ready", "from": "sb-92f2e8c56804", "note": "x" * 90}]
    columns = [("tag", "TAG"), ("status", "STATUS"), ("from", "FROM"), ("note", "NOTE")]
    render.table(rows, columns, empty="none")
    out = capsys.readouterr().out
    assert tag in out and "sb-92f2e8c56804" in out and "x" * 90 in out
    assert "…" not in out


def test_tables_show_unix_times_as_local_time(capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from forkd.cli import render

    ts = 1_796_135_919
    render.table(
        [{"id": "sb-1", "created_at_unix": ts}],
        [("id", "ID"), ("created_at_unix", "CREATED")],
        empty="none",
    )
    out = capsys.readouterr().out
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) in out and str(ts) not in out


def test_workspace_commands_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The local backend's workspace commands: empty list, 404 and 400 as one-line errors."""
    home = ["--local", "--home", str(tmp_path / "h")]
    assert main([*home, "workspace", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main([*home, "workspace", "suspend", "dev"]) == 1
    assert "workspace 'dev' not found" in capsys.readouterr().err
    assert main([*home, "workspace", "create", "a.b", "--snapshot", "py"]) == 1
    assert "invalid workspace name" in capsys.readouterr().err
    assert main([*home, "workspace", "create", "dev", "--snapshot", "py"]) == 1
    assert "snapshot 'py' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*home, "workspace", "create", "dev"])  # --snapshot is required
