"""Printing results: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.endswith("_unix") and isinstance(value, int | float):  # people read local time
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


def table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, empty: str
) -> None:
    if not rows:
        err.print(empty)
        return
    t = Table(box=None, pad_edge=False, header_style="bold")
    for _, title in columns:
        t.add_column(title)
    for row in rows:
        t.add_row(*(_cell(key, row.get(key)) for key, _ in columns))
    # Ids and tags are copied by people and parsed by scripts: never cut a cell to fit the
    # terminal (or the 80 columns rich assumes for a pipe); a long line wraps instead.
    natural = Measurement.get(out, out.options.update_width(1 << 16), t).maximum
    Console(highlight=False, soft_wrap=True, width=max(out.width, natural)).print(t)
