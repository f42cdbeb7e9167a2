"""Run by bench/e2b_sdk.py with a python that has ``e2b-code-interpreter``: times N rounds of
create -> first result through the E2B SDKs and prints them as JSON (seconds)."""

from __future__ import annotations

import json
import sys
import time

from e2b import Sandbox as CommandSandbox  # type: ignore[import-not-found]
from e2b_code_interpreter import Sandbox  # type: ignore[import-not-found]


def main(template: str, rounds: int) -> None:
    command: list[float] = []
    code: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sbx = CommandSandbox.create(template)
        assert sbx.commands.run("echo hi").stdout == "hi\n"
        command.append(time.perf_counter() - t0)
        sbx.kill()
        t0 = time.perf_counter()
        csbx = Sandbox.create(template)
        assert csbx.run_code("1 + 1").text == "2"
        code.append(time.perf_counter() - t0)
        csbx.kill()
    print(json.dumps({"command": command, "code": code}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
