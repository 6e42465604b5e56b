"""SQLite backend: one file shared by every server process on the machine.

Why it is built this way:

* Group commit. A commit costs about as much as the work in it (DESIGN.md:
  ~4k requests/s one commit each, 37k/s sixteen at a time), so every write is
  queued to one writer task (:class:`.sqlite_writer.SqliteGroupCommit`).
* The whole batch, BEGIN to COMMIT, runs in a writer process of its own
  (:mod:`.sqlite_writer`), sent as one message of ``(function, args)`` pairs.
  On a thread of the server's process each SQLite step waited for the event
  loop's GIL: a commit took ~30 ms of wall time for ~7 ms of CPU and bounded
  the server's throughput. If the writer process dies, the batch it held fails
  with StoreError and the next batch starts a new one. Reads run on
  aiosqlite's thread in the server's process, on their own connection: WAL
  shows them only committed data.
* How a batch runs (one transaction, a savepoint per write only when one
  fails) and the writes themselves: :mod:`.sqlite_writes`. The schema, WAL
  and synchronous=NORMAL: :mod:`.sqlite_schema`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from . import sqlite_writes as writes
from .base import (
    NewRequest,
    RequestRecord,
    SessionCounts,
    SessionRecord,
    Store,
    StoreError,
    User,
    prefix_end,
)
from .budgets import UserUsage, kv_size
from .sqlite_identity import SqliteIdentity
from .sqlite_schema import REQUEST_COLUMNS, SESSION_COLUMNS, setup
from .sqlite_writer import SqliteGroupCommit, WriterProcess
from .sqlite_writes import one

T = TypeVar("T")

# Rows deleted per purge transaction, so a big purge never holds the write lock
# (and every other process's commits) for long.
PURGE_CHUNK = 5000


class SqliteStore(SqliteIdentity, Store):
    """The store in one SQLite file (see the module docstring for the design)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._process = WriterProcess(self.path, busy_timeout)
        self._group = SqliteGroupCommit(
            self._process, self._failed, name=f"sqlite writer {self.path}"
        )

    # -- lifecycle -----------------------------------------------------------
    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: the sqlite3 module must not open transactions
            # behind our back; timeout= is SQLite's busy_timeout.
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        try:
            await _call(db, setup)
        except BaseException as e:
            await db.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot set up {self.path}: {e}") from e
            raise
        try:
            await self._process.start()
        except BaseException:
            await db.close()
            raise
        self._db = db
        self._group.start()

    async def close(self) -> None:
        if self._db is None:
            return
        await self._group.close()  # drains what is queued
        await self._process.stop()
        db, self._db = self._db, None
        await db.close()

    @property
    def commits(self) -> int:
        """Transactions the writer committed (tests check the grouping)."""
        return self._group.commits

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None while it is not running)."""
        return self._process.pid

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchall())

    # -- reads and writes ----------------------------------------------------
    def _write(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """``fn(connection, *args)`` in the next group commit (a write of
        :mod:`.sqlite_writes`, its args picklable); awaited, its result once
        committed."""
        return self._group.write(fn, *args)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreError("the store is not open")
        try:
            return await _call(self._db, fn)
        except sqlite3.Error as e:
            self._failed()
            raise StoreError(f"sqlite: {e}") from e

    # -- users ---------------------------------------------------------------
    async def create_user(self, username: str, password_hash: bytes) -> User:
        user = User(username, password_hash, time.time())
        await self._write(writes.insert_user, username, password_hash, user.created_at)
        return user

    async def get_user(self, username: str) -> User | None:
        row = await self._read(
            lambda c: one(
                c,
                "SELECT username, password_hash, created_at FROM users WHERE username_lower = ?",
                (username.lower(),),
            )
        )
        return None if row is None else User(row[0], bytes(row[1]), row[2])

    # -- sessions and ownership ----------------------------------------------
    async def create_session(
        self,
        session_id: str,
        username: str,
        owner: str,
        lease_until: float,
        *,
        max_sessions: int | None = None,
        max_connections: int | None = None,
        now: float | None = None,
    ) -> SessionRecord:
        created = time.time()
        record = SessionRecord(session_id, username, created, 0, owner, 1, lease_until)
        await self._write(
            writes.insert_session, record, max_sessions, max_connections,
            created if now is None else now,
        )  # fmt: skip
        return record

    async def set_carried(self, session_id: str, epoch: int, carried: bool) -> bool:
        return await self._write(writes.set_carried, session_id, epoch, carried)

    async def usage(self, username: str, now: float | None = None) -> UserUsage:
        at = time.time() if now is None else now
        return await self._read(lambda c: writes.usage(c, username, at))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._read(
            lambda c: one(
                c, f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            )
        )
        return None if row is None else SessionRecord(*row)

    async def orphaned_sessions(self, now: float, limit: int = 100) -> list[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT s.session_id FROM sessions s"
                " WHERE (s.owner IS NULL OR s.lease_until < ?)"
                " AND EXISTS (SELECT 1 FROM requests r"
                "             WHERE r.session_id = s.session_id AND r.state != 'done')"
                " LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def claim_session(
        self, session_id: str, owner: str, lease_until: float, now: float
    ) -> int | None:
        return await self._write(writes.claim_session, session_id, owner, lease_until, now)

    async def release_session(self, session_id: str, epoch: int) -> bool:
        changed = await self._write(
            writes.rowcount,
            "UPDATE sessions SET owner = NULL, lease_until = 0, carried = 0"
            " WHERE session_id = ? AND epoch = ?",
            (session_id, epoch),
        )
        return changed == 1

    async def renew_session(self, session_id: str, epoch: int, lease_until: float) -> None:
        await self._write(writes.renew_session, session_id, epoch, lease_until)

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        return await self._write(
            writes.rowcount,
            "UPDATE sessions SET lease_until = ? WHERE owner = ?",
            (lease_until, owner),
        )

    # -- requests ------------------------------------------------------------
    async def add_requests(
        self,
        session_id: str,
        epoch: int,
        requests: Sequence[NewRequest],
        now: float,
        *,
        max_pending: int | None = None,
    ) -> None:
        if not requests:
            return
        rows = [(r.seq, r.client_id, r.op, r.args) for r in requests]
        await self._write(writes.add_requests, session_id, epoch, rows, now, max_pending)

    async def remove_requests(self, session_id: str, epoch: int, seqs: Sequence[int]) -> None:
        if seqs:
            await self._write(writes.remove_requests, session_id, epoch, list(seqs))

    async def start_request(self, session_id: str, seq: int, epoch: int) -> int:
        return await self._write(writes.start_request, session_id, seq, epoch)

    async def finish_request(
        self,
        session_id: str,
        seq: int,
        epoch: int | None,
        final: str,
        failed: bool,
        now: float,
        start_next: int | None = None,
    ) -> tuple[bool, int | None]:
        return await self._write(
            writes.finish_request, session_id, seq, epoch, final, failed, now, start_next
        )

    async def finish_requests(
        self, session_id: str, epoch: int, finals: Sequence[tuple[int, str, bool]], now: float
    ) -> list[bool]:
        if not finals:
            return []
        # Like finish_request each: a seq already done keeps its first final
        # (False), a seq given twice is stored once (True, then False), and a
        # seq the store does not have is False.
        first: dict[int, tuple[str, bool]] = {}
        for seq, final, failed in finals:
            first.setdefault(seq, (final, failed))
        values = [(seq, final, int(failed)) for seq, (final, failed) in first.items()]
        finished = set(await self._write(writes.finish_requests, session_id, epoch, values, now))
        stored = []
        for seq, _, _ in finals:
            stored.append(seq in finished)
            finished.discard(seq)
        return stored

    async def get_request(self, session_id: str, seq: int) -> RequestRecord | None:
        row = await self._read(
            lambda c: one(
                c,
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id = ? AND seq = ?",
                (session_id, seq),
            )
        )
        return None if row is None else RequestRecord.from_row(row)

    async def find_request(self, session_id: str, client_id: str) -> RequestRecord | None:
        row = await self._read(
            lambda c: one(
                c,
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id = ? AND client_id = ?",
                (session_id, client_id),
            )
        )
        return None if row is None else RequestRecord.from_row(row)

    async def seqs_of(self, session_id: str, client_ids: Sequence[str]) -> dict[str, int]:
        if not client_ids:
            return {}
        marks = ",".join("?" * len(client_ids))
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT client_id, seq FROM requests WHERE session_id = ? AND client_id IN ({marks})",
                (session_id, *client_ids),
            ).fetchall()
        )
        return {client_id: seq for client_id, seq in rows}

    async def unfinished(self, session_id: str) -> list[RequestRecord]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {REQUEST_COLUMNS} FROM requests"
                " WHERE session_id = ? AND state != 'done' ORDER BY seq",
                (session_id,),
            ).fetchall()
        )
        return [RequestRecord.from_row(row) for row in rows]

    async def finals_after(
        self, session_id: str, after: int, limit: int | None = None
    ) -> list[tuple[int, str]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT seq, final FROM requests"
                " WHERE session_id = ? AND seq > ? AND state = 'done' ORDER BY seq LIMIT ?",
                (session_id, after, -1 if limit is None else limit),
            ).fetchall()
        )
        return [(seq, final) for seq, final in rows]

    async def count_requests(self, session_id: str, after: int, through: int) -> int:
        row = await self._read(
            lambda c: one(
                c,
                "SELECT count(*) FROM requests WHERE session_id = ? AND seq > ? AND seq <= ?",
                (session_id, after, through),
            )
        )
        return int(row[0])

    async def session_counts(self, session_id: str) -> SessionCounts:
        # One statement, so one snapshot even while other processes commit.
        row = await self._read(
            lambda c: one(
                c,
                "SELECT s.last_seq,"
                " (SELECT count(*) FROM requests r"
                "  WHERE r.session_id = s.session_id AND r.state != 'done'),"
                " (SELECT min(seq) FROM requests r"
                "  WHERE r.session_id = s.session_id AND r.state != 'done')"
                " FROM sessions s WHERE s.session_id = ?",
                (session_id,),
            )
        )
        if row is None:
            return SessionCounts(last_seq=0, last_done=0, pending=0)
        last_seq, pending, first_unfinished = row
        last_done = last_seq if not pending else first_unfinished - 1
        return SessionCounts(last_seq=last_seq, last_done=last_done, pending=pending)

    async def failed_requests(self, limit: int = 100) -> list[RequestRecord]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE failed = 1"
                " ORDER BY finished_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [RequestRecord.from_row(row) for row in rows]

    async def purge(self, finished_before: float, sessions_before: float | None = None) -> int:
        deleted = await self._delete_in_chunks(
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests"
            " WHERE state = 'done' AND finished_at < ? LIMIT ?)",
            finished_before,
        )
        # A session still leased (a live owner, possibly idle for longer than
        # the TTL) is kept even if it has no request left.
        await self._delete_in_chunks(
            "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions s"
            " WHERE created_at < ?1 AND lease_until < ?1 AND NOT EXISTS"
            " (SELECT 1 FROM requests r WHERE r.session_id = s.session_id) LIMIT ?2)",
            finished_before if sessions_before is None else sessions_before,
        )
        return deleted

    async def _delete_in_chunks(self, sql: str, before: float) -> int:
        total = 0
        while True:
            n = await self._write(writes.rowcount, sql, (before, PURGE_CHUNK))
            total += n
            if n < PURGE_CHUNK:
                return total

    # -- key-value (per user) ------------------------------------------------
    async def kv_put(
        self, username: str, key: str, value: str, *, max_bytes: int | None = None
    ) -> None:
        await self._write(writes.kv_put, username, key, value, kv_size(key, value), max_bytes)

    async def kv_get(self, username: str, key: str) -> str | None:
        row = await self._read(
            lambda c: one(c, "SELECT value FROM kv WHERE username = ? AND key = ?", (username, key))
        )
        return None if row is None else str(row[0])

    async def kv_delete(self, username: str, key: str) -> bool:
        return await self._write(writes.kv_delete, username, key)

    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000, after: str | None = None
    ) -> list[tuple[str, str]]:
        # A key range rather than LIKE: LIKE ignores ASCII case and treats % and _
        # as wildcards. Keys compare by code point (BINARY collation on UTF-8).
        end = prefix_end(prefix)
        sql = "SELECT key, value FROM kv WHERE username = ? AND key >= ?"
        params: tuple[Any, ...] = (username, prefix)
        if after is not None:
            sql += " AND key > ?"
            params += (after,)
        if end is not None:
            sql += " AND key < ?"
            params += (end,)
        rows = await self._read(
            lambda c: c.execute(sql + " ORDER BY key LIMIT ?", (*params, limit)).fetchall()
        )
        return [(key, value) for key, value in rows]


# -- reads and set-up: on aiosqlite's thread, in the server's process -----------
async def _call(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(connection, *args)`` on the connection's thread, in one hop.

    aiosqlite's public calls are one statement each; its ``_execute`` (stable
    across its releases) takes a whole function, so a read of several
    statements (or the schema set-up) costs one hop.
    """
    execute = cast(Callable[..., Awaitable[T]], db._execute)
    return await execute(fn, db._conn, *args)
