"""server.errors: every internal failure becomes one wire code and a fixed
message; no internal text reaches a client."""

from __future__ import annotations

import orjson
import pytest

from protocol import ErrorCode, ProtocolError
from server.auth import AuthError
from server.broker import BrokerError, QueueFull
from server.errors import (
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionUnavailable,
    error_frame,
    wire_error,
)
from server.store import Fenced, StoreError, UserExists

SECRET = "/srv/private/sq.db: disk I/O error at 10.0.0.7"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SessionNotFound(SECRET), ErrorCode.NOT_FOUND),
        (SessionExpired(SECRET), ErrorCode.EXPIRED),
        (SessionBusy(SECRET), ErrorCode.NOT_FOUND),
        (StoreError(SECRET), ErrorCode.UNAVAILABLE),
        (UserExists(SECRET), ErrorCode.UNAVAILABLE),
        (Fenced(SECRET), ErrorCode.UNAVAILABLE),
        (BrokerError(SECRET), ErrorCode.UNAVAILABLE),
        (QueueFull(SECRET), ErrorCode.QUEUE_FULL),
        (RuntimeError(SECRET), ErrorCode.INTERNAL),
        (KeyError(SECRET), ErrorCode.INTERNAL),
    ],
)
def test_internal_failures_map_to_a_code_and_a_fixed_message(
    exc: Exception, code: ErrorCode
) -> None:
    answer = wire_error(exc)
    assert answer.code is code
    assert answer.message and SECRET not in answer.message
    assert answer == wire_error(type(exc)("something else entirely"))  # fixed text


def test_resume_failures_share_a_base_class() -> None:
    for kind in (SessionNotFound, SessionExpired, SessionBusy):
        assert issubclass(kind, SessionUnavailable)


def test_distinct_failures_get_distinct_messages() -> None:
    kinds = [
        SessionNotFound,
        SessionExpired,
        SessionBusy,
        Fenced,
        StoreError,
        QueueFull,
        BrokerError,
    ]
    messages = [wire_error(kind()).message for kind in kinds]
    assert len(set(messages)) == len(messages)


def test_auth_and_protocol_errors_keep_their_code_and_client_message() -> None:
    auth = AuthError(ErrorCode.RATE_LIMITED, "too many failed logins; try again later", 2.5)
    assert wire_error(auth) == (ErrorCode.RATE_LIMITED, "too many failed logins; try again later")
    bad = ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid UTF-8 text", id="r1")
    assert wire_error(bad) == (ErrorCode.BAD_REQUEST, "frame is not valid UTF-8 text")


def test_error_frame_is_a_wire_error_frame() -> None:
    frame = orjson.loads(error_frame(StoreError(SECRET), "r7"))
    assert frame == {
        "type": "error", "id": "r7", "code": "unavailable",
        "message": "the store is unavailable; retry",
    }  # fmt: skip
    limited = orjson.loads(error_frame(AuthError(ErrorCode.RATE_LIMITED, "slow down", 1.5)))
    assert limited == {
        "type": "error", "code": "rate_limited", "message": "slow down", "retry_after": 1.5
    }  # fmt: skip
    bad = orjson.loads(error_frame(ProtocolError(ErrorCode.BAD_REQUEST, "no", id="x")))
    assert (bad["id"], bad["code"]) == ("x", "bad_request")
