"""Every error the wire protocol can carry, defined here once.

Wire error codes (the ``code`` of an ``error`` frame) are the members of
:class:`ErrorCode`; WebSocket close codes are the members of :class:`CloseCode`.
Nothing else in sessionq spells a code as a literal: the server maps its internal
failures to one of these in exactly one place, so a client never sees a
traceback, only a code and a human message.

Exception tree::

    Exception
    └── ProtocolError          a client frame that cannot be accepted; carries the
                               wire code, a message for humans and, when the frame
                               had a valid ``id``, that id (raised by ``parse``)
    TypeError (builtin)        ``encode_result`` / ``encode_progress`` got a value
                               that is not JSON-serialisable (the server answers
                               with ``handler_error``)

Error codes by phase:

- any frame: ``bad_request`` (unparsable or mistyped frame), ``internal``
  (extension: unexpected server fault answering one frame; the connection stays).
- before auth: ``unauthorized``, ``invalid_credentials``, ``user_exists``,
  ``weak_password``, ``invalid_token``, ``token_expired``, ``rate_limited``.
- submit, refused before acceptance (no ``seq``): ``unknown_op``, ``queue_full``,
  ``rate_limited``, ``unavailable``.
- final frame of an accepted request (with ``seq``): ``handler_error`` (or the
  handler's own code), ``timeout``, ``crashed``, ``cancelled``,
  ``result_too_large`` (1.1: the final frame is over SESSIONQ_MAX_RESULT_BYTES),
  ``quota_exceeded`` (1.1: a ``kv.put`` over the user's storage quota).
- cancel / status / resume: ``not_found``, ``expired``, ``not_cancellable``
  (extension: the request is running and its handler cannot be interrupted).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "ErrorCode", "ProtocolError"]


class ErrorCode(StrEnum):
    """The ``code`` field of an ``error`` frame."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    INVALID_CREDENTIALS = "invalid_credentials"
    USER_EXISTS = "user_exists"
    WEAK_PASSWORD = "weak_password"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_OP = "unknown_op"
    QUEUE_FULL = "queue_full"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    HANDLER_ERROR = "handler_error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    UNAVAILABLE = "unavailable"
    # Version 1.1: quotas.
    RESULT_TOO_LARGE = "result_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    # Extension: cancel of a running request whose handler cannot be interrupted.
    NOT_CANCELLABLE = "not_cancellable"
    # Extension: unexpected server fault while answering one frame.
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes sessionq uses (RFC 6455 ones and 4xxx application ones)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect and resume
    POLICY = 1008  # e.g. origin not allowed
    TOO_BIG = 1009  # frame over max_message_bytes
    INTERNAL = 1011  # unexpected server fault on this connection
    UNAUTHORIZED = 4401
    AUTH_TIMEOUT = 4408
    TAKEN_OVER = 4409  # a newer connection resumed this session
    TOO_MANY_CONNECTIONS = 4429
    SLOW_CONSUMER = 4503  # client did not read fast enough: reconnect and resume


class ProtocolError(Exception):
    """A client frame that cannot be accepted.

    Carries the wire ``code``, a human ``message`` and, when the frame had a
    valid ``id`` (submit, cancel, status), that ``id`` so the client can match
    the reply to its request. ``str(exc)`` is the message.
    """

    def __init__(self, code: ErrorCode, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, id={self.id!r})"
