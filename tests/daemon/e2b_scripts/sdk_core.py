"""Drives forkd through the unmodified E2B Python SDK; run with a venv that has ``e2b``.

Usage: python sdk_core.py TEMPLATE. The E2B_* variables point the SDK at the daemon. Prints one
JSON object: what each step observed (or the error it raised), for the test to assert on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from e2b import CommandExitException, PtySize, Sandbox

out: dict[str, Any] = {}


def step(name: str, fn: Callable[[], Any]) -> Any:
    try:
        value = fn()
        out[name] = value
        return value
    except Exception as e:
        out[name] = {
            "raised": type(e).__name__,
            "message": str(e)[:500],
            "tb": traceback.format_exc()[-1500:],
        }
        return None


def main(template: str) -> None:
    t0 = time.monotonic()
    sbx = Sandbox.create(template, envs={"FOO": "bar"}, metadata={"suite": "e2b"}, timeout=600)
    out["create_s"] = time.monotonic() - t0
    out["sandbox_id"] = sbx.sandbox_id

    def echo() -> dict[str, Any]:
        r = sbx.commands.run("echo hi")
        return {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}

    step("echo", echo)
    out["first_result_s"] = time.monotonic() - t0

    def failing() -> dict[str, Any]:
        try:
            sbx.commands.run("echo oops >&2; exit 3")
        except CommandExitException as e:
            return {"exception": type(e).__name__, "exit_code": e.exit_code, "stderr": e.stderr}
        return {"exception": None}

    step("failing", failing)
    step("env", lambda: sbx.commands.run("echo $FOO-$BAR", envs={"BAR": "baz"}).stdout)
    step("cwd", lambda: sbx.commands.run("pwd").stdout)

    def streaming() -> dict[str, Any]:
        seen: list[tuple[float, str]] = []
        r = sbx.commands.run(
            "echo one; sleep 2; echo two",
            on_stdout=lambda s: seen.append((time.monotonic(), s)),
        )
        end = time.monotonic()
        return {
            "chunks": [s for _, s in seen],
            "first_before_end_s": end - seen[0][0] if seen else None,
            "stdout": r.stdout,
        }

    step("streaming", streaming)

    def background() -> dict[str, Any]:
        h = sbx.commands.run("sleep 120", background=True)
        listed = [p.pid for p in sbx.commands.list()]
        killed = h.kill()
        try:
            h.wait()
            waited = "returned"
        except CommandExitException as e:
            waited = f"exit {e.exit_code}"
        after = [p.pid for p in sbx.commands.list()]
        return {
            "pid": h.pid,
            "listed": h.pid in listed,
            "killed": killed,
            "waited": waited,
            "listed_after": h.pid in after,
        }

    step("background", background)

    def stdin() -> str:
        h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
        sbx.commands.send_stdin(h.pid, "hello\n")
        return h.wait().stdout

    step("stdin", stdin)

    def files() -> dict[str, Any]:
        info = sbx.files.write("notes/hello.txt", "hello file")
        content = sbx.files.read("notes/hello.txt")
        names = [e.name for e in sbx.files.list("notes")]
        exists = sbx.files.exists("notes/hello.txt")
        sbx.files.make_dir("/tmp/e2bdir")
        sbx.files.rename("notes/hello.txt", "/tmp/e2bdir/moved.txt")
        moved = sbx.files.read("/tmp/e2bdir/moved.txt")
        sbx.files.remove("/tmp/e2bdir/moved.txt")
        gone = not sbx.files.exists("/tmp/e2bdir/moved.txt")
        via_shell = sbx.commands.run("cat /tmp/e2bdir/moved.txt || echo missing").stdout
        return {
            "path": info.path,
            "content": content,
            "names": names,
            "exists": exists,
            "moved": moved,
            "gone": gone,
            "via_shell": via_shell,
        }

    step("files", files)

    def failure(fn: Callable[[], Any]) -> str:
        try:
            fn()
        except Exception as e:
            return type(e).__name__
        return "no error"

    def users() -> dict[str, Any]:
        sbx.files.write("owned.txt", "mine")
        sbx.files.write("/root/secret.txt", "s", user="root")
        return {
            "default": sbx.commands.run("id -un; echo $HOME; pwd").stdout,
            "root": sbx.commands.run("id -un; echo $HOME; pwd", user="root").stdout,
            "owner": sbx.commands.run("stat -c %u:%g /home/user/owned.txt").stdout,
            "info_owner": sbx.files.get_info("owned.txt").owner,
            "root_dir": failure(lambda: sbx.commands.run("ls /root")),
            "root_file": failure(lambda: sbx.files.read("/root/secret.txt")),
            "root_reads": sbx.files.read("/root/secret.txt", user="root"),
            "unknown_command": failure(lambda: sbx.commands.run("true", user="nobody-here")),
            "unknown_file": failure(lambda: sbx.files.write("x.txt", "x", user="nobody-here")),
        }

    step("users", users)

    def pty() -> dict[str, Any]:
        h = sbx.pty.create(PtySize(rows=24, cols=80))
        events = iter(h)
        seen = bytearray()

        def until(marker: bytes) -> bytes:
            while marker not in seen:
                _out, _err, data = next(events)
                if data:
                    seen.extend(data)
            return bytes(seen)

        sbx.pty.send_stdin(h.pid, b"tty; stty size; id -un; echo done-$((1+1))\n")
        first = until(b"done-2")
        sbx.pty.resize(h.pid, PtySize(rows=40, cols=100))
        sbx.pty.send_stdin(h.pid, b"stty size; echo again-$((2+1))\n")
        second = until(b"again-3")[len(first) :]
        return {
            "tty": b"/dev/pts/" in first,
            "size": b"24 80" in first,
            "user": b"\nuser\r\n" in first,
            "resized": b"40 100" in second,
            "killed": sbx.pty.kill(h.pid),
        }

    step("pty", pty)

    def more_files() -> dict[str, Any]:
        import io

        many = sbx.files.write_files(
            [
                {"path": "/tmp/many/a.txt", "data": "A"},
                {"path": "/tmp/many/sub/b.txt", "data": b"B"},
            ]
        )
        streamed = sbx.files.write("/tmp/many/c.bin", io.BytesIO(b"\x00\x01" * 1000))
        zipped = sbx.files.write("/tmp/many/d.txt", "gzipped", gzip=True)
        raw = sbx.files.read("/tmp/many/c.bin", format="bytes")
        deep = sorted(e.path for e in sbx.files.list("/tmp/many", depth=2))
        info = sbx.files.get_info("/tmp/many/sub")
        return {
            "many": sorted(w.path for w in many),
            "streamed": streamed.path,
            "zipped": sbx.files.read(zipped.path),
            "raw_ok": bytes(raw) == b"\x00\x01" * 1000,
            "deep": deep,
            "dir_type": str(getattr(info.type, "value", info.type)),
        }

    step("more_files", more_files)

    def watch() -> dict[str, Any]:
        def kinds(events: Any) -> list[list[str]]:
            return [[e.name, str(getattr(e.type, "value", e.type))] for e in events]

        sbx.files.make_dir("/tmp/watched")
        handle = sbx.files.watch_dir("/tmp/watched", recursive=True)
        sbx.files.write("/tmp/watched/a.txt", "1")
        sbx.commands.run("mkdir /tmp/watched/d && echo x > /tmp/watched/d/b.txt")
        first = kinds(handle.get_new_events())
        sbx.commands.run("echo more >> /tmp/watched/a.txt; rm /tmp/watched/d/b.txt")
        second = kinds(handle.get_new_events())
        handle.stop()
        return {"first": first, "second": second}

    step("watch", watch)

    def missing_file() -> str:
        try:
            sbx.files.read("/no/such/file")
        except Exception as e:
            return type(e).__name__
        return "no error"

    step("missing_file", missing_file)

    def connect() -> dict[str, Any]:
        other = Sandbox.connect(sbx.sandbox_id)
        r = other.commands.run("echo from-second")
        return {"same_id": other.sandbox_id == sbx.sandbox_id, "stdout": r.stdout}

    step("connect", connect)

    def info() -> dict[str, Any]:
        i = sbx.get_info()
        sbx.set_timeout(1200)
        later = sbx.get_info()
        listed = [s.sandbox_id for s in Sandbox.list().next_items()]
        return {
            "template": i.template_id,
            "metadata": i.metadata,
            "extended": (later.end_at - i.end_at).total_seconds() > 60,
            "listed": sbx.sandbox_id in listed,
            "running": sbx.is_running(),
        }

    step("info", info)

    def fork() -> dict[str, Any]:
        sbx.commands.run("echo parent-state > /tmp/state.txt")
        children = sbx.fork(count=2)
        seen = []
        for child in children:
            if isinstance(child, Exception):
                seen.append(f"{type(child).__name__}: {child}")
                continue
            seen.append(child.commands.run("cat /tmp/state.txt; echo $FOO").stdout)
            child.commands.run("echo child > /tmp/state.txt")
            child.kill()
        after = sbx.commands.run("cat /tmp/state.txt").stdout
        return {"children": seen, "parent_after": after}

    step("fork", fork)

    def pause_resume() -> dict[str, Any]:
        s = Sandbox.create(template, envs={"FOO": "paused"})
        s.commands.run("echo kept > /tmp/p.txt")
        paused = s.pause()
        state = Sandbox.get_info(s.sandbox_id).state
        again = s.pause()
        resumed = Sandbox.connect(s.sandbox_id)
        kept = resumed.commands.run("cat /tmp/p.txt; echo $FOO").stdout
        running = Sandbox.get_info(s.sandbox_id).state
        killed = resumed.kill()
        return {
            "paused": paused,
            "state": str(getattr(state, "value", state)),
            "pause_again": again,
            "same_id": resumed.sandbox_id == s.sandbox_id,
            "kept": kept,
            "running": str(getattr(running, "value", running)),
            "killed": killed,
        }

    step("pause_resume", pause_resume)

    def unknown_connect() -> str:
        try:
            Sandbox.connect("nosuchsandbox")
        except Exception as e:
            return type(e).__name__
        return "no error"

    step("unknown_connect", unknown_connect)

    def short_timeout() -> dict[str, Any]:
        s = Sandbox.create(template, timeout=2)
        deadline = time.monotonic() + 15
        running = s.is_running()
        while running and time.monotonic() < deadline:
            time.sleep(0.5)
            running = s.is_running()
        return {"running_after": running, "killed_again": Sandbox.kill(s.sandbox_id)}

    step("short_timeout", short_timeout)

    def kill() -> dict[str, Any]:
        first = sbx.kill()
        second = Sandbox.kill(sbx.sandbox_id)
        return {"first": first, "second": second}

    step("kill", kill)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:
        out["fatal"] = {
            "raised": type(e).__name__,
            "message": str(e)[:1000],
            "tb": traceback.format_exc()[-3000:],
        }
    print(json.dumps(out), flush=True)
    os._exit(0)  # no interpreter teardown: see sdk_async.py
