"""The consumer's result pipeline: final frames go to the store, then to the
client, in seq order.

Results go to the store in a pipeline: the results of a message's requests
are collected and written together once its last request has run, or as soon
as a request is still running ``HOLD_RESULTS`` seconds after the first result
was collected; while one write commits, the next requests run. A frame is
sent only after its write has committed, in seq order. So a burst of submits
comes back as a burst of results (and the client's next burst coalesces into
one message again), a message costs one commit, and a single request waits
for nothing.
"""

from __future__ import annotations

import asyncio
import time

from consumers.ports import Finisher, SessionPort

HOLD_RESULTS = 0.005  # longest a finished result waits for the rest of its message


class ResultPipeline:
    """One consumer's results on their way to the store and the client."""

    def __init__(
        self, port: SessionPort, store: Finisher, epoch: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.port = port
        self.store = store
        self.epoch = epoch
        self.error: BaseException | None = None  # a write failed: stop, raise this
        self._loop = loop
        self._collected: list[tuple[int, bytes, bool, bool]] = []
        self._writing: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._ready: list[tuple[int, bytes, bool]] = []
        self._push_timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        """Results are collected or being written (not all stored yet)."""
        return bool(self._collected) or self._writing is not None

    def add(self, seq: int, final: bytes, *, store: bool, failed: bool = True) -> None:
        """Queue seq's final frame: written to the store first when ``store``
        (else it is stored already, e.g. a cancel), then sent."""
        if not self._collected:
            self._hold_timer = self._loop.call_later(HOLD_RESULTS, self.flush)
        self._collected.append((seq, final, store, failed))

    def flush(self) -> None:
        """Write what is collected now (or as soon as the running write ends)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._collected and self._writing is None:
            self._write_collected()

    async def drain(self) -> None:
        """Return once no write is running (check :attr:`error` then)."""
        while self._writing is not None:
            self._drained.clear()
            await self._drained.wait()

    def push_ready(self) -> None:
        """Send the stored results, together: a burst of results brings the
        client's next burst of submits, which coalesces into one message."""
        if self._push_timer is not None:
            self._push_timer.cancel()
            self._push_timer = None
        ready, self._ready = self._ready, []
        port = self.port
        for seq, final, send in ready:
            port.finished(seq)
            if send:
                port.push_final(seq, final)

    def _write_collected(self) -> None:
        batch, self._collected = self._collected, []
        self._writing = self._loop.create_task(self._write(batch))

    async def _write(self, batch: list[tuple[int, bytes, bool, bool]]) -> None:
        port = self.port
        to_store = [(seq, final.decode(), failed) for seq, final, store, failed in batch if store]
        try:
            stored = iter(
                await self.store.finish_requests(port.session_id, self.epoch, to_store, time.time())
                if to_store
                else []
            )
        except Exception as exc:  # fenced or store down: stop; the next owner re-runs them
            self.push_ready()
            self.error = exc
            self._collected = []
            self._writing = None
            self._drained.set()
            return
        for seq, final, store, _failed in batch:
            self._ready.append((seq, final, not store or next(stored)))
        if self._push_timer is None:
            self._push_timer = self._loop.call_later(HOLD_RESULTS, self.push_ready)
        if self._collected and self.error is None:
            self._write_collected()
        else:
            self._writing = None
            self._drained.set()
