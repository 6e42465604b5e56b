"""A session's lifecycle when the broker or the store fails at an awkward moment.

Each test injects one failure into a real server's broker or store object (the
RabbitMQ it talks to is shared, so it is not stopped here) and checks that
the session neither lingers nor loses work: it settles, leaves the process
when it should, and a resume carries its requests on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq.exceptions
from conftest import PASSWORD, UNIT, Client, ClientFactory, ServerFactory, finals_of, until
from prometheus_client import REGISTRY

from server.app import Server
from server.store import StoreError


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def login(connect: ClientFactory, server: Server, username: str) -> Client:
    client = await connect(target=server)
    await client.send({"type": "login", "username": username, "password": PASSWORD})
    assert (await client.recv())["type"] == "welcome"
    return client


async def test_a_queue_delete_on_a_dead_channel_still_lets_the_session_close(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(lease_seconds=60)
    first = await user_client(target=server)
    sid, user = first.welcome["session"], first.welcome["user"]

    async def delete_queue(channel: Any, name: str) -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("<Channel> closed")

    server.broker.delete_queue = delete_queue  # type: ignore[method-assign]
    await first.close()
    await until(lambda: sid not in server.sessions)  # closed, and left this process
    record = await server.store.get_session(sid)
    assert record is not None and record.owner is None  # released in the store
    second = await login(connect, server, user)
    await second.send({"type": "resume", "session": sid, "after": 0})
    assert (await second.recv())["type"] == "resumed"


async def test_a_resume_whose_take_up_fails_leaves_no_half_started_session(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(lease_seconds=60)  # no orphan sweep during the test
    first = await user_client(target=server)
    sid, user = first.welcome["session"], first.welcome["user"]
    await first.submit("a", "sleep", {"seconds": 0.3})
    await first.submit("b", "echo", {"b": 1})
    await first.recv_until(lambda f: f["type"] == "accepted" and f["id"] == "b")
    await server.sessions[sid].hand_over("test")  # leaves with "b" stored, unfinished
    assert sid not in server.sessions
    store, real, calls = server.store, server.store.unfinished, 0

    async def failing_once(session_id: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("injected: the store hiccups once")
        return await real(session_id)

    store.unfinished = failing_once  # type: ignore[method-assign]
    open_before = value("sessionq_sessions", state="open")
    second = await login(connect, server, user)
    await second.send({"type": "resume", "session": sid, "after": 1})
    assert (await second.closed())[0] == 1011
    assert sid not in server.sessions  # not left behind with no queue and no consumer
    await until(lambda: value("sessionq_sessions", state="open") == open_before)
    third = await login(connect, server, user)
    await third.send({"type": "resume", "session": sid, "after": 1})
    frames = await third.recv_until(lambda f: f.get("id") == "b" and "seq" in f)
    assert frames[0]["type"] == "resumed"
    assert finals_of(frames)[-1]["value"] == {"b": 1}  # it ran after all


async def test_a_recovery_that_fails_unexpectedly_is_tried_again(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(lease_seconds=60)
    client = await user_client(target=server)
    sid = client.welcome["session"]
    session = server.sessions[sid]
    real = server.broker.declare_session_queue
    calls = 0

    async def declare(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise aiormq.exceptions.ChannelInvalidStateError("<Channel> closed by RPC timeout")
        await real(*args)

    server.broker.declare_session_queue = declare  # type: ignore[method-assign]
    try:
        await session.recover()  # as after a reconnect: the first try fails
    except Exception as exc:
        assert "ChannelInvalidStateError" in repr(exc)
    await until(lambda: session.state == "open" and session.consumer is not None)
    await client.submit("after", "echo", {"ok": 1})
    assert finals_of(await client.finals(1))[0]["value"] == {"ok": 1}
    closed = asyncio.get_running_loop().create_future()
    session.on_closed = closed.set_result
    await client.close()
    await asyncio.wait_for(closed, UNIT)  # it drains and closes, not stuck recovering


async def test_a_cancel_answered_not_found_is_not_a_refused_submit(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory()
    client = await user_client(target=server)
    await client.submit("a", "echo", {})
    await client.finals(1)
    before = value("sessionq_requests_refused_total", code="not_found")
    await client.send({"type": "cancel", "id": "a"})
    reply = await client.recv()
    assert (reply["code"], reply["id"]) == ("not_found", "a")
    assert value("sessionq_requests_refused_total", code="not_found") == before
