"""The session server end to end: real sockets, real RabbitMQ, real SQLite."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from typing import Any

import jwt
import orjson
import pytest
import websockets
from aio_pika import connect as amqp_connect
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity
from conftest import (
    BROKER_URL,
    PASSWORD,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    finals_of,
    unique_name,
)
from prometheus_client import REGISTRY

from server.app import Server

# -- authentication ----------------------------------------------------------------


async def test_register_gives_welcome_with_token_and_limits(connect: ClientFactory) -> None:
    client = await connect()
    name = unique_name()
    await client.send({"type": "register", "username": name, "password": PASSWORD})
    welcome = await client.recv()
    assert welcome["type"] == "welcome"
    assert welcome["user"] == name
    assert welcome["session"]
    assert welcome["limits"] == {"max_pending": 1000, "max_message_bytes": 1048576}
    assert welcome["expires_at"] > time.time() + 800
    claims = jwt.decode(welcome["token"], options={"verify_signature": False})
    assert claims["sub"] == name and {"iat", "exp", "jti"} <= set(claims)


async def test_login_and_its_failures(connect: ClientFactory, user_client: ClientFactory) -> None:
    first = await user_client()
    name = first.welcome["user"]
    client = await connect()
    await client.send({"type": "login", "username": name, "password": "wrong password"})
    wrong = await client.recv()
    await client.send({"type": "login", "username": name + "nobody", "password": PASSWORD})
    unknown = await client.recv()
    assert wrong["code"] == unknown["code"] == "invalid_credentials"
    assert wrong["message"] == unknown["message"]
    await client.send({"type": "login", "username": name.upper(), "password": PASSWORD})
    welcome = await client.recv()
    assert welcome["type"] == "welcome" and welcome["user"] == name
    assert welcome["session"] != first.welcome["session"]


async def test_register_refusals(connect: ClientFactory, user_client: ClientFactory) -> None:
    existing = (await user_client()).welcome["user"]
    client = await connect()
    await client.send({"type": "register", "username": existing.upper(), "password": PASSWORD})
    assert (await client.recv())["code"] == "user_exists"
    await client.send({"type": "register", "username": unique_name(), "password": "short"})
    assert (await client.recv())["code"] == "weak_password"
    name = unique_name()
    await client.send({"type": "register", "username": name, "password": name})
    assert (await client.recv())["code"] == "weak_password"
    await client.send({"type": "register", "username": "bad name!", "password": PASSWORD})
    assert (await client.recv())["code"] == "bad_request"


@pytest.mark.parametrize("how", ["header", "query", "frame"])
async def test_token_authentication_paths(
    how: str, connect: ClientFactory, user_client: ClientFactory
) -> None:
    token = (await user_client()).welcome["token"]
    if how == "header":
        client = await connect(additional_headers={"Authorization": f"Bearer {token}"})
    elif how == "query":
        client = await connect(path=f"/ws?token={token}")
    else:
        client = await connect()
        await client.send({"type": "auth", "token": token})
    welcome = await client.recv()
    assert welcome["type"] == "welcome"
    assert welcome["token"] == token


async def test_bad_tokens_are_refused(server: Server, connect: ClientFactory) -> None:
    name = (await connect()) and unique_name()
    now = int(time.time())
    claims = {"sub": name, "iat": now, "jti": "x", "iss": "sessionq", "aud": "sessionq"}
    forged = jwt.encode({**claims, "exp": now + 60}, "another key of enough length 123", "HS256")
    unsigned = jwt.encode({**claims, "exp": now + 60}, None, algorithm="none")
    expired = jwt.encode({**claims, "exp": now - 5}, server.settings.jwt_secret, "HS256")
    client = await connect()
    for token, code in [
        (forged, "invalid_token"),
        (unsigned, "invalid_token"),
        (expired, "token_expired"),
        ("not a jwt", "invalid_token"),
    ]:
        await client.send({"type": "auth", "token": token})
        reply = await client.recv()
        assert (reply["type"], reply["code"]) == ("error", code)


async def test_frames_before_auth_are_unauthorized(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "submit", "id": "r1", "op": "echo", "args": {}})
    reply = await client.recv()
    assert reply == {**reply, "type": "error", "code": "unauthorized", "id": "r1"}


async def test_repeated_auth_failures_close_with_4401(connect: ClientFactory) -> None:
    client = await connect()
    for _ in range(5):
        await client.send({"type": "auth", "token": "nope"})
    codes = [f.get("code") for f in await _drain(client)]
    assert codes.count("invalid_token") == 5
    assert client.ws.close_code == 4401


async def test_auth_timeout_closes_with_4408(server_factory: ServerFactory) -> None:
    server = await server_factory(auth_timeout=0.3)
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        started = time.monotonic()
        client = Client(ws)
        assert (await client.closed())[0] == 4408
        assert time.monotonic() - started < UNIT


async def test_failed_logins_are_rate_limited(
    connect: ClientFactory, user_client: ClientFactory
) -> None:
    name = (await user_client()).welcome["user"]
    codes = []
    for _ in range(2):
        client = await connect()
        for _ in range(3):
            await client.send({"type": "login", "username": name, "password": "wrong pass"})
            codes.append(await client.recv())
    limited = [f for f in codes if f["code"] == "rate_limited"]
    assert [f["code"] for f in codes[:5]] == ["invalid_credentials"] * 5
    assert limited and limited[0]["retry_after"] > 0
    # Another user registering is not held back by these failures.
    other = await user_client()
    assert other.welcome["type"] == "welcome"


async def test_connections_per_user_are_limited(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(max_connections_per_user=2)
    first = await user_client(target=server)
    token = first.welcome["token"]
    second = await connect(target=server, path=f"/ws?token={token}")
    assert (await second.recv())["type"] == "welcome"
    third = await connect(target=server, path=f"/ws?token={token}")
    assert (await third.closed())[0] == 4429
    await first.send({"type": "status"})
    assert (await first.recv())["type"] == "status"  # existing ones untouched


# -- requests ------------------------------------------------------------------------


async def test_fifo_with_interleaved_sleep_and_echo(user_client: ClientFactory) -> None:
    client = await user_client()
    plan = [("sleep", {"seconds": 0.2}), ("echo", {"n": 2}), ("sleep", {"seconds": 0.05}),
            ("echo", {"n": 4}), ("sleep", {"seconds": 0.1}), ("echo", {"n": 6})]  # fmt: skip
    for i, (op, args) in enumerate(plan, 1):
        await client.submit(f"r{i}", op, args)
    frames = await client.finals(len(plan))
    accepted = [f for f in frames if f["type"] == "accepted"]
    assert [(f["id"], f["seq"], f["ahead"]) for f in accepted] == [
        (f"r{i}", i, i - 1) for i in range(1, 7)
    ]
    finals = finals_of(frames)
    assert [f["seq"] for f in finals] == [1, 2, 3, 4, 5, 6]
    assert [f["value"] for f in finals] == [
        {"slept": 0.2}, {"n": 2}, {"slept": 0.05}, {"n": 4}, {"slept": 0.1}, {"n": 6}
    ]  # fmt: skip
    for final in finals:  # each accepted before its result
        assert frames.index(accepted[final["seq"] - 1]) < frames.index(final)


async def test_count_streams_progress_then_result(user_client: ClientFactory) -> None:
    client = await user_client()
    await client.submit("c", "count", {"to": 5, "interval": 0.01})
    frames = await client.finals(1)
    assert [f["type"] for f in frames] == ["accepted"] + ["progress"] * 5 + ["result"]
    assert [f["data"] for f in frames[1:6]] == [{"i": i} for i in range(1, 6)]
    assert frames[-1]["value"] == {"count": 5}


async def test_twenty_sessions_keep_their_own_order(user_client: ClientFactory) -> None:
    clients = [await user_client() for _ in range(20)]

    async def run(client: Client, k: int) -> list[Any]:
        for i in range(10):
            if i % 3 == 0:
                await client.submit(f"s{i}", "sleep", {"seconds": 0.01 * (k % 4)})
            else:
                await client.submit(f"s{i}", "echo", {"k": k, "i": i})
        return finals_of(await client.finals(10, timeout=4 * UNIT))

    results = await asyncio.gather(*(run(c, k) for k, c in enumerate(clients)))
    for k, finals in enumerate(results):
        assert [f["seq"] for f in finals] == list(range(1, 11))
        assert [f["id"] for f in finals] == [f"s{i}" for i in range(10)]
        for f in finals:
            if f["id"] not in ("s0", "s3", "s6", "s9"):
                assert f["value"]["k"] == k


async def test_handler_failures_do_not_stop_the_queue(server_factory: ServerFactory,
                                                      user_client: ClientFactory) -> None:  # fmt: skip
    server = await server_factory(ops="tests.ops_for_tests")
    client = await user_client(target=server)
    await client.submit("a", "test.fail")
    await client.submit("b", "test.fail", {"own_code": True})
    await client.submit("c", "test.unserializable")
    await client.submit("d", "test.slow", {"seconds": 5})
    await client.submit("e", "echo", {"still": "works"})
    finals = finals_of(await client.finals(5))
    assert [(f["id"], f.get("code")) for f in finals] == [
        ("a", "handler_error"), ("b", "quota_exceeded"), ("c", "handler_error"),
        ("d", "timeout"), ("e", None),
    ]  # fmt: skip
    assert "boom" in finals[0]["message"] and "Traceback" not in finals[0]["message"]
    assert finals[-1]["value"] == {"still": "works"}


async def test_refusals_before_acceptance_carry_the_id(user_client: ClientFactory) -> None:
    client = await user_client()
    await client.submit("u", "no.such.op")
    await client.submit("s", "sleep", {"seconds": 61})
    await client.submit("h", "hash", {"data": "x", "rounds": 10_000_001})
    await client.send({"type": "submit", "id": "g", "op": "echo", "args": [1]})
    replies = [await client.recv() for _ in range(4)]
    assert [(r["id"], r["code"], "seq" in r) for r in replies] == [
        ("u", "unknown_op", False), ("s", "bad_request", False),
        ("h", "bad_request", False), ("g", "bad_request", False),
    ]  # fmt: skip
    await client.submit("ok", "echo", {})
    assert (await client.recv())["seq"] == 1  # refusals used no seq


async def test_bad_frames_get_bad_request_and_the_socket_stays(user_client: ClientFactory) -> None:
    client = await user_client()
    for bad in [b'{"type":"status"}', "not json", "[1,2]", '{"type": 5}', '{"type":"nope"}',
                '{"type":"submit","id":"x","op":"echo","args":5}']:  # fmt: skip
        await client.send(bad)
        reply = await client.recv()
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), bad
    await client.ws.send(b"\xff\xfe{", text=True)  # invalid UTF-8 in a text frame
    assert (await client.recv())["code"] == "bad_request"
    await client.send({"type": "status"})
    assert (await client.recv())["type"] == "status"


async def test_oversize_frame_closes_with_1009(server_factory: ServerFactory,
                                               user_client: ClientFactory) -> None:  # fmt: skip
    server = await server_factory(max_message_bytes=4096)
    client = await user_client(target=server)
    await client.submit("big", "echo", {"blob": "x" * 5000})
    assert (await client.closed())[0] == 1009


async def test_duplicate_ids_run_once(user_client: ClientFactory) -> None:
    client = await user_client()
    await client.submit("once", "count", {"to": 2})
    await client.submit("once", "count", {"to": 2})  # while the first is being accepted
    await client.submit("next", "echo", {})
    frames = await client.finals(2)
    accepted = [f for f in frames if f["type"] == "accepted"]
    assert [(f["id"], f["seq"]) for f in accepted] == [("once", 1), ("once", 1), ("next", 2)]
    assert [f["id"] for f in finals_of(frames)] == ["once", "next"]
    assert len([f for f in frames if f["type"] == "progress"]) == 2
    await client.submit("once", "count", {"to": 2})  # after it finished
    again = await client.recv()
    assert (again["type"], again["seq"]) == ("accepted", 1)
    await client.send({"type": "status"})
    assert (await client.recv())["last_seq"] == 2


async def test_queue_full_refuses_without_losing_accepted(server_factory: ServerFactory,
                                                           user_client: ClientFactory) -> None:  # fmt: skip
    server = await server_factory(max_pending=3)
    client = await user_client(target=server)
    for i in range(5):
        await client.submit(f"q{i}", "sleep", {"seconds": 0.1})
    frames = await client.finals(3)
    refused = [f for f in frames if f["type"] == "error" and "seq" not in f]
    assert [(f["id"], f["code"]) for f in refused] == [("q3", "queue_full"), ("q4", "queue_full")]
    assert [f["id"] for f in finals_of(frames)] == ["q0", "q1", "q2"]
    await client.submit("later", "echo", {})  # room again once they finished
    assert (await client.recv())["seq"] == 4


async def test_cancel_queued_running_and_finished(server_factory: ServerFactory,
                                                  user_client: ClientFactory) -> None:  # fmt: skip
    server = await server_factory(ops="tests.ops_for_tests")
    client = await user_client(target=server)
    before = {op: _finished(op, "cancelled") for op in ("sleep", "echo")}
    await client.submit("run", "sleep", {"seconds": 30})
    await client.submit("queued", "echo", {"x": 1})
    await client.submit("after", "echo", {"x": 2})
    await client.recv_until(lambda f: f.get("id") == "after" and f["type"] == "accepted")
    await client.send({"type": "cancel", "id": "queued"})
    await client.send({"type": "cancel", "id": "run"})
    frames = await client.finals(3)
    finals = finals_of(frames)
    assert [(f["id"], f["seq"], f.get("code")) for f in finals] == [
        ("run", 1, "cancelled"), ("queued", 2, "cancelled"), ("after", 3, None)
    ]  # fmt: skip
    # Both cancels count as finals, the queued one too (no handler ran for it).
    assert {op: _finished(op, "cancelled") - n for op, n in before.items()} == {
        "sleep": 1, "echo": 1
    }  # fmt: skip
    await client.send({"type": "cancel", "id": "after"})
    reply = await client.recv()
    assert (reply["code"], reply["id"], "seq" in reply) == ("not_found", "after", False)
    await client.send({"type": "cancel", "id": "never"})
    reply = await client.recv()
    assert (reply["code"], reply["id"], "seq" in reply) == ("not_found", "never", False)
    # A sync handler cannot be interrupted: the client is told and it finishes.
    await client.submit("blk", "test.blocking", {"seconds": 0.5})
    await client.recv_until(lambda f: f.get("type") == "accepted")
    await asyncio.sleep(0)  # let the consumer start it
    await _wait_state(client, "blk", "running")
    await client.send({"type": "cancel", "id": "blk"})
    frames = await client.finals(1)
    assert ("not_cancellable", "blk") in [(f.get("code"), f.get("id")) for f in frames]
    assert finals_of(frames)[0]["value"] == {"attempt": 1}


def _finished(op: str, outcome: str) -> float:
    labels = {"op": op, "outcome": outcome}
    return REGISTRY.get_sample_value("sessionq_requests_finished_total", labels) or 0.0


def _broker_messages() -> float:
    """Broker messages this test process's servers have published for submits."""
    count = REGISTRY.get_sample_value("sessionq_publish_batch_requests_count")
    return count or 0.0


async def test_a_burst_of_submits_shares_broker_messages(user_client: ClientFactory) -> None:
    """Submits that arrive while the session's previous batch is unfinished
    wait for it and go out together: a burst of 32 costs a few broker
    messages, not 32, and still gets every accepted, seq and result in order."""
    client = await user_client()
    await client.submit("first", "sleep", {"seconds": 0.05})
    await client.recv_until(lambda f: f.get("id") == "first")
    before = _broker_messages()
    for i in range(32):
        await client.submit(f"b{i}", "echo", {"i": i})
    frames = await client.finals(33)
    accepted = [f for f in frames if f["type"] == "accepted"]
    assert [(f["id"], f["seq"]) for f in accepted] == [(f"b{i}", i + 2) for i in range(32)]
    assert [f["seq"] for f in finals_of(frames)] == list(range(1, 34))
    assert all(f["value"] == {"i": f["seq"] - 2} for f in finals_of(frames)[1:])
    assert _broker_messages() - before <= 4


async def test_accepted_is_not_held_behind_a_slow_request(user_client: ClientFactory) -> None:
    """Coalescing never makes a client wait for a slow request to learn that
    its next one is accepted."""
    client = await user_client()
    await client.submit("slow", "sleep", {"seconds": 2})
    await client.recv_until(lambda f: f.get("id") == "slow")
    await _wait_state(client, "slow", "running")
    await client.submit("next", "echo", {})
    frames = await client.recv_until(lambda f: f.get("id") in ("next", "slow"), 2 * UNIT)
    assert (frames[-1]["id"], frames[-1]["type"], frames[-1]["ahead"]) == ("next", "accepted", 1)


async def test_status_and_cancel_right_after_submit(user_client: ClientFactory) -> None:
    """A request asked about or cancelled before its `accepted` (it may still
    be gathering with others) is reported queued, and a cancel ends it
    `cancelled` with its seq, right after its `accepted`."""
    client = await user_client()
    await client.submit("a", "sleep", {"seconds": 0.3})
    await client.recv_until(lambda f: f.get("id") == "a")
    await client.submit("b", "echo", {})
    await client.send({"type": "status", "id": "b"})
    await client.send({"type": "cancel", "id": "b"})
    frames = await client.finals(2)
    status = next(f for f in frames if f["type"] == "status")
    assert (status["state"], status["ahead"]) == ("queued", 1)
    mine = [(f["type"], f.get("seq"), f.get("code")) for f in frames
            if f.get("id") == "b" and f["type"] != "status"]  # fmt: skip
    assert mine == [("accepted", 2, None), ("error", 2, "cancelled")]


async def test_status_reports_counts_and_request_state(user_client: ClientFactory) -> None:
    client = await user_client()
    await client.submit("a", "sleep", {"seconds": 5})
    await client.submit("b", "echo", {})
    await client.submit("c", "echo", {})
    await client.recv_until(lambda f: f.get("id") == "c")
    await _wait_state(client, "a", "running")
    await client.send({"type": "status", "id": "c"})
    status = await client.recv()
    assert status == {
        "type": "status", "session": client.welcome["session"], "pending": 3,
        "last_seq": 3, "last_done": 0, "id": "c", "state": "queued", "ahead": 2,
    }  # fmt: skip
    await client.send({"type": "cancel", "id": "a"})
    await client.finals(3)
    await client.send({"type": "status", "id": "b"})
    done = await client.recv()
    assert (done["state"], done["pending"], done["last_done"]) == ("done", 0, 3)


async def test_cpu_bound_op_does_not_hold_up_other_sessions(user_client: ClientFactory) -> None:
    busy, other = await user_client(), await user_client()
    await busy.submit("h", "hash", {"data": "x", "rounds": 3_000_000})
    await busy.recv()  # accepted
    started = time.monotonic()
    for i in range(20):
        await other.submit(f"e{i}", "echo", {"i": i})
    await other.finals(20)
    echo_time = time.monotonic() - started
    result = finals_of(await busy.finals(1, timeout=6 * UNIT))[0]
    hash_time = time.monotonic() - started
    assert len(result["value"]["hex"]) == 64
    assert echo_time < hash_time  # the echoes did not wait for the hash


async def test_kv_operations(user_client: ClientFactory) -> None:
    alice, bob = await user_client(), await user_client()
    await alice.submit("p1", "kv.put", {"key": "a/1", "value": {"n": 1}})
    await alice.submit("p2", "kv.put", {"key": "a/2", "value": [2]})
    await alice.submit("p3", "kv.put", {"key": "b", "value": "x"})
    await alice.submit("g", "kv.get", {"key": "a/1"})
    await alice.submit("l", "kv.list", {"prefix": "a/"})
    await alice.submit("d", "kv.delete", {"key": "a/1"})
    await alice.submit("g2", "kv.get", {"key": "a/1"})
    finals = finals_of(await alice.finals(7))
    values = {f["id"]: f["value"] for f in finals}
    assert values["g"] == {"key": "a/1", "found": True, "value": {"n": 1}}
    assert values["l"] == {"items": [{"key": "a/1", "value": {"n": 1}},
                                     {"key": "a/2", "value": [2]}], "next": None}  # fmt: skip
    assert values["d"]["deleted"] is True
    assert values["g2"]["found"] is False
    await bob.submit("bl", "kv.list", {"prefix": ""})
    assert finals_of(await bob.finals(1))[0]["value"] == {"items": [], "next": None}


# -- the broker side -------------------------------------------------------------


async def _queue_exists(name: str) -> bool:
    """Ask the broker itself, with a passive declare: an exclusive queue of
    another connection answers RESOURCE_LOCKED, a missing one NOT_FOUND."""
    connection = await amqp_connect(BROKER_URL)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
            return True
        except ChannelLockedResource:
            return True
        except ChannelNotFoundEntity:
            return False
    finally:
        await connection.close()


async def test_queue_per_connection_removed_after_drain(server: Server,
                                                        user_client: ClientFactory) -> None:  # fmt: skip
    a, b = await user_client(), await user_client()
    sa, sb = a.welcome["session"], b.welcome["session"]
    queue_a, queue_b = server.sessions[sa].queue_name, server.sessions[sb].queue_name
    assert queue_a is not None and queue_b is not None and queue_a != queue_b
    assert await _queue_exists(queue_a) and await _queue_exists(queue_b)
    for i in range(3):
        await a.submit(f"k{i}", "kv.put", {"key": f"drain{i}", "value": i})
    await a.submit("slow", "sleep", {"seconds": 0.3})
    await a.recv_until(lambda f: f.get("id") == "slow")
    session = server.sessions[sa]
    closed = asyncio.get_running_loop().create_future()
    session.on_closed = lambda s: closed.set_result(s)
    await a.close()  # disconnect with work queued
    await asyncio.wait_for(closed, UNIT)
    assert not await _queue_exists(queue_a)  # gone from the broker
    assert await _queue_exists(queue_b)  # the other session's is untouched
    # The work that was queued ran and its results are stored.
    finals = await server.store.finals_after(sa, 0)
    assert [seq for seq, _ in finals] == [1, 2, 3, 4]
    assert orjson.loads(finals[-1][1])["value"] == {"slept": 0.3}


# -- HTTP ----------------------------------------------------------------------------


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=UNIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, body


async def test_http_routes(server: Server, user_client: ClientFactory) -> None:
    await user_client()
    port = server.port
    assert await asyncio.to_thread(_get, port, "/healthz") == (200, b"ok\n")
    assert await asyncio.to_thread(_get, port, "/readyz") == (200, b"ready\n")
    status, body = await asyncio.to_thread(_get, port, "/metrics")
    assert status == 200 and b"sessionq_connections" in body
    assert b'sessionq_auth_total{method="register",outcome="ok"}' in body
    status, body = await asyncio.to_thread(_get, port, "/")
    assert status == 200 and b"<html" in body.lower()
    assert (await asyncio.to_thread(_get, port, "/nope"))[0] == 404


async def test_origin_checks(server: Server, connect: ClientFactory) -> None:
    port = server.port
    ok = await connect(origin=f"http://127.0.0.1:{port}")
    await ok.send({"type": "status"})
    assert (await ok.recv())["code"] == "unauthorized"
    with pytest.raises(websockets.InvalidStatus) as info:
        await connect(origin="http://evil.example")
    assert info.value.response.status_code == 403


# -- helpers ---------------------------------------------------------------------------


async def _drain(client: Client) -> list[dict[str, Any]]:
    frames = []
    try:
        while True:
            frames.append(await client.recv())
    except websockets.ConnectionClosed:
        return frames


async def _wait_state(client: Client, rid: str, state: str) -> None:
    """Ask status until the request reaches ``state`` (events, not sleeps: each
    round trip is a real answer from the server)."""
    async with asyncio.timeout(UNIT):
        while True:
            await client.send({"type": "status", "id": rid})
            frames = await client.recv_until(lambda f: f["type"] == "status")
            if frames[-1].get("state") == state:
                return


async def test_retryable_ops_retry_then_dead_letter(server_factory: ServerFactory,
                                                    user_client: ClientFactory) -> None:  # fmt: skip
    server = await server_factory(ops="tests.ops_for_tests")
    client = await user_client(target=server)
    await client.submit("f", "test.flaky", {"fail": 2})
    await client.submit("d", "test.doomed")
    await client.submit("e", "echo", {})
    finals = finals_of(await client.finals(3))
    assert finals[0]["value"] == {"tries": 3}
    assert (finals[1]["code"], finals[1]["message"]) == (
        "handler_error", "ConnectionError: downstream refused try 3"
    )  # fmt: skip
    assert "value" in finals[2]
    # The failed request stays in the log where an operator can list it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "dead-letters",
        "--store-url", server.settings.store_url, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 2 * UNIT)
    assert proc.returncode == 0
    line = next(ln for ln in out.decode().splitlines() if client.welcome["session"] in ln)
    assert "op=test.doomed" in line and "code=handler_error" in line and "seq=2" in line


async def test_a_vanished_queue_refuses_only_its_own_submits(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """Two sessions publish on one shared channel; one session's queue is gone.
    Its submits are refused (`unavailable`), never accepted, and the other
    session's submits, published in between on the same channel, are all
    accepted: a returned message fails its own publish, not a neighbour's."""
    server = await server_factory(amqp_channels=1)
    a = await user_client(target=server)
    b = await user_client(target=server)
    session_a = server.sessions[a.welcome["session"]]
    assert session_a.channel is not None and session_a.queue_name is not None
    await server.broker.delete_queue(session_a.channel, session_a.queue_name)
    for i in range(20):
        await a.submit(f"a{i}", "echo", {})
        await b.submit(f"b{i}", "echo", {})
    replies_a = await a.recv_until(lambda f: f.get("id") == "a19")
    assert {(f["type"], f.get("code")) for f in replies_a} == {("error", "unavailable")}
    frames_b = await b.finals(20)
    assert len([f for f in frames_b if f["type"] == "accepted"]) == 20
    assert [f["seq"] for f in finals_of(frames_b)] == list(range(1, 21))
