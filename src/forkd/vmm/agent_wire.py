"""Bounded, typed decoding of what the guest agent sends (docs/agent-protocol.md, docs/security.md).

Every byte on ``agent.sock`` is under guest control, so nothing here trusts it: a line is at most
:data:`MAX_LINE_BYTES`, its id is read with one regex before anything is parsed (a line whose id
this connection did not send is never parsed), and a reply is parsed and checked in one step by a
pydantic model of its op: strict types, bounded fields, nesting bounded by the parser (no Python
recursion), extra fields only where the op's reply is open-ended and then at most
:data:`MAX_DEPTH` deep. Errors carry no guest text beyond :data:`MAX_ERROR_TEXT` characters.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forkd.errors import AgentProtocolError

# The one cap on a line in either direction. The host tells the guest agent in every hello, and
# the agent keeps each reply within it (exec output is trimmed, file reads come in chunks).
MAX_LINE_BYTES = 8 << 20
MAX_DEPTH = 64  # nesting of the open-ended fields of a reply
MAX_ID = 64
MAX_ERROR_TEXT = 1000  # guest text quoted in an error message
MAX_ENTRIES = 65536  # list_files
INT32 = 1 << 31

_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,64})"')


def peek_id(line: bytes) -> str | None:
    """The first ``"id": "<str>"`` of ``line``, found without parsing it (None: no id)."""
    m = _ID.search(line)
    return m.group(1).decode("ascii", "replace") if m else None


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` cut to ``limit`` characters, for quoting guest text in host messages."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Reply(BaseModel):
    """Fields every reply has; a failure adds ``error``, ``kind`` and maybe ``errno``."""

    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True, frozen=True)

    id: str = Field(max_length=MAX_ID)
    ok: bool
    error: str | None = Field(default=None, max_length=MAX_LINE_BYTES)
    kind: str | None = Field(default=None, max_length=32)
    errno: int | None = Field(default=None, ge=0, lt=INT32)


class OpenReply(Reply):
    """hello, ping, reseed, set_clock and ops this module does not know: small, open-ended."""

    model_config = ConfigDict(extra="allow")


class ExecReply(Reply):
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = Field(default=None, ge=-INT32, lt=INT32)
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = Field(default=0.0, ge=0)


class EvalReply(Reply):
    result: str | None = None
    traceback: str | None = None
    exit_code: int | None = Field(default=None, ge=-INT32, lt=INT32)
    stdout: str = ""
    stdout_truncated: bool = False
    # with split_stderr (the E2B code interpreter): stderr apart, the exception's parts
    stderr: str | None = None
    stderr_truncated: bool = False
    error_type: str | None = Field(default=None, max_length=1024)
    error_value: str | None = None
    result_str: str | None = None
    result_none: bool = False


class WriteFileReply(Reply):
    path: str | None = Field(default=None, max_length=4096)
    size: int | None = Field(default=None, ge=0, lt=1 << 63)


class ReadFileReply(Reply):
    path: str | None = Field(default=None, max_length=4096)
    data_b64: str | None = None
    size: int | None = Field(default=None, ge=0, lt=1 << 63)
    truncated: bool = False


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True, frozen=True)

    name: str = Field(max_length=1024)
    path: str = Field(max_length=8192)
    type: Literal["file", "dir", "symlink", "other"]
    size: int = Field(ge=0, lt=1 << 63)
    mode: int = Field(ge=0, le=0o7777)
    mtime: float


class RemoveFileReply(Reply):
    removed: bool = False


class ListEntry(FileEntry):
    uid: int | None = Field(default=None, ge=0, lt=1 << 32)
    gid: int | None = Field(default=None, ge=0, lt=1 << 32)


class StatEntry(ListEntry):
    symlink_target: str | None = Field(default=None, max_length=8192)


class ListFilesReply(Reply):
    entries: list[ListEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)


class EntryReply(Reply):
    """stat, mkdir (``created``), move."""

    entry: StatEntry | None = None
    created: bool = False


class ProcStartReply(Reply):
    pid: int | None = Field(default=None, ge=1, lt=INT32)


class ProcInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True, frozen=True)

    pid: int = Field(ge=1, lt=INT32)
    argv: list[str] = Field(default_factory=list, max_length=65536)
    env: dict[str, str] = Field(default_factory=dict, max_length=65536)
    cwd: str | None = Field(default=None, max_length=8192)
    tag: str | None = Field(default=None, max_length=4096)


class ProcExit(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True, frozen=True)

    pid: int = Field(ge=1, lt=INT32)
    exit_code: int = Field(ge=-INT32, lt=INT32)
    signal: int | None = Field(default=None, ge=0, le=128)


class ProcListReply(Reply):
    processes: list[ProcInfo] = Field(default_factory=list, max_length=4096)
    exited: list[ProcExit] = Field(default_factory=list, max_length=4096)


class ProcDoneReply(Reply):
    """proc_input, proc_close_stdin, proc_signal, proc_resize, eval_context_drop."""

    written: int | None = Field(default=None, ge=0, lt=1 << 63)
    closed: bool = False
    signalled: bool = False
    resized: bool = False
    removed: bool = False


MODELS: dict[str, type[Reply]] = {
    "stat": EntryReply,
    "mkdir": EntryReply,
    "move": EntryReply,
    "proc_start": ProcStartReply,
    "proc_list": ProcListReply,
    "proc_input": ProcDoneReply,
    "proc_close_stdin": ProcDoneReply,
    "proc_signal": ProcDoneReply,
    "proc_resize": ProcDoneReply,
    "eval_context_drop": ProcDoneReply,
    "exec": ExecReply,
    "eval": EvalReply,
    "write_file": WriteFileReply,
    "read_file": ReadFileReply,
    "list_files": ListFilesReply,
    "remove_file": RemoveFileReply,
}


def _depth_ok(value: object, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def decode(op: str, line: bytes) -> Reply:
    """Parse and check ``line`` as the reply to ``op``; :class:`AgentProtocolError` if it is not."""
    if len(line) > MAX_LINE_BYTES:
        raise AgentProtocolError(f"agent {op}: reply of {len(line)} bytes exceeds the line cap")
    if not line.lstrip().startswith(b"{"):
        raise AgentProtocolError(f"agent {op}: reply is not a JSON object")
    model = MODELS.get(op, OpenReply)
    try:
        reply = model.model_validate_json(line)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[:1]
        where = ".".join(str(p) for p in first[0]["loc"]) if first else ""
        why = clip(first[0]["msg"] if first else "invalid", 200)
        raise AgentProtocolError(
            f"agent {op}: malformed reply ({clip(where, 80) + ': ' if where else ''}{why})"
        ) from None
    if reply.model_extra and not _depth_ok(reply.model_extra, MAX_DEPTH - 1):
        raise AgentProtocolError(f"agent {op}: reply nests deeper than {MAX_DEPTH} levels")
    return reply


def as_dict(reply: Reply) -> dict[str, Any]:
    """The reply as the plain mapping :meth:`AgentClient.call` returns."""
    return reply.model_dump()
