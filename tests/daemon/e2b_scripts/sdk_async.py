"""The E2B SDKs' asyncio classes against forkd (see sdk_core.py). Usage: sdk_async.py TEMPLATE."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from e2b import AsyncSandbox
from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox


async def main(template: str) -> dict[str, Any]:
    sbx = await AsyncSandbox.create(template)
    seen: list[tuple[float, str]] = []
    r = await sbx.commands.run(
        "echo a; sleep 1.5; echo b", on_stdout=lambda s: seen.append((time.monotonic(), s))
    )
    end = time.monotonic()
    await sbx.files.write("async.txt", "async")
    content = await sbx.files.read("async.txt")
    await sbx.files.make_dir("/tmp/awatch")
    seen_events: list[str] = []
    watcher = await sbx.files.watch_dir(
        "/tmp/awatch", on_event=lambda e: seen_events.append(e.name)
    )
    await sbx.files.write("/tmp/awatch/z.txt", "z")
    for _ in range(50):  # the WatchDir stream looks every 0.5 s
        if seen_events:
            break
        await asyncio.sleep(0.1)
    await watcher.stop()
    handle = await sbx.commands.run("sleep 60", background=True)
    killed = await handle.kill()
    await sbx.kill()
    code = await AsyncCodeSandbox.create(template)
    await code.run_code("z = 20")
    text = (await code.run_code("z + 1")).text
    await code.kill()
    return {
        "stdout": r.stdout,
        "chunks": [s for _, s in seen],
        "first_before_end_s": end - seen[0][0] if seen else None,
        "content": content,
        "killed": killed,
        "text": text,
        "watched": seen_events,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
    # The SDK's native HTTP client sometimes aborts while the interpreter tears down after an
    # asyncio run (SIGABRT after all output is out); the result is printed, so skip teardown.
    os._exit(0)
