"""Two replicas that share only the store and the broker.

Each test starts two ``sessionq serve`` processes on different ports with one
store (a SQLite file, a PostgreSQL schema, or a MongoDB database through the
wire emulator) and
shows one of the three ways a session moves between replicas: a resume after
a disconnect, a resume that takes a live session over (4409), and a replica
that dies (SIGKILL) and whose sessions the other one adopts once its lease
lapses. Every accepted request ends in exactly one final frame, in seq order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT, Client, finals_of
from store_servers import EVERY_STORE, every_store_url
from test_faults import ServerProcess, open_client, spawn_server, wait_running

Start = Callable[[], Awaitable[ServerProcess]]


@pytest.fixture(params=EVERY_STORE)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return every_store_url(request, tmp_path)


@pytest.fixture
async def replica(store_url: str) -> AsyncIterator[Start]:
    """Start a replica on the shared store (each call: one more process)."""
    procs: list[ServerProcess] = []

    async def start() -> ServerProcess:
        server = await spawn_server(store_url)
        procs.append(server)
        return server

    yield start
    for server in procs:
        await server.kill()


def assert_exactly_once(finals: list[dict[str, Any]], last: int) -> None:
    assert [f["seq"] for f in finals] == list(range(1, last + 1)), finals


async def resume(client: Client, welcome: dict[str, Any], after: int) -> dict[str, Any]:
    await client.send({"type": "resume", "session": welcome["session"], "after": after})
    frames = await client.recv_until(lambda f: f["type"] in ("resumed", "error"), 4 * UNIT)
    assert frames[-1]["type"] == "resumed", frames[-1]
    return frames[-1]


async def test_a_session_resumed_on_the_other_replica_continues_there(replica: Start) -> None:
    a, b = await replica(), await replica()
    client = await open_client(a)
    await client.submit("r1", "echo", {"n": 1})
    seen = finals_of(await client.finals(1))
    await client.submit("r2", "sleep", {"seconds": 0.5})
    for i in (3, 4):
        await client.submit(f"r{i}", "echo", {"n": i})
    await client.recv_until(lambda f: f.get("id") == "r4" and f["type"] == "accepted")
    await client.close()  # r2..r4 drain on replica a

    other = await open_client(b, client.welcome["token"])
    resumed = await resume(other, client.welcome, after=1)
    assert resumed["last_seq"] == 4
    rest = finals_of(await other.finals(3, 4 * UNIT))
    await other.submit("r5", "echo", {"n": 5})  # the session's seq goes on here
    frames = await other.finals(1)
    accepted = [f for f in frames if f["type"] == "accepted"]
    assert [(f["id"], f["seq"]) for f in accepted] == [("r5", 5)]
    finals = seen + rest + finals_of(frames)
    assert_exactly_once(finals, 5)
    assert [f["value"] for f in finals] == [
        {"n": 1}, {"slept": 0.5}, {"n": 3}, {"n": 4}, {"n": 5}
    ]  # fmt: skip


async def test_resuming_a_live_session_on_the_other_replica_takes_it_over(
    replica: Start,
) -> None:
    a, b = await replica(), await replica()
    first = await open_client(a)
    await first.submit("r1", "test.attempt", {"seconds": 0.5})
    for i in (2, 3):
        await first.submit(f"r{i}", "echo", {"n": i})
    await first.recv_until(lambda f: f.get("id") == "r3" and f["type"] == "accepted")
    await wait_running(first, "r1")

    second = await open_client(b, first.welcome["token"])
    resumed = await resume(second, first.welcome, after=0)
    assert resumed["last_seq"] == 3
    code, _ = await first.closed(4 * UNIT)
    assert code == 4409
    finals = finals_of(await second.finals(3, 4 * UNIT))
    assert_exactly_once(finals, 3)
    # The running request finished on replica a, once: not run again on b.
    assert finals[0]["value"] == {"attempt": 1}


async def test_a_killed_replicas_sessions_are_finished_by_the_other(replica: Start) -> None:
    a, b = await replica(), await replica()
    client = await open_client(a)
    await client.submit("r1", "echo", {"n": 1})
    seen = finals_of(await client.finals(1))
    await client.submit("r2", "test.attempt", {"seconds": 1})
    for i in (3, 4):
        await client.submit(f"r{i}", "echo", {"n": i})
    await client.recv_until(lambda f: f.get("id") == "r4" and f["type"] == "accepted")
    await wait_running(client, "r2")
    await a.kill()  # r2 running, r3 and r4 queued: replica b adopts them once the lease lapses

    other = await open_client(b, client.welcome["token"])
    async with asyncio.timeout(6 * UNIT):
        while True:  # the adoption runs them with no client; then a resume replays them
            await other.send({"type": "resume", "session": client.welcome["session"], "after": 1})
            frames = await other.recv_until(lambda f: f["type"] in ("resumed", "error"))
            if frames[-1]["type"] == "resumed":
                break
    rest = finals_of(await other.finals(3, 4 * UNIT))
    finals = seen + rest
    assert_exactly_once(finals, 4)
    assert rest[0]["value"] == {"attempt": 2}  # r2 ran again, once, after the crash
    assert [f["value"] for f in rest[1:]] == [{"n": 3}, {"n": 4}]
