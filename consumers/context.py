"""What a handler receives besides its args."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class KV(Protocol):
    """The slice of the store a handler may use: the user's key-value data."""

    async def kv_put(self, username: str, key: str, value: str) -> None: ...
    async def kv_get(self, username: str, key: str) -> str | None: ...
    async def kv_delete(self, username: str, key: str) -> bool: ...
    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000
    ) -> list[tuple[str, str]]: ...


@dataclass(slots=True)
class Context:
    """Per-request context.

    ``attempt`` is 1 on the first run; it is higher when the request runs again
    after its server process died mid-run (handlers that are not idempotent can
    check it). ``progress(data)`` streams a progress frame to the client; it may
    be called from the handler's thread for sync handlers.
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

    async def run_cpu(self, func: Callable[..., T], *args: Any) -> T:
        """Run a picklable function in the process pool (off the event loop and
        off this process's GIL)."""
        return await self._loop.run_in_executor(self._cpu, func, *args)
