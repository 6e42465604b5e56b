"""The server on MongoDB: a representative subset of its behaviour.

The store is tests/mongo_server.py's: the wire emulator, or the MongoDB that
``SESSIONQ_TEST_MONGODB_URL`` names; every test has a database of its own.
Core protocol (welcome, echo, a FIFO burst), resume after a disconnect, a
takeover by a second connection (4409), a crash (SIGKILL) and a restart, and
twenty sessions of twenty requests at once.

That last one is the "stall": on the emulator every ``accepted`` comes at
once and the results only after many seconds. It is the emulator's, not the
store's; ``test_the_stall_is_the_emulators_unique_index_scans`` shows why by
counting (docs/deployment.md, "MongoDB in the tests").
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    finals_of,
)
from test_faults import ServerProcess, open_client, spawn_server

from server.app import Server

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_PYTHON = ROOT / ".venv-mongo" / "bin" / "python"
PROBE = Path(__file__).with_name("mongo_emulator_probe.py")


@pytest.fixture
async def server(server_factory: ServerFactory, mongodb_store_url: str) -> Server:
    """Every client fixture (connect, user_client) talks to a server on MongoDB."""
    return await server_factory(store_url=mongodb_store_url)


def assert_exactly_once(finals: list[dict[str, Any]], expected: int) -> None:
    """One final per seq 1..expected, in seq order."""
    assert [f["seq"] for f in finals] == list(range(1, expected + 1))


async def resume(client: Client, session: str, after: int) -> dict[str, Any]:
    await client.send({"type": "resume", "session": session, "after": after})
    frames = await client.recv_until(lambda f: f["type"] in ("resumed", "error"))
    return frames[-1]


# -- core protocol -------------------------------------------------------------------
async def test_welcome_then_an_echo(server: Server, user_client: ClientFactory) -> None:
    assert server.settings.store_url.startswith("mongodb")
    client = await user_client()
    assert client.welcome["session"] and client.welcome["token"]
    await client.submit("hello", "echo", {"text": "hi"})
    frames = await client.finals(1)
    assert [(f["type"], f["id"], f["seq"]) for f in frames] == [
        ("accepted", "hello", 1), ("result", "hello", 1)
    ]  # fmt: skip
    assert frames[-1]["value"] == {"text": "hi"}


async def test_a_burst_comes_back_in_fifo_order(user_client: ClientFactory) -> None:
    client = await user_client()
    for i in range(1, 31):
        if i % 5 == 0:
            await client.submit(f"r{i}", "sleep", {"seconds": 0.01})
        else:
            await client.submit(f"r{i}", "echo", {"i": i})
    frames = await client.finals(30, timeout=4 * UNIT)
    accepted = [f for f in frames if f["type"] == "accepted"]
    assert [(f["id"], f["seq"]) for f in accepted] == [(f"r{i}", i) for i in range(1, 31)]
    finals = finals_of(frames)
    assert_exactly_once(finals, 30)
    assert [f["value"] for f in finals if f["seq"] % 5] == [{"i": i} for i in range(1, 31) if i % 5]


# -- resume and takeover -------------------------------------------------------------
async def test_resume_after_a_disconnect_gets_every_result_once_in_order(
    user_client: ClientFactory, connect: ClientFactory
) -> None:
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    for i in range(1, 7):
        await client.submit(f"r{i}", "sleep", {"seconds": 0.05 * (i % 3)})
    frames = await client.recv_until(lambda f: f.get("seq") == 1 and f["type"] == "result")
    seen = finals_of(frames)
    await client.close()  # gone with requests 2..6 queued or running

    again = await connect(path=f"/ws?token={token}")
    assert (await again.recv())["type"] == "welcome"
    resumed = await resume(again, session, after=seen[-1]["seq"])
    assert (resumed["type"], resumed["session"], resumed["last_seq"]) == ("resumed", session, 6)
    rest = finals_of(await again.finals(6 - len(seen), timeout=2 * UNIT))
    assert_exactly_once(seen + rest, 6)
    assert [f["id"] for f in seen + rest] == [f"r{i}" for i in range(1, 7)]
    await again.submit("r7", "echo", {"n": 7})  # the session's seq goes on
    frames = await again.finals(1)
    assert [(f["type"], f["seq"]) for f in frames] == [("accepted", 7), ("result", 7)]


async def test_a_second_connection_resuming_takes_over_with_4409(
    user_client: ClientFactory, connect: ClientFactory
) -> None:
    first = await user_client()
    session, token = first.welcome["session"], first.welcome["token"]
    await first.submit("a", "sleep", {"seconds": 0.3})
    await first.submit("b", "echo", {"x": 1})
    await first.recv_until(lambda f: f.get("id") == "b")  # b accepted
    second = await connect(path=f"/ws?token={token}")
    assert (await second.recv())["type"] == "welcome"
    resumed = await resume(second, session, after=0)
    assert resumed["type"] == "resumed" and resumed["last_seq"] == 2
    assert (await first.closed())[0] == 4409
    finals = finals_of(await second.finals(2, timeout=2 * UNIT))
    assert [(f["id"], f["seq"]) for f in finals] == [("a", 1), ("b", 2)]


# -- a crash -------------------------------------------------------------------------
@pytest.fixture
async def start_process(
    mongodb_store_url: str,
) -> AsyncIterator[Callable[[], Awaitable[ServerProcess]]]:
    """``sessionq serve`` processes on the test's MongoDB database, to be killed like a crash."""
    started: list[ServerProcess] = []

    async def start() -> ServerProcess:
        server = await spawn_server(mongodb_store_url)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.kill()


async def test_a_crash_mid_queue_then_a_restart_and_resume(
    start_process: Callable[[], Awaitable[ServerProcess]],
) -> None:
    """SIGKILL with one request running and three queued: the next process
    adopts the session once the lease lapses, runs the running one again and
    the rest after it, one final per seq, in order."""
    first = await start_process()
    client = await open_client(first)
    await client.submit("r1", "echo", {"n": 1})
    await client.submit("r2", "test.attempt", {"seconds": 1})
    for i in range(3, 6):
        await client.submit(f"r{i}", "echo", {"n": i})
    # Every request accepted (stored) before the crash, and r1's result seen.
    frames = await client.recv_until(lambda f: f.get("id") == "r5" and f["type"] == "accepted")
    if not finals_of(frames):
        frames += await client.recv_until(lambda f: f.get("id") == "r1" and "value" in f)
    seen = finals_of(frames)
    async with asyncio.timeout(2 * UNIT):  # r2 has started
        while True:
            await client.send({"type": "status", "id": "r2"})
            status = (await client.recv_until(lambda f: f["type"] == "status"))[-1]
            if status.get("state") == "running":
                break
    await first.kill()

    second = await start_process()
    again = await open_client(second, client.welcome["token"])
    await again.send({"type": "resume", "session": client.welcome["session"], "after": 1})
    resumed = (await again.recv_until(lambda f: f["type"] in ("resumed", "error"), 4 * UNIT))[-1]
    assert (resumed["type"], resumed["last_seq"]) == ("resumed", 5), resumed
    rest = finals_of(await again.finals(4, timeout=4 * UNIT))
    assert_exactly_once(seen + rest, 5)
    assert rest[0]["value"] == {"attempt": 2}  # r2 ran again after the crash
    assert [f["value"] for f in rest[1:]] == [{"n": 3}, {"n": 4}, {"n": 5}]
    await again.close()


# -- the stall -----------------------------------------------------------------------
@pytest.mark.timeout(600)  # the emulator's pace, not the store's: see the module docstring
async def test_twenty_sessions_of_twenty_echoes_at_once(user_client: ClientFactory) -> None:
    clients = [await user_client() for _ in range(20)]

    async def run(client: Client, k: int) -> list[dict[str, Any]]:
        for i in range(20):
            await client.submit(f"e{i}", "echo", {"k": k, "i": i})
        return finals_of(await client.finals(20, timeout=100 * UNIT))

    results = await asyncio.gather(*(run(c, k) for k, c in enumerate(clients)))
    for k, finals in enumerate(results):
        assert_exactly_once(finals, 20)
        assert [f["value"] for f in finals] == [{"k": k, "i": i} for i in range(20)]


def test_the_stall_is_the_emulators_unique_index_scans(mongodb_url: str) -> None:
    """Counted, not timed (tests/mongo_emulator_probe.py): for the same store
    calls, the store sends the same number of commands however many requests
    are stored, while the emulator compares every written request with every
    stored one (its check of a unique index on two fields is a scan of the
    collection, under the collection's lock). So the emulator's work per
    request grows with the requests stored, and 400 at once queue behind each
    other; on MongoDB a unique index is a B-tree lookup."""
    if os.environ.get("SESSIONQ_TEST_MONGODB_URL"):
        pytest.skip("about the emulator; SESSIONQ_TEST_MONGODB_URL names a real MongoDB")
    sessions, batch = 6, 10
    probe = subprocess.run(
        [str(EMULATOR_PYTHON), str(PROBE), str(sessions), str(batch)],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    counts = json.loads(probe.stdout)
    unique = [i["keys"] for i in counts["indexes"] if i["unique"] and len(i["keys"]) > 1]
    assert unique == [["session_id", "seq"], ["session_id", "client_id"]]
    adds, finishes = counts["add"], counts["finish"]
    # The store: four commands per batch and five per finish (one each for the
    # user's pending-request counter), at any size.
    assert {a["commands"] for a in adds} == {4}
    assert {f["commands"] for f in finishes} == {5}
    # The emulator: each document written is compared with every stored one,
    # once per unique two-field index.
    for add in adds:
        assert add["scanned"] >= len(unique) * batch * add["stored"]
    assert [a["scanned"] for a in adds] == sorted({a["scanned"] for a in adds})  # rising
    stored = sessions * batch
    for finish in finishes:  # a finish writes two requests: the done one and the next
        assert finish["stored"] == stored
        assert finish["scanned"] >= 2 * len(unique) * (stored - 1)


# -- the emulator script -------------------------------------------------------------
EMULATOR = ROOT / "scripts" / "mongo-emulator"


def test_the_emulator_refuses_a_bad_port() -> None:
    done = subprocess.run(
        [str(EMULATOR), "--port", "70000"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "--port must be 0..65535, not 70000" in done.stderr


async def test_the_emulator_ends_with_its_parent(mongodb_url: str) -> None:
    """A test run that dies leaves no emulator behind: the emulator's parent
    (a shell here) is killed, and the emulator exits on its own."""
    if os.environ.get("SESSIONQ_TEST_MONGODB_URL"):
        pytest.skip("about the emulator; SESSIONQ_TEST_MONGODB_URL names a real MongoDB")
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", '"$0" --port 0 & echo "$!"; wait', str(EMULATOR),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert shell.stdout is not None
    pid = int(await asyncio.wait_for(shell.stdout.readline(), 2 * UNIT))
    ready = await asyncio.wait_for(shell.stdout.readline(), 6 * UNIT)
    assert ready.startswith(b"mongo-emulator: ready mongodb://127.0.0.1:"), ready
    fd = os.pidfd_open(pid)
    try:
        shell.kill()
        await shell.wait()
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ended.set)  # a pidfd turns readable when its process exits
        try:
            await asyncio.wait_for(ended.wait(), 2 * UNIT)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
