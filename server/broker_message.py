"""The broker message format: what a session publishes to its queue and its
consumer reads back. Pure: bytes in, plain items out, no I/O.

One broker message carries one or more consecutive requests of one session
(the submit path coalesces what arrived together; a recovery re-publishes
unfinished requests in batches). Its body is a JSON array of items::

    [[seq, id, op, args(, attempt)], ...]

``args`` is the request's JSON object, copied into the body as the raw text
the store holds: it is neither parsed nor re-encoded on the way in.
``attempt`` (how many times the request has been started, this time
included) is left out when it is 1, the common case; a recovery gives it for
a request whose process died while running it.

The format is private to the server processes (every process of one
deployment runs the same code); it is not the wire protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol import decode_json, encode_json

__all__ = ["BatchItem", "BrokerMessageError", "decode_batch", "encode_batch"]

# (seq, id, op, args, attempt), as the consumer runs it.
BatchItem = tuple[int, str, str, dict[str, Any], int]


class BrokerMessageError(ValueError):
    """A broker message body that is not a batch of requests."""


def encode_batch(
    items: Sequence[tuple[int, str, str, str] | tuple[int, str, str, str, int]],
) -> bytes:
    """One broker message: ``[[seq, id, op, args-json(, attempt)], ...]`` with
    args kept as raw JSON text so it is neither parsed nor re-encoded on the
    way. ``attempt`` (default 1) is given for requests re-published after their
    process died while running them."""
    parts = []
    for item in items:
        seq, rid, op, args = item[0], item[1], item[2], item[3]
        attempt = item[4] if len(item) > 4 else 1
        tail = b"," + str(attempt).encode() if attempt != 1 else b""
        parts.append(
            b"[" + str(seq).encode() + b"," + encode_json(rid) + b"," + encode_json(op) + b","
            + args.encode() + tail + b"]"
        )  # fmt: skip
    return b"[" + b",".join(parts) + b"]"


def decode_batch(body: bytes) -> list[BatchItem]:
    """The requests a broker message carries, in order, each as
    ``(seq, id, op, args, attempt)`` with ``attempt`` 1 when it was left out.

    Raises :class:`BrokerMessageError` for a body that is not such a batch
    (not JSON, not a list of items, an item of the wrong shape or types).
    """
    try:
        decoded = decode_json(body)
    except ValueError as e:
        raise BrokerMessageError(f"broker message is not JSON: {e}") from None
    if type(decoded) is not list:
        raise BrokerMessageError("broker message is not a list of requests")
    items: list[BatchItem] = []
    for item in decoded:
        # Unpacking the decoded list costs no tuple; the one built below is
        # the item itself (the hot path: one per request).
        if type(item) is list and len(item) == 4:
            seq, rid, op, args = item
            attempt = 1
        elif type(item) is list and len(item) == 5:
            seq, rid, op, args, attempt = item
        else:
            raise BrokerMessageError(
                f"broker message item is not [seq, id, op, args(, attempt)]: {item!r:.200}"
            )
        if not (
            type(seq) is int
            and type(rid) is str
            and type(op) is str
            and type(args) is dict
            and type(attempt) is int
        ):
            raise BrokerMessageError(
                f"broker message item has a field of the wrong type: {item!r:.200}"
            )
        items.append((seq, rid, op, args, attempt))
    return items
