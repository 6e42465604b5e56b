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
        self._held: list[bytes] | None = None  # live frames kept back during a replay
        self._size = 0
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._sent = asyncio.Event()
        self.closed = False

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        self._size += len(frame)
        if self._size > self.limit_bytes:
            self.slow()
            return
        if self._held is not None:
            self._held.append(frame)
            return
        self._frames.append(frame)
        self._empty.clear()
        self._wake.set()

    def hold(self) -> None:
        """Keep live frames back while a resume replay is sent."""
        if self._held is None:
            self._held = []

    async def push_replayed(self, frame: bytes) -> None:
        """Send a replayed frame ahead of the held live ones, pacing the replay
        to the client's reading speed (it never counts as a slow reader by
        itself, however long the replay)."""
        while self._size > self.limit_bytes // 2 and not self.closed:
            self._sent.clear()
            await self._sent.wait()
        if self.closed:
            return
        self._size += len(frame)
        self._frames.append(frame)
        self._empty.clear()
        self._wake.set()

    def release(self, keep: Callable[[bytes], bool]) -> None:
        """Send the held live frames after the replay, dropping those for which
        ``keep`` is False (finals the replay already carried)."""
        held, self._held = self._held or [], None
        for frame in held:
            if keep(frame):
                self._frames.append(frame)
            else:
                self._size -= len(frame)
        if self._frames:
            self._empty.clear()
            self._wake.set()

    def slow(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._frames.clear()
        self._held = None
        self._sent.set()
        if self.on_slow is not None:
            self.on_slow()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until every pushed frame was handed to the socket,
        so that a last error frame goes out before a close."""
        if self.closed or self._held is not None:
            return
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """The writer task: send frames in order until the connection closes."""
        ws = self.ws
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                async with asyncio.timeout(None) as deadline:
                    while self._frames and not self.closed:
                        frame = self._frames.popleft()
                        self._size -= len(frame)
                        deadline.reschedule(loop.time() + self.slow_timeout)
                        await ws.send(frame, text=True)
                        self._sent.set()
                    deadline.reschedule(None)
                if not self._frames:
                    self._empty.set()
        except TimeoutError:
            self.slow()
        except ConnectionClosed:
            self.closed = True
