"""The submit pump: stores and publishes a session's submits, coalesced.

The submit path is built around coalescing (DESIGN.md, "Where the time
goes"): :meth:`Session.submit` only checks and queues a frame (the core's
rules); one pump task per session takes *everything* that arrived while the
previous batch was being stored and published, stores it in one write
(group-committed with other sessions' writes), publishes it as one broker
message, waits for that one confirm, then queues the ``accepted`` frames in
submit order. With one request in flight this adds no latency (no timer);
with many, batches grow by themselves. The pump task exists only while
submits wait: an idle session holds no task.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from server import metrics
from server.broker import BrokerError
from server.broker_message import encode_batch
from server.errors import wire_error
from server.session_core import Pending
from server.store import Fenced, NewRequest, StoreError

if TYPE_CHECKING:
    from server.session import Session

__all__ = ["GATHER", "HOLD_MAX", "SLOW_OP", "SubmitPump"]

GATHER = 0.002  # after a batch of several: time for the rest of the client's burst
SLOW_OP = 0.01  # a running request this old is slow: stop holding submits for it
HOLD_MAX = 0.25  # longest a submit waits for the session's previous batch


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SubmitPump:
    """One session's pump (owned by its driver)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.task: asyncio.Task[None] | None = None
        self._idle_waiter: asyncio.Future[None] | None = None
        self._last_batch = 0

    def start(self) -> None:
        self.task = self.session.spawn(self._run())

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def queue_drained(self) -> None:
        """Every accepted request has finished: a held batch may go."""
        if self._idle_waiter is not None:
            _wake(self._idle_waiter)
            self._idle_waiter = None

    async def _run(self) -> None:
        s = self.session
        core = s.core
        try:
            while core.incoming:
                await self._wait_batch_done()
                batch = core.take_batch()
                try:
                    await self._accept(batch)
                finally:
                    cancelled = core.batch_done()
                for rid in cancelled:
                    await s.cancel(rid)
        finally:
            self.task = None
            s.run(core.pump_ended())

    async def _wait_batch_done(self) -> None:
        """Let a streaming session's submits gather into one broker message.

        A broker message costs far more than a request in it (see
        docs/performance.md), so while the session's previous batch is still
        unfinished, new submits wait for it (Nagle's rule, with the batch's
        results in the role of the ACK), and a session that just sent a batch
        of several gives the rest of the client's burst ``GATHER`` seconds to
        arrive. A session with one request in flight waits for nothing. The
        wait ends early when the running request is a slow one (it has run
        ``SLOW_OP`` seconds: nothing to gain) and never lasts past ``HOLD_MAX``.
        """
        s = self.session
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + HOLD_MAX
        waited = False
        while s.core.unfinished and not s.core.closed:
            consumer = s.consumer
            if consumer is None:
                return
            since = consumer.running_since
            if (since is not None and now - since > SLOW_OP) or now >= deadline:
                return
            future = loop.create_future()
            self._idle_waiter = future
            timer = loop.call_later(min(deadline - now, SLOW_OP), _wake, future)
            await future
            timer.cancel()
            waited = True
            now = loop.time()
        if waited or self._last_batch > 1:
            await asyncio.sleep(GATHER)

    async def _accept(self, batch: list[Pending]) -> None:
        s = self.session
        core = s.core
        records: list[NewRequest] = []
        try:
            if core.unremoved:  # their seqs are about to be reused
                await self.remove_refused()
            if core.resumed_from_store:
                ids = [p.frame.id for p in batch]
                known = await s.store.seqs_of(s.session_id, ids)
                batch, sends = core.drop_known(batch, known)
                s.run(sends)
                if not batch:
                    return
            first = core.next_seq()
            records = [
                NewRequest(first + i, p.frame.id, p.frame.op, p.args_json)
                for i, p in enumerate(batch)
            ]
            await s.store.add_requests(s.session_id, s.epoch, records, time.time())
        except StoreError as exc:
            s.log.warning("storing {} requests failed: {}", len(batch), exc)
            if isinstance(exc, Fenced):
                s.lost_ownership()
            elif records:
                # The write may have committed with its answer lost (the
                # writer died after the commit): forget them before their
                # seqs are reused. Harmless if nothing was stored.
                core.unremoved = [r.seq for r in records]
            s.run(core.batch_refused(batch, *wire_error(exc)))
            return
        body = encode_batch([(r.seq, r.client_id, r.op, r.args) for r in records])
        try:
            if s.channel is None or s.queue_name is None:
                raise BrokerError("no queue")
            started = time.perf_counter()
            await s.broker.publish(s.channel, s.queue_name, body)
            metrics.observe_publish(time.perf_counter() - started)
        except BrokerError as exc:  # QueueFull: the broker's x-max-length refused it
            core.unremoved = [r.seq for r in records]
            await self.forget_refused()
            s.run(core.batch_refused(batch, *wire_error(exc)))
            return
        self._last_batch = len(batch)
        metrics.batch_size.observe(len(batch))
        metrics.requests_accepted.inc(len(batch))
        s.run(core.batch_accepted(batch, first))
        s.accepted(first, len(batch))

    async def remove_refused(self) -> None:
        """Remove the requests of refused batches from the store (their seqs
        are reused, and a next owner would run them); raises StoreError."""
        s = self.session
        await s.store.remove_requests(s.session_id, s.epoch, s.core.unremoved)
        s.core.unremoved = []

    async def forget_refused(self) -> None:
        """:meth:`remove_refused`, best effort: if the store fails, the next
        batch (or the release) tries again; a fenced one gives the session up."""
        s = self.session
        if not s.core.unremoved:
            return
        try:
            await self.remove_refused()
        except StoreError as exc:
            s.log.warning("could not forget refused requests {}: {}", s.core.unremoved, exc)
            if isinstance(exc, Fenced):
                s.lost_ownership()
