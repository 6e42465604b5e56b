"""The metrics an operator reads move when the events they name happen."""

from __future__ import annotations

import asyncio

from conftest import ClientFactory, ServerFactory, finals_of, until
from prometheus_client import REGISTRY


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_session_and_its_request_show_in_the_metrics(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory()
    before = {
        "wait": value("sessionq_queue_wait_seconds_count"),
        "publish": value("sessionq_publish_seconds_count"),
        "store": value("sessionq_store_seconds_count", op="add_requests"),
        "finish": value("sessionq_store_seconds_count", op="finish_requests"),
        "resume": value("sessionq_session_takeovers_total", how="resume"),
        "open": value("sessionq_sessions", state="open"),
        "draining": value("sessionq_sessions", state="draining"),
        "refused": value("sessionq_requests_refused_total", code="unknown_op"),
    }
    client = await user_client(target=server)
    assert value("sessionq_sessions", state="open") == before["open"] + 1
    await client.submit("a", "sleep", {"seconds": 1.5})  # outlives a sample
    await client.submit("b", "nope")
    await client.recv_until(lambda f: f["type"] == "accepted")
    await until(lambda: value("sessionq_pending_requests") >= 1)  # sampled each second
    assert value("sessionq_requests_refused_total", code="unknown_op") == before["refused"] + 1
    assert value("sessionq_publish_seconds_count") == before["publish"] + 1
    assert value("sessionq_store_seconds_count", op="add_requests") == before["store"] + 1

    # A second connection resumes the session: the first is taken over.
    other = await connect(target=server)
    await other.send({"type": "auth", "token": client.welcome["token"]})
    assert (await other.recv())["type"] == "welcome"
    await other.send({"type": "resume", "session": client.welcome["session"], "after": 0})
    frames = await other.recv_until(lambda f: f["type"] == "result")
    assert finals_of(frames)[0]["id"] == "a"
    assert (await client.closed())[0] == 4409
    assert value("sessionq_session_takeovers_total", how="resume") == before["resume"] + 1
    assert value("sessionq_queue_wait_seconds_count") == before["wait"] + 1
    assert value("sessionq_store_seconds_count", op="finish_requests") > before["finish"]

    # The resumed session drains and closes once its connection goes.
    session = server.sessions[client.welcome["session"]]
    closed = asyncio.get_running_loop().create_future()
    session.on_closed = closed.set_result
    await other.close()
    await asyncio.wait_for(closed, 5)
    # Both sessions (the first connection's own new one, and the resumed one) are gone.
    await until(lambda: value("sessionq_sessions", state="open") == before["open"])
    assert value("sessionq_sessions", state="draining") == before["draining"]
