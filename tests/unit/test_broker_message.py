"""The broker message format (server.broker_message): pure, no broker."""

from __future__ import annotations

import pytest

from server.broker_message import BrokerMessageError, decode_batch, encode_batch


def test_round_trip_keeps_order_and_fields() -> None:
    body = encode_batch(
        [
            (1, "a", "echo", '{"x": 1}'),
            (2, "b", "kv.put", '{"key": "k", "value": "v"}', 3),
            (3, "c", "sleep", "{}"),
        ]
    )
    assert decode_batch(body) == [
        (1, "a", "echo", {"x": 1}, 1),
        (2, "b", "kv.put", {"key": "k", "value": "v"}, 3),
        (3, "c", "sleep", {}, 1),
    ]


def test_attempt_one_is_left_out_of_the_body() -> None:
    # The common case stays short on the broker; decoding puts the 1 back.
    assert encode_batch([(7, "id", "echo", "{}", 1)]) == encode_batch([(7, "id", "echo", "{}")])
    assert encode_batch([(7, "id", "echo", "{}")]) == b'[[7,"id","echo",{}]]'
    assert decode_batch(b'[[7,"id","echo",{}]]') == [(7, "id", "echo", {}, 1)]
    assert encode_batch([(7, "id", "echo", "{}", 2)]) == b'[[7,"id","echo",{},2]]'


def test_args_json_is_copied_byte_for_byte() -> None:
    # Not parsed and re-encoded: spacing, key order, escapes and number
    # spellings reach the body exactly as the store holds them.
    args = '{ "b" : 1.50 ,"a":"\\u00e9\\n", "n": [1e3, -0] }'
    body = encode_batch([(1, "r", "echo", args)])
    assert body == b'[[1,"r","echo",' + args.encode() + b"]]"
    assert decode_batch(body)[0][3] == {"b": 1.5, "a": "\u00e9\n", "n": [1000.0, 0]}


def test_ids_and_op_names_are_json_escaped() -> None:
    rid, op = 'quote " back \\ é \u2028', "op/with\ttab"
    (item,) = decode_batch(encode_batch([(5, rid, op, "{}")]))
    assert item == (5, rid, op, {}, 1)


def test_empty_batch() -> None:
    assert encode_batch([]) == b"[]"
    assert decode_batch(b"[]") == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not JSON"),
        (b"[[1, ", "not JSON"),
        (b'{"seq": 1}', "not a list"),
        (b'[[1, "a", "echo"]]', "is not \\[seq, id, op, args"),
        (b'[[1, "a", "echo", {}, 1, 2]]', "is not \\[seq, id, op, args"),
        (b"[7]", "is not \\[seq, id, op, args"),
        (b'[["1", "a", "echo", {}]]', "wrong type"),
        (b'[[1, 2, "echo", {}]]', "wrong type"),
        (b'[[1, "a", null, {}]]', "wrong type"),
        (b'[[1, "a", "echo", [1]]]', "wrong type"),
        (b'[[1, "a", "echo", {}, "2"]]', "wrong type"),
        (b'[[true, "a", "echo", {}]]', "wrong type"),
        (b'[[1.0, "a", "echo", {}]]', "wrong type"),
    ],
)
def test_malformed_bodies_raise_a_clear_error(body: bytes, says: str) -> None:
    with pytest.raises(BrokerMessageError, match=says):
        decode_batch(body)


def test_error_is_a_value_error_and_names_the_item_briefly() -> None:
    huge = b'[[1, "a", "echo", "' + b"x" * 10_000 + b'"]]'
    with pytest.raises(ValueError) as caught:
        decode_batch(huge)
    assert len(str(caught.value)) < 400
