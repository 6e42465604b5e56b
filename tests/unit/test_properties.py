"""Hostile input, as properties: whatever a client sends, the parser, the
built-in ops' argument checks and the encoders answer with a value or with
their one documented error, never with anything else.

Pure functions only: no broker, no store, no sockets. Hypothesis draws the
inputs: arbitrary text and bytes, arbitrary JSON (huge integers, NaN and
infinities, long strings, deep nesting), and frames whose ``type`` is right
but whose fields are anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumers.builtin import (
    DIRECT_ROUNDS,
    pbkdf2_hex,
    pbkdf2_hex_of,
    pbkdf2_start,
    pbkdf2_step,
    register_builtins,
)
from consumers.registry import BadArgs, Registry
from protocol import (
    MAX_ARGS_DEPTH,
    MAX_ID_LENGTH,
    Auth,
    Cancel,
    ErrorCode,
    Login,
    ProtocolError,
    Register,
    Resume,
    Status,
    Submit,
    encode_accepted,
    encode_error,
    encode_json,
    encode_progress,
    encode_result,
    encode_status,
    encode_welcome,
    parse,
)

# A few seconds per property by default; SESSIONQ_TEST_EXAMPLES=5000 for a long hunt.
settings.register_profile(
    "sessionq",
    max_examples=int(os.environ.get("SESSIONQ_TEST_EXAMPLES", "100")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sessionq")


@pytest.fixture(scope="session", autouse=True)
def _broker_answers() -> None:
    """These tests need no broker: this stands in for tests/conftest.py's check."""


# --- strategies ------------------------------------------------------------------

FRAME_TYPES = ["submit", "cancel", "status", "auth", "login", "register", "resume"]
FIELDS = ["type", "id", "op", "args", "token", "username", "password", "session", "after"]
ARG_NAMES = ["seconds", "to", "interval", "data", "rounds", "key", "value", "prefix"]

huge_ints = st.integers(min_value=-(10**30), max_value=10**30) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**400, -(10**400)]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.builds(lambda c, n: c * n, st.characters(), st.integers(100, 100_000))
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=30,
)


def dumps(value: Any) -> str:
    """JSON text of anything ``json_values`` draws: huge integers stay exact,
    NaN and infinities become the tokens that strict JSON refuses."""
    return json.dumps(value, allow_nan=True)


def nested(depth: int, leaf: str = "1") -> str:
    text = leaf
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"a":{text}}}'
    return text


# --- (a) the frame parser ----------------------------------------------------------


def check_parse(data: str | bytes) -> None:
    """``parse`` returns a client frame or raises ProtocolError(bad_request)
    with a short message; a frame it returns can be encoded again."""
    try:
        frame = parse(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert isinstance(exc.message, str) and 0 < len(exc.message) <= 300
        if exc.id is not None:
            assert 0 < len(exc.id) <= MAX_ID_LENGTH
        return
    assert isinstance(frame, Auth | Login | Register | Submit | Cancel | Status | Resume)
    if isinstance(frame, Submit):
        assert 0 < len(frame.id) <= MAX_ID_LENGTH and type(frame.args) is dict
        # The server stores and publishes the args as JSON: that must work.
        assert orjson.loads(encode_json(frame.args)) == frame.args or _has_nan(frame.args)
    if isinstance(frame, Resume):
        assert type(frame.after) is int and frame.after >= 0


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


@given(st.text())
@example("")
@example("\ud800")
@example('{"type":"submit","id":"a","op":"echo","args":{"x":"\\ud800"}}')
def test_parse_arbitrary_text(text: str) -> None:
    check_parse(text)


@given(st.binary())
def test_parse_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(data)


@given(json_values)
def test_parse_arbitrary_json(value: Any) -> None:
    check_parse(dumps(value))


@given(
    st.sampled_from(FRAME_TYPES),
    st.dictionaries(st.sampled_from(FIELDS[1:]), json_values, max_size=len(FIELDS)),
)
def test_parse_frames_of_every_type_with_arbitrary_fields(
    kind: str, fields: dict[str, Any]
) -> None:
    check_parse(dumps({"type": kind, **fields}))


@given(
    st.sampled_from(FRAME_TYPES),
    st.text(min_size=1, max_size=MAX_ID_LENGTH),
    st.dictionaries(st.sampled_from(ARG_NAMES), json_values, max_size=4),
)
def test_parse_submits_with_arbitrary_args(kind: str, id: str, args: dict[str, Any]) -> None:
    check_parse(dumps({"type": kind, "id": id, "op": "echo", "args": args}))


@given(st.integers(min_value=0, max_value=1100), st.sampled_from(["args", "token", "after"]))
@example(MAX_ARGS_DEPTH, "args")
@example(MAX_ARGS_DEPTH + 1, "args")
@example(300, "args")
def test_parse_deep_nesting(depth: int, name: str) -> None:
    check_parse(f'{{"type":"submit","id":"d","op":"echo","{name}":{nested(depth)}}}')


def test_args_nested_beyond_the_limit_are_refused_with_their_id() -> None:
    deep = f'{{"type":"submit","id":"d","op":"echo","args":{{"a":{nested(MAX_ARGS_DEPTH)}}}}}'
    with pytest.raises(ProtocolError) as caught:
        parse(deep)
    assert caught.value.id == "d"
    assert f"nested deeper than {MAX_ARGS_DEPTH}" in caught.value.message
    ok = f'{{"type":"submit","id":"d","op":"echo","args":{{"a":{nested(MAX_ARGS_DEPTH - 1)}}}}}'
    assert isinstance(parse(ok), Submit)


# --- (b) the built-in ops' argument checks ---------------------------------------------

REGISTRY = Registry()
register_builtins(REGISTRY)
VALIDATED = [name for name in REGISTRY.names() if getattr(REGISTRY.get(name), "validate", None)]
LIMITS = {"max_sleep": 60.0, "cpu_slots": 1}


def check_validate(name: str, args: dict[str, Any]) -> None:
    op = REGISTRY.get(name)
    assert op is not None and op.validate is not None
    try:
        op.validate(args, LIMITS)
    except BadArgs as exc:
        assert exc.code == "bad_request" and 0 < len(exc.message) <= 200


def test_every_builtin_with_arguments_is_checked() -> None:
    assert {"sleep", "count", "hash", "kv.put", "kv.get", "kv.delete", "kv.list"} <= set(VALIDATED)


@given(st.sampled_from(VALIDATED), st.dictionaries(st.text(), json_values, max_size=6))
def test_validate_arbitrary_args(name: str, args: dict[str, Any]) -> None:
    check_validate(name, args)


@given(st.sampled_from(VALIDATED), st.dictionaries(st.sampled_from(ARG_NAMES), json_values))
@example("sleep", {"seconds": 10**400})
@example("count", {"to": 5, "interval": -(10**400)})
@example("sleep", {"seconds": math.nan})
@example("hash", {"data": "x", "rounds": 10**400})
def test_validate_the_ops_own_arguments_with_arbitrary_values(
    name: str, args: dict[str, Any]
) -> None:
    check_validate(name, args)


@given(st.sampled_from(VALIDATED), json_values)
def test_validate_args_from_the_wire(name: str, value: Any) -> None:
    """What a submit can carry: anything that parses as its ``args``."""
    try:
        frame = parse(dumps({"type": "submit", "id": "v", "op": name, "args": value}))
    except ProtocolError:
        return
    assert isinstance(frame, Submit)
    check_validate(name, frame.args)


@given(st.text(max_size=300), st.integers(min_value=1, max_value=60))
@example("k" * 65, 3)
@example("", 1)
def test_the_stepped_pbkdf2_chain_is_pbkdf2(data: str, rounds: int) -> None:
    state = pbkdf2_start(data, rounds)
    done = rounds == 1
    while not done:
        done, state = pbkdf2_step(state)
    expected = hashlib.pbkdf2_hmac("sha256", data.encode(), b"sessionq", rounds, 32).hex()
    assert pbkdf2_hex_of(state) == expected == pbkdf2_hex(data, rounds)


def test_the_stepped_chain_agrees_across_steps() -> None:
    rounds = DIRECT_ROUNDS + 3  # more than one step
    state = pbkdf2_start("across", rounds)
    done = False
    steps = 0
    while not done:
        done, state = pbkdf2_step(state)
        steps += 1
    assert steps >= 2
    assert pbkdf2_hex_of(state) == pbkdf2_hex("across", rounds)


# --- (c) the encoders ---------------------------------------------------------------------


def _normalised(value: Any) -> Any:
    """What the encoders promise to send for ``value``: NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def _fits(value: Any) -> bool:
    """orjson encodes integers of at most 64 bits."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, list):
        return all(_fits(v) for v in value)
    if isinstance(value, dict):
        return all(_fits(v) for v in value.values())
    return True


@given(json_values)
def test_encode_result_progress_and_json(value: Any) -> None:
    encoders = [
        lambda v: encode_result("r", 7, v),
        lambda v: encode_progress("r", 7, v),
        lambda v: encode_json({"value": v}),
    ]
    for encode in encoders:
        try:
            data = encode(value)
        except TypeError as exc:
            assert not _fits(value), exc
            continue
        assert _fits(value)
        frame = orjson.loads(data)
        assert frame["value" if "value" in frame else "data"] == _normalised(value)


@given(json_values)
def test_a_value_too_deep_to_encode_is_a_type_error_naming_the_request(value: Any) -> None:
    deep: Any = value
    for _ in range(300):
        deep = [deep]
    with pytest.raises(TypeError, match="'deep'"):
        encode_result("deep", 1, deep)


@given(json_values, st.text(), st.integers(min_value=0, max_value=2**63 - 1))
def test_encode_error_status_and_the_rest(extra: Any, text: str, n: int) -> None:
    try:
        frame = orjson.loads(encode_error("bad_request", text, "i", n, retry_after=extra))
    except TypeError as exc:
        # Only what JSON cannot carry is refused (an integer over 64 bits, a
        # lone surrogate in a string).
        with pytest.raises(TypeError):
            orjson.dumps([text, extra])
        assert not _fits(extra) or "surrogates" in str(exc), exc
    else:
        assert list(frame)[:5] == ["type", "id", "seq", "code", "message"]
        assert frame["retry_after"] == _normalised(extra) and frame["message"] == text
    for data in (
        encode_status(text, n, n, n, id=text, state="queued", ahead=n),
        encode_accepted(text, n, n),
        encode_welcome(text, text, text, n, n, n),
    ):
        decoded = orjson.loads(data)
        assert next(iter(decoded)) == "type" and text in decoded.values()
