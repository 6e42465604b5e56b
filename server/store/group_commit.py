"""Group commit, shared by the SQLite and PostgreSQL stores' writers.

A commit costs about as much as the work in it (DESIGN.md: ~4k requests/s one
commit each, 37k/s sixteen at a time), so every write is queued to one writer
task. The task takes everything queued, hands it to the backend as one batch
(one transaction, one commit) and then answers each caller with its own
outcome. Writes that arrive while a batch commits form the next one: no
timer, and no added latency when only one write is in flight.

A failure of the batch as a whole (the transaction, the connection, the
writer process) fails every write in it with StoreError and is counted; the
next batch starts afresh, so the store recovers by itself. A batch that was
cancelled (the store closing under it) fails its writes the same way. A
subclass says how a batch runs (:meth:`GroupCommit._run`), what a failure of
the whole batch becomes (:meth:`GroupCommit._failure`) and how one write's
outcome settles its caller (:meth:`GroupCommit._settle`).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from .base import StoreError

__all__ = ["GroupCommit"]

Op = TypeVar("Op")


class GroupCommit(abc.ABC, Generic[Op]):
    """The writer task of one store: batches of ``Op`` (what the backend runs)."""

    def __init__(self, on_failed: Callable[[int], object], *, name: str) -> None:
        self.on_failed = on_failed  # told how many writes a failed batch took
        self.name = name
        self.commits = 0  # batches committed
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def close(self) -> None:
        """Stop taking writes; return once what was queued has run."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _queue(self, op: Op) -> asyncio.Future[Any]:
        """Queue ``op`` for the next batch; the future settles once it ran."""
        if self._task is None or self._closing:
            raise StoreError("the store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wakeup.set()
        return future

    @abc.abstractmethod
    async def _run(self, ops: Sequence[Op]) -> Sequence[Any]:
        """Run ``ops`` as one batch; one outcome per op, in order. Raises if the
        batch as a whole failed (then nothing of it is stored)."""

    @abc.abstractmethod
    def _failure(self, exc: Exception) -> Exception:
        """What each write of a batch that failed as a whole raises (a StoreError
        for a failure of the store; an exception the backend raised as it is)."""

    def _settle(self, future: asyncio.Future[Any], outcome: Any) -> None:
        future.set_result(outcome)

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._pending = self._pending, []
            batch = [(op, fut) for op, fut in batch if not fut.cancelled()]
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._run([op for op, _ in batch])
        except Exception as e:  # the batch failed as a whole: nothing of it is stored
            self.on_failed(len(batch))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(self._failure(e))
            return
        except asyncio.CancelledError:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreError("the store's writer was cancelled"))
            raise
        self.commits += 1
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if not fut.done():
                self._settle(fut, outcome)
