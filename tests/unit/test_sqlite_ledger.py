"""The SQLite writer's pending counts inside one transaction (a group commit
of several sessions' writes): run_batch on a real SQLite file, the way the
writer process runs it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.store import sqlite_writes as writes
from server.store.base import SessionRecord, StoreError
from server.store.budgets import Budget, BudgetExceeded
from server.store.sqlite_schema import setup

FAR = 4e9


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db", isolation_level=None)) as c:
        setup(c)
        ops: list[writes.Write] = [(writes.insert_user, ("alice", b"h", 0.0))]
        for sid, user in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
            ops.append((writes.insert_session, (SessionRecord(sid, user, 0.0, 0, "me", 1, FAR),)))
        assert all(ok for ok, _ in writes.run_batch(c, ops))
        yield c


def pending(c: sqlite3.Connection, user: str) -> int | None:
    row = c.execute("SELECT pending FROM user_budgets WHERE username = ?", (user,)).fetchone()
    return None if row is None else int(row[0])


def add(sid: str, *seqs: int, limit: int | None = 3) -> writes.Write:
    rows = [(s, f"{sid}-{s}", "echo", "{}") for s in seqs]
    return (writes.add_requests, (sid, 1, rows, 1.0, limit))


def finish(sid: str, *seqs: int) -> writes.Write:
    return (writes.finish_requests, (sid, 1, [(s, "{}", 0) for s in seqs], 2.0))


def outcomes(results: list[tuple[bool, Any]]) -> list[Any]:
    return [value if ok else type(value) for ok, value in results]


def test_adds_in_one_transaction_count_against_each_other(db: sqlite3.Connection) -> None:
    results = writes.run_batch(db, [add("a1", 1, 2), add("a2", 1), add("a2", 2), add("b1", 1)])
    assert outcomes(results) == [None, None, BudgetExceeded, None]
    refusal = results[2][1]
    assert refusal.budget is Budget.PENDING and refusal.limit == 3
    assert (pending(db, "alice"), pending(db, "bob")) == (3, 1)
    # Finishing frees room for an add later in the same transaction.
    results = writes.run_batch(db, [add("a2", 2), finish("a1", 1, 2), add("a2", 2, 3)])
    assert outcomes(results) == [BudgetExceeded, [1, 2], None]
    assert pending(db, "alice") == 3


def test_a_write_that_fails_changes_no_count(db: sqlite3.Connection) -> None:
    writes.run_batch(db, [add("a1", 1)])
    # A taken seq fails its write alone (the batch runs again, savepoint by
    # savepoint); the writes around it still count.
    results = writes.run_batch(db, [add("a2", 1), add("a1", 1, 2, limit=None), finish("a1", 1)])
    assert outcomes(results) == [None, StoreError, [1]]
    assert pending(db, "alice") == 1
    assert db.execute("SELECT count(*) FROM requests WHERE session_id = 'a1'").fetchone() == (1,)


def test_a_finish_twice_and_a_cancel_without_an_epoch_count_once(db: sqlite3.Connection) -> None:
    writes.run_batch(db, [add("a1", 1, 2, limit=None)])
    cancel = (writes.finish_request, ("a1", 2, None, "{}", True, 2.0, None))
    results = writes.run_batch(db, [finish("a1", 1), finish("a1", 1), cancel, cancel])
    assert outcomes(results) == [[1], [], (True, None), (False, None)]
    assert pending(db, "alice") == 0


def test_a_user_deleted_in_the_transaction_leaves_no_count(db: sqlite3.Connection) -> None:
    results = writes.run_batch(db, [add("a1", 1), (writes.delete_user, ("ALICE",))])
    assert results[0] == (True, None) and results[1][0]
    assert pending(db, "alice") is None
    assert pending(db, "bob") is None  # never written: bob changed nothing


def test_a_cancel_of_a_request_without_a_session_row_is_stored_and_counts_nothing(
    db: sqlite3.Connection,
) -> None:
    db.execute(
        "INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at)"
        " VALUES ('gone', 1, 'c1', 'echo', '{}', 'queued', 0)"
    )
    cancel = (writes.finish_request, ("gone", 1, None, "{}", True, 2.0, None))
    assert writes.run_batch(db, [cancel]) == [(True, (True, None))]
    assert db.execute("SELECT count(*) FROM user_budgets").fetchone() == (0,)
