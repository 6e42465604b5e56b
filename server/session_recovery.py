"""Opening a session's queue and consumer, and reopening them from the store.

One mechanism carries a session's work whatever broke: a broker restart or a
lost channel (the broker's copy is gone), a consumer that ended on an error
(a result the store could not take), a close that a resume called off (the
queue went with the subscription), a session taken up from another owner.
Each time a fresh queue is declared under a new name, the unfinished
requests are re-published from the store in seq order, and a new consumer
starts. The store is the source of truth; the broker's copy is transient.

The session core decides the lifecycle edges (``recovering`` ->
``open``/``draining``/``closing``); this module does the I/O.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from consumers.consumer import SessionConsumer
from protocol import ErrorCode, decode_json
from server import metrics
from server.broker import BrokerError
from server.broker_message import encode_batch
from server.store import Fenced, StoreError

if TYPE_CHECKING:
    from server.session import Session

__all__ = ["Recovery", "Work"]

# A request to (re)publish: (seq, id, op, args JSON, attempt).
Work = tuple[int, str, str, str, int]


class Recovery:
    """The queue/consumer side of one session (owned by its driver)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._lock = asyncio.Lock()
        self._incarnation = 0
        self._repair: asyncio.Task[None] | None = None  # after a consumer failed
        self._failed: SessionConsumer | None = None  # ... the newest such consumer
        self._repair_due = False
        self._repair_sleeping = False

    async def stored_work(self, through: int | None = None) -> list[Work]:
        """This session's work in the store, in seq order: its unfinished
        requests, and the stored finals the client has not had yet and that
        belong after one of those. A queued request cancelled while an earlier
        one ran has its `cancelled` final stored at once; after a broker outage
        (``through`` given: recovery of this session, up to that seq) a result
        may be stored and not yet sent. Those ride the queue like a live cancel
        (see Session._cancel): each is sent in its place, and never run."""
        s = self.session
        core = s.core
        rows = await s.store.unfinished(s.session_id)
        work = [
            (r.seq, r.client_id, r.op, r.args, r.attempts + 1)
            for r in rows
            if through is None or r.seq <= through
        ]
        waiting = [item[0] for item in work]
        if through is not None:  # what this session's client is still owed live
            waiting += [seq for seq in core.unfinished if seq <= through]
        if not waiting:
            return work  # every stored final is in seq order: a resume replays them
        have = {item[0] for item in work}
        loop = asyncio.get_running_loop()
        for seq, final in await s.store.finals_after(s.session_id, min(waiting) - 1):
            if seq in have or (through is not None and seq > through):
                continue  # still unfinished when read first (a live cancel covers it)
            record = await s.store.get_request(s.session_id, seq)
            if record is None:
                continue
            if seq not in core.cancels:
                done: asyncio.Future[bytes] = loop.create_future()
                done.set_result(final.encode())
                core.cancels[seq] = done
            # Counted in metrics where it ran; a cancel is counted when sent.
            cancelled = decode_json(final).get("code") == ErrorCode.CANCELLED
            op = record.op if cancelled else ""
            work.append((seq, record.client_id, op, record.args, 1))
            have.add(seq)
        work.sort()
        return work

    async def open_queue(self, unfinished: list[Work]) -> None:
        s = self.session
        broker = s.broker
        channel = broker.pick_channel()
        self._incarnation += 1
        name = f"sessionq.s.{s.session_id}.{s.owner}.{self._incarnation}"
        await broker.declare_session_queue(channel, name, s.settings.max_pending)
        batch = s.settings.batch_max
        try:
            for start in range(0, len(unfinished), batch):
                await broker.publish(channel, name, encode_batch(unfinished[start : start + batch]))
        except BrokerError:
            # Never consumed, so auto-delete would keep it for the connection's life.
            await broker.delete_queue(channel, name)
            raise
        consumer = SessionConsumer(
            s, s.store, s.store, s.registry,
            limits={"max_sleep": s.settings.max_sleep, "cpu_slots": s.settings.cpu_slots_per_user,
                    "kv_max_bytes_per_user": s.settings.kv_max_bytes_per_user},
            op_timeout=s.settings.op_timeout, max_attempts=s.settings.max_attempts,
            cpu_pool=s.cpu_pool, observe=metrics.observe_request,
            max_result_bytes=s.settings.max_result_bytes,
            on_progress_dropped=metrics.progress_dropped.inc,
        )  # fmt: skip
        s.channel, s.queue_name = channel, name
        s.consumer = consumer
        try:
            # One deadline for the subscription (aiormq would spend a task per
            # RPC on a timeout of its own).
            async with asyncio.timeout(broker.publish_timeout):
                await consumer.start(channel, name)
        except Exception as exc:
            s.consumer = None
            await broker.delete_queue(channel, name)
            raise BrokerError(f"consume failed: {exc!r}") from exc

    async def recover(self, failed: SessionConsumer | None = None, *, repair: bool = False) -> None:
        """After a lost channel/connection: wait for the old consumer to end its
        running request, then re-publish every unfinished request from the
        store into a fresh queue. Called on broker reconnect, by a close that a
        resume called off, and by the repair loop (``repair``: only if the
        session still runs ``failed``, or nothing). A recovery that fails
        leaves the rest to the repair loop."""
        s = self.session
        async with self._lock:
            if repair and s.consumer not in (failed, None):
                s.run(s.core.recovered())
                return  # recovered meanwhile
            s.core.recovering()
            try:
                await self._recover()
            except Exception as exc:
                # Store or broker down, or anything unforeseen: the repair
                # loop tries again; a session never stays `recovering` with
                # nothing to move it on.
                if not isinstance(exc, StoreError | BrokerError):
                    s.log.opt(exception=exc).warning("session recovery failed")
                if not repair:
                    self._schedule_repair(s.consumer)
                # Nothing to carry and no one to carry it to: close anyway.
                s.run(s.core.recovery_failed())
                raise
            s.run(s.core.recovered())

    async def _recover(self) -> None:
        s = self.session
        if s.core.closed:
            return
        old = s.consumer
        if old is not None:
            old.stop()
            await old.wait_ended()
            if s.core.closed:
                return  # closed while its consumer stopped: nothing to recover
        s.consumer = None
        # A fenced write first. It proves that the store takes writes, and that
        # no other process adopted the session while this one could not renew
        # its lease (a stall, a store outage): that one runs these requests.
        lease_until = time.time() + s.settings.lease_seconds
        try:
            await s.store.renew_session(s.session_id, s.epoch, lease_until)
        except Fenced:
            s.lost_ownership()
            return
        todo = await self.stored_work(through=s.core.accepted_through)
        s.core.unfinished = {item[0]: item[1] for item in todo}
        s.core.replayed_finals &= s.core.unfinished.keys()
        await self.open_queue(todo)
        if s.core.closed:  # stopped meanwhile (hand-over, shutdown)
            consumer = s.consumer
            if consumer is not None:
                consumer.stop()  # it starts nothing; this ends the subscription
                await consumer.wait_ended()
            return
        s.log.info("session recovered; {} requests re-published", len(todo))

    def consumer_failed(self, consumer: SessionConsumer, exc: Exception) -> None:
        s = self.session
        if s.core.closed or consumer is not s.consumer:
            return
        fenced = isinstance(exc, Fenced)
        metrics.consumer_failures.labels("fenced" if fenced else "error").inc()
        if fenced:
            s.lost_ownership()
        else:
            s.core.recovering()
            self._schedule_repair(consumer)

    def _schedule_repair(self, failed: SessionConsumer | None) -> None:
        """Have the repair loop recover the session (``failed``: the consumer
        that ended on an error, or None after a recovery that failed)."""
        if self.session.core.closed:
            return
        self._failed = failed  # the newest: a repair under way picks it up
        self._repair_due = True
        if self._repair is None:
            self._repair = self.session.spawn(self._repair_session())

    async def _repair_session(self) -> None:
        """Carry the session on after its consumer ended on an error (a result
        the store could not take, or the consumer's channel failed): recover
        from the store once it takes writes again. The first try is at once;
        while failures follow each other with no result stored in between
        (a store that reads but cannot write), tries back off (the core's
        next_repair_delay), so the request is not re-run in a tight loop. A
        broker reconnect recovers the session as well; whichever comes first
        does it."""
        s = self.session
        try:
            while self._repair_due and not s.core.closed:
                delay = s.core.next_repair_delay()
                if delay:
                    self._repair_sleeping = True  # only now may a close cancel us
                    try:
                        await asyncio.sleep(delay)
                    finally:
                        self._repair_sleeping = False
                self._repair_due = False
                try:
                    await self.recover(self._failed, repair=True)
                except (StoreError, BrokerError) as exc:
                    if not self._repair_due:  # no newer failure: try this one again
                        self._failed = s.consumer
                        self._repair_due = True
                    s.log.warning("session not recovered yet: {}", exc)
        finally:
            self._repair = None

    def cancel_sleeping_repair(self) -> None:
        # A repair inside recover() is left to finish: cancelled there, it
        # could leave a declared queue or a subscription behind; _recover
        # stops what it opened once it sees the session closed.
        if self._repair is not None and self._repair_sleeping:
            self._repair.cancel()
