"""PostgreSQL backend, on asyncpg with a connection pool.

For the scale-out setup (DESIGN.md): every replica shares one PostgreSQL. What
the SQLite store taught, and how it carries over:

* Group commit, one round trip per batch, a failing write failing alone:
  :mod:`.postgres_writer`. Fencing by epoch in the statement that writes:
  :mod:`.postgres_schema`.
* Leases are on the database's clock. The interface passes times read from
  the caller's clock (``now``, ``lease_until``); the store measures, when it
  opens, how far the database's clock is from this process's, and moves every
  lease time it writes or compares by that much (and back for the records it
  returns). Replicas whose clocks disagree therefore still agree on when a
  lease lapses; only their clocks' drift since they opened the store counts.
  Other times (created, finished) stay the caller's.
* Reads go to the pool, one statement each; READ COMMITTED shows them only
  committed data.
* Per-user budgets are checked in the transaction of the write they guard:
  :mod:`.postgres_budgets`.

PostgreSQL's text cannot hold the NUL character, which SQLite and MongoDB
store: a write or read with one fails alone with StoreError (a write without
failing its batch). ``?search_path=name`` in the URL puts the tables in that
schema (asyncpg passes unknown URL parameters on as server settings).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from . import postgres_budgets, postgres_schema
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
from .postgres_identity import PostgresIdentity
from .postgres_support import check_text, clock_skew, translated
from .postgres_writer import CONNECTION_ERRORS, Writer

POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0
# A statement that takes longer (a server that stopped answering, a lock that
# another process holds) is cancelled and fails with StoreError, as SQLite's
# busy_timeout makes a locked-out write fail, rather than holding every write
# behind it forever.
COMMAND_TIMEOUT = 30.0
PURGE_CHUNK = 5000  # rows deleted per transaction, as in the SQLite store

REQUEST_COLUMNS = (
    "session_id, seq, client_id, op, args, state, attempts, failed, final, created_at, finished_at"
)
SESSION_COLUMNS = "session_id, username, created_at, last_seq, owner, epoch, lease_until"


class PostgresStore(PostgresIdentity, Store):
    """The store in one PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None  # reads
        self._writer: Writer | None = None
        self._skew = 0.0  # the database's clock minus ours, measured on open

    # -- lifecycle -----------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        # Pools open connections when asked (min_size 0): asyncpg keeps a floor
        # above 0 by reconnecting in the background, logging a traceback for
        # each try while the server is down; a store asked then fails instead.
        try:
            writes = await asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=1,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        except (asyncpg.PostgresError, *CONNECTION_ERRORS, TimeoutError, ValueError) as e:
            raise StoreError(f"postgresql: cannot connect: {e}") from e
        try:
            async with writes.acquire() as connection:
                await postgres_schema.migrate(connection)
                self._skew = await clock_skew(connection)
            # Reads get a pool of their own: the writer never queues behind them.
            pool = await asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        except BaseException as e:
            await writes.close()
            if isinstance(e, (TimeoutError, *CONNECTION_ERRORS)):
                raise StoreError(f"postgresql: cannot connect: {e}") from e
            if isinstance(e, asyncpg.PostgresError):
                raise StoreError(f"postgresql: cannot set the store up: {e}") from e
            raise
        self._pool, self._writer = pool, Writer(writes, self._failed)

    async def close(self) -> None:
        if self._pool is None or self._writer is None:
            return
        writer, pool, self._writer, self._pool = self._writer, self._pool, None, None
        await writer.close()  # drains what is queued
        await pool.close()

    @property
    def commits(self) -> int:
        """Batches the writer committed (tests check the grouping)."""
        return 0 if self._writer is None else self._writer.commits

    @translated
    async def ping(self) -> None:
        await self._pool_().fetchval("SELECT 1")

    def _pool_(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    async def _write(self, op: list[Any]) -> Any:
        if self._writer is None:
            raise StoreError("the store is not open")
        return await self._writer.write(op)

    # -- users ---------------------------------------------------------------
    async def create_user(self, username: str, password_hash: bytes) -> User:
        user = User(username, password_hash, time.time())
        encoded = base64.b64encode(password_hash).decode()
        await self._write(["create_user", username, username.lower(), encoded, user.created_at])
        return user

    @translated
    async def get_user(self, username: str) -> User | None:
        check_text(username)
        row = await self._pool_().fetchrow(
            "SELECT username, password_hash, created_at FROM users WHERE username_lower = $1",
            username.lower(),
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
        record = SessionRecord(session_id, username, time.time(), 0, owner, 1, lease_until)
        at = record.created_at if now is None else now
        await self._write(
            ["create_session", session_id, username, record.created_at, owner,
             lease_until + self._skew, max_sessions, max_connections, at + self._skew]
        )  # fmt: skip
        return record

    async def set_carried(self, session_id: str, epoch: int, carried: bool) -> bool:
        return bool(await self._write(["set_carried", session_id, epoch, carried]))

    @translated
    async def usage(self, username: str, now: float | None = None) -> UserUsage:
        check_text(username)
        at = time.time() if now is None else now
        sessions, carried, pending, kv_bytes = await self._pool_().fetchrow(
            postgres_budgets.USAGE,
            username,
            at + self._skew,  # leases: the database's clock
        )
        return UserUsage(sessions, carried, pending, kv_bytes)

    @translated
    async def get_session(self, session_id: str) -> SessionRecord | None:
        check_text(session_id)
        row = await self._pool_().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = $1", session_id
        )
        if row is None:
            return None
        sid, username, created_at, last_seq, owner, epoch, lease_until = row
        # The lease back on the caller's clock, like every time it passed in
        # (0: released, no lease).
        lease = lease_until - self._skew if lease_until else lease_until
        return SessionRecord(sid, username, created_at, last_seq, owner, epoch, lease)

    async def claim_session(
        self, session_id: str, owner: str, lease_until: float, now: float
    ) -> int | None:
        epoch = await self._write(
            ["claim", session_id, owner, lease_until + self._skew, now + self._skew]
        )
        return None if epoch is None else int(epoch)

    @translated
    async def orphaned_sessions(self, now: float, limit: int = 100) -> list[str]:
        rows = await self._pool_().fetch(
            "SELECT s.session_id FROM sessions s"
            " WHERE (s.owner IS NULL OR s.lease_until < $1)"  # the database's clock
            " AND EXISTS (SELECT 1 FROM requests r"
            "             WHERE r.session_id = s.session_id AND r.state <> 'done')"
            " LIMIT $2",
            now + self._skew,
            limit,
        )
        return [row[0] for row in rows]

    async def release_session(self, session_id: str, epoch: int) -> bool:
        return bool(await self._write(["release", session_id, epoch]))

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        return int(await self._write(["renew_leases", owner, lease_until + self._skew]))

    async def renew_session(self, session_id: str, epoch: int, lease_until: float) -> None:
        await self._write(["renew_session", session_id, epoch, lease_until + self._skew])

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
        rows = [[r.seq, r.client_id, r.op, r.args] for r in requests]
        await self._write(["add", session_id, epoch, rows, now, max_pending])

    async def remove_requests(self, session_id: str, epoch: int, seqs: Sequence[int]) -> None:
        if seqs:
            await self._write(["remove", session_id, epoch, list(seqs)])

    async def start_request(self, session_id: str, seq: int, epoch: int) -> int:
        return int(await self._write(["start", session_id, seq, epoch]))

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
        stored, started = await self._write(
            ["finish", session_id, seq, epoch, final, failed, now, start_next]
        )
        return bool(stored), None if started is None else int(started)

    async def finish_requests(
        self, session_id: str, epoch: int, finals: Sequence[tuple[int, str, bool]], now: float
    ) -> list[bool]:
        if not finals:
            return []
        # As finish_request each: a seq given twice is stored once (the first).
        first: dict[int, tuple[str, bool]] = {}
        for seq, final, failed in finals:
            first.setdefault(seq, (final, failed))
        values = [[seq, final, failed] for seq, (final, failed) in first.items()]
        finished = set(await self._write(["finish_many", session_id, epoch, values, now]))
        stored = []
        for seq, _, _ in finals:
            stored.append(seq in finished)
            finished.discard(seq)
        return stored

    @translated
    async def get_request(self, session_id: str, seq: int) -> RequestRecord | None:
        check_text(session_id)
        row = await self._pool_().fetchrow(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id = $1 AND seq = $2",
            session_id,
            seq,
        )
        return None if row is None else RequestRecord.from_row(row)

    @translated
    async def find_request(self, session_id: str, client_id: str) -> RequestRecord | None:
        check_text(session_id, client_id)
        row = await self._pool_().fetchrow(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id = $1 AND client_id = $2",
            session_id,
            client_id,
        )
        return None if row is None else RequestRecord.from_row(row)

    @translated
    async def seqs_of(self, session_id: str, client_ids: Sequence[str]) -> dict[str, int]:
        if not client_ids:
            return {}
        check_text(session_id, *client_ids)
        rows = await self._pool_().fetch(
            "SELECT client_id, seq FROM requests WHERE session_id = $1 AND client_id = ANY ($2)",
            session_id,
            list(client_ids),
        )
        return {client_id: seq for client_id, seq in rows}

    @translated
    async def unfinished(self, session_id: str) -> list[RequestRecord]:
        check_text(session_id)
        rows = await self._pool_().fetch(
            f"SELECT {REQUEST_COLUMNS} FROM requests"
            " WHERE session_id = $1 AND state <> 'done' ORDER BY seq",
            session_id,
        )
        return [RequestRecord.from_row(row) for row in rows]

    @translated
    async def finals_after(
        self, session_id: str, after: int, limit: int | None = None
    ) -> list[tuple[int, str]]:
        check_text(session_id)
        rows = await self._pool_().fetch(
            "SELECT seq, final FROM requests"
            " WHERE session_id = $1 AND seq > $2 AND state = 'done' ORDER BY seq LIMIT $3",
            session_id,
            after,
            limit,
        )
        return [(seq, final) for seq, final in rows]

    @translated
    async def count_requests(self, session_id: str, after: int, through: int) -> int:
        check_text(session_id)
        count = await self._pool_().fetchval(
            "SELECT count(*) FROM requests WHERE session_id = $1 AND seq > $2 AND seq <= $3",
            session_id,
            after,
            through,
        )
        return int(count)

    @translated
    async def session_counts(self, session_id: str) -> SessionCounts:
        check_text(session_id)
        # One statement, so one snapshot even while other processes commit.
        row = await self._pool_().fetchrow(
            "SELECT s.last_seq,"
            " (SELECT count(*) FROM requests r"
            "  WHERE r.session_id = s.session_id AND r.state <> 'done'),"
            " (SELECT min(seq) FROM requests r"
            "  WHERE r.session_id = s.session_id AND r.state <> 'done')"
            " FROM sessions s WHERE s.session_id = $1",
            session_id,
        )
        if row is None:
            return SessionCounts(last_seq=0, last_done=0, pending=0)
        last_seq, pending, first_unfinished = row
        last_done = last_seq if not pending else first_unfinished - 1
        return SessionCounts(last_seq=last_seq, last_done=last_done, pending=pending)

    @translated
    async def failed_requests(self, limit: int = 100) -> list[RequestRecord]:
        rows = await self._pool_().fetch(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE failed"
            " ORDER BY finished_at DESC LIMIT $1",
            limit,
        )
        return [RequestRecord.from_row(row) for row in rows]

    async def purge(self, finished_before: float, sessions_before: float | None = None) -> int:
        deleted = await self._delete_in_chunks("purge_requests", finished_before)
        await self._delete_in_chunks(
            "purge_sessions", finished_before if sessions_before is None else sessions_before
        )
        return deleted

    async def _delete_in_chunks(self, op: str, before: float) -> int:
        total = 0
        while True:
            n = int(await self._write([op, before, PURGE_CHUNK]))
            total += n
            if n < PURGE_CHUNK:
                return total

    # -- key-value (per user) ------------------------------------------------
    async def kv_put(
        self, username: str, key: str, value: str, *, max_bytes: int | None = None
    ) -> None:
        await self._write(["kv_put", username, key, value, kv_size(key, value), max_bytes])

    @translated
    async def kv_get(self, username: str, key: str) -> str | None:
        check_text(username, key)
        value = await self._pool_().fetchval(
            "SELECT value FROM kv WHERE username = $1 AND key = $2", username, key
        )
        return None if value is None else str(value)

    async def kv_delete(self, username: str, key: str) -> bool:
        return bool(await self._write(["kv_delete", username, key]))

    @translated
    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000, after: str | None = None
    ) -> list[tuple[str, str]]:
        check_text(username, prefix, *(() if after is None else (after,)))
        # A key range (the column sorts by code point, COLLATE "C") rather than
        # LIKE, where % and _ are wildcards.
        end = prefix_end(prefix)
        rows = await self._pool_().fetch(
            "SELECT key, value FROM kv WHERE username = $1 AND key >= $2"
            " AND ($3::text IS NULL OR key < $3) AND ($5::text IS NULL OR key > $5)"
            " ORDER BY key LIMIT $4",
            username,
            prefix,
            end,
            limit,
            after,
        )
        return [(key, value) for key, value in rows]
