"""What only the PostgreSQL store can show (the contract suite runs on it too):
its schema version, its failures and recovery, and two stores on one database.
Every test runs on a real server, in a schema of its own (tests/store_servers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.store import Fenced, NewRequest, SessionCounts, StoreError, postgres_schema
from server.store.postgres import PostgresStore

UNIT = 0.1  # seconds; every timeout below is a multiple of it
FAR = 1e12


def reqs(*seqs: int) -> list[NewRequest]:
    return [NewRequest(seq, f"c{seq}", "echo", "{}") for seq in seqs]


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to the store's schema."""
    connection = await asyncpg.connect(postgres_url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def test_the_schema_is_versioned_and_kept_across_opens(
    postgres_url: str, admin: asyncpg.Connection
) -> None:
    first = PostgresStore(postgres_url)
    await first.open()
    await first.create_user("alice", b"h")
    await first.close()
    await first.close()  # twice is fine
    second = PostgresStore(postgres_url)
    await second.open()  # migrates nothing: the schema is current
    try:
        assert await second.get_user("ALICE") is not None
    finally:
        await second.close()
    versions = await admin.fetch("SELECT version FROM sessionq_schema ORDER BY version")
    assert [row[0] for row in versions] == list(range(1, postgres_schema.VERSION + 1))


async def test_processes_starting_together_migrate_once(
    postgres_url: str, admin: asyncpg.Connection
) -> None:
    """``sessionq serve --workers N`` opens N stores on a new database at once."""
    stores = [PostgresStore(postgres_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await asyncio.gather(*(s.kv_put("alice", f"k{n}", "1") for n, s in enumerate(stores)))
        assert len(await stores[0].kv_list("alice", "")) == 3
    finally:
        for s in stores:
            await s.close()
    versions = await admin.fetch("SELECT version FROM sessionq_schema")
    assert sorted(row[0] for row in versions) == list(range(1, postgres_schema.VERSION + 1))


async def test_a_schema_newer_than_the_code_is_refused(
    postgres_url: str, admin: asyncpg.Connection
) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    await store.close()
    newer = postgres_schema.VERSION + 1
    await admin.execute("INSERT INTO sessionq_schema (version) VALUES ($1)", newer)
    with pytest.raises(StoreError, match=f"version {newer}, newer than this"):
        await PostgresStore(postgres_url).open()


async def test_open_fails_with_store_error_when_nothing_answers() -> None:
    store = PostgresStore("postgresql://sessionq:sessionq@127.0.0.1:1/sessionq")
    with pytest.raises(StoreError, match="cannot connect"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.kv_put("alice", "k", "1")
    with pytest.raises(StoreError, match="not open"):
        await store.ping()


async def test_writes_fail_while_locked_out_and_work_again_after(
    postgres_url: str, admin: asyncpg.Connection
) -> None:
    # lock_timeout (a server setting, passed in the URL) bounds the wait.
    store = PostgresStore(f"{postgres_url}&lock_timeout={int(2 * UNIT * 1000)}")
    failures: list[int] = []
    store.on_failure = failures.append  # sessionq_store_errors_total's hook
    await store.open()
    try:
        async with admin.transaction():
            await admin.execute("LOCK TABLE kv IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreError, match="lock"):
                await store.kv_put("alice", "k", "1")
            assert failures == [1]
            assert await store.get_user("alice") is None  # other reads go on
        await store.kv_put("alice", "k", "2")
        assert await store.kv_get("alice", "k") == "2"
        assert failures == [1]  # what was asked and done is not a failure
    finally:
        await store.close()


async def test_the_store_outlives_its_connections(
    postgresql_store: PostgresStore, admin: asyncpg.Connection
) -> None:
    s = postgresql_store
    await s.create_user("alice", b"h")
    assert await s.get_user("alice") is not None  # a reader's connection, too
    cut = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND usename = current_user"
    )
    assert cut >= 2  # the writer's connection and the readers'
    for name in ("bob", "carol"):  # a write that meets a cut connection may fail...
        try:
            await s.create_user(name, b"h")
        except StoreError:
            pass
    await s.create_user("dave", b"h")  # ...but the store takes new ones
    for name in ("alice", "dave"):
        try:
            user = await s.get_user(name)
        except StoreError:  # a reader's connection that was cut
            user = await s.get_user(name)
        assert user is not None


async def test_a_value_postgresql_cannot_hold_fails_alone(
    postgresql_store: PostgresStore,
) -> None:
    s = postgresql_store
    before = s.commits
    bad, good = await asyncio.gather(
        s.kv_put("alice", "k\x00", "1"), s.kv_put("alice", "k", "1"), return_exceptions=True
    )
    assert isinstance(bad, StoreError) and "NUL" in str(bad)
    assert good is None
    assert s.commits - before == 1
    assert await s.kv_list("alice", "") == [("k", "1")]


async def test_two_stores_on_one_database_both_write_and_fence(postgres_url: str) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await a.open()
    await b.open()
    try:
        await a.create_session("sa", "alice", "A", lease_until=FAR)
        await b.create_session("sb", "bob", "B", lease_until=0.0)
        async with asyncio.timeout(50 * UNIT):
            await asyncio.gather(
                *(a.add_requests("sa", 1, reqs(n), now=0.0) for n in range(1, 101)),
                *(b.add_requests("sb", 1, reqs(n), now=0.0) for n in range(1, 101)),
                *(a.kv_put("alice", f"a{n}", "1") for n in range(100)),
                *(b.kv_put("alice", f"b{n}", "1") for n in range(100)),
            )
        for view in (a, b):
            assert (await view.session_counts("sa")).pending == 100
            assert len(await view.kv_list("alice", "")) == 200
        # A takes sb over (its lease ended); B's writes at the old epoch are refused.
        assert await a.claim_session("sb", "A", lease_until=FAR, now=1.0) == 2
        with pytest.raises(Fenced):
            await b.finish_request("sb", 1, 1, "{}", False, now=2.0)
        with pytest.raises(Fenced):
            await b.add_requests("sb", 1, reqs(101), now=2.0)
        assert await a.finish_request("sb", 1, 2, "{}", False, now=2.0) == (True, None)
        counts = await b.session_counts("sb")
        assert counts == SessionCounts(last_seq=100, last_done=1, pending=99)
    finally:
        await a.close()
        await b.close()


async def test_a_large_batch_of_adds_and_finishes_keeps_each_outcome(
    postgresql_store: PostgresStore,
) -> None:
    """Batches of many adds and finishes (the load's) run as a few statements
    for the whole batch; each write still gets its own answer."""
    s = postgresql_store
    sids = [f"s{n}" for n in range(40)]
    for sid in sids:
        await s.create_session(sid, "alice", "A", lease_until=FAR)
    assert await s.claim_session("s0", "A", lease_until=FAR, now=0.0) == 2  # s0 at epoch 2
    before = s.commits
    added = await asyncio.gather(
        *(s.add_requests(sid, 1, reqs(1, 2, 3), now=1.0) for sid in sids), return_exceptions=True
    )
    assert s.commits - before == 1
    assert isinstance(added[0], Fenced)
    assert added[1:] == [None] * 39
    before = s.commits
    finished = await asyncio.gather(
        *(s.finish_requests(sid, 1, [(2, '"two"', False), (9, '"nine"', True)], 2.0)
          for sid in sids),
        *(s.add_requests(sid, 1, reqs(4), now=2.0) for sid in sids[1:]),
        return_exceptions=True,
    )  # fmt: skip
    assert s.commits - before == 1
    assert isinstance(finished[0], Fenced)
    assert finished[1:40] == [[True, False]] * 39
    assert finished[40:] == [None] * 39
    for sid in sids[1:]:
        assert await s.finals_after(sid, 0) == [(2, '"two"')]
        assert await s.session_counts(sid) == SessionCounts(last_seq=4, last_done=0, pending=3)
    assert await s.unfinished("s0") == []
    # A taken client id fails its own write only, in a batch of that size too.
    outcomes = await asyncio.gather(
        s.add_requests("s1", 1, [NewRequest(5, "c1", "echo", "{}")], now=3.0),
        *(s.add_requests(sid, 1, reqs(5), now=3.0) for sid in sids[2:]),
        return_exceptions=True,
    )
    assert type(outcomes[0]) is StoreError
    assert outcomes[1:] == [None] * 38
    assert (await s.session_counts("s1")).last_seq == 4
    assert (await s.session_counts("s2")).last_seq == 5


async def test_leases_are_on_the_databases_clock(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose clock runs 100 s ahead still sees another replica's
    live lease as live, and a lapsed one as lapsed: lease times are moved onto
    the database's clock, measured when each store opens."""
    import time

    from server.store import postgres as postgres_module

    right = PostgresStore(postgres_url)
    await right.open()
    real = time.time
    monkeypatch.setattr(postgres_module.time, "time", lambda: real() + 100)
    ahead = PostgresStore(postgres_url)
    await ahead.open()  # measures its clock 100 s ahead of the database's
    monkeypatch.setattr(postgres_module.time, "time", real)
    try:
        await right.create_session("s1", "ada", "right", real() + 15)
        await right.add_requests("s1", 1, [NewRequest(1, "a", "echo", "{}")], real())
        # The fast replica, by its own clock, sees the lease live ...
        assert await ahead.orphaned_sessions(real() + 100) == []
        assert await ahead.claim_session("s1", "ahead", real() + 100 + 15, real() + 100) is None
        record = await ahead.get_session("s1")
        assert record is not None and abs(record.lease_until - (real() + 100 + 15)) < 2
        # ... and lapsed once it has lapsed on the database's clock.
        assert await ahead.orphaned_sessions(real() + 100 + 16) == ["s1"]
        assert await ahead.claim_session("s1", "ahead", real() + 130, real() + 116) == 2
        assert await right.claim_session("s1", "right", real() + 15, real()) is None
    finally:
        await ahead.close()
        await right.close()
