"""Pure protocol tests: parse, encoders, credential rules. No I/O, milliseconds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from protocol import (
    USERNAME_RE,
    Auth,
    Cancel,
    CloseCode,
    ErrorCode,
    Login,
    ProtocolError,
    Register,
    Resume,
    Status,
    Submit,
    decode_json,
    encode_accepted,
    encode_error,
    encode_json,
    encode_progress,
    encode_result,
    encode_resumed,
    encode_status,
    encode_welcome,
    error_from,
    parse,
    valid_username,
    weak_password,
)

ID128 = "i" * 128
ID129 = "i" * 129


def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


def bad(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message
    return info.value


# --- parse: valid frames ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"type": "auth", "token": "t"}, Auth("t")),
        ({"type": "auth", "token": ""}, Auth("")),
        ({"type": "login", "username": "al", "password": "pw"}, Login("al", "pw")),
        # content of credentials is not judged by the parser
        ({"type": "login", "username": "", "password": ""}, Login("", "")),
        ({"type": "register", "username": "bo b!", "password": "x"}, Register("bo b!", "x")),
        ({"type": "submit", "id": "1", "op": "echo"}, Submit("1", "echo", {})),
        (
            {"type": "submit", "id": ID128, "op": "o" * 128, "args": {"a": [1, {"b": None}]}},
            Submit(ID128, "o" * 128, {"a": [1, {"b": None}]}),
        ),
        ({"type": "submit", "id": "é", "op": "kv.put", "args": {}}, Submit("é", "kv.put", {})),
        ({"type": "cancel", "id": "x"}, Cancel("x")),
        ({"type": "cancel", "id": ID128}, Cancel(ID128)),
        ({"type": "status"}, Status(None)),
        ({"type": "status", "id": "x"}, Status("x")),
        ({"type": "resume", "session": "s"}, Resume("s", 0)),
        ({"type": "resume", "session": "s" * 128, "after": 0}, Resume("s" * 128, 0)),
        ({"type": "resume", "session": "s", "after": 2**62}, Resume("s", 2**62)),
        # unknown extra fields are ignored
        ({"type": "cancel", "id": "x", "future": {"x": 1}, "v": 2}, Cancel("x")),
    ],
)
def test_parse_ok(fields: dict[str, Any], expected: object) -> None:
    assert parse(frame(**fields)) == expected


def test_parse_defaults_are_fresh_objects() -> None:
    first = parse(frame(type="submit", id="1", op="echo"))
    second = parse(frame(type="submit", id="2", op="echo"))
    assert isinstance(first, Submit) and isinstance(second, Submit)
    assert first.args == {} and first.args is not second.args


def test_frames_are_frozen_and_slotted() -> None:
    sub = Submit("1", "echo")
    with pytest.raises(AttributeError):
        sub.id = "2"  # type: ignore[misc]
    assert not hasattr(sub, "__dict__")


def test_parse_whitespace_and_unicode_escapes() -> None:
    assert parse(' \n{"type" : "cancel", "id": "\\u00e9"}\t') == Cancel("é")


# --- parse: refused frames --------------------------------------------------------


def test_binary_refused() -> None:
    err = bad(b'{"type":"status"}')
    assert err.message == "binary frames are not accepted; send JSON text"
    assert err.id is None


def test_invalid_utf8_bytes_refused() -> None:
    assert bad(b"\xff\xfe{").id is None


def test_lone_surrogate_text_refused() -> None:
    # what a lenient decoder (surrogateescape) makes of invalid UTF-8
    err = bad('{"type":"cancel","id":"\udcff"}')
    assert "UTF-8" in err.message


@pytest.mark.parametrize(
    "text", ["", " ", "{", '{"type":"status"', "{'type':'status'}", "NaN", '{"type":"status"}x']
)
def test_invalid_json_refused(text: str) -> None:
    assert "JSON" in bad(text).message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[]", "array"),
        ('[{"type":"status"}]', "array"),
        ("1", "number"),
        ("1.5", "number"),
        ('"status"', "string"),
        ("null", "null"),
        ("true", "boolean"),
    ],
)
def test_non_object_refused(text: str, kind: str) -> None:
    err = bad(text)
    assert "JSON object" in err.message and kind in err.message


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"id":"x"}',
        '{"type":null}',
        '{"type":1}',
        '{"type":true}',
        '{"type":["status"]}',
        '{"type":{"a":1}}',
    ],
)
def test_missing_or_non_string_type_refused(text: str) -> None:
    err = bad(text)
    assert "'type'" in err.message
    assert err.id is None


@pytest.mark.parametrize("kind", ["", "Submit", "STATUS", "welcome", "error", "x" * 1000])
def test_unknown_type_refused(kind: str) -> None:
    err = bad(frame(type=kind, id="x"))
    assert "unknown frame type" in err.message
    assert len(err.message) < 200
    assert err.id is None


# Each case: frame fields, the faulty field, the id the error must carry.
FIELD_CASES: list[tuple[dict[str, Any], str, str | None]] = [
    ({"type": "auth"}, "token", None),
    ({"type": "auth", "token": None}, "token", None),
    ({"type": "auth", "token": 1}, "token", None),
    ({"type": "login", "password": "p"}, "username", None),
    ({"type": "login", "username": "u"}, "password", None),
    ({"type": "login", "username": 1, "password": "p"}, "username", None),
    ({"type": "login", "username": "u", "password": ["p"]}, "password", None),
    ({"type": "register", "password": "p"}, "username", None),
    ({"type": "register", "username": "u"}, "password", None),
    ({"type": "register", "username": None, "password": "p"}, "username", None),
    ({"type": "register", "username": "u", "password": 12345678}, "password", None),
    # submit: id problems -> no id in the error
    ({"type": "submit", "op": "echo"}, "id", None),
    ({"type": "submit", "id": "", "op": "echo"}, "id", None),
    ({"type": "submit", "id": ID129, "op": "echo"}, "id", None),
    ({"type": "submit", "id": 7, "op": "echo"}, "id", None),
    ({"type": "submit", "id": True, "op": "echo"}, "id", None),
    ({"type": "submit", "id": None, "op": "echo"}, "id", None),
    ({"type": "submit", "id": ID129, "op": 1}, "id", None),
    # submit: other fields wrong while id is valid -> id in the error
    ({"type": "submit", "id": "r1"}, "op", "r1"),
    ({"type": "submit", "id": "r1", "op": ""}, "op", "r1"),
    ({"type": "submit", "id": "r1", "op": "o" * 129}, "op", "r1"),
    ({"type": "submit", "id": "r1", "op": 3}, "op", "r1"),
    ({"type": "submit", "id": ID128, "op": "echo", "args": []}, "args", ID128),
    ({"type": "submit", "id": "r1", "op": "echo", "args": None}, "args", "r1"),
    ({"type": "submit", "id": "r1", "op": "echo", "args": "x"}, "args", "r1"),
    ({"type": "submit", "id": "r1", "op": "echo", "args": 1}, "args", "r1"),
    ({"type": "submit", "id": "r1", "op": "echo", "args": False}, "args", "r1"),
    # cancel
    ({"type": "cancel"}, "id", None),
    ({"type": "cancel", "id": ""}, "id", None),
    ({"type": "cancel", "id": ID129}, "id", None),
    ({"type": "cancel", "id": 1}, "id", None),
    ({"type": "cancel", "id": None}, "id", None),
    # status: optional id, but must be valid when present
    ({"type": "status", "id": ""}, "id", None),
    ({"type": "status", "id": ID129}, "id", None),
    ({"type": "status", "id": 5}, "id", None),
    ({"type": "status", "id": None}, "id", None),
    # resume
    ({"type": "resume"}, "session", None),
    ({"type": "resume", "session": ""}, "session", None),
    ({"type": "resume", "session": "s" * 129}, "session", None),
    ({"type": "resume", "session": 1}, "session", None),
    ({"type": "resume", "session": "s", "after": -1}, "after", None),
    ({"type": "resume", "session": "s", "after": "1"}, "after", None),
    ({"type": "resume", "session": "s", "after": 1.0}, "after", None),
    ({"type": "resume", "session": "s", "after": 1.5}, "after", None),
    ({"type": "resume", "session": "s", "after": None}, "after", None),
    ({"type": "resume", "session": "s", "after": True}, "after", None),
    ({"type": "resume", "session": "s", "after": False}, "after", None),
]


@pytest.mark.parametrize(("fields", "name", "id"), FIELD_CASES)
def test_bad_field_refused(fields: dict[str, Any], name: str, id: str | None) -> None:
    err = bad(frame(**fields))
    assert f"'{name}'" in err.message
    assert fields["type"] in err.message
    assert ("missing" in err.message) is (name not in fields)
    assert err.id == id


def test_bool_is_not_an_int_message() -> None:
    err = bad(frame(type="resume", session="s", after=True))
    assert err.message == "resume: field 'after' must be an integer >= 0, got a boolean"


def test_messages_do_not_echo_long_values() -> None:
    err = bad(frame(type="submit", id="x" * 10_000, op="echo"))
    assert err.message == (
        "submit: field 'id' must be a string of 1..128 characters, got a string of 10000 characters"
    )


def test_error_from_carries_id() -> None:
    err = bad(frame(type="submit", id="r9", op="echo", args=[1]))
    assert orjson.loads(error_from(err)) == {
        "type": "error",
        "id": "r9",
        "code": "bad_request",
        "message": "submit: field 'args' must be a JSON object, got an array",
    }
    no_id = bad(b"\x00")
    assert orjson.loads(error_from(no_id)) == {
        "type": "error",
        "code": "bad_request",
        "message": "binary frames are not accepted; send JSON text",
    }


def test_protocol_error_shape() -> None:
    exc = ProtocolError(ErrorCode.NOT_FOUND, "no such request", id="a")
    assert (exc.code, exc.message, exc.id) == (ErrorCode.NOT_FOUND, "no such request", "a")
    assert str(exc) == "no such request"
    assert "not_found" in repr(exc)
    assert ProtocolError(ErrorCode.BAD_REQUEST, "m").id is None


def test_codes() -> None:
    assert ErrorCode.NOT_CANCELLABLE.value == "not_cancellable"
    assert ErrorCode.INTERNAL.value == "internal"
    assert ErrorCode.RESULT_TOO_LARGE.value == "result_too_large"  # 1.1
    assert ErrorCode.QUOTA_EXCEEDED.value == "quota_exceeded"  # 1.1
    assert len({c.value for c in ErrorCode}) == len(ErrorCode) == 21
    assert CloseCode.TOO_BIG.value == 1009
    assert CloseCode.TAKEN_OVER.value == 4409
    assert CloseCode.SLOW_CONSUMER.value == 4503


# --- encoders ------------------------------------------------------------------------


def test_encode_welcome() -> None:
    raw = encode_welcome("s1", "ann", "jwt", 1700000000, 100, 65536)
    assert isinstance(raw, bytes)
    decoded = orjson.loads(raw)
    assert decoded == {
        "type": "welcome",
        "session": "s1",
        "user": "ann",
        "token": "jwt",
        "expires_at": 1700000000,
        "limits": {"max_pending": 100, "max_message_bytes": 65536},
    }
    assert list(decoded) == ["type", "session", "user", "token", "expires_at", "limits"]


def test_encode_accepted() -> None:
    raw = encode_accepted("r1", 3, 2)
    assert raw == b'{"type":"accepted","id":"r1","seq":3,"ahead":2}'


@pytest.mark.parametrize("data", [None, 1, "x", [1, 2], {"i": 1}, {"nested": {"é": [True]}}])
def test_encode_progress(data: Any) -> None:
    assert orjson.loads(encode_progress("r1", 4, data)) == {
        "type": "progress",
        "id": "r1",
        "seq": 4,
        "data": data,
    }


@pytest.mark.parametrize("value", [None, 0, 1.5, "x", [], {}, {"count": 3, "l": [None]}])
def test_encode_result(value: Any) -> None:
    decoded = orjson.loads(encode_result("r1", 5, value))
    assert decoded == {"type": "result", "id": "r1", "seq": 5, "value": value}
    assert list(decoded) == ["type", "id", "seq", "value"]


@pytest.mark.parametrize(
    "value", [{1, 2}, {1: "non-str key"}, 2**70, object(), b"bytes", {"a": {"b": {3}}}, "\ud800"]
)
def test_unserializable_raises_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match=r"result of request 'r1' \(seq 5\) is not JSON"):
        encode_result("r1", 5, value)
    with pytest.raises(TypeError, match=r"progress data of request 'r1' \(seq 5\) is not JSON"):
        encode_progress("r1", 5, value)
    with pytest.raises(TypeError):
        encode_json(value)


def test_encode_error_minimal() -> None:
    raw = encode_error(ErrorCode.UNAUTHORIZED, "authenticate first")
    decoded = orjson.loads(raw)
    assert decoded == {"type": "error", "code": "unauthorized", "message": "authenticate first"}


def test_encode_error_full() -> None:
    decoded = orjson.loads(encode_error(ErrorCode.HANDLER_ERROR, "boom", id="r1", seq=7))
    assert decoded == {
        "type": "error",
        "id": "r1",
        "seq": 7,
        "code": "handler_error",
        "message": "boom",
    }
    assert list(decoded) == ["type", "id", "seq", "code", "message"]


def test_encode_error_extras_and_str_code() -> None:
    decoded = orjson.loads(encode_error("rate_limited", "slow down", retry_after=2.5, n=1))
    assert decoded == {
        "type": "error",
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": 2.5,
        "n": 1,
    }
    assert list(decoded)[-2:] == ["retry_after", "n"]
    assert orjson.loads(encode_error("app_code", "x", seq=0))["seq"] == 0


def test_encode_error_rejects_type_extra() -> None:
    with pytest.raises(TypeError, match="type"):
        encode_error(ErrorCode.INTERNAL, "x", type="result")


def test_encode_status() -> None:
    assert orjson.loads(encode_status("s", 2, 9, 7)) == {
        "type": "status",
        "session": "s",
        "pending": 2,
        "last_seq": 9,
        "last_done": 7,
    }
    full = orjson.loads(encode_status("s", 2, 9, 7, id="r8", state="queued", ahead=1))
    assert full == {
        "type": "status",
        "session": "s",
        "pending": 2,
        "last_seq": 9,
        "last_done": 7,
        "id": "r8",
        "state": "queued",
        "ahead": 1,
    }
    assert list(full) == [
        "type",
        "session",
        "pending",
        "last_seq",
        "last_done",
        "id",
        "state",
        "ahead",
    ]
    done = orjson.loads(encode_status("s", 0, 9, 9, id="r9", state="done"))
    assert "ahead" not in done and done["state"] == "done"
    assert orjson.loads(encode_status("s", 0, 0, 0, ahead=0))["ahead"] == 0


def test_encode_resumed() -> None:
    assert (
        encode_resumed("s", 12, 3) == b'{"type":"resumed","session":"s","last_seq":12,"pending":3}'
    )


def test_json_helpers() -> None:
    value = {"a": [1, 2.5, None, True, "é"], "b": {}}
    assert decode_json(encode_json(value)) == value
    assert decode_json(encode_json(value).decode()) == value
    with pytest.raises(ValueError):
        decode_json("{")


# --- credentials --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "A", "0", "_", ".", "-", "a.b-c_d", "Z" * 64, "x" * 63 + "9"],
)
def test_valid_username(name: str) -> None:
    assert valid_username(name)
    assert USERNAME_RE.match(name)


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "a b", "a@b", "a/b", "é", "\uff41", "a\n", "\na", "a\x00", "\u0661", "a+b"],
)
def test_invalid_username(name: str) -> None:
    assert not valid_username(name)
    assert USERNAME_RE.search(name) is None


@pytest.mark.parametrize(
    ("username", "password", "weak"),
    [
        ("ann", "", True),
        ("ann", "1234567", True),  # 7 chars
        ("ann", "12345678", False),  # 8 chars
        ("ann", "ééééééé", True),  # 7 characters, 14 bytes
        ("ann", "ééééééééé", False),
        ("longusername", "longusername", True),
        ("LongUserName", "longUSERNAME", True),
        ("longusername", "longusername1", False),
        ("password", "PASSWORD", True),
        ("ann", "password", False),  # no composition rules
    ],
)
def test_weak_password(username: str, password: str, weak: bool) -> None:
    assert weak_password(username, password) is weak
