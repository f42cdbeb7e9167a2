"""The envd messages forkd serves, in their proto3 JSON form.

Derived from E2B's published schemas ``spec/envd/process/process.proto`` (package ``process``)
and ``spec/envd/filesystem/filesystem.proto`` (package ``filesystem``) in the e2b-dev/E2B
repository. Proto3 JSON rules apply: lowerCamelCase names (the original snake_case names are
accepted too), ``bytes`` as base64, ``int64`` as a string, enums by name, zero values omitted.
Requests are parsed leniently (unknown fields ignored, as the SDK's own decoder does).
"""

from __future__ import annotations

import base64
import datetime as dt
import stat as statmod
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from forkd.api.e2b.connect import ConnectError


class _Msg(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --- process.proto ---------------------------------------------------------------------------


class ProcessConfig(_Msg):
    cmd: str
    args: list[str] = Field(default_factory=list)
    envs: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None


class PtySize(_Msg):
    cols: int = Field(default=80, ge=1, le=10000)
    rows: int = Field(default=24, ge=1, le=10000)


class Pty(_Msg):
    size: PtySize = Field(default_factory=PtySize)


class StartRequest(_Msg):
    process: ProcessConfig
    pty: Pty | None = None
    tag: str | None = None
    stdin: bool | None = None


class ProcessSelector(_Msg):
    pid: int | None = None
    tag: str | None = None


class SelectRequest(_Msg):
    """ConnectRequest, CloseStdinRequest: ``{process: ProcessSelector}``."""

    process: ProcessSelector


class ProcessInput(_Msg):
    stdin: str | None = None  # bytes (base64)
    pty: str | None = None


class SendInputRequest(_Msg):
    process: ProcessSelector
    input: ProcessInput = Field(default_factory=ProcessInput)


class UpdateRequest(_Msg):
    """``{process: ProcessSelector, pty: {size}}``: resize a process's terminal."""

    process: ProcessSelector
    pty: Pty | None = None


class SendSignalRequest(_Msg):
    process: ProcessSelector
    signal: str | int = "SIGNAL_UNSPECIFIED"


# enum Signal
SIGNALS = {"SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9, 15: 15, 9: 9}


def start_event(pid: int) -> dict[str, Any]:
    return {"event": {"start": {"pid": pid}}}


def data_event(stream: str, data: bytes) -> dict[str, Any]:
    return {"event": {"data": {stream: base64.b64encode(data).decode("ascii")}}}


def keepalive_event() -> dict[str, Any]:
    return {"event": {"keepalive": {}}}


def end_event(exit_code: int, signal: int | None, error: str | None = None) -> dict[str, Any]:
    end: dict[str, Any] = {"exited": signal is None}
    if exit_code:
        end["exitCode"] = exit_code
    end["status"] = f"signal: {signal}" if signal is not None else f"exit status {exit_code}"
    if error:
        end["error"] = error
    return {"event": {"end": end}}


def process_info(proc: dict[str, Any]) -> dict[str, Any]:
    """ProcessInfo from an agent ``proc_list`` entry (argv[0] is ``cmd``)."""
    argv = [str(a) for a in proc.get("argv") or []]
    config: dict[str, Any] = {"cmd": argv[0] if argv else ""}
    if argv[1:]:
        config["args"] = argv[1:]
    envs = proc.get("env")
    if isinstance(envs, dict) and envs:
        config["envs"] = {str(k): str(v) for k, v in envs.items()}
    if proc.get("cwd"):
        config["cwd"] = str(proc["cwd"])
    info: dict[str, Any] = {"config": config, "pid": int(proc.get("pid", 0))}
    if proc.get("tag"):
        info["tag"] = str(proc["tag"])
    return info


# --- filesystem.proto ------------------------------------------------------------------------


class PathRequest(_Msg):
    """StatRequest, MakeDirRequest, RemoveRequest: ``{path}``."""

    path: str


class ListDirRequest(_Msg):
    path: str
    depth: int = 0


class WatchRequest(_Msg):
    """WatchDirRequest, CreateWatcherRequest."""

    path: str
    recursive: bool = False
    include_entry: bool = False


class WatcherRequest(_Msg):
    """GetWatcherEventsRequest, RemoveWatcherRequest."""

    watcher_id: str


# What a directory holds: relative name -> (type, size, mtime, mode).
Snapshot = dict[str, tuple[object, ...]]


def watch_events(before: Snapshot, after: Snapshot) -> list[dict[str, Any]]:
    """FilesystemEvents (``{name, type}``) for the net change from ``before`` to ``after``."""
    events: list[dict[str, Any]] = []
    for name in sorted(after.keys() - before.keys()):
        events.append({"name": name, "type": "EVENT_TYPE_CREATE"})
    for name in sorted(before.keys() - after.keys()):
        events.append({"name": name, "type": "EVENT_TYPE_REMOVE"})
    for name in sorted(before.keys() & after.keys()):
        old, new = before[name], after[name]
        if old[:3] != new[:3] and new[0] != "dir":
            events.append({"name": name, "type": "EVENT_TYPE_WRITE"})
        elif old[3] != new[3]:
            events.append({"name": name, "type": "EVENT_TYPE_CHMOD"})
    return events


class MoveRequest(_Msg):
    source: str
    destination: str


_FILE_TYPES = {
    "file": "FILE_TYPE_FILE",
    "dir": "FILE_TYPE_DIRECTORY",
    "symlink": "FILE_TYPE_SYMLINK",
}


def entry_info(entry: dict[str, Any]) -> dict[str, Any]:
    """EntryInfo from an agent ``stat``/``list_files`` entry.

    Entries of other kinds (sockets, devices) are reported as files: the SDK drops entries
    without a type.
    """
    kind = str(entry.get("type", "file"))
    mode = int(entry.get("mode", 0))
    fmt = statmod.S_IFDIR if kind == "dir" else statmod.S_IFLNK if kind == "symlink" else 0
    out: dict[str, Any] = {
        "name": str(entry.get("name", "")),
        "type": _FILE_TYPES.get(kind, "FILE_TYPE_FILE"),
        "path": str(entry.get("path", "")),
        "size": str(int(entry.get("size", 0))),
        "mode": mode,
        "permissions": statmod.filemode(fmt | mode) if fmt else "-" + statmod.filemode(mode)[1:],
        "owner": _user(entry.get("uid")),
        "group": _user(entry.get("gid")),
    }
    if isinstance(entry.get("mtime"), int | float):
        when = dt.datetime.fromtimestamp(float(entry["mtime"]), dt.UTC)
        out["modifiedTime"] = when.isoformat().replace("+00:00", "Z")
    if kind == "symlink":
        out["isSymlink"] = True
        if entry.get("symlink_target"):
            out["symlinkTarget"] = str(entry["symlink_target"])
    return out


GUEST_USERS = {0: "root", 1000: "user"}  # the accounts of forkd's guest image


def _user(uid: object) -> str:
    return GUEST_USERS.get(uid, str(uid)) if isinstance(uid, int) else "root"


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "message"
        raise ConnectError("invalid_argument", f"{where}: {first.get('msg')}") from None
