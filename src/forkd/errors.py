"""The one error hierarchy of forkd.

Every layer raises a subclass of :class:`ForkdError`; the daemon maps ``http_status`` to the
response code and ``str(error)`` to the ``{"error": ...}`` body, the CLI prints it on one line.
"""

from __future__ import annotations

import errno


class ForkdError(Exception):
    """Base of every error forkd raises on purpose."""

    http_status = 500


class InvalidInput(ForkdError):
    """A caller-supplied value (tag, id, count, path, size) is not acceptable."""

    http_status = 400


class NotFound(ForkdError):
    """The named snapshot, sandbox or image does not exist."""

    http_status = 404


class Conflict(ForkdError):
    """The request clashes with current state (tag exists, snapshot not ready, dependents)."""

    http_status = 409


class Unavailable(ForkdError):
    """A capacity bound is in force (branch concurrency, max sandboxes); retry later."""

    http_status = 503


class NotImplementedYet(ForkdError):
    """An endpoint of the wire API that this build does not provide."""

    http_status = 501


class PayloadTooLarge(ForkdError):
    """A request body, or the file it carries, does not fit."""

    http_status = 413


class GatewayTimeout(ForkdError):
    """An operation did not finish within the bound the daemon puts on it."""

    http_status = 504


class HostSetupError(ForkdError):
    """The host lacks something forkd needs (QEMU, debootstrap, tmpfs space, ...)."""


class ImageError(ForkdError):
    """Building or loading a guest image failed."""


class ImageSourceError(ImageError):
    """An image to import cannot be read or used: no such image, unreachable registry, not an
    image, another platform."""

    http_status = 422


class VMError(ForkdError):
    """A QEMU process failed to start, answer QMP, migrate or stop."""


class QemuGone(VMError):
    """A QEMU process exited (killed or crashed) in the middle of an operation. Nothing the
    caller sent was wrong and a retry may well succeed: 503 (a sandbox's own QEMU: 410)."""

    http_status = 503


class AgentError(ForkdError):
    """The guest agent could not be reached or answered with an error."""


class AgentProtocolError(AgentError):
    """The guest agent broke the protocol: a line over the cap, a malformed or out-of-bounds
    reply, or a flood of lines nobody asked for. The guest is at fault, not the request: 502."""

    http_status = 502


class GuestOSError(AgentError):
    """The guest kernel refused a file or process operation; ``errno`` is the guest's.

    Refusals that are about the request (a directory not empty, permission denied, disk full)
    answer 4xx; anything else stays a 500.
    """

    def __init__(self, message: str, errno_code: int | None) -> None:
        super().__init__(message)
        self.errno = errno_code
        if errno_code in _CONFLICT_ERRNOS:
            self.http_status = 409
        elif errno_code in _FULL_ERRNOS:
            self.http_status = 413
        elif errno_code in _INVALID_ERRNOS:
            self.http_status = 400


_CONFLICT_ERRNOS = frozenset({errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.ETXTBSY})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_INVALID_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG,
    errno.EROFS, errno.ELOOP, errno.EXDEV, errno.ENXIO, errno.ENODEV,
})  # fmt: skip


class SandboxDead(AgentError):
    """The sandbox's QEMU process is gone; nothing can be asked of it."""

    http_status = 410
