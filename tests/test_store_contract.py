"""One contract for every store backend, plus what only one backend can show.

SQLite runs on a real file everywhere; PostgreSQL on a real server
(tests/store_servers.py: a database per run, a schema per test). MongoDB runs
everywhere too: on the server ``SESSIONQ_TEST_MONGODB_URL`` points at, else on
the wire emulator that tests/mongo_server.py starts (each test in a database of
its own, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.store import (
    Budget,
    BudgetExceeded,
    Fenced,
    NewRequest,
    RequestState,
    SessionCounts,
    SessionRecord,
    Store,
    StoreError,
    User,
    UserExists,
    UserUsage,
    open_store,
)
from server.store.mongodb import MongoStore
from server.store.postgres import PostgresStore
from server.store.sqlite import SqliteStore

UNIT = 0.1  # seconds; every timeout below is a multiple of it
FAR = 1e12  # a lease that outlives every test


# One fixture per backend, named "<backend>_store"; ``store`` runs each test on each.
BACKENDS = [
    "sqlite",
    "postgresql",
    pytest.param("mongodb", marks=pytest.mark.mongodb),
]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    backend: Store = request.getfixturevalue(f"{request.param}_store")
    return backend


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# postgresql_store: tests/store_servers.py (a schema of its own in the run's database)


@pytest.fixture
async def mongodb_store(
    mongodb_url: str, mongodb_database: str
) -> AsyncIterator[MongoStore]:  # the database is dropped by its fixture after the test
    s = MongoStore(mongodb_url, database=mongodb_database)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def reqs(*seqs: int) -> list[NewRequest]:
    return [NewRequest(seq, f"c{seq}", "echo", f'{{"n": {seq}}}') for seq in seqs]


async def session_of(store: Store, sid: str) -> SessionRecord:
    session = await store.get_session(sid)
    assert session is not None
    return session


async def new_session(store: Store, sid: str = "s1", owner: str = "A") -> str:
    await store.create_session(sid, "alice", owner, lease_until=FAR)
    return sid


# -- users -------------------------------------------------------------------
async def test_user_names_are_unique_without_regard_to_case(store: Store) -> None:
    created = await store.create_user("Alice", b"hash")
    assert created.username == "Alice"
    with pytest.raises(UserExists):
        await store.create_user("ALICE", b"other")
    user = await store.get_user("aLiCe")
    assert user is not None
    assert (user.username, user.password_hash) == ("Alice", b"hash")
    assert await store.get_user("bob") is None


# -- sessions and ownership ----------------------------------------------------
async def test_session_starts_at_epoch_one_owned_by_its_creator(store: Store) -> None:
    await store.create_session("s1", "alice", "A", lease_until=100.0)
    session = await session_of(store, "s1")
    assert (session.username, session.owner, session.epoch) == ("alice", "A", 1)
    assert (session.last_seq, session.lease_until) == (0, 100.0)
    assert await store.get_session("nope") is None
    with pytest.raises(StoreError):
        await store.create_session("s1", "alice", "B", lease_until=100.0)


async def test_claim_waits_for_the_lease_and_always_bumps_the_epoch(store: Store) -> None:
    await store.create_session("s1", "alice", "A", lease_until=100.0)
    assert await store.claim_session("s1", "B", lease_until=200.0, now=50.0) is None
    assert await store.claim_session("s1", "B", lease_until=200.0, now=100.0) is None  # not ended
    assert await store.claim_session("s1", "A", lease_until=150.0, now=50.0) == 2  # holder
    assert await store.claim_session("s1", "B", lease_until=300.0, now=151.0) == 3  # lapsed
    session = await session_of(store, "s1")
    assert (session.owner, session.epoch, session.lease_until) == ("B", 3, 300.0)
    assert await store.claim_session("nope", "B", lease_until=300.0, now=151.0) is None


async def test_orphaned_sessions_are_those_with_work_and_no_live_owner(store: Store) -> None:
    await store.create_session("live", "alice", "A", lease_until=100.0)
    await store.create_session("dead", "alice", "B", lease_until=40.0)
    await store.create_session("idle", "alice", "B", lease_until=40.0)
    await store.create_session("freed", "alice", "C", lease_until=100.0)
    for sid in ("live", "dead", "freed"):
        await store.add_requests(sid, 1, reqs(1, 2), now=5.0)
    await store.add_requests("idle", 1, reqs(1), now=5.0)
    await store.finish_request("idle", 1, 1, '{"type":"result"}', False, now=6.0)
    assert await store.release_session("freed", 1)
    assert sorted(await store.orphaned_sessions(now=50.0)) == ["dead", "freed"]
    assert sorted(await store.orphaned_sessions(now=150.0)) == ["dead", "freed", "live"]
    assert len(await store.orphaned_sessions(now=150.0, limit=1)) == 1


async def test_release_needs_the_current_epoch_and_frees_the_session(store: Store) -> None:
    await store.create_session("s1", "alice", "A", lease_until=FAR)
    epoch = await store.claim_session("s1", "A", lease_until=FAR, now=0.0)
    assert epoch == 2
    assert await store.release_session("s1", 1) is False
    assert (await session_of(store, "s1")).owner == "A"
    assert await store.release_session("s1", epoch) is True
    session = await session_of(store, "s1")
    assert (session.owner, session.lease_until, session.epoch) == (None, 0, 2)
    assert await store.claim_session("s1", "B", lease_until=FAR, now=0.0) == 3


async def test_renew_leases_extends_every_session_of_the_owner(store: Store) -> None:
    await store.create_session("s1", "alice", "A", lease_until=10.0)
    await store.create_session("s2", "bob", "A", lease_until=10.0)
    await store.create_session("s3", "carol", "B", lease_until=10.0)
    assert await store.renew_leases("A", 99.0) == 2
    leases = [(await session_of(store, s)).lease_until for s in ("s1", "s2", "s3")]
    assert leases == [99.0, 99.0, 10.0]
    assert await store.renew_leases("nobody", 99.0) == 0


async def test_renew_session_extends_one_lease_and_is_fenced(store: Store) -> None:
    await store.create_session("s1", "alice", "A", lease_until=10.0)
    await store.create_session("s2", "bob", "A", lease_until=10.0)
    await store.renew_session("s1", 1, 99.0)
    assert [(await session_of(store, s)).lease_until for s in ("s1", "s2")] == [99.0, 10.0]
    assert await store.claim_session("s1", "B", lease_until=200.0, now=100.0) == 2
    with pytest.raises(Fenced):  # another owner took it after the lease lapsed
        await store.renew_session("s1", 1, 300.0)
    assert (await session_of(store, "s1")).lease_until == 200.0
    with pytest.raises(Fenced):
        await store.renew_session("gone", 1, 300.0)


# -- requests ------------------------------------------------------------------
async def test_add_requests_queues_them_and_raises_last_seq(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=5.0)
    record = await store.get_request(sid, 2)
    assert record is not None
    assert (record.client_id, record.op, record.args, record.state) == (
        "c2",
        "echo",
        '{"n": 2}',
        RequestState.QUEUED,
    )
    assert (record.attempts, record.failed, record.final, record.created_at) == (
        0,
        False,
        None,
        5.0,
    )
    assert (await session_of(store, sid)).last_seq == 3
    found = await store.find_request(sid, "c3")
    assert found is not None and found.seq == 3
    assert await store.find_request(sid, "c9") is None
    assert await store.find_request("other", "c3") is None


async def test_a_taken_client_id_refuses_the_whole_call(store: Store) -> None:
    """The caller checks find_request first; the store is the backstop."""
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1), now=0.0)
    taken = [NewRequest(2, "c2", "echo", "{}"), NewRequest(3, "c1", "echo", "{}")]
    with pytest.raises(StoreError) as caught:
        await store.add_requests(sid, 1, taken, now=0.0)
    assert type(caught.value) is StoreError
    assert await store.get_request(sid, 2) is None
    assert (await session_of(store, sid)).last_seq == 1
    # the same client id in another session is fine
    other = await new_session(store, "s2")
    await store.add_requests(other, 1, reqs(1), now=0.0)


async def test_remove_requests_lowers_last_seq(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3, 4), now=0.0)
    await store.start_request(sid, 1, 1)
    await store.remove_requests(sid, 1, [3, 4])
    assert [r.seq for r in await store.unfinished(sid)] == [1, 2]
    assert (await session_of(store, sid)).last_seq == 2
    await store.remove_requests(sid, 1, [1])  # running: not removed
    assert (await store.get_request(sid, 1)) is not None
    assert (await session_of(store, sid)).last_seq == 2
    # From an owner whose epoch passed: its successor may be running them.
    assert await store.claim_session(sid, "B", lease_until=2 * FAR, now=FAR + 1) == 2
    with pytest.raises(Fenced):
        await store.remove_requests(sid, 1, [2])
    assert [r.seq for r in await store.unfinished(sid)] == [1, 2]


async def test_remove_after_purge_does_not_reuse_purged_seqs(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2), now=0.0)
    for seq in (1, 2):
        await store.finish_request(sid, seq, 1, "{}", False, now=1.0)
    await store.purge(finished_before=2.0)
    await store.add_requests(sid, 1, reqs(3), now=3.0)
    await store.remove_requests(sid, 1, [3])
    assert (await session_of(store, sid)).last_seq == 2


async def test_start_request_counts_attempts(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1), now=0.0)
    assert [await store.start_request(sid, 1, 1) for _ in range(3)] == [1, 2, 3]
    record = await store.get_request(sid, 1)
    assert record is not None and record.state is RequestState.RUNNING


async def test_start_of_a_done_or_missing_request_returns_zero(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1), now=0.0)
    await store.finish_request(sid, 1, None, '{"cancelled": 1}', True, now=1.0)
    assert await store.start_request(sid, 1, 1) == 0
    assert await store.start_request(sid, 7, 1) == 0
    record = await store.get_request(sid, 1)
    assert record is not None and (record.state, record.attempts) == (RequestState.DONE, 0)


async def test_the_first_final_wins(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1), now=0.0)
    await store.start_request(sid, 1, 1)
    assert await store.finish_request(sid, 1, 1, '{"r": 1}', False, now=7.0) == (True, None)
    assert await store.finish_request(sid, 1, 1, '{"r": 2}', True, now=8.0) == (False, None)
    record = await store.get_request(sid, 1)
    assert record is not None
    assert (record.state, record.final, record.failed, record.finished_at) == (
        RequestState.DONE,
        '{"r": 1}',
        False,
        7.0,
    )


async def test_finish_can_start_the_next_request(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=0.0)
    await store.start_request(sid, 1, 1)
    assert await store.finish_request(sid, 1, 1, "{}", False, now=1.0, start_next=2) == (True, 1)
    record = await store.get_request(sid, 2)
    assert record is not None and (record.state, record.attempts) == (RequestState.RUNNING, 1)
    # a finish that was already stored still starts the next one
    assert await store.finish_request(sid, 1, 1, "{}", False, now=1.0, start_next=3) == (False, 1)


async def test_old_epochs_are_fenced_off(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2), now=0.0)
    assert await store.claim_session(sid, "A", lease_until=FAR, now=0.0) == 2
    with pytest.raises(Fenced):
        await store.start_request(sid, 1, 1)
    with pytest.raises(Fenced):
        await store.finish_request(sid, 1, 1, "{}", False, now=1.0)
    with pytest.raises(Fenced):
        await store.finish_request(sid, 1, 1, "{}", False, now=1.0, start_next=2)
    with pytest.raises(Fenced):
        await store.add_requests(sid, 1, reqs(3), now=0.0)
    with pytest.raises(Fenced):
        await store.add_requests("nope", 1, reqs(1), now=0.0)
    assert [(r.seq, r.state, r.attempts) for r in await store.unfinished(sid)] == [
        (1, RequestState.QUEUED, 0),
        (2, RequestState.QUEUED, 0),
    ]
    assert (await session_of(store, sid)).last_seq == 2
    # the current epoch works; no epoch (cancel from the connection) skips fencing
    assert await store.start_request(sid, 1, 2) == 1
    assert await store.finish_request(sid, 2, None, "{}", True, now=1.0) == (True, None)


async def test_unfinished_and_finals_after_are_in_seq_order(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(3, 1, 2, 4), now=0.0)
    for seq in (4, 2, 1):
        await store.finish_request(sid, seq, 1, f'"f{seq}"', False, now=1.0)
    assert [r.seq for r in await store.unfinished(sid)] == [3]
    assert await store.finals_after(sid, 0) == [(1, '"f1"'), (2, '"f2"'), (4, '"f4"')]
    assert await store.finals_after(sid, 2) == [(4, '"f4"')]
    assert await store.finals_after("other", 0) == []
    # A page at a time, as a replay reads them.
    assert await store.finals_after(sid, 0, limit=2) == [(1, '"f1"'), (2, '"f2"')]
    assert await store.finals_after(sid, 2, limit=2) == [(4, '"f4"')]
    assert await store.finals_after(sid, 4, limit=2) == []


async def test_count_requests_counts_every_state_in_the_range(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3, 4, 5), now=0.0)
    await store.finish_request(sid, 2, 1, '"f2"', False, now=1.0)
    assert await store.count_requests(sid, 0, 5) == 5
    assert await store.count_requests(sid, 1, 3) == 2
    assert await store.count_requests(sid, 5, 9) == 0
    await store.finish_request(sid, 1, 1, '"f1"', False, now=1.0)
    assert await store.purge(finished_before=2.0) == 2  # seqs 1 and 2 passed retention
    assert await store.count_requests(sid, 0, 5) == 3


async def test_last_done_stops_at_the_first_unfinished(store: Store) -> None:
    sid = await new_session(store)
    assert await store.session_counts(sid) == SessionCounts(last_seq=0, last_done=0, pending=0)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=0.0)
    await store.finish_request(sid, 1, 1, "{}", False, now=1.0)
    await store.finish_request(sid, 3, 1, "{}", False, now=1.0)
    assert await store.session_counts(sid) == SessionCounts(last_seq=3, last_done=1, pending=1)
    await store.finish_request(sid, 2, 1, "{}", False, now=1.0)
    assert await store.session_counts(sid) == SessionCounts(last_seq=3, last_done=3, pending=0)
    assert await store.session_counts("nope") == SessionCounts(last_seq=0, last_done=0, pending=0)


async def test_failed_requests_newest_first(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3, 4), now=0.0)
    await store.finish_request(sid, 1, 1, '"e1"', True, now=10.0)
    await store.finish_request(sid, 2, 1, '"ok"', False, now=20.0)
    await store.finish_request(sid, 3, 1, '"e3"', True, now=30.0)
    assert [r.seq for r in await store.failed_requests()] == [3, 1]
    [newest] = await store.failed_requests(limit=1)
    assert (newest.seq, newest.final, newest.failed) == (3, '"e3"', True)


async def test_purge_removes_old_finished_requests_and_ended_sessions(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=0.0)
    await store.finish_request(sid, 1, 1, "{}", False, now=10.0)
    await store.finish_request(sid, 2, 1, "{}", False, now=20.0)
    assert await store.purge(finished_before=15.0) == 1
    assert await store.get_request(sid, 1) is None
    assert await store.get_request(sid, 2) is not None
    assert [r.seq for r in await store.unfinished(sid)] == [3]

    # Sessions: deleted once empty, created before the cut and no longer leased.
    later = time.time() + 1000
    await store.finish_request(sid, 3, 1, "{}", False, now=30.0)
    await store.release_session(sid, 1)
    await store.create_session("held", "bob", "B", lease_until=FAR)
    await store.create_session("busy", "carol", "C", lease_until=0.0)
    await store.add_requests("busy", 1, reqs(1), now=0.0)
    assert await store.purge(finished_before=later) == 2
    assert await store.get_session(sid) is None
    assert await store.get_session("held") is not None
    assert await store.get_session("busy") is not None


async def test_kv_is_per_user_and_lists_by_prefix_in_key_order(store: Store) -> None:
    assert await store.kv_get("alice", "k") is None
    await store.kv_put("alice", "k", "1")
    await store.kv_put("alice", "k", "2")
    await store.kv_put("bob", "k", "3")
    assert (await store.kv_get("alice", "k"), await store.kv_get("bob", "k")) == ("2", "3")
    for key in ("b.2", "b.1", "bx1", "b%", "B.3", "a", "c", "b.1.x"):
        await store.kv_put("alice", key, f'"{key}"')
    assert [k for k, _ in await store.kv_list("alice", "b.")] == ["b.1", "b.1.x", "b.2"]
    assert await store.kv_list("alice", "b%") == [("b%", '"b%"')]
    everything = [k for k, _ in await store.kv_list("alice", "")]
    assert everything == "B.3 a b% b.1 b.1.x b.2 bx1 c k".split()  # by code point
    assert [k for k, _ in await store.kv_list("alice", "b", limit=2)] == ["b%", "b.1"]
    assert await store.kv_list("bob", "") == [("k", "3")]
    assert await store.kv_delete("alice", "k") is True
    assert await store.kv_delete("alice", "k") is False
    assert await store.kv_get("alice", "k") is None
    assert await store.kv_get("bob", "k") == "3"


async def test_ping_answers_when_open(store: Store) -> None:
    await store.ping()


# -- open_store ------------------------------------------------------------------
async def test_open_store_picks_the_backend_by_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///var/sq.db")
    assert isinstance(relative, SqliteStore)
    await relative.open()  # creates var/
    await relative.close()
    assert (tmp_path / "var" / "sq.db").is_file()

    absolute = open_store(f"sqlite:///{tmp_path}/abs/sq.db")  # four slashes
    assert isinstance(absolute, SqliteStore) and absolute.path == tmp_path / "abs" / "sq.db"
    assert isinstance(open_store("mongodb://127.0.0.1:1/db"), MongoStore)
    assert isinstance(open_store("mongodb+srv://cluster.example.com/db"), MongoStore)
    assert isinstance(open_store("postgresql://u:p@127.0.0.1:1/db"), PostgresStore)
    assert isinstance(open_store("postgres://u:p@db.example.com/db"), PostgresStore)
    for bad in ("postgresql:/x/db", "sqlite://x.db", "sqlite:///"):
        with pytest.raises(ValueError, match="store URL"):
            open_store(bad)


async def test_a_mongodb_store_fails_with_store_error_before_it_is_open() -> None:
    # No unreachable server here: PyMongo 4.20 leaks the socket of a connect
    # that AsyncMongoClient.close() cancels, which filterwarnings=error turns
    # into a random failure of a later test.
    store = open_store("mongodb://127.0.0.1:notaport/db")
    with pytest.raises(StoreError, match="bad store URL"):
        await store.open()
    with pytest.raises(StoreError):
        await store.ping()
    await store.close()


# -- group commit: the backends that group writes (SQLite, PostgreSQL) ------------
@pytest.fixture(params=["sqlite", "postgresql"])
def grouping_store(request: pytest.FixtureRequest) -> SqliteStore | PostgresStore:
    backend: SqliteStore | PostgresStore = request.getfixturevalue(f"{request.param}_store")
    return backend


async def test_concurrent_writes_share_commits(
    grouping_store: SqliteStore | PostgresStore,
) -> None:
    s = grouping_store
    sid = await new_session(s)
    before = s.commits
    async with asyncio.timeout(50 * UNIT):
        await asyncio.gather(*(s.add_requests(sid, 1, reqs(n), now=0.0) for n in range(1, 201)))
        results = await asyncio.gather(
            *(s.finish_request(sid, n, 1, f'"{n}"', False, now=1.0) for n in range(1, 201))
        )
    assert results == [(True, None)] * 200
    assert await s.session_counts(sid) == SessionCounts(last_seq=200, last_done=200, pending=0)
    assert len(await s.finals_after(sid, 0)) == 200
    assert s.commits - before <= 10


async def test_one_failing_write_does_not_fail_its_batch(
    grouping_store: SqliteStore | PostgresStore,
) -> None:
    s = grouping_store
    sid = await new_session(s)
    await s.create_user("bob", b"h")
    await s.claim_session(sid, "A", lease_until=FAR, now=0.0)  # epoch 2
    before = s.commits
    outcomes = await asyncio.gather(
        s.kv_put("alice", "k", "1"),
        s.create_user("BOB", b"h"),
        s.add_requests(sid, 1, reqs(1), now=0.0),
        s.add_requests(sid, 2, reqs(2), now=0.0),
        s.create_user("carol", b"h"),
        return_exceptions=True,
    )
    assert s.commits - before == 1  # all five were one transaction
    stored, taken, fenced, added, carol = outcomes
    assert (stored, added) == (None, None)
    assert isinstance(taken, UserExists)
    assert isinstance(fenced, Fenced)
    assert isinstance(carol, User)
    assert await s.kv_get("alice", "k") == "1"
    assert await s.get_user("carol") is not None
    assert [r.seq for r in await s.unfinished(sid)] == [2]


# -- SQLite only -------------------------------------------------------------------
async def test_the_store_outlives_its_writer_process(sqlite_store: SqliteStore) -> None:
    # Writes run in a child process (off the server's GIL). If that process
    # dies, the store starts another one: the server keeps serving.
    s = sqlite_store
    await s.create_user("alice", b"h")
    first = s.writer_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    try:  # a write that meets the dead process fails; none after it does
        await s.create_user("bob", b"h")
    except StoreError as e:
        assert "writer process ended" in str(e)
    await s.create_user("carol", b"h")
    assert s.writer_pid not in (None, first)
    for name in ("alice", "carol"):
        assert await s.get_user(name) is not None


async def test_closing_the_store_ends_its_writer_process(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "store.db")
    await s.open()
    await s.create_user("alice", b"h")
    pid = s.writer_pid
    assert pid is not None and _exists(pid)
    await s.close()
    assert s.writer_pid is None
    assert not _exists(pid)  # exited and reaped


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first = SqliteStore(path)
    await first.open()
    await first.create_user("alice", b"h")
    sid = await new_session(first)
    await first.add_requests(sid, 1, reqs(1), now=0.0)
    # writes queued before close() still land: gather starts them in order
    writes = (first.kv_put("alice", f"k{n}", "1") for n in range(50))
    await asyncio.gather(*writes, first.close())
    await first.close()  # twice is fine
    with pytest.raises(StoreError):
        await first.kv_put("alice", "late", "1")

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get_user("ALICE") is not None
        assert [r.seq for r in await second.unfinished(sid)] == [1]
        assert len(await second.kv_list("alice", "k")) == 50
    finally:
        await second.close()


async def test_two_stores_on_one_file_both_write(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a, b = SqliteStore(path), SqliteStore(path)
    await a.open()
    await b.open()
    try:
        await a.create_session("sa", "alice", "A", lease_until=FAR)
        await b.create_session("sb", "bob", "B", lease_until=FAR)
        async with asyncio.timeout(50 * UNIT):
            await asyncio.gather(
                *(a.add_requests("sa", 1, reqs(n), now=0.0) for n in range(1, 101)),
                *(b.add_requests("sb", 1, reqs(n), now=0.0) for n in range(1, 101)),
                *(a.kv_put("alice", f"a{n}", "1") for n in range(100)),
                *(b.kv_put("alice", f"b{n}", "1") for n in range(100)),
            )
        for view in (a, b):
            assert (await view.session_counts("sa")).pending == 100
            assert (await view.session_counts("sb")).pending == 100
            assert len(await view.kv_list("alice", "")) == 200
    finally:
        await a.close()
        await b.close()


async def test_writes_fail_while_locked_out_and_work_again_after(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = SqliteStore(path, busy_timeout=UNIT)
    failures: list[int] = []
    s.on_failure = failures.append  # sessionq_store_errors_total's hook
    await s.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreError):
            await s.kv_put("alice", "k", "1")
        assert failures == [1]
        assert await s.kv_get("alice", "k") is None  # reads go on meanwhile
        blocker.execute("ROLLBACK")
        await s.kv_put("alice", "k", "2")
        assert await s.kv_get("alice", "k") == "2"
        assert failures == [1]  # what was asked and done is not a failure
    finally:
        blocker.close()
        await s.close()


async def test_finish_requests_records_several_at_once(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=5.0)
    await store.finish_request(sid, 2, 1, '{"first":true}', False, now=6.0)
    stored = await store.finish_requests(
        sid, 1, [(1, '{"a":1}', False), (2, '{"again":true}', False), (3, '{"c":3}', True)], 7.0
    )
    assert stored == [True, False, True]
    assert await store.finals_after(sid, 0) == [
        (1, '{"a":1}'), (2, '{"first":true}'), (3, '{"c":3}')
    ]  # fmt: skip
    assert (await store.session_counts(sid)).pending == 0
    with pytest.raises(Fenced):
        await store.finish_requests(sid, 0, [(1, "{}", False)], 8.0)


async def test_finish_requests_stores_a_repeated_seq_once(store: Store) -> None:
    """A seq given twice in one group (a stale message and its replacement)
    keeps its first final; a seq the store does not have is not stored."""
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2), now=5.0)
    stored = await store.finish_requests(
        sid, 1, [(1, '{"one":1}', False), (1, '{"one":2}', False), (9, "{}", False)], 7.0
    )
    assert stored == [True, False, False]
    assert await store.finals_after(sid, 0) == [(1, '{"one":1}')]
    assert (await store.session_counts(sid)).pending == 1


async def test_seqs_of_finds_the_ids_a_session_has(store: Store) -> None:
    sid = await new_session(store)
    await store.add_requests(sid, 1, reqs(1, 2, 3), now=5.0)
    assert await store.seqs_of(sid, ["c1", "c3", "nope"]) == {"c1": 1, "c3": 3}
    assert await store.seqs_of(sid, []) == {}
    other = await new_session(store, "s2")
    assert await store.seqs_of(other, ["c1"]) == {}


# -- per-user budgets ------------------------------------------------------------------
async def test_create_session_refuses_past_the_users_live_sessions(store: Store) -> None:
    now = time.time()
    limits = {"max_sessions": 3, "max_connections": 2, "now": now}
    await store.create_session("a", "alice", "A", FAR, **limits)
    await store.create_session("b", "alice", "B", FAR, **limits)
    # Two carried: a third connection is refused, a third session is not.
    with pytest.raises(BudgetExceeded) as refused:
        await store.create_session("c", "alice", "A", FAR, **limits)
    assert refused.value.budget is Budget.CONNECTIONS and refused.value.limit == 2
    assert await store.get_session("c") is None
    assert await store.set_carried("b", 1, False) is True  # b drains: no connection
    await store.create_session("c", "alice", "A", FAR, **limits)
    with pytest.raises(BudgetExceeded) as refused:  # a, b (draining) and c
        await store.create_session("d", "alice", "A", FAR, **limits)
    assert refused.value.budget is Budget.SESSIONS and refused.value.limit == 3
    await store.create_session("e", "bob", "A", FAR, **limits)  # another user's own count
    assert await store.usage("alice", now) == UserUsage(3, 2, 0, 0)
    # A released session and a lapsed lease (a crashed owner) stop counting.
    assert await store.release_session("b", 1)
    assert await store.set_carried("a", 1, False)
    await store.create_session("d", "alice", "A", now + 5, **limits)
    with pytest.raises(BudgetExceeded):
        await store.create_session("x", "alice", "A", FAR, **limits)
    await store.create_session("x", "alice", "A", FAR, **{**limits, "now": now + 10})


async def test_carried_follows_set_carried_claims_and_releases(store: Store) -> None:
    now = time.time()
    await store.create_session("a", "alice", "A", FAR, now=now)
    assert (await store.usage("alice", now)).connections == 1
    assert await store.set_carried("a", 7, False) is False  # not the current epoch
    assert (await store.usage("alice", now)).connections == 1
    epoch = await store.claim_session("a", "A", FAR, now)  # a new owner: no carrier yet
    assert epoch == 2 and (await store.usage("alice", now)).connections == 0
    assert await store.set_carried("a", 2, True) is True
    assert (await store.usage("alice", now)) == UserUsage(1, 1, 0, 0)
    assert await store.release_session("a", 2)
    assert await store.usage("alice", now) == UserUsage(0, 0, 0, 0)


async def test_add_requests_refuses_past_the_users_pending_budget(store: Store) -> None:
    await store.create_session("s1", "alice", "A", FAR)
    await store.create_session("s2", "alice", "B", FAR)
    await store.create_session("s3", "bob", "B", FAR)
    await store.add_requests("s1", 1, reqs(1, 2, 3), now=1.0, max_pending=5)
    await store.add_requests("s2", 1, reqs(1, 2), now=1.0, max_pending=5)
    with pytest.raises(BudgetExceeded) as refused:
        await store.add_requests("s2", 1, reqs(3), now=1.0, max_pending=5)
    assert refused.value.budget is Budget.PENDING and refused.value.limit == 5
    assert await store.get_request("s2", 3) is None
    assert (await session_of(store, "s2")).last_seq == 2  # nothing of it was stored
    with pytest.raises(BudgetExceeded):  # a batch larger than the budget on its own
        await store.add_requests("s3", 1, reqs(*range(1, 7)), now=1.0, max_pending=5)
    await store.add_requests("s3", 1, reqs(1, 2, 3, 4, 5), now=1.0, max_pending=5)
    assert (await store.usage("alice")).pending == 5
    # Finishing, cancelling (no epoch) and removing free the budget.
    await store.finish_request("s1", 1, 1, '{"type":"result"}', False, 2.0)
    await store.finish_request("s1", 1, 1, '{"type":"result"}', False, 2.0)  # twice: once
    await store.finish_request("s1", 2, None, '{"type":"cancelled"}', True, 2.0)
    await store.finish_requests("s2", 1, [(1, "{}", False), (1, "{}", False)], 2.0)
    await store.remove_requests("s2", 1, [2, 99])
    assert (await store.usage("alice")).pending == 1
    await store.add_requests("s2", 1, reqs(2, 3, 4, 5), now=3.0, max_pending=5)
    assert (await store.usage("alice")).pending == 5
    assert (await store.usage("bob")).pending == 5


async def test_kv_bytes_are_counted_and_capped_per_user(store: Store) -> None:
    await store.kv_put("alice", "k", '"0123456789"', max_bytes=30)  # 1 + 12 bytes
    await store.kv_put("alice", "é", '"x"', max_bytes=30)  # 2 + 3 bytes
    assert (await store.usage("alice")).kv_bytes == 18
    with pytest.raises(BudgetExceeded) as refused:
        await store.kv_put("alice", "big", '"' + "x" * 12 + '"', max_bytes=30)
    assert refused.value.budget is Budget.KV_BYTES and refused.value.limit == 30
    assert await store.kv_get("alice", "big") is None
    with pytest.raises(BudgetExceeded):  # growing one value past the total
        await store.kv_put("alice", "k", '"' + "x" * 30 + '"', max_bytes=30)
    assert await store.kv_get("alice", "k") == '"0123456789"'
    await store.kv_put("alice", "k", "1", max_bytes=30)  # shrinking frees bytes
    await store.kv_put("alice", "big", '"' + "x" * 12 + '"', max_bytes=30)
    await store.kv_put("bob", "big", '"' + "x" * 25 + '"', max_bytes=30)  # bob's own total
    assert (await store.usage("alice")).kv_bytes == 2 + 5 + 17
    assert await store.kv_delete("alice", "big")
    assert (await store.usage("alice")).kv_bytes == 7
    with pytest.raises(BudgetExceeded):  # one entry larger than the whole budget
        await store.kv_put("carol", "k", '"' + "x" * 40 + '"', max_bytes=30)


async def test_kv_list_pages_after_a_key(store: Store) -> None:
    for key in ("a", "b.1", "b.2", "b.3", "c"):
        await store.kv_put("alice", key, "1")
    first = await store.kv_list("alice", "b.", limit=2)
    assert [k for k, _ in first] == ["b.1", "b.2"]
    rest = await store.kv_list("alice", "b.", limit=2, after="b.2")
    assert [k for k, _ in rest] == ["b.3"]
    assert [k for k, _ in await store.kv_list("alice", "", limit=10, after="b.3")] == ["c"]


async def test_a_store_from_before_budgets_derives_them_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the schema as it was before budgets
        from server.store.sqlite_schema import SCHEMA

        db.executescript(SCHEMA)
        db.execute("INSERT INTO sessions VALUES ('s1', 'alice', 0, 3, 'A', 1, ?)", (FAR,))
        db.executemany(
            "INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at)"
            " VALUES ('s1', ?, ?, 'echo', '{}', ?, 0)",
            [(1, "c1", "done"), (2, "c2", "running"), (3, "c3", "queued")],
        )
        db.execute("INSERT INTO kv VALUES ('alice', 'k', '\"v\"')")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.usage("alice") == UserUsage(1, 0, 2, 4)
        with pytest.raises(BudgetExceeded):
            await store.add_requests("s1", 1, reqs(4), now=1.0, max_pending=2)
    finally:
        await store.close()
    again = SqliteStore(path)  # opening again derives nothing twice
    await again.open()
    try:
        assert (await again.usage("alice")).pending == 2
    finally:
        await again.close()


@pytest.mark.mongodb
async def test_a_mongodb_store_from_before_budgets_derives_them_once(
    mongodb_url: str, mongodb_database: str
) -> None:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    db = client[mongodb_database]
    try:  # documents as an earlier version wrote them: no counters, no sizes
        await db["sessions"].insert_one(
            {"_id": "s1", "username": "alice", "created_at": 0.0, "last_seq": 3,
             "owner": "A", "epoch": 1, "lease_until": FAR}
        )  # fmt: skip
        await db["requests"].insert_many(
            [{"session_id": "s1", "seq": seq, "client_id": f"c{seq}", "op": "echo", "args": "{}",
              "state": state, "attempts": 0, "failed": False, "final": None,
              "created_at": 0.0, "finished_at": None}
             for seq, state in ((1, "done"), (2, "running"), (3, "queued"))]
        )  # fmt: skip
        await db["kv"].insert_one({"username": "alice", "key": "k", "value": '"v"'})
    finally:
        await client.close()
    for _ in range(2):  # the second opening derives nothing again
        store = MongoStore(mongodb_url, database=mongodb_database)
        await store.open()
        try:
            usage = await store.usage("alice")
            assert (usage.pending, usage.kv_bytes) == (2, 4)
            await store.kv_delete("alice", "k")  # an entry without a stored size
            assert (await store.usage("alice")).kv_bytes == 0
            await store.kv_put("alice", "k", '"v"')
        finally:
            await store.close()


async def test_a_postgresql_store_from_before_budgets_derives_them_once(postgres_url: str) -> None:
    import asyncpg

    from server.store import postgres_schema

    connection = await asyncpg.connect(postgres_url, timeout=10)
    try:  # the schema at version 1, with what an earlier version wrote
        await connection.execute(
            "CREATE TABLE sessionq_schema ("
            " version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now())"
        )
        await connection.execute(postgres_schema.MIGRATIONS[0])
        await connection.execute("INSERT INTO sessionq_schema (version) VALUES (1)")
        await connection.execute(
            "INSERT INTO sessions VALUES ('s1', 'alice', 0, 3, 'A', 1, $1)", FAR
        )
        await connection.executemany(
            "INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at)"
            " VALUES ('s1', $1, $2, 'echo', '{}', $3, 0)",
            [(1, "c1", "done"), (2, "c2", "running"), (3, "c3", "queued")],
        )
        await connection.execute("INSERT INTO kv VALUES ('alice', 'k', '\"v\"')")
    finally:
        await connection.close()
    for _ in range(2):  # the second opening derives nothing again
        store = PostgresStore(postgres_url)
        await store.open()
        try:
            assert await store.usage("alice") == UserUsage(1, 0, 2, 4)
            with pytest.raises(BudgetExceeded):
                await store.add_requests("s1", 1, reqs(4), now=1.0, max_pending=2)
        finally:
            await store.close()


async def test_concurrent_adds_never_pass_the_pending_budget(store: Store) -> None:
    """Many sessions of one user adding at once (one group commit, or on
    PostgreSQL the batch path for many sessions): the adds that fit are
    stored whole, the others not at all, and the count is the stored rows."""
    await store.add_requests(await new_session(store, "old"), 1, reqs(1), now=1.0)
    for user in ("alice", "bob"):  # alice has a counter already, bob none yet
        sessions = [f"{user}{i}" for i in range(20)]
        for sid in sessions:
            await store.create_session(sid, user, "A", FAR)

        async def add(sid: str) -> bool:
            try:
                await store.add_requests(sid, 1, reqs(1, 2), now=1.0, max_pending=26)
            except BudgetExceeded:
                return False
            return True

        added = await asyncio.gather(*(add(sid) for sid in sessions))
        stored = [len(await store.unfinished(sid)) for sid in sessions]
        assert stored == [2 if ok else 0 for ok in added]
        assert sum(stored) >= 24 if user == "bob" else sum(stored) >= 22
        pending = (await store.usage(user)).pending
        assert pending == sum(stored) + (1 if user == "alice" else 0) <= 26
        assert [(await session_of(store, sid)).last_seq for sid in sessions] == [
            2 if ok else 0 for ok in added
        ]
        for sid, ok in zip(sessions, added, strict=True):
            if ok:
                await store.finish_requests(sid, 1, [(1, "{}", False), (2, "{}", False)], 2.0)
        assert (await store.usage(user)).pending == (1 if user == "alice" else 0)


# -- identity: revocation ------------------------------------------------------------
async def test_token_state_reads_version_disabled_and_revoked_jti(store: Store) -> None:
    assert await store.token_state("nobody") is None
    await store.create_user("Alice", b"hash")
    state = await store.token_state("ALICE", "j1")
    assert state is not None
    assert (state.username, state.version, state.disabled, state.jti_revoked) == (
        "Alice",
        0,
        False,
        False,
    )
    await store.revoke_token("j1", time.time() + 60, time.time())
    state = await store.token_state("alice", "j1")
    assert state is not None and state.jti_revoked
    other = await store.token_state("alice", "j2")
    assert other is not None and not other.jti_revoked


async def test_expired_revocations_are_forgotten(store: Store) -> None:
    await store.create_user("alice", b"hash")
    now = time.time()
    await store.revoke_token("old", now - 10, now - 20)
    await store.revoke_token("new", now + 60, now)  # forgets entries expired before now
    old = await store.token_state("alice", "old")
    assert old is not None and not old.jti_revoked
    new = await store.token_state("alice", "new")
    assert new is not None and new.jti_revoked


async def test_revoke_disable_and_passwd_raise_the_version(store: Store) -> None:
    assert await store.revoke_user("nobody") is None
    assert await store.set_disabled("nobody", True) is None
    assert await store.set_password("nobody", b"x") is None
    await store.create_user("alice", b"hash")
    assert await store.revoke_user("alice") == 1
    assert await store.set_disabled("ALICE", True) == 2
    state = await store.token_state("alice")
    assert state is not None and state.disabled and state.version == 2
    assert await store.set_disabled("alice", False) == 2  # enabling revives no token
    state = await store.token_state("alice")
    assert state is not None and not state.disabled
    assert await store.set_password("alice", b"new-hash") == 3
    user = await store.get_user("alice")
    assert user is not None and user.password_hash == b"new-hash"


async def test_delete_user_removes_everything_and_the_name_starts_above(store: Store) -> None:
    assert await store.delete_user("nobody") is None
    await store.create_user("alice", b"hash")
    await store.set_disabled("alice", True)  # version 1
    await new_session(store, "s1")
    await store.add_requests("s1", 1, reqs(1), time.time())
    await store.kv_put("alice", "k", "1")
    await store.create_user("bob", b"hash")
    await store.create_session("s2", "bob", "A", lease_until=FAR)
    await store.kv_put("bob", "k", "2")
    version = await store.delete_user("ALICE")
    assert version == 2
    assert await store.get_user("alice") is None
    assert await store.token_state("alice") is None
    assert await store.get_session("s1") is None
    assert await store.get_request("s1", 1) is None
    assert await store.kv_get("alice", "k") is None
    # Someone else's data stays.
    assert await store.get_session("s2") is not None
    assert await store.kv_get("bob", "k") == "2"
    # The name can be registered again: enabled, and above every old token.
    await store.create_user("Alice", b"other")
    state = await store.token_state("alice")
    assert state is not None and state.version == 2 and not state.disabled


async def test_deleting_a_user_forgets_its_budget_counters(store: Store) -> None:
    await store.create_user("alice", b"hash")
    await store.create_session("s1", "alice", "A", FAR)
    await store.add_requests("s1", 1, reqs(1, 2), now=1.0, max_pending=10)
    await store.kv_put("alice", "k", '"v"', max_bytes=10)
    assert await store.usage("alice") == UserUsage(1, 1, 2, 4)
    assert await store.delete_user("alice") is not None
    assert await store.usage("alice") == UserUsage(0, 0, 0, 0)
    await store.create_user("alice", b"hash")  # the name again starts with nothing used
    await store.create_session("s2", "alice", "A", FAR)
    await store.add_requests("s2", 1, reqs(*range(1, 11)), now=1.0, max_pending=10)
    await store.kv_put("alice", "k", '"' + "x" * 7 + '"', max_bytes=10)
