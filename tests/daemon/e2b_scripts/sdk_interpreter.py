"""Drives forkd through the unmodified ``e2b-code-interpreter`` SDK (see sdk_core.py)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from e2b_code_interpreter import Sandbox

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
    # no template: the SDK asks for its default, which the daemon maps onto ``template``
    sbx = Sandbox.create()
    out["sandbox_id"] = sbx.sandbox_id
    out["template"] = sbx.get_info().template_id
    step("first", lambda: sbx.run_code("1 + 1").text)
    out["first_result_s"] = time.monotonic() - t0
    step("assign", lambda: sbx.run_code("x = 1").text)
    step("use", lambda: sbx.run_code("x + 1").text)
    step("string", lambda: sbx.run_code("'abc'").text)
    step("warm", lambda: sbx.run_code("WARM_MARKER").text)

    def error() -> dict[str, Any]:
        e = sbx.run_code("def f():\n    return 1 / 0\nf()").error
        return {"name": e.name, "value": e.value, "traceback": e.traceback} if e else {}

    step("error", error)

    def prints() -> dict[str, Any]:
        seen: list[str] = []
        ex = sbx.run_code(
            "import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n42",
            on_stdout=lambda m: seen.append(m.line),
        )
        return {
            "stdout": ex.logs.stdout,
            "stderr": ex.logs.stderr,
            "text": ex.text,
            "callback": seen,
            "count": ex.execution_count,
        }

    step("prints", prints)

    def live() -> dict[str, Any]:
        seen: list[tuple[float, str]] = []
        ex = sbx.run_code(
            "import time\nprint('one')\ntime.sleep(1.5)\nprint('two')",
            on_stdout=lambda m: seen.append((time.monotonic(), m.line)),
        )
        end = time.monotonic()
        return {
            "lines": [s for _, s in seen],
            "stdout": ex.logs.stdout,
            "first_before_end_s": end - seen[0][0] if seen else None,
        }

    step("live", live)

    def contexts() -> dict[str, Any]:
        ctx = sbx.create_code_context()
        sbx.run_code("y = 5", context=ctx)
        in_ctx = sbx.run_code("y * 2", context=ctx).text
        e = sbx.run_code("y").error
        listed = [c.id for c in sbx.list_code_contexts()]
        sbx.remove_code_context(ctx)
        return {
            "in_ctx": in_ctx,
            "default_error": e.name if e else None,
            "listed": ctx.id in listed,
        }

    step("contexts", contexts)

    def language() -> str:
        try:
            sbx.run_code("1", language="r")
        except Exception as e:
            return type(e).__name__
        return "no error"

    step("language", language)
    step("commands", lambda: sbx.commands.run("echo hi").stdout)

    def fork() -> dict[str, Any]:
        sbx.run_code("forked_value = 41")
        (child,) = sbx.fork()
        seen = child.run_code("forked_value + 1").text
        child.run_code("forked_value = 0")
        child.kill()
        return {"child": seen, "parent": sbx.run_code("forked_value").text}

    step("fork", fork)
    step("kill", lambda: sbx.kill())


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
