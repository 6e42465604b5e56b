"""Per-user budgets across processes (PROTOCOL.md 1.1, "Budgets across a
user's connections"): two ``sessionq serve`` processes on one store (a SQLite
file, a PostgreSQL schema, or a MongoDB database through the wire emulator)
share one count of a user's sessions, connections and unfinished requests.

Requests that must stay unfinished run ``test.gate``, which ends when the
test creates its file: every wait below is on an event, never on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from conftest import UNIT, Client, ClientFactory, ServerFactory, finals_of
from prometheus_client import REGISTRY
from store_servers import EVERY_STORE, every_store_url
from test_faults import ServerProcess, open_client, spawn_server

from server.settings import Settings, SettingsError

Start = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture(params=EVERY_STORE)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return every_store_url(request, tmp_path)


@pytest.fixture
async def replica(store_url: str) -> AsyncIterator[Start]:
    """Start a ``sessionq serve`` on the shared store with ``settings``."""
    procs: list[ServerProcess] = []

    async def start(**settings: Any) -> ServerProcess:
        server = await spawn_server(
            store_url, ops="tests.ops_for_tests,tests.ops_budgets", **settings
        )
        procs.append(server)
        return server

    yield start
    for server in procs:
        await server.kill()


async def refused(server: ServerProcess, token: str) -> tuple[int | None, str]:
    """Authenticate with ``token``; the (code, reason) the server closes with."""
    client = Client(await websockets.connect(server.url))
    await client.send({"type": "auth", "token": token})
    return await client.closed()


async def admitted(server: ServerProcess, token: str) -> Client:
    """Authenticate with ``token`` until the server takes the connection (a
    budget another process frees is seen once its store write lands)."""
    async with asyncio.timeout(4 * UNIT):
        while True:
            client = Client(await websockets.connect(server.url))
            await client.send({"type": "auth", "token": token})
            try:
                client.welcome = await client.recv()
                return client
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 4429, closed


async def test_sessions_of_a_user_are_counted_across_processes_draining_included(
    replica: Start, tmp_path: Path
) -> None:
    budget = {"max_sessions_per_user": 3, "max_connections_per_user": 10}
    a, b = await replica(**budget), await replica(**budget)
    gate = tmp_path / "gate"
    first = await open_client(a)
    token = first.welcome["token"]
    await first.submit("g", "test.gate", {"path": str(gate)})
    await first.recv_until(lambda f: f["type"] == "accepted")
    await first.close()  # its session drains on a: it still counts
    kept = [await open_client(b, token), await open_client(a, token)]
    for server in (b, a):
        assert await refused(server, token) == (4429, "too many sessions")
    # A resume is no new session: at the limit, a kept connection takes up the
    # draining one (and the idle session it leaves closes).
    await kept[1].send({"type": "resume", "session": first.welcome["session"], "after": 0})
    frames = await kept[1].recv_until(lambda f: f["type"] in ("resumed", "error"))
    assert frames[-1]["type"] == "resumed", frames[-1]
    kept.append(await admitted(b, token))  # the third again
    await kept[1].close()  # its session drains again, and counts until it has drained
    assert await refused(a, token) == (4429, "too many sessions")
    gate.touch()  # the draining session finishes its work and closes
    again = await admitted(a, token)
    assert again.welcome["type"] == "welcome"
    assert await refused(b, token) == (4429, "too many sessions")


async def test_connections_of_a_user_are_counted_across_processes(replica: Start) -> None:
    a, b = await replica(max_connections_per_user=2), await replica(max_connections_per_user=2)
    first = await open_client(a)
    token = first.welcome["token"]
    await open_client(b, token)  # one connection on each process
    for server in (a, b):
        assert await refused(server, token) == (4429, "too many connections")
    await first.close()  # its idle session closes: the connection no longer counts
    third = await admitted(b, token)
    assert third.welcome["type"] == "welcome"


async def test_pending_requests_of_a_user_are_counted_across_processes(
    replica: Start, tmp_path: Path
) -> None:
    a, b = await replica(max_pending_per_user=4), await replica(max_pending_per_user=4)
    gate = tmp_path / "gate"
    on_a = await open_client(a)
    on_b = await open_client(b, on_a.welcome["token"])
    for i in (1, 2, 3):
        await on_a.submit(f"a{i}", "test.gate", {"path": str(gate)})
    await on_a.recv_until(lambda f: f.get("id") == "a3" and f["type"] == "accepted")
    await on_b.submit("b1", "test.gate", {"path": str(gate)})
    accepted = await on_b.recv_until(lambda f: f.get("id") == "b1")
    assert accepted[-1]["type"] == "accepted", accepted[-1]
    await on_b.submit("b2", "echo", {"n": 2})
    refusal = (await on_b.recv_until(lambda f: f.get("id") == "b2"))[-1]
    assert refusal["type"] == "error" and refusal["code"] == "queue_full", refusal
    assert "seq" not in refusal
    await on_a.submit("a4", "echo", {"n": 4})  # the other process refuses too
    refusal = (await on_a.recv_until(lambda f: f.get("id") == "a4"))[-1]
    assert (refusal["code"], "seq" in refusal) == ("queue_full", False)
    gate.touch()
    assert [f["id"] for f in finals_of(await on_a.finals(3))] == ["a1", "a2", "a3"]
    assert [f["id"] for f in finals_of(await on_b.finals(1))] == ["b1"]
    # Nothing of the refused submits was stored: their ids are free, the seqs go on.
    await on_b.submit("b2", "echo", {"n": 2})
    frames = await on_b.finals(1)
    assert [(f["type"], f["seq"]) for f in frames if f.get("id") == "b2"] == [
        ("accepted", 2),
        ("result", 2),
    ]


# -- one process: the metric and the close code -------------------------------------
def _hits(budget: str) -> float:
    return REGISTRY.get_sample_value("sessionq_budget_refusals_total", {"budget": budget}) or 0.0


async def test_budget_refusals_are_counted_by_budget(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(max_sessions_per_user=1, max_pending_per_user=1)
    sessions, pending = _hits("sessions"), _hits("pending")
    closes = REGISTRY.get_sample_value("sessionq_closes_total", {"code": "4429"}) or 0.0
    first = await user_client(target=server)
    second = await connect(target=server)
    await second.send({"type": "auth", "token": first.welcome["token"]})
    assert await second.closed() == (4429, "too many sessions")
    assert _hits("sessions") == sessions + 1
    assert REGISTRY.get_sample_value("sessionq_closes_total", {"code": "4429"}) == closes + 1
    await first.submit("s", "sleep", {"seconds": 30})
    await first.recv_until(lambda f: f.get("id") == "s")
    await first.submit("e", "echo", {})
    refusal = (await first.recv_until(lambda f: f.get("id") == "e"))[-1]
    assert refusal["code"] == "queue_full"
    assert _hits("pending") == pending + 1


# -- key-value quotas (one process) ---------------------------------------------------
async def test_a_kv_value_over_the_size_limit_is_refused_before_acceptance(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(kv_max_value_bytes=100)
    client = await user_client(target=server)
    await client.submit("big", "kv.put", {"key": "k", "value": "x" * 99})  # 101 bytes as JSON
    refusal = (await client.recv_until(lambda f: f.get("id") == "big"))[-1]
    assert (refusal["type"], refusal["code"], "seq" in refusal) == ("error", "bad_request", False)
    assert "100" in refusal["message"]
    await client.submit("fits", "kv.put", {"key": "k", "value": "x" * 98})  # 100 bytes
    await client.submit("get", "kv.get", {"key": "k"})
    finals = finals_of(await client.finals(2))
    assert finals[1]["value"] == {"key": "k", "found": True, "value": "x" * 98}


async def test_a_put_over_the_users_kv_bytes_ends_quota_exceeded(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(kv_max_bytes_per_user=50)
    hits = _hits("kv_bytes")
    client = await user_client(target=server)
    await client.submit("p1", "kv.put", {"key": "a", "value": "x" * 30})  # 1 + 32 bytes
    await client.submit("p2", "kv.put", {"key": "b", "value": "x" * 30})  # 33 more: over 50
    await client.submit("g2", "kv.get", {"key": "b"})
    await client.submit("d1", "kv.delete", {"key": "a"})
    await client.submit("p3", "kv.put", {"key": "b", "value": "x" * 30})  # fits now
    finals = {f["id"]: f for f in finals_of(await client.finals(5))}
    assert finals["p1"]["type"] == "result"
    assert (finals["p2"]["type"], finals["p2"]["code"]) == ("error", "quota_exceeded")
    assert finals["p2"]["seq"] == 2 and "50" in finals["p2"]["message"]
    assert finals["g2"]["value"]["found"] is False  # the refused put stored nothing
    assert finals["p3"]["value"] == {"key": "b", "ok": True}
    assert _hits("kv_bytes") == hits + 1
    # The count is the user's over all sessions (and processes: the store's).
    other = await user_client(target=server)
    await other.submit("own", "kv.put", {"key": "a", "value": "x" * 40})  # another user's own
    assert finals_of(await other.finals(1))[0]["type"] == "result"


async def test_kv_list_pages_with_limit_and_next(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory()
    client = await user_client(target=server)
    for i in range(101):
        await client.submit(f"p{i}", "kv.put", {"key": f"k/{i:03}", "value": i})
    await client.submit("other", "kv.put", {"key": "z", "value": 0})
    await client.finals(102)
    await client.submit("all", "kv.list", {"prefix": "k/"})  # default limit: 100
    page = finals_of(await client.finals(1))[0]["value"]
    assert [item["key"] for item in page["items"]] == [f"k/{i:03}" for i in range(100)]
    assert page["next"] == "k/099"
    await client.submit("rest", "kv.list", {"prefix": "k/", "next": page["next"]})
    assert finals_of(await client.finals(1))[0]["value"] == {
        "items": [{"key": "k/100", "value": 100}],
        "next": None,
    }
    await client.submit("two", "kv.list", {"prefix": "k/", "limit": 2, "next": "k/050"})
    page = finals_of(await client.finals(1))[0]["value"]
    assert ([item["key"] for item in page["items"]], page["next"]) == (["k/051", "k/052"], "k/052")
    for rid, limit in (("zero", 0), ("huge", 1001), ("text", "5")):
        await client.submit(rid, "kv.list", {"limit": limit})
        refusal = (await client.recv_until(lambda f, rid=rid: f.get("id") == rid))[-1]
        assert (refusal["code"], "seq" in refusal) == ("bad_request", False), refusal


def test_budget_settings_must_be_positive() -> None:
    for name in (
        "MAX_SESSIONS_PER_USER", "MAX_PENDING_PER_USER", "KV_MAX_VALUE_BYTES",
        "KV_MAX_BYTES_PER_USER",
    ):  # fmt: skip
        with pytest.raises(SettingsError, match=f"SESSIONQ_{name}: must be greater than 0"):
            Settings.from_env(environ={f"SESSIONQ_{name}": "0"})
    defaults = Settings.from_env(environ={})
    assert (
        defaults.max_sessions_per_user, defaults.max_pending_per_user,
        defaults.kv_max_value_bytes, defaults.kv_max_bytes_per_user,
    ) == (20, 5000, 65536, 16777216)  # fmt: skip
