"""What a handler receives besides its args."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from consumers.cpu import UserSlots, slots_for

T = TypeVar("T")
S = TypeVar("S")


class KV(Protocol):
    """The slice of the store a handler may use: the user's key-value data."""

    async def kv_put(
        self, username: str, key: str, value: str, *, max_bytes: int | None = None
    ) -> None: ...
    async def kv_get(self, username: str, key: str) -> str | None: ...
    async def kv_delete(self, username: str, key: str) -> bool: ...
    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000, after: str | None = None
    ) -> list[tuple[str, str]]: ...


@dataclass(slots=True)
class Context:
    """Per-request context.

    ``attempt`` is 1 on the first run; it is higher when the request runs again
    after its server process died mid-run (handlers that are not idempotent can
    check it). ``progress(data)`` streams a progress frame to the client; it may
    be called from the handler's thread for sync handlers. ``run_cpu`` and
    ``run_cpu_steps`` send CPU-bound work to the process pool, each holding one
    of the user's CPU slots (``limits["cpu_slots"]``, consumers/cpu.py).
    """

    user: str
    session: str
    seq: int
    id: str
    attempt: int
    store: KV
    limits: dict[str, Any]
    _emit_progress: Callable[[Any], None]
    _loop: asyncio.AbstractEventLoop
    _cpu: Executor | None
    retry: int = 0  # 0 on the first try; n on the n-th retry of an op declared with retries

    def progress(self, data: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._emit_progress(data)
        else:
            self._loop.call_soon_threadsafe(self._emit_progress, data)

    def cpu_slots(self) -> UserSlots:
        return slots_for(self._cpu, int(self.limits.get("cpu_slots", 1)))

    async def run_cpu(self, func: Callable[..., T], *args: Any) -> T:
        """Run a picklable function in the process pool (off the event loop and
        off this process's GIL), holding one of the user's CPU slots.

        A timeout or cancel ends the request at once, but a call already
        running in a worker runs to its end (a pool worker cannot be
        interrupted): split long work with :meth:`run_cpu_steps`.
        """
        async with self.cpu_slots().hold(self.user):
            return await self._loop.run_in_executor(self._cpu, func, *args)

    async def run_cpu_steps(self, step: Callable[[S], tuple[bool, S]], state: S) -> S:
        """Run long CPU work as short pool calls: ``step(state)`` returns
        ``(done, state)`` and is called again with the new state until done.

        The user's CPU slot is held across the steps. Between two steps the
        worker is free for other calls, and a timeout or cancel stops the work:
        at most the step then running finishes, its result dropped. ``step``
        and ``state`` must be picklable; keep ``state`` small (it crosses the
        process boundary twice a step) and a step to tens of milliseconds.
        """
        async with self.cpu_slots().hold(self.user):
            done = False
            while not done:
                done, state = await self._loop.run_in_executor(self._cpu, step, state)
            return state
