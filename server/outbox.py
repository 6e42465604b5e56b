"""A connection's outgoing frames: pushed without waiting, written by one task.

Producers (the submit path, the consumer, progress callbacks) call
:meth:`Outbox.push`, which never blocks, so a slow reader cannot hold up the
consumer, the broker acks or anyone else. One writer task per connection sends
the frames in push order. A client that lets more than ``limit_bytes`` pile up,
or whose socket does not take a frame within ``slow_timeout``, is closed with
4503: its results are stored, and it resumes after reconnecting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from protocol import CloseCode
from server import metrics


class Outbox:
    def __init__(
        self,
        ws: ServerConnection,
        *,
        limit_bytes: int,
        slow_timeout: float,
        on_slow: Callable[[], None] | None = None,
    ) -> None:
        self.ws = ws
        self.limit_bytes = limit_bytes
        self.slow_timeout = slow_timeout
        self.on_slow = on_slow
        self._frames: deque[bytes] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._held = False
        self._hold_from = 0
        self.closed = False

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        self._frames.append(frame)
        self._empty.clear()
        self._size += len(frame)
        if self._size > self.limit_bytes:
            self.slow()
            return
        if not self._held:
            self._wake.set()

    def hold(self) -> None:
        """Keep frames back (while a resume replay is assembled)."""
        self._held = True
        self._hold_from = len(self._frames)

    def release(self, front: list[bytes], keep: Callable[[bytes], bool]) -> None:
        """Put ``front`` before what was held, dropping held frames for which
        ``keep`` is False, and start sending again."""
        frames = list(self._frames)
        before, held = frames[: self._hold_from], frames[self._hold_from :]
        self._frames = deque(before + front + [frame for frame in held if keep(frame)])
        self._size = sum(map(len, self._frames))
        self._held = False
        self._wake.set()

    def slow(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._frames.clear()
        metrics.closes.labels(str(int(CloseCode.SLOW_CONSUMER))).inc()
        if self.on_slow is not None:
            self.on_slow()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until every pushed frame was handed to the socket,
        so that a last error frame goes out before a close."""
        if self.closed or self._held:
            return
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """The writer task: send frames in order until the connection closes."""
        ws = self.ws
        frames = self._frames
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                async with asyncio.timeout(None) as deadline:
                    while self._frames and not self._held and not self.closed:
                        frames = self._frames
                        frame = frames.popleft()
                        self._size -= len(frame)
                        deadline.reschedule(loop.time() + self.slow_timeout)
                        await ws.send(frame, text=True)
                    deadline.reschedule(None)
                if not self._frames:
                    self._empty.set()
        except TimeoutError:
            self.slow()
        except ConnectionClosed:
            self.closed = True
