"""Per-user slots of the CPU pool.

The process pool is shared by every session of a server process. Without a
bound, one user with ten sockets of long ``hash`` requests fills every worker
(and the pool's queue) and everyone else's CPU ops wait behind them. Here each
user holds at most ``per_user`` places in the pool at once
(``SESSIONQ_CPU_SLOTS_PER_USER``, default 1); the user's other CPU ops wait in
the order they asked, first come, first served, outside the pool, where waiting
costs nothing and a cancel or timeout simply leaves the line.

A slot is held from submission until the call returns, so it counts a call
waiting in the pool's queue as much as a running one: the pool's FIFO queue
then holds at most ``per_user`` calls of any one user, and another user's
call waits behind at most that many calls of each user, not behind all of them.

The table of slots belongs to the pool it divides (one per pool object, kept
as long as the pool lives): every session's Context finds the same table
through the pool it already holds. The setting reaches it in the consumer's
``limits["cpu_slots"]``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from server import metrics

__all__ = ["UserSlots", "slots_for"]


@dataclass(slots=True)
class _Holder:
    held: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class UserSlots:
    """A counting semaphore per user, fair (FIFO) within each user.

    Users with nothing held and nothing waiting take no memory. The waits
    are counted, without per-user labels, in ``sessionq_cpu_slot_waits_total``
    (every acquisition that had to wait: the budget was hit) and
    ``sessionq_cpu_slot_waiting`` (how many wait now); ``waiting()`` is this
    table's own count.
    """

    def __init__(self, per_user: int) -> None:
        if per_user < 1:
            raise ValueError("per_user must be at least 1")
        self.per_user = per_user
        self._users: dict[str, _Holder] = {}

    def held(self, user: str) -> int:
        holder = self._users.get(user)
        return holder.held if holder is not None else 0

    def waiting(self) -> int:
        return sum(len(h.waiters) for h in self._users.values())

    @asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[None]:
        await self.acquire(user)
        try:
            yield
        finally:
            self.release(user)

    async def acquire(self, user: str) -> None:
        holder = self._users.get(user)
        if holder is None:
            holder = self._users[user] = _Holder()
        if holder.held < self.per_user and not holder.waiters:
            holder.held += 1
            return
        metrics.cpu_slot_waits.inc()
        metrics.cpu_slot_waiting.inc()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        holder.waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                # Handed a slot in the same moment as cancelled: pass it on.
                self.release(user)
            else:
                if granted in holder.waiters:
                    holder.waiters.remove(granted)
                self._forget_if_idle(user, holder)
            raise
        finally:
            metrics.cpu_slot_waiting.dec()

    def release(self, user: str) -> None:
        """Give the slot to the user's first waiter, or free it."""
        holder = self._users[user]
        while holder.waiters:
            granted = holder.waiters.popleft()
            if not granted.done():
                granted.set_result(None)  # the slot changes hands; ``held`` stays
                return
        holder.held -= 1
        self._forget_if_idle(user, holder)

    def _forget_if_idle(self, user: str, holder: _Holder) -> None:
        if holder.held == 0 and not holder.waiters:
            self._users.pop(user, None)


_tables: weakref.WeakKeyDictionary[object, UserSlots] = weakref.WeakKeyDictionary()


def slots_for(pool: Executor | None, per_user: int) -> UserSlots:
    """The slot table of ``pool`` (``None``: the running loop's default
    executor), made on first use; ``per_user`` follows the latest caller (all
    callers of one server pass the same setting)."""
    owner: object = pool if pool is not None else asyncio.get_running_loop()
    table = _tables.get(owner)
    if table is None:
        table = _tables[owner] = UserSlots(per_user)
    else:
        table.per_user = per_user
    return table
