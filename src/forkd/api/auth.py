"""Bearer-token authentication of the daemon: token loading rules, bind safety, ASGI middleware.

The middleware is plain ASGI (no per-request objects beyond one header scan) and compares tokens
with :func:`hmac.compare_digest`. ``/healthz`` stays open so supervisors can probe liveness.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import stat
import sys
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkd.api.asgi import error_messages
from forkd.errors import HostSetupError, InvalidInput

MIN_TOKEN_BYTES = 16
OPEN_PATHS = frozenset({"/healthz"})

# A token made only of these words (and digits / separators) is a placeholder, not a secret.
_PLACEHOLDER_WORDS = (
    "changeme", "change", "me", "replace", "token", "secret", "password", "passwd", "pass",
    "example", "placeholder", "default", "insecure", "test", "testing", "dummy", "your", "my",
    "here", "api", "key", "forkd", "bearer", "admin", "auth", "todo", "fixme", "xxx",
)  # fmt: skip
_PLACEHOLDER_RE = re.compile("(?:" + "|".join(sorted(_PLACEHOLDER_WORDS, key=len)[::-1]) + ")+")
# Phrases of template files and docs; found anywhere in a token's letters, they mark it as one
# someone forgot to fill in (``REPLACE_ME_WITH_32_BYTES_BASE64``, ``CHANGE_ME_TO_A_SECRET``). Each
# is 8+ letters, so a random token contains one by chance with negligible probability.
_PLACEHOLDER_PHRASES = (
    "replaceme", "changeme", "yourtoken", "yoursecret", "yourkey", "tokenhere", "secrethere",
    "keyhere", "insertyour", "putyour", "fillmein", "placeholder", "generatea", "randombytes",
    "notasecret", "dontuse", "donotuse",
)  # fmt: skip
# A constant's name, not a secret: upper-case words joined by underscores (``SOME_TOKEN_VALUE``).
_CONSTANT_RE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+){2,}")
_MIN_DISTINCT_CHARS = 5


def token_problem(token: str) -> str | None:
    """Why ``token`` is unfit as a bearer secret, or None when it is acceptable."""
    raw = token.encode("utf-8", "surrogateescape")
    if len(raw) < MIN_TOKEN_BYTES:
        return f"it is {len(raw)} bytes long; use at least {MIN_TOKEN_BYTES}"
    if not all(0x21 <= b <= 0x7E for b in raw):
        return "it must be printable ASCII without spaces"
    if len(set(token.lower())) < _MIN_DISTINCT_CHARS:
        return "it repeats too few characters to be a secret"
    letters = re.sub(r"[^a-z]", "", token.lower())
    if letters and _PLACEHOLDER_RE.fullmatch(letters):
        return "it looks like a placeholder ('changeme', 'secret', 'password', ...)"
    phrase = next((p for p in _PLACEHOLDER_PHRASES if p in letters), None)
    if phrase is not None:
        return f"it looks like a placeholder (it says {phrase!r}); generate a random one"
    if _CONSTANT_RE.fullmatch(token) and re.search(r"[A-Z]{4}", token):
        return "it looks like a placeholder (an upper-case NAME_LIKE_THIS); generate a random one"
    return None


def load_token(path: Path) -> str:
    """Read the bearer token from ``path`` (surrounding whitespace stripped) and vet it.

    Raises :class:`InvalidInput` for an unfit token and :class:`HostSetupError` when the file
    cannot be read. Warns on stderr when other users may read the file.
    """
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise HostSetupError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidInput(f"token file {path} is not UTF-8 text") from None
    problem = token_problem(token)
    if problem is not None:
        raise InvalidInput(
            f"refusing the token in {path}: {problem} (make one with "
            f"'openssl rand -hex 32 > {path}')"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"forkd: warning: token file {path} is readable by other users; chmod 600 it",
            file=sys.stderr,
        )
    return token


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into its parts; :class:`InvalidInput` if malformed."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidInput(f"--bind takes HOST:PORT (e.g. 127.0.0.1:8889), got {bind!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise InvalidInput(f"--bind port must be 0..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise InvalidInput(f"--bind takes HOST:PORT, got {bind!r}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: could resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token."""
    if token is None and not is_loopback(host):
        raise InvalidInput(
            f"refusing to listen on {host} without a token: anyone who can reach it could run "
            "code in your sandboxes. Pass --token-file FILE (>= 16 random bytes, e.g. "
            "'openssl rand -hex 32 > FILE'), or bind to 127.0.0.1"
        )


def _unauthorized(message: str) -> tuple[Message, Message]:
    return error_messages(401, message, ((b"www-authenticate", b'Bearer realm="forkd"'),))


_MISSING = _unauthorized("missing bearer token")
_INVALID = _unauthorized("invalid bearer token")


class BearerAuthMiddleware:
    """Answer 401 unless ``Authorization: Bearer <token>`` matches (every path but /healthz).

    Paths under ``open_prefixes`` are left to their routes, which authenticate themselves.
    """

    def __init__(
        self, app: ASGIApp, token: str | None, open_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None
        self._open_prefixes = open_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._token is None
            or scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or (self._open_prefixes and scope["path"].startswith(self._open_prefixes))
        ):
            await self.app(scope, receive, send)
            return
        value: bytes | None = None
        for name, header in scope["headers"]:
            if name == b"authorization":
                value = header
                break
        reply = _MISSING
        if value is not None:
            scheme, _, presented = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and presented.strip():
                if hmac.compare_digest(presented.strip(), self._token):
                    await self.app(scope, receive, send)
                    return
                reply = _INVALID
        await send(reply[0])
        await send(reply[1])
