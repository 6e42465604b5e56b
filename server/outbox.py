"""A connection's outgoing frames: pushed without waiting, written by one task.

Producers (the submit path, the consumer, progress callbacks) call
:meth:`Outbox.push`, which never blocks, so a slow reader cannot hold up the
consumer, the broker acks or anyone else. Frames go out in push order: those
pushed in one turn of the event loop are written together at its end, and a
writer task takes over only while the socket is backed up. A client that lets more than ``limit_bytes`` pile up,
or whose socket does not take a frame within ``slow_timeout``, is closed with
4503: its results are stored, and it resumes after reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

BURST = 64  # frames encoded per socket write


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
        self._held_size = 0  # their bytes (part of _size)
        self._size = 0
        self.task: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self._sent = asyncio.Event()
        self._flush_due = False
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
            self._held_size += len(frame)
            return
        self._frames.append(frame)
        self._empty.clear()
        self._start()

    def _start(self) -> None:
        # Frames pushed in one turn of the event loop are written together at
        # its end, straight to the socket when it takes them (no task); the
        # writer task runs only while the socket is backed up, and an idle
        # connection holds none.
        if self.task is None and not self._flush_due and not self.closed:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.task is not None or self.closed or not self._frames:
            return
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            self._mark_closed()
            return
        if ws.transport.get_write_buffer_size() == 0:
            self._send_burst()
            self._sent.set()
            if ws.transport.get_write_buffer_size() == 0 and not self._frames:
                self._empty.set()
                return
        self.task = asyncio.create_task(self.run())

    def _send_burst(self) -> None:
        protocol = self.ws.protocol
        size = 0
        for _ in range(min(len(self._frames), BURST)):
            frame = self._frames.popleft()
            size += len(frame)
            protocol.send_text(frame)
        self._size -= size
        _write_joined(self.ws)

    def hold(self) -> None:
        """Keep live frames back while a resume replay is sent."""
        if self._held is None:
            self._held = []

    async def push_replayed(self, frame: bytes) -> bool:
        """Send a replayed frame ahead of the held live ones, pacing the replay
        to the client's reading speed (it never counts as a slow reader by
        itself, however long the replay). Held live frames do not count here:
        they cannot leave before the replay ends, so waiting for them would
        stall the replay for good."""
        while self._size - self._held_size > self.limit_bytes // 2 and not self.closed:
            self._sent.clear()
            await self._sent.wait()
        if self.closed:
            return False  # not sent: the caller must not count it as replayed
        self._size += len(frame)
        self._frames.append(frame)
        self._empty.clear()
        self._start()
        return True

    def release(self, keep: Callable[[bytes], bool]) -> None:
        """Send the held live frames after the replay, dropping those for which
        ``keep`` is False (finals the replay already carried)."""
        held, self._held = self._held or [], None
        self._held_size = 0
        for frame in held:
            if keep(frame):
                self._frames.append(frame)
            else:
                self._size -= len(frame)
        if self._frames:
            self._empty.clear()
            self._start()

    def _mark_closed(self) -> None:
        self.closed = True
        self._sent.set()  # a replay waiting for room gives up instead of hanging

    def slow(self) -> None:
        if self.closed:
            return
        self._mark_closed()
        self._frames.clear()
        self._held = None
        self._held_size = 0
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
        """The writer task: send frames in order until the connection closes.

        A burst of frames is encoded into the connection's protocol buffer and
        written to the socket as one buffer with one drain (``ws.send()``
        writes, and the event loop sends, each frame on its own), so a burst
        of results costs one system call, not one per frame, and reaches the
        client in one read. The slow-reader deadline applies per burst.
        """
        ws = self.ws
        protocol = ws.protocol
        loop = asyncio.get_running_loop()
        try:
            while self._frames and not self.closed:
                if protocol.state is not State.OPEN:
                    raise ConnectionClosed(None, None)
                self._send_burst()
                async with asyncio.timeout_at(loop.time() + self.slow_timeout):
                    await ws.drain()
                self._sent.set()
        except TimeoutError:
            self.slow()
        except (ConnectionClosed, OSError):
            self._mark_closed()
        finally:
            self.task = None
            if not self._frames:
                self._empty.set()

    async def stop(self) -> None:
        """Stop writing (the connection is over)."""
        self._mark_closed()
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _write_joined(ws: ServerConnection) -> None:
    """What ``ws.send_data()`` does, with the pending frames joined into one
    transport write."""
    chunks = ws.protocol.data_to_send()
    if all(chunks):
        ws.transport.write(b"".join(chunks))
        return
    for data in chunks:  # an end-of-stream marker among them: the close path
        if data:
            ws.transport.write(data)
        elif ws.transport.can_write_eof():
            with contextlib.suppress(Exception):  # as websockets does
                ws.transport.write_eof()
        else:
            ws.transport.close()
