"""E2B wire pieces without a daemon: Connect framing, proto3 JSON shapes, egress mapping."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from starlette.requests import Request

from forkd.api.e2b import connect as c
from forkd.api.e2b import messages as m
from forkd.api.e2b.control import E2BError, NewSandbox, egress_of
from forkd.api.e2b.envd import parse_passwd, request_user, resolve
from forkd.errors import GuestOSError


def test_envelopes_round_trip() -> None:
    frame = c.envelope({"event": {"start": {"pid": 7}}})
    flags, n = struct.unpack(">BI", frame[:5])
    assert flags == 0 and json.loads(frame[5 : 5 + n]) == {"event": {"start": {"pid": 7}}}
    assert c.parse_stream_request(frame) == {"event": {"start": {"pid": 7}}}
    end = c.end_stream(c.ConnectError("not_found", "gone"))
    assert end[0] == c.FLAG_END_STREAM
    assert json.loads(end[5:]) == {"error": {"code": "not_found", "message": "gone"}}
    assert json.loads(c.end_stream()[5:]) == {}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00\x00",
        b"\x01\x00\x00\x00\x02{}",
        b"\x00\x00\x00\x00\x09{}",
        b"\x00\x00\x00\x00\x02[]",
    ],
)
def test_bad_stream_requests(body: bytes) -> None:
    with pytest.raises(c.ConnectError) as e:
        c.parse_stream_request(body)
    assert e.value.code in ("invalid_argument", "unimplemented")


def test_error_statuses() -> None:
    assert c.ConnectError("unimplemented", "x").http_status == 501
    assert c.ConnectError("no-such-code", "x").code == "unknown"
    response = c.unary_error(c.ConnectError("invalid_argument", "bad"))
    assert response.status_code == 400
    assert json.loads(bytes(response.body)) == {"code": "invalid_argument", "message": "bad"}


def test_end_event_omits_zero_exit_code() -> None:
    assert m.end_event(0, None) == {"event": {"end": {"exited": True, "status": "exit status 0"}}}
    assert m.end_event(137, 9)["event"]["end"] == {
        "exited": False,
        "exitCode": 137,
        "status": "signal: 9",
    }
    assert m.data_event("stdout", b"hi\n") == {"event": {"data": {"stdout": "aGkK"}}}


def test_entry_info_is_proto3_json() -> None:
    entry = m.entry_info(
        {"name": "a", "path": "/a", "type": "dir", "size": 4096, "mode": 0o755, "mtime": 0.0,
         "uid": 0, "gid": 0}
    )  # fmt: skip
    assert entry == {
        "name": "a",
        "type": "FILE_TYPE_DIRECTORY",
        "path": "/a",
        "size": "4096",
        "mode": 0o755,
        "permissions": "drwxr-xr-x",
        "owner": "root",
        "group": "root",
        "modifiedTime": "1970-01-01T00:00:00Z",
    }
    assert m.entry_info({"name": "s", "type": "other", "mode": 0o644})["type"] == "FILE_TYPE_FILE"


def test_requests_accept_camel_and_snake_case() -> None:
    a = m.parse(m.StartRequest, {"process": {"cmd": "ls", "args": ["-l"], "envs": {"A": "1"}}})
    assert (a.process.cmd, a.process.args, a.process.envs) == ("ls", ["-l"], {"A": "1"})
    assert m.parse(m.MoveRequest, {"source": "a", "destination": "b"}).destination == "b"
    with pytest.raises(c.ConnectError):
        m.parse(m.StartRequest, {"process": {"args": []}})


def test_paths_resolve_against_home() -> None:
    assert resolve("x.txt") == "/home/user/x.txt"
    assert resolve("~/a/../b") == "/home/user/b"
    assert resolve("/tmp/x") == "/tmp/x"
    with pytest.raises(c.ConnectError):
        resolve("a\0b")
    assert resolve("x", "/root") == "/root/x" and resolve("~", "/root") == "/root"
    assert resolve("x", "/") == "/x"


def _request(query: str = "", **headers: str) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "query_string": query.encode(), "headers": raw})


def test_the_user_a_call_names() -> None:
    basic = "Basic " + base64.b64encode(b"root:").decode()
    assert request_user(_request(Authorization=basic)) == "root"
    assert request_user(_request("path=x&username=user")) == "user"
    assert request_user(_request()) is None
    assert request_user(_request(Authorization="Bearer abc")) is None
    with pytest.raises(E2BError) as e:
        request_user(_request(Authorization="Basic !!!"))
    assert e.value.status == 400


def test_passwd_users_and_their_homes() -> None:
    text = "root:x:0:0:root:/root:/bin/bash\n# c\nuser:x:1000:1000::/home/user:/bin/bash\nbad\n"
    assert parse_passwd(text) == {"root": "/root", "user": "/home/user"}


def test_permission_errors_are_permission_denied() -> None:
    err = c.ConnectError.from_forkd(GuestOSError("[Errno 13] Permission denied", 13))
    assert (err.code, err.http_status) == ("permission_denied", 403)
    assert m.entry_info({"name": "f", "uid": 1000, "gid": 1000})["owner"] == "user"
    assert m.entry_info({"name": "f", "uid": 1234})["owner"] == "1234"


def new(**body: object) -> NewSandbox:
    return NewSandbox.model_validate({"templateID": "t", **body})


def test_egress_mapping() -> None:
    assert egress_of(new()) == (None, None)
    assert egress_of(new(allow_internet_access=False)) == (None, False)
    net, internet = egress_of(new(network={"allowOut": ["example.com", "10.0.0.0/8"]}))
    assert internet is None and net is not None
    assert (net.egress, net.allow) == ("allowlist", ["example.com", "10.0.0.0/8"])
    net, _ = egress_of(new(network={"denyOut": ["0.0.0.0/0"]}))
    assert net is not None and net.egress == "none"
    net, _ = egress_of(new(network={"allowOut": ["0.0.0.0/0"]}))
    assert net is not None and net.egress == "internet"
    with pytest.raises(E2BError):
        egress_of(new(network={"denyOut": ["10.0.0.0/8"]}))


def test_watch_events_are_the_net_change() -> None:
    before = {
        "a": ("file", 1, 1.0, 0o644),
        "d": ("dir", 4096, 1.0, 0o755),
        "gone": ("file", 1, 1.0, 0o644),
    }
    after = {
        "a": ("file", 2, 2.0, 0o644),
        "d": ("dir", 4096, 2.0, 0o700),
        "new": ("file", 0, 3.0, 0o644),
    }
    assert m.watch_events(before, after) == [
        {"name": "new", "type": "EVENT_TYPE_CREATE"},
        {"name": "gone", "type": "EVENT_TYPE_REMOVE"},
        {"name": "a", "type": "EVENT_TYPE_WRITE"},
        {"name": "d", "type": "EVENT_TYPE_CHMOD"},
    ]
    assert m.watch_events(after, after) == []
