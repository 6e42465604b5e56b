"""Hostile clients next to a well-behaved one (issue: "Limits that hold").

Eight sockets send what a hostile or broken client would: deep nesting,
huge numbers, wrong types, unknown ops, oversized values, binary and broken
UTF-8, and floods of ``status`` and ``cancel``. Meanwhile another user's
session runs its requests: it gets every result, in order, and ``/healthz``
stays green. The hostile sockets get clear errors, not a dead server.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import websockets
from conftest import UNIT, Client, ClientFactory, ServerFactory, finals_of


def _healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=UNIT) as answer:
        return int(answer.status)


def submit(rid: str, op: str, args: str) -> str:
    return '{"type":"submit","id":"' + rid + '","op":"' + op + '","args":' + args + "}"


def hostile_frames(k: int) -> list[str | bytes]:
    """What socket ``k`` sends, frame by frame."""
    frames: list[str | bytes] = [
        submit(f"d{k}", "echo", '{"a":' + "[" * 200 + "]" * 200 + "}"),  # past the 64 levels
        submit(f"D{k}", "echo", "[" * 5000 + "]" * 5000),  # past what JSON parsers take
        submit(f"n{k}", "sleep", '{"seconds":1e308}'),
        submit(f"i{k}", "count", '{"to":1e30}'),
        '{"type":"submit","id":7,"op":"echo","args":[]}',
        submit(f"u{k}", "no.such.op", "{}"),
        submit(f"h{k}", "hash", '{"data":"x","rounds":99999999}'),
        submit(f"s{k}", "sleep", '{"seconds":"soon"}'),
        '{"type":"nope"}',
        "[1,2,3]",
        "not json at all",
        b"\x00\x01binary",
        '{"type":"status","id":' + json.dumps("x" * 500) + "}",
        '{"type":"resume","session":"' + "z" * 100 + '","after":-1}',
    ]
    frames += ['{"type":"status"}', '{"type":"cancel","id":"nothing"}'] * 100
    frames.append('{"type":"status","id":"end"}')  # the last answer the socket waits for
    return frames


async def hostile(client: Client, k: int) -> list[dict[str, Any]]:
    replies = []
    for frame in hostile_frames(k):
        await client.send(frame)
    async with asyncio.timeout(6 * UNIT):
        while True:
            reply = await client.recv()
            replies.append(reply)
            if reply.get("id") == "end":
                return replies


async def test_hostile_sockets_do_not_disturb_another_users_session(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(max_message_bytes=1 << 20, max_sleep=5)
    good = await user_client(target=server)
    attackers = [await user_client(target=server) for _ in range(8)]

    async def well_behaved() -> list[dict[str, Any]]:
        for i in range(60):
            await good.submit(f"g{i}", "echo", {"i": i})
        return finals_of(await good.finals(60, 6 * UNIT))

    results, *replies = await asyncio.gather(
        well_behaved(), *(hostile(client, k) for k, client in enumerate(attackers))
    )
    assert [(f["seq"], f["value"]) for f in results] == [(i + 1, {"i": i}) for i in range(60)]
    assert await asyncio.to_thread(_healthz, server.port) == 200
    for k, answers in enumerate(replies):
        errors = [r for r in answers if r["type"] == "error"]
        assert not any("seq" in r for r in errors), errors  # nothing hostile was accepted
        by_id = {r.get("id"): r["code"] for r in errors}
        assert by_id[f"d{k}"] == "bad_request"  # nested too deep
        assert by_id[f"n{k}"] == "bad_request"  # a sleep past SESSIONQ_MAX_SLEEP
        assert by_id[f"i{k}"] == "bad_request"  # count far past 10,000
        assert by_id[f"u{k}"] == "unknown_op"
        assert by_id[f"h{k}"] == "bad_request"  # hash rounds over the cap
        assert by_id[f"s{k}"] == "bad_request"
        assert sum(1 for r in errors if r["code"] == "not_found") >= 100  # every cancel answered
    # The hostile sockets are still served: a well-formed submit on one works.
    await attackers[0].submit("fine", "echo", {"ok": True})
    assert finals_of(await attackers[0].finals(1))[0]["value"] == {"ok": True}
    # A frame over the size limit closes only that socket, with 1009.
    port = server.port
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as raw:
        await raw.send("x" * ((1 << 20) + 1))
        await asyncio.wait_for(raw.wait_closed(), UNIT)
        assert raw.close_code == 1009
    await good.submit("after", "echo", {})
    assert finals_of(await good.finals(1))[0]["seq"] == 61
