"""The SQLite store's writes: the batch runner and the module-level write
functions it runs. They run in the writer process (:mod:`.sqlite_writer`);
the store (:mod:`.sqlite`) names them in the batches it sends, where they are
pickled by reference with their args. Only :func:`one` and :func:`usage`
(with :func:`usage_sessions`) also serve the store's reads.

* A batch first runs as one plain transaction. If a write in it fails
  (UserExists, Fenced, a taken client id), the batch is rolled back and run
  again with each write in its own SAVEPOINT, so the failing one is rolled
  back alone and the rest of its batch commits. A failure of the whole
  transaction (I/O error, full disk, read-only file, the lock not granted
  within ``busy_timeout``) fails every write of that batch with StoreError;
  the next batch starts afresh, so the store recovers by itself.
* ``BEGIN IMMEDIATE`` takes the write lock up front (a deferred transaction
  that upgrades later can fail with SQLITE_BUSY without waiting), and the
  connection's ``busy_timeout`` makes it wait for another process's commit
  instead of failing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from .base import Fenced, SessionRecord, StoreError, UserExists
from .budgets import Budget, BudgetExceeded, UserUsage
from .sqlite_ledger import LEDGER
from .sqlite_schema import SESSION_COLUMNS

# One write of a batch: a function of this module and its args; it is called
# as ``function(connection, *args)``.
Write = tuple[Callable[..., Any], tuple[Any, ...]]


# -- the batch runner ----------------------------------------------------------
def run_batch(c: sqlite3.Connection, ops: Sequence[Write]) -> list[tuple[bool, Any]]:
    """Run ``ops`` (the writer process's batch: ``(function, args)`` pairs) in
    one transaction and commit once (each op in its own savepoint when one of
    them fails; see the module docstring).

    Returns (True, result) or (False, exception) per op. Raises if the
    transaction as a whole fails; nothing of the batch is stored then.
    """
    if c.in_transaction:  # a ROLLBACK that failed last time must not wedge the store
        c.execute("ROLLBACK")
    # Almost every batch succeeds whole: run it without a savepoint per op
    # (two SQLite steps each). If an op fails, roll back and run the batch
    # again the careful way, each op in its own savepoint.
    c.execute("BEGIN IMMEDIATE")
    LEDGER.begin()
    try:
        results = [fn(c, *args) for fn, args in ops]
        LEDGER.flush(c)
        c.execute("COMMIT")
        return [(True, result) for result in results]
    except BaseException as e:
        _rollback(c)
        if not isinstance(e, Exception):
            raise
        # One op failed (or the whole transaction did: then it fails again below).
    outcomes: list[tuple[bool, Any]] = []
    c.execute("BEGIN IMMEDIATE")
    LEDGER.begin()
    try:
        for fn, args in ops:
            c.execute("SAVEPOINT op")
            try:
                outcomes.append((True, fn(c, *args)))
            except Exception as e:
                if not c.in_transaction:  # SQLite rolled back everything (I/O error, full disk)
                    raise
                c.execute("ROLLBACK TO op")
                outcomes.append((False, store_error(e)))
            c.execute("RELEASE op")
        LEDGER.flush(c)
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcomes


def _rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            c.execute("ROLLBACK")


def store_error(e: Exception) -> Exception:
    if isinstance(e, sqlite3.Error):
        error = StoreError(f"sqlite: {e}")
        error.__cause__ = e
        return error
    return e


def one(c: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    # fetchall, not fetchone: it finishes the statement (an UPDATE ... RETURNING
    # left open would block the RELEASE/COMMIT that follows).
    rows = c.execute(sql, params).fetchall()
    return rows[0] if rows else None


def check_epoch(c: sqlite3.Connection, session_id: str, epoch: int) -> str:
    """Raise Fenced unless ``epoch`` is the session's; return its user."""
    return str(_current(c, session_id, epoch, _EPOCH_USER)[1])


_EPOCH_USER = "SELECT epoch, username FROM sessions WHERE session_id = ?"
# The same, with the user's stored pending count (an add checked against it).
_EPOCH_USER_PENDING = (
    "SELECT s.epoch, s.username, coalesce(b.pending, 0) FROM sessions s"
    " LEFT JOIN user_budgets b ON b.username = s.username WHERE s.session_id = ?"
)


def _current(c: sqlite3.Connection, session_id: str, epoch: int, sql: str) -> Any:
    row = one(c, sql, (session_id,))
    if row is None or row[0] != epoch:
        current = None if row is None else row[0]
        raise Fenced(f"session {session_id}: epoch {epoch} is not current ({current})")
    return row


# -- the writes (sent by reference, with their args) -------------------------
def rowcount(c: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return c.execute(sql, params).rowcount


def renew_session(c: sqlite3.Connection, session_id: str, epoch: int, lease_until: float) -> None:
    sql = "UPDATE sessions SET lease_until = ? WHERE session_id = ? AND epoch = ?"
    if c.execute(sql, (lease_until, session_id, epoch)).rowcount != 1:
        check_epoch(c, session_id, epoch)
        raise Fenced(f"session {session_id}: epoch {epoch} is not current")


def insert_user(
    c: sqlite3.Connection, username: str, password_hash: bytes, created_at: float
) -> None:
    try:
        c.execute(
            "INSERT INTO users (username, username_lower, password_hash, created_at)"
            " VALUES (?, ?, ?, ?)",
            (username, username.lower(), password_hash, created_at),
        )
    except sqlite3.IntegrityError as e:
        raise UserExists(username) from e


def insert_session(
    c: sqlite3.Connection,
    r: SessionRecord,
    max_sessions: int | None = None,
    max_connections: int | None = None,
    now: float = 0.0,
) -> None:
    """Insert a carried session, if the user's live sessions (and carried
    ones) are under their limits: the count and the insert are one
    transaction, which the writer's lock makes the only one on the file."""
    if max_sessions is not None or max_connections is not None:
        sessions, carried = usage_sessions(c, r.username, now)
        if max_sessions is not None and sessions >= max_sessions:
            raise BudgetExceeded(Budget.SESSIONS, max_sessions)
        if max_connections is not None and carried >= max_connections:
            raise BudgetExceeded(Budget.CONNECTIONS, max_connections)
    try:
        c.execute(
            f"INSERT INTO sessions ({SESSION_COLUMNS}, carried) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            (r.session_id, r.username, r.created_at, r.last_seq, r.owner, r.epoch, r.lease_until),
        )
    except sqlite3.IntegrityError as e:
        raise StoreError(f"session {r.session_id} exists") from e


def usage_sessions(c: sqlite3.Connection, username: str, now: float) -> tuple[int, int]:
    """(live sessions, carried live sessions) of ``username`` at ``now``."""
    row = one(
        c,
        "SELECT count(*), coalesce(sum(carried), 0) FROM sessions"
        " WHERE username = ? AND lease_until >= ? AND owner IS NOT NULL",
        (username, now),
    )
    return int(row[0]), int(row[1])


def usage(c: sqlite3.Connection, username: str, now: float) -> UserUsage:
    """What ``username`` uses of each budget (a read)."""
    sessions, carried = usage_sessions(c, username, now)
    row = one(c, "SELECT pending, kv_bytes FROM user_budgets WHERE username = ?", (username,))
    pending, kv_bytes = (0, 0) if row is None else row
    return UserUsage(sessions, carried, int(pending), int(kv_bytes))


def claim_session(
    c: sqlite3.Connection, session_id: str, owner: str, lease_until: float, now: float
) -> int | None:
    row = one(
        c,
        "UPDATE sessions SET owner = ?, lease_until = ?, epoch = epoch + 1, carried = 0"
        " WHERE session_id = ? AND (owner IS NULL OR lease_until < ? OR owner = ?)"
        " RETURNING epoch",
        (owner, lease_until, session_id, now, owner),
    )
    return None if row is None else int(row[0])


def add_requests(
    c: sqlite3.Connection,
    session_id: str,
    epoch: int,
    rows: Sequence[tuple[int, str, str, str]],
    now: float,
    max_pending: int | None = None,
) -> None:
    if max_pending is None:
        username = check_epoch(c, session_id, epoch)
    else:  # the epoch check reads the user's stored count along (one statement)
        _, username, stored = _current(c, session_id, epoch, _EPOCH_USER_PENDING)
        LEDGER.check(username, len(rows), max_pending, stored=stored)
    # One statement for the whole batch rather than one per row.
    sql = (
        "INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at) VALUES "
        + ",".join(["(?, ?, ?, ?, ?, 'queued', ?)"] * len(rows))
    )
    params = [
        v for seq, client_id, op, args in rows for v in (session_id, seq, client_id, op, args, now)
    ]
    try:
        c.execute(sql, params)
    except sqlite3.IntegrityError as e:
        raise StoreError(f"session {session_id}: a seq or client id is taken") from e
    c.execute(
        "UPDATE sessions SET last_seq = max(last_seq, ?) WHERE session_id = ?",
        (max(row[0] for row in rows), session_id),
    )
    LEDGER.change(username, len(rows))


def remove_requests(
    c: sqlite3.Connection, session_id: str, epoch: int, seqs: Sequence[int]
) -> None:
    username = check_epoch(c, session_id, epoch)
    deleted = c.executemany(
        "DELETE FROM requests WHERE session_id = ? AND seq = ? AND state = 'queued'",
        [(session_id, seq) for seq in seqs],
    ).rowcount
    row = one(c, "SELECT max(seq) FROM requests WHERE session_id = ?", (session_id,))
    highest = row[0] if row and row[0] is not None else 0
    c.execute(
        "UPDATE sessions SET last_seq = min(last_seq, ?) WHERE session_id = ?",
        (max(highest, min(seqs) - 1), session_id),
    )
    LEDGER.change(username, -deleted)


def start_request(c: sqlite3.Connection, session_id: str, seq: int, epoch: int) -> int:
    check_epoch(c, session_id, epoch)
    return _start(c, session_id, seq)


def finish_request(
    c: sqlite3.Connection,
    session_id: str,
    seq: int,
    epoch: int | None,
    final: str,
    failed: bool,
    now: float,
    start_next: int | None,
) -> tuple[bool, int | None]:
    username = None if epoch is None else check_epoch(c, session_id, epoch)
    cur = c.execute(
        "UPDATE requests SET state = 'done', final = ?, failed = ?, finished_at = ?"
        " WHERE session_id = ? AND seq = ? AND state != 'done'",
        (final, int(failed), now, session_id, seq),
    )
    stored = cur.rowcount == 1
    started = None if start_next is None else _start(c, session_id, start_next)
    if stored and username is None:  # a cancel: no epoch given, look the user up
        row = one(c, "SELECT username FROM sessions WHERE session_id = ?", (session_id,))
        username = None if row is None else row[0]
    if stored and username is not None:
        LEDGER.change(username, -1)
    return stored, started


def finish_requests(
    c: sqlite3.Connection,
    session_id: str,
    epoch: int,
    values: Sequence[tuple[int, str, int]],
    now: float,
) -> list[int]:
    """Finish the given (seq, final, failed) rows, each seq given once, with
    one UPDATE from a VALUES list; return the seqs it finished."""
    username = check_epoch(c, session_id, epoch)
    sql = (
        "UPDATE requests SET state = 'done', final = v.column2, failed = v.column3,"
        " finished_at = ? FROM (VALUES " + ",".join(["(?, ?, ?)"] * len(values)) + ") AS v"
        " WHERE requests.session_id = ? AND requests.seq = v.column1"
        " AND requests.state != 'done' RETURNING requests.seq"
    )
    params = [now, *(v for row in values for v in row), session_id]
    finished = [row[0] for row in c.execute(sql, params).fetchall()]
    LEDGER.change(username, -len(finished))
    return finished


def set_carried(c: sqlite3.Connection, session_id: str, epoch: int, carried: bool) -> bool:
    return (
        c.execute(
            "UPDATE sessions SET carried = ? WHERE session_id = ? AND epoch = ?",
            (int(carried), session_id, epoch),
        ).rowcount
        == 1
    )


def kv_put(
    c: sqlite3.Connection, username: str, key: str, value: str, size: int, max_bytes: int | None
) -> None:
    """Set a key; the user's kv_bytes move by the size difference, within
    ``max_bytes`` when the entry grows."""
    row = one(
        c,
        "SELECT length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)) FROM kv"
        " WHERE username = ? AND key = ?",
        (username, key),
    )
    delta = size - (int(row[0]) if row else 0)
    limit = max_bytes if delta > 0 else None
    if limit is not None and delta > limit:
        raise BudgetExceeded(Budget.KV_BYTES, limit)
    changed = c.execute(
        "INSERT INTO user_budgets (username, kv_bytes) VALUES (?1, max(0, ?2))"
        " ON CONFLICT (username) DO UPDATE SET kv_bytes = max(0, kv_bytes + ?2)"
        " WHERE ?3 IS NULL OR kv_bytes + ?2 <= ?3",
        (username, delta, limit),
    ).rowcount
    if changed != 1:
        assert max_bytes is not None
        raise BudgetExceeded(Budget.KV_BYTES, max_bytes)
    c.execute(
        "INSERT INTO kv (username, key, value) VALUES (?, ?, ?)"
        " ON CONFLICT (username, key) DO UPDATE SET value = excluded.value",
        (username, key, value),
    )


def kv_delete(c: sqlite3.Connection, username: str, key: str) -> bool:
    row = one(
        c,
        "DELETE FROM kv WHERE username = ? AND key = ?"
        " RETURNING length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))",
        (username, key),
    )
    if row is None:
        return False
    c.execute(
        "UPDATE user_budgets SET kv_bytes = max(0, kv_bytes - ?) WHERE username = ?",
        (int(row[0]), username),
    )
    return True


def _start(c: sqlite3.Connection, session_id: str, seq: int) -> int:
    row = one(
        c,
        "UPDATE requests SET state = 'running', attempts = attempts + 1"
        " WHERE session_id = ? AND seq = ? AND state != 'done' RETURNING attempts",
        (session_id, seq),
    )
    return 0 if row is None else int(row[0])


# -- identity ----------------------------------------------------------------------
def _user_exists(c: sqlite3.Connection, key: str) -> bool:
    return one(c, "SELECT 1 FROM users WHERE username_lower = ?", (key,)) is not None


def revoke_user(c: sqlite3.Connection, username: str) -> int | None:
    key = username.lower()
    if not _user_exists(c, key):
        return None
    row = one(
        c,
        "INSERT INTO user_tokens (username_lower, version) VALUES (?, 1)"
        " ON CONFLICT (username_lower) DO UPDATE SET version = version + 1 RETURNING version",
        (key,),
    )
    return int(row[0])


def set_disabled(c: sqlite3.Connection, username: str, disabled: bool) -> int | None:
    key = username.lower()
    if not _user_exists(c, key):
        return None
    bump = 1 if disabled else 0
    row = one(
        c,
        "INSERT INTO user_tokens (username_lower, version, disabled) VALUES (?, ?, ?)"
        " ON CONFLICT (username_lower) DO UPDATE SET version = version + ?,"
        " disabled = excluded.disabled RETURNING version",
        (key, bump, int(disabled), bump),
    )
    return int(row[0])


def set_password(c: sqlite3.Connection, username: str, password_hash: bytes) -> int | None:
    key = username.lower()
    if not _user_exists(c, key):
        return None
    c.execute("UPDATE users SET password_hash = ? WHERE username_lower = ?", (password_hash, key))
    return revoke_user(c, username)


def delete_user(c: sqlite3.Connection, username: str) -> int | None:
    key = username.lower()
    version = revoke_user(c, username)
    if version is None:
        return None
    c.execute("UPDATE user_tokens SET disabled = 0 WHERE username_lower = ?", (key,))
    c.execute(
        "DELETE FROM requests WHERE session_id IN"
        " (SELECT session_id FROM sessions WHERE lower(username) = ?)",
        (key,),
    )
    c.execute("DELETE FROM sessions WHERE lower(username) = ?", (key,))
    c.execute("DELETE FROM kv WHERE lower(username) = ?", (key,))
    c.execute("DELETE FROM user_budgets WHERE lower(username) = ?", (key,))
    c.execute("DELETE FROM users WHERE username_lower = ?", (key,))
    LEDGER.forget(key)  # last: a write changes the ledger only once it succeeded
    return version


def revoke_token(c: sqlite3.Connection, jti: str, expires_at: float, now: float) -> None:
    c.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))
    c.execute(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?)"
        " ON CONFLICT (jti) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)",
        (jti, expires_at),
    )
