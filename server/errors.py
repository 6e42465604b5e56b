"""The server's internal failures, and the one place they become wire codes.

Exception tree (what the server raises and catches; none of these texts is
ever sent to a client)::

    Exception
    ├── SessionUnavailable         a resume cannot take the session it names
    │   ├── SessionNotFound        unknown, or another user's
    │   ├── SessionExpired         its results have passed their retention
    │   └── SessionBusy            another process still owns it after the wait
    ├── StoreError (server.store)  the store failed; Fenced: an older epoch wrote
    ├── BrokerError (server.broker) the broker failed; QueueFull: x-max-length
    └── AuthError (server.auth)    carries its own wire code and a message
                                   written for clients
    ProtocolError (protocol)       a bad client frame, with its wire code

:func:`wire_error` maps each of them to an :class:`~protocol.ErrorCode` and a
fixed message for clients; :func:`error_frame` encodes that as an ``error``
frame. Anything else is ``internal``: a client never sees a traceback or the
text of an internal exception.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from protocol import ErrorCode, ProtocolError, encode_error
from server.auth import AuthError
from server.broker import BrokerError, QueueFull
from server.store import Fenced, StoreError

__all__ = [
    "SessionBusy",
    "SessionExpired",
    "SessionNotFound",
    "SessionUnavailable",
    "WireError",
    "error_frame",
    "wire_error",
]


class SessionUnavailable(Exception):
    """A resume cannot take the session it names."""


class SessionNotFound(SessionUnavailable):
    """No such session, or it belongs to another user (the two look the same
    from outside)."""


class SessionExpired(SessionUnavailable):
    """The session's results have passed their retention: some of what the
    client asked for is gone."""


class SessionBusy(SessionUnavailable):
    """Another process still owns the session after one lease period of
    waiting for it to let go."""


class WireError(NamedTuple):
    code: ErrorCode
    message: str


# Fixed texts: an internal exception's own text (a path, a host, a driver's
# message) stays in the server's log. Checked in order: subclasses first.
# PROTOCOL.md gives resume only not_found and expired, so busy is not_found.
_FIXED: tuple[tuple[type[BaseException], ErrorCode, str], ...] = (
    (SessionNotFound, ErrorCode.NOT_FOUND, "no such session for this user"),
    (SessionExpired, ErrorCode.EXPIRED, "the session's results have passed their retention"),
    (SessionBusy, ErrorCode.NOT_FOUND, "another server still owns the session; try again"),
    (Fenced, ErrorCode.UNAVAILABLE, "the session moved to another server; resume it"),
    (StoreError, ErrorCode.UNAVAILABLE, "the store is unavailable; retry"),
    (QueueFull, ErrorCode.QUEUE_FULL, "the session's queue is full"),
    (BrokerError, ErrorCode.UNAVAILABLE, "the broker is unreachable; retry"),
)
_INTERNAL = WireError(ErrorCode.INTERNAL, "internal error")


def wire_error(exc: BaseException) -> WireError:
    """The wire code and client message for ``exc``."""
    if isinstance(exc, AuthError | ProtocolError):
        return WireError(exc.code, exc.message)  # their messages are written for clients
    for kind, code, message in _FIXED:
        if isinstance(exc, kind):
            return WireError(code, message)
    return _INTERNAL


def error_frame(exc: BaseException, id: str | None = None) -> bytes:
    """The ``error`` frame answering ``exc`` (with the request's ``id`` if any)."""
    code, message = wire_error(exc)
    if id is None and isinstance(exc, ProtocolError):
        id = exc.id
    extra: dict[str, Any] = {}
    if isinstance(exc, AuthError) and exc.retry_after is not None:
        extra["retry_after"] = exc.retry_after
    return encode_error(code, message, id, **extra)
