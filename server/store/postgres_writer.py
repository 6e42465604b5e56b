"""The PostgreSQL store's writer: group commit on a connection of its own.

* Group commit (:mod:`.group_commit`): every write is queued to one task,
  which sends everything queued as one call of the server-side function
  ``sessionq_batch`` (:mod:`.postgres_schema`) and answers each caller;
  writes that arrive while that call runs form the next batch, across
  sessions. One call is one round trip and one
  commit (it runs outside an explicit transaction), however many writes the
  batch holds: on a busy event loop every round trip costs a turn of the loop,
  so a round trip per write would bound throughput. A batch of many adds and
  finishes (the load's) runs server-side as a few statements for the whole
  batch rather than a few per write.
* A batch first runs plainly. If a write in it fails (a taken seq or client
  id, a value out of range), the whole call is rolled back and the batch runs
  again with each write in a subtransaction of its own, so the failing one
  fails alone. Fenced writes and taken user names never fail the call: they
  come back as outcomes.
* A failure of the call as a whole (the server gone, the connection broken,
  disk full, a statement past its timeout) fails every write of the batch with
  StoreError and counts them as failures; the next batch takes a fresh
  connection, so the store recovers by itself. A deadlock with another
  process's batch is retried (PostgreSQL aborts one of the two).
* PostgreSQL's text cannot hold the NUL character, which SQLite and MongoDB
  store: a write with one fails alone with StoreError, before it is queued.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson

from .base import Fenced, StoreError, UserExists
from .budgets import BudgetExceeded
from .group_commit import GroupCommit

DEADLOCK_RETRIES = 3
# Errors of the connection rather than of what was sent: running the batch
# again, carefully, on the same connection would only fail again.
CONNECTION_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
RETRIED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# Errors of what a write sent (a taken key, a value out of range): the batch
# runs again carefully. Any other error fails the batch.
SENT_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)


class Writer(GroupCommit[bytes]):
    """Runs writes (``[name, args...]``, as ``sessionq_op`` takes them) in
    batches on ``pool``'s one connection; ``failed(n)`` is told of n writes
    that failed for the store's own reasons."""

    def __init__(self, pool: asyncpg.Pool, failed: Callable[[int], object]) -> None:
        super().__init__(failed, name="postgresql writer")
        self._pool = pool
        self.start()

    async def close(self) -> None:
        """Run what is queued, then close the connection. Writes after it fail."""
        await super().close()
        await self._pool.close()

    async def write(self, op: list[Any]) -> Any:
        """Queue ``op`` for the next batch; return its result once committed,
        or raise what its outcome says (Fenced, UserExists, BudgetExceeded,
        StoreError)."""
        if self._closing:
            raise StoreError("the store is not open")  # before the checks below
        if _has_nul(op):  # a value PostgreSQL cannot take fails here, alone
            raise StoreError("postgresql: text cannot contain the NUL character")
        try:
            encoded = orjson.dumps(op)
        except TypeError as e:  # a lone surrogate
            raise StoreError(f"postgresql: cannot store {e}") from e
        outcome = await self._queue(encoded)
        if "e" not in outcome:
            return outcome["r"]
        kind = outcome["e"]
        if kind == "fenced":
            raise Fenced(f"session {op[1]}: epoch is not current")
        if kind == "user_exists":
            raise UserExists(op[1])
        if kind == "budget":
            raise BudgetExceeded(outcome["b"], int(outcome["l"]))
        raise StoreError(f"postgresql: {outcome.get('m', kind)}")

    def _failure(self, exc: Exception) -> StoreError:
        error = StoreError(f"postgresql: {exc}")
        error.__cause__ = exc
        return error

    async def _run(self, ops: Sequence[bytes]) -> list[dict[str, Any]]:
        """One call of sessionq_batch for ``ops`` (each a JSON array): plainly,
        then carefully if the plain call failed for something sent; raises if
        the call fails."""
        payload = (b"[" + b",".join(ops) + b"]").decode()
        async with self._pool.acquire() as connection:
            for attempt in range(DEADLOCK_RETRIES + 1):
                try:
                    result = await connection.fetchval(
                        "SELECT sessionq_batch($1::jsonb, false)", payload
                    )
                    break
                except RETRIED:
                    if attempt == DEADLOCK_RETRIES:
                        raise
                except SENT_ERRORS:  # one write's: run each in a block of its own
                    result = await connection.fetchval(
                        "SELECT sessionq_batch($1::jsonb, true)", payload
                    )
                    break
        outcomes: list[dict[str, Any]] = orjson.loads(result)
        return outcomes


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
