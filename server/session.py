"""A session: its seq counter, its unfinished requests, its queue and consumer.

States: ``open`` (a connection is attached) -> ``draining`` (no connection;
the consumer finishes what was accepted, storing results) -> ``closed``
(consumer stopped, queue gone, ownership released). A ``resume`` can bring a
draining session back to ``open`` on a new connection.

The submit path is built around coalescing (DESIGN.md, "Where the time
goes"): :meth:`Session.submit` only checks and queues a frame; one pump task
per session takes *everything* that arrived while the previous batch was
being stored and published, stores it in one write (group-committed with
other sessions' writes), publishes it as one broker message, waits for that
one confirm, then queues the ``accepted`` frames in submit order. With one
request in flight this adds no latency (no timer); with many, batches grow by
themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger

from consumers.consumer import SessionConsumer, encode_batch
from consumers.registry import BadArgs, Registry
from protocol import (
    CloseCode,
    ErrorCode,
    Submit,
    decode_json,
    encode_accepted,
    encode_error,
    encode_json,
    encode_status,
)
from server import metrics
from server.broker import Broker, BrokerError, QueueFull, RawChannel
from server.settings import Settings
from server.store import Fenced, NewRequest, Store, StoreError

if TYPE_CHECKING:
    from server.outbox import Outbox


@dataclass(slots=True)
class _Pending:
    """A submit waiting in the pump; duplicates of its id ride along."""

    frame: Submit
    args_json: str
    duplicates: int = 0
    cancel: bool = False  # cancelled before it was accepted: cancel once it is


# Submit coalescing (Session._wait_batch_done)
GATHER = 0.002  # after a batch of several: time for the rest of the client's burst
SLOW_OP = 0.01  # a running request this old is slow: stop holding submits for it
HOLD_MAX = 0.25  # longest a submit waits for the session's previous batch
REPAIR_FIRST_DELAY = 0.2  # recovery after a consumer failed: first retry ...
REPAIR_MAX_DELAY = 5.0  # ... doubling up to this


# A request to (re)publish: (seq, id, op, args JSON, attempt).
Work = tuple[int, str, str, str, int]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Session:
    def __init__(
        self,
        session_id: str,
        username: str,
        epoch: int,
        *,
        settings: Settings,
        store: Store,
        broker: Broker,
        registry: Registry,
        cpu_pool: Executor | None,
        owner: str,
        last_seq: int = 0,
        on_closed: Callable[[Session], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.username = username
        self.epoch = epoch
        self.settings = settings
        self.store = store
        self.broker = broker
        self.registry = registry
        self.cpu_pool = cpu_pool
        self.owner = owner
        self.on_closed = on_closed
        self.state = "open"
        self.outbox: Outbox | None = None
        self.close_connection: Callable[[int, str], None] | None = None

        self.last_seq = last_seq
        self.accepted_through = last_seq
        self.unfinished: dict[int, str] = {}  # seq -> client id, in seq order
        self.ids: dict[str, tuple[int, int]] = {}  # client id -> (seq, ahead)
        self.resumed_from_store = last_seq > 0  # ids before this process: ask the store
        self.replayed_finals: set[int] = set()  # sent by a resume replay, still unfinished here
        self._incoming: list[_Pending] = []
        self._incoming_ids: dict[str, _Pending] = {}
        self._accept_waiter: tuple[int, asyncio.Future[bool]] | None = None
        self._idle_waiter: asyncio.Future[None] | None = None
        self._last_batch = 0
        self._cancels: dict[int, asyncio.Future[bytes]] = {}
        self._submit_times: list[float] = []
        self._unremoved: list[int] = []  # seqs of refused requests still in the store

        self.channel: RawChannel | None = None
        self.queue_name: str | None = None
        self.queue_generation = -1
        self.consumer: SessionConsumer | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._recover_lock = asyncio.Lock()
        self._repair: asyncio.Task[None] | None = None  # after a consumer failed
        self._failed: SessionConsumer | None = None  # ... the newest such consumer
        self._repair_due = False
        self._repair_delay = 0.0  # ... before its next try (0 after a stored result)
        self._repair_sleeping = False
        self._giving_up: asyncio.Task[None] | None = None
        self.closing = False  # its consumer is stopping; it cannot be carried again
        self.careful = False  # taken from an owner that died (see SessionPort.careful)
        self._close_settled = asyncio.Event()  # no close under way (done or called off)
        self._close_settled.set()
        self._incarnation = 0
        self.log = logger.bind(session=session_id, user=username)

    # -- lifecycle ---------------------------------------------------------------
    async def take_up(self) -> int:
        """Start a session taken up from the store (from another owner, or
        adopted): republish its stored work. Returns how many requests that is."""
        work = await self._stored_work()
        await self.start(work)
        return len(work)

    async def _stored_work(self, through: int | None = None) -> list[Work]:
        """This session's work in the store, in seq order: its unfinished
        requests, and the stored finals the client has not had yet and that
        belong after one of those. A queued request cancelled while an earlier
        one ran has its `cancelled` final stored at once; after a broker outage
        (``through`` given: recovery of this session, up to that seq) a result
        may be stored and not yet sent. Those ride the queue like a live cancel
        (see _cancel): each is sent in its place, and never run."""
        rows = await self.store.unfinished(self.session_id)
        work = [
            (r.seq, r.client_id, r.op, r.args, r.attempts + 1)
            for r in rows
            if through is None or r.seq <= through
        ]
        waiting = [item[0] for item in work]
        if through is not None:  # what this session's client is still owed live
            waiting += [seq for seq in self.unfinished if seq <= through]
        if not waiting:
            return work  # every stored final is in seq order: a resume replays them
        have = {item[0] for item in work}
        loop = asyncio.get_running_loop()
        for seq, final in await self.store.finals_after(self.session_id, min(waiting) - 1):
            if seq in have or (through is not None and seq > through):
                continue  # still unfinished when read first (a live cancel covers it)
            record = await self.store.get_request(self.session_id, seq)
            if record is None:
                continue
            if seq not in self._cancels:
                self._cancels[seq] = loop.create_future()
                self._cancels[seq].set_result(final.encode())
            # Counted in metrics where it ran; a cancel is counted when sent.
            cancelled = decode_json(final).get("code") == ErrorCode.CANCELLED
            op = record.op if cancelled else ""
            work.append((seq, record.client_id, op, record.args, 1))
            have.add(seq)
        work.sort()
        return work

    async def start(self, unfinished: list[Work] | None = None) -> None:
        """Declare a fresh queue, (re)publish ``unfinished`` requests from the
        store in seq order, and start the consumer and the submit pump."""
        if unfinished:
            for item in unfinished:
                self.unfinished[item[0]] = item[1]
        try:
            await self._open_queue(unfinished or [])
        except BrokerError as exc:
            # No broker now: the session still works for status/resume, submits
            # get `unavailable`, and the broker's recovery callback retries.
            self.log.warning("session queue not ready: {}", exc)

    async def _open_queue(self, unfinished: list[Work]) -> None:
        channel = self.broker.pick_channel()
        generation = self.broker.generation
        self._incarnation += 1
        name = f"sessionq.s.{self.session_id}.{self.owner}.{self._incarnation}"
        await self.broker.declare_session_queue(channel, name, self.settings.max_pending)
        batch = self.settings.batch_max
        try:
            for start in range(0, len(unfinished), batch):
                await self.broker.publish(
                    channel, name, encode_batch(unfinished[start : start + batch])
                )
        except BrokerError:
            # Never consumed, so auto-delete would keep it for the connection's life.
            await self.broker.delete_queue(channel, name)
            raise
        consumer = SessionConsumer(
            self,
            self.store,
            self.store,
            self.registry,
            limits={
                "max_sleep": self.settings.max_sleep,
                "cpu_slots": self.settings.cpu_slots_per_user,
            },
            op_timeout=self.settings.op_timeout,
            max_attempts=self.settings.max_attempts,
            cpu_pool=self.cpu_pool,
            observe=metrics.observe_request,
        )
        self.channel, self.queue_name, self.queue_generation = channel, name, generation
        self.consumer = consumer
        try:
            # One deadline for the subscription (aiormq would spend a task per
            # RPC on a timeout of its own).
            async with asyncio.timeout(self.broker.publish_timeout):
                await consumer.start(channel, name)
        except Exception as exc:
            self.consumer = None
            await self.broker.delete_queue(channel, name)
            raise BrokerError(f"consume failed: {exc!r}") from exc

    async def recover(self, failed: SessionConsumer | None = None, *, repair: bool = False) -> None:
        """After a lost channel/connection: wait for the old consumer to end its
        running request, then re-publish every unfinished request from the
        store into a fresh queue. Called by the manager on broker reconnect,
        by a close that a resume called off, and by the repair loop
        (``repair``: only if the session still runs ``failed``, or nothing).
        A recovery that fails leaves the rest to the repair loop."""
        try:
            async with self._recover_lock:
                if repair and self.consumer not in (failed, None):
                    return  # recovered meanwhile
                await self._recover()
        except (StoreError, BrokerError):
            if not repair:
                self._schedule_repair(self.consumer)
            raise
        finally:
            # A close held back while the queue was reopened (see _begin_close):
            # its client left and nothing is left to run.
            if self.state == "draining" and self._idle():
                self._begin_close()

    async def _recover(self) -> None:
        if self.state == "closed":
            return
        old = self.consumer
        if old is not None:
            old.stop()
            await old.wait_ended()
            if self.state == "closed":
                return  # closed while its consumer stopped: nothing to recover
        self.consumer = None
        # A fenced write first. It proves that the store takes writes, and that
        # no other process adopted the session while this one could not renew
        # its lease (a stall, a store outage): that one runs these requests.
        lease_until = time.time() + self.settings.lease_seconds
        try:
            await self.store.renew_session(self.session_id, self.epoch, lease_until)
        except Fenced:
            self._lost_ownership()
            return
        todo = await self._stored_work(through=self.accepted_through)
        self.unfinished = {item[0]: item[1] for item in todo}
        self.replayed_finals &= self.unfinished.keys()
        await self._open_queue(todo)
        if self.state == "closed":  # stopped meanwhile (hand-over, shutdown)
            consumer = self.consumer
            if consumer is not None:
                consumer.stop()  # it starts nothing; this ends the subscription
                await consumer.wait_ended()
            return
        self.log.info("session recovered; {} requests re-published", len(todo))

    def consumer_failed(self, consumer: SessionConsumer, exc: Exception) -> None:
        if self.state == "closed" or consumer is not self.consumer:
            return
        fenced = isinstance(exc, Fenced)
        metrics.consumer_failures.labels("fenced" if fenced else "error").inc()
        if fenced:
            self._lost_ownership()
        else:
            self._schedule_repair(consumer)

    def _schedule_repair(self, failed: SessionConsumer | None) -> None:
        """Have the repair loop recover the session (``failed``: the consumer
        that ended on an error, or None after a recovery that failed)."""
        if self.state == "closed":
            return
        self._failed = failed  # the newest: a repair under way picks it up
        self._repair_due = True
        if self._repair is None:
            self._repair = asyncio.create_task(self._repair_session())

    async def _repair_session(self) -> None:
        """Carry the session on after its consumer ended on an error (a result
        the store could not take, or the consumer's channel failed): recover
        from the store once it takes writes again. The first try is at once;
        while failures follow each other with no result stored in between
        (a store that reads but cannot write), tries back off up to
        REPAIR_MAX_DELAY, so the request is not re-run in a tight loop. A
        broker reconnect recovers the session as well; whichever comes first
        does it."""
        try:
            while self._repair_due and self.state != "closed":
                delay = self._repair_delay
                if delay:
                    self._repair_sleeping = True  # only now may a close cancel us
                    try:
                        await asyncio.sleep(delay)
                    finally:
                        self._repair_sleeping = False
                self._repair_delay = min(max(REPAIR_FIRST_DELAY, delay * 2), REPAIR_MAX_DELAY)
                self._repair_due = False
                try:
                    await self.recover(self._failed, repair=True)
                except (StoreError, BrokerError) as exc:
                    if not self._repair_due:  # no newer failure: try this one again
                        self._failed = self.consumer
                        self._repair_due = True
                    self.log.warning("session not recovered yet: {}", exc)
        finally:
            self._repair = None

    def _cancel_sleeping_repair(self) -> None:
        # A repair inside recover() is left to finish: cancelled there, it
        # could leave a declared queue or a subscription behind; _recover
        # stops what it opened once it sees the session closed.
        if self._repair is not None and self._repair_sleeping:
            self._repair.cancel()

    def _lost_ownership(self) -> None:
        """The store fenced a write: another process claimed the session after
        this one's lease lapsed (it was stalled or cut off from the store)."""
        if self._giving_up is None and self.state != "closed":
            self._giving_up = asyncio.create_task(self._give_up())

    async def _give_up(self) -> None:
        self.log.warning("session claimed by another process; closing it here")
        await self.hand_over("session taken over elsewhere")

    async def hand_over(self, reason: str) -> None:
        """The session lives on in another process: close the socket that
        carried it with 4409 (``reason``), finish the running request, start
        nothing more, release ownership and leave this process."""
        if self.close_connection is not None:
            self.close_connection(CloseCode.TAKEN_OVER, reason)
        await self.stop(self.settings.op_timeout)
        if self.on_closed is not None:
            self.on_closed(self)

    def attach(self, outbox: Outbox, close: Callable[[int, str], None]) -> None:
        self.outbox = outbox
        self.close_connection = close
        if self.state != "closed":
            self.state = "open"

    def detach(self, outbox: Outbox | None) -> None:
        """The connection carrying this session went away: drain, then close."""
        if self.outbox is not outbox:
            return  # a newer connection already carries the session
        self.outbox = None
        self.close_connection = None
        if self.state == "closed":
            return
        self.state = "draining"
        if self._idle():
            self._begin_close()

    def _idle(self) -> bool:
        """Nothing accepted is unfinished and no submit is on its way in (a
        batch being stored and published counts: its client may have sent it
        just before going away, and it is accepted all the same)."""
        return not self.unfinished and not self._incoming and self._pump_task is None

    def _begin_close(self) -> None:
        if self._recover_lock.locked():
            return  # a recovery is opening a fresh queue; it closes when done
        self.closing = True
        self._close_settled.clear()
        if self._closer is None:
            self._closer = asyncio.create_task(self._close_after(self.consumer))

    def _call_off_close(self) -> None:
        self.closing = False
        self._closer = None
        self._close_settled.set()

    async def _close_after(self, consumer: SessionConsumer | None) -> None:
        if consumer is not None:
            consumer.stop()
            await consumer.wait_ended()
            if consumer is not self.consumer:
                # Recovered meanwhile: the recovery carries on, and closes
                # the session when it is done if there is nothing to run.
                self._call_off_close()
                return
            if self.state != "draining" or self.unfinished:
                # A resume attached it again while its consumer stopped: its
                # queue is gone with the subscription, so start afresh.
                self._call_off_close()
                try:
                    await self.recover(consumer)
                except (BrokerError, StoreError) as exc:
                    self.log.warning("session not reopened: {}", exc)
                return
        await self._finish_close()

    async def _finish_close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self._pump_task is not None:
            self._pump_task.cancel()
        self._cancel_sleeping_repair()
        name, self.queue_name = self.queue_name, None
        if name is not None and self.channel is not None:
            # auto-delete removes it once the consumer is gone; make sure
            await self.broker.delete_queue(self.channel, name)
        await self._forget_refused()
        try:
            await self.store.release_session(self.session_id, self.epoch)
        except StoreError as exc:
            self.log.warning("could not release session: {}", exc)
        self._close_settled.set()
        if self.on_closed is not None:
            self.on_closed(self)
        self.log.debug("session closed")

    async def stop(self, grace: float) -> None:
        """Shutdown: finish the running request within ``grace``, start no more,
        keep the rest stored for the next owner."""
        self.closing = True
        self.state = "closed"
        if self._pump_task is not None:
            self._pump_task.cancel()
        self._cancel_sleeping_repair()
        consumer = self.consumer
        if consumer is not None:
            consumer.stop()
            try:
                await asyncio.wait_for(consumer.wait_ended(), grace)
            except TimeoutError:
                consumer.abort()
                await consumer.wait_ended()
        await self._forget_refused()
        try:
            await self.store.release_session(self.session_id, self.epoch)
        except StoreError:
            pass
        self._close_settled.set()

    async def _remove_refused(self) -> None:
        """Remove the requests of refused batches from the store (their seqs
        are reused, and a next owner would run them); raises StoreError."""
        await self.store.remove_requests(self.session_id, self.epoch, self._unremoved)
        self._unremoved = []

    async def _forget_refused(self) -> None:
        """:meth:`_remove_refused`, best effort: if the store fails, the next
        batch (or the release) tries again; a fenced one gives the session up."""
        if not self._unremoved:
            return
        try:
            await self._remove_refused()
        except StoreError as exc:
            self.log.warning("could not forget refused requests {}: {}", self._unremoved, exc)
            if isinstance(exc, Fenced):
                self._lost_ownership()

    async def wait_close_settled(self) -> None:
        """Wait until a closing session has either released its ownership or
        been carried on after all (a resume attached it while it closed)."""
        await self._close_settled.wait()

    # -- SessionPort (used by the consumer) ------------------------------------
    def push(self, frame: bytes) -> None:
        outbox = self.outbox
        if outbox is not None:
            outbox.push(frame)

    def push_final(self, seq: int, frame: bytes) -> None:
        # A final stored before a resume's replay read it, but handed to us
        # after the replay was sent, would otherwise reach the client twice.
        if self.replayed_finals and seq in self.replayed_finals:
            self.replayed_finals.discard(seq)
            return
        self.push(frame)

    async def wait_accepted(self, seq: int) -> bool:
        while self.accepted_through < seq:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._accept_waiter = (seq, future)
            if not await future:
                return False  # abandoned: the consumer is stopping
        return True

    def abandon_accept_wait(self) -> None:
        waiter, self._accept_waiter = self._accept_waiter, None
        if waiter is not None and not waiter[1].done():
            waiter[1].set_result(False)

    def cancel_pending(self, seq: int) -> asyncio.Future[bytes] | None:
        return self._cancels.get(seq)

    def begin(self, seq: int, rid: str) -> bool:
        return self.unfinished.get(seq) == rid

    def finished(self, seq: int) -> None:
        self._repair_delay = 0.0  # a result was stored: a later failure retries at once
        self.unfinished.pop(seq, None)
        self._cancels.pop(seq, None)
        if not self.unfinished and self._idle_waiter is not None:
            _wake(self._idle_waiter)
            self._idle_waiter = None
        if self.state == "draining" and self._idle():
            self._begin_close()

    def owned(self) -> bool:
        return self.state != "closed"

    # -- client requests -----------------------------------------------------------
    def submit(self, frame: Submit) -> None:
        """Check a submit and queue it for the pump, or refuse it at once."""
        rid = frame.id
        known = self.ids.get(rid)
        if known is not None:
            self.push(encode_accepted(rid, known[0], known[1]))
            return
        waiting = self._incoming_ids.get(rid)
        if waiting is not None:
            waiting.duplicates += 1
            return
        op = self.registry.get(frame.op)
        if op is None:
            return self._refuse(ErrorCode.UNKNOWN_OP, f"unknown op {frame.op!r}", rid)
        if op.validate is not None:
            try:
                op.validate(frame.args, {"max_sleep": self.settings.max_sleep})
            except BadArgs as exc:
                return self._refuse(ErrorCode.BAD_REQUEST, exc.message, rid)
        if len(self.unfinished) + len(self._incoming) >= self.settings.max_pending:
            return self._refuse(
                ErrorCode.QUEUE_FULL,
                f"the session already has {self.settings.max_pending} unfinished requests",
                rid,
            )
        if self.settings.max_submits_per_second > 0 and not self._rate_ok():
            return self._refuse(ErrorCode.RATE_LIMITED, "too many submits per second", rid)
        if self.consumer is None or not self.broker.connected:
            return self._refuse(ErrorCode.UNAVAILABLE, "the broker is unreachable; retry", rid)
        try:
            args_json = encode_json(frame.args).decode()
        except TypeError:
            return self._refuse(ErrorCode.BAD_REQUEST, "args must be JSON", rid)
        pending = _Pending(frame, args_json)
        self._incoming.append(pending)
        self._incoming_ids[rid] = pending
        if self._pump_task is None:  # started per burst: an idle session holds no task
            self._pump_task = asyncio.create_task(self._pump())

    def _rate_ok(self) -> bool:
        now = time.monotonic()
        times = self._submit_times
        while times and times[0] <= now - 1.0:
            times.pop(0)
        if len(times) >= self.settings.max_submits_per_second:
            return False
        times.append(now)
        return True

    def _refuse(self, code: ErrorCode, message: str, rid: str) -> None:
        metrics.requests_refused.labels(code.value).inc()
        self.push(encode_error(code, message, rid))

    async def _pump(self) -> None:
        try:
            while self._incoming:
                await self._wait_batch_done()
                batch = self._incoming[: self.settings.batch_max]
                del self._incoming[: len(batch)]
                try:
                    await self._accept(batch)
                finally:
                    for pending in batch:
                        self._incoming_ids.pop(pending.frame.id, None)
                for pending in batch:
                    if pending.cancel:
                        await self.cancel(pending.frame.id)
        finally:
            self._pump_task = None
            if self.state == "draining" and self._idle():
                self._begin_close()  # the client left while its last submits went in

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
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + HOLD_MAX
        waited = False
        while self.unfinished and self.state != "closed":
            consumer = self.consumer
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

    async def _accept(self, batch: list[_Pending]) -> None:
        records: list[NewRequest] = []
        try:
            if self._unremoved:  # their seqs are about to be reused
                await self._remove_refused()
            if self.resumed_from_store:
                batch = await self._drop_known(batch)
                if not batch:
                    return
            first = self.last_seq + 1
            records = [
                NewRequest(first + i, p.frame.id, p.frame.op, p.args_json)
                for i, p in enumerate(batch)
            ]
            await self.store.add_requests(self.session_id, self.epoch, records, time.time())
        except StoreError as exc:
            self.log.warning("storing {} requests failed: {}", len(batch), exc)
            if isinstance(exc, Fenced):
                self._lost_ownership()
            elif records:
                # The write may have committed with its answer lost (the
                # writer died after the commit): forget them before their
                # seqs are reused. Harmless if nothing was stored.
                self._unremoved = [r.seq for r in records]
            for p in batch:
                self._refuse(ErrorCode.UNAVAILABLE, "the request could not be stored; retry",
                             p.frame.id)  # fmt: skip
            return
        body = encode_batch([(r.seq, r.client_id, r.op, r.args) for r in records])
        try:
            if self.channel is None or self.queue_name is None:
                raise BrokerError("no queue")
            await self.broker.publish(self.channel, self.queue_name, body)
        except BrokerError as exc:
            full = isinstance(exc, QueueFull)
            self._unremoved = [r.seq for r in records]
            await self._forget_refused()
            code = ErrorCode.QUEUE_FULL if full else ErrorCode.UNAVAILABLE
            message = "the session's queue is full" if full else "the broker is unreachable; retry"
            for p in batch:
                self._refuse(code, message, p.frame.id)
            return
        self._last_batch = len(batch)
        metrics.batch_size.observe(len(batch))
        metrics.requests_accepted.inc(len(batch))
        ahead = len(self.unfinished)
        for record, p in zip(records, batch, strict=True):
            self.unfinished[record.seq] = record.client_id
            self.ids[record.client_id] = (record.seq, ahead)
            frame = encode_accepted(record.client_id, record.seq, ahead)
            for _ in range(1 + p.duplicates):
                self.push(frame)
            ahead += 1
        self.last_seq = records[-1].seq
        self.accepted_through = self.last_seq
        waiter = self._accept_waiter
        if waiter is not None and waiter[0] <= self.accepted_through:
            self._accept_waiter = None
            if not waiter[1].done():
                waiter[1].set_result(True)

    async def _drop_known(self, batch: list[_Pending]) -> list[_Pending]:
        """For a session that existed before this process owned it: answer ids
        the store already has with their original ``accepted``."""
        known = await self.store.seqs_of(self.session_id, [p.frame.id for p in batch])
        keep = []
        for p in batch:
            seq = known.get(p.frame.id)
            if seq is None:
                keep.append(p)
                continue
            self.ids[p.frame.id] = (seq, 0)
            for _ in range(1 + p.duplicates):
                self.push(encode_accepted(p.frame.id, seq, 0))
        return keep

    async def cancel(self, rid: str) -> None:
        """Answer a client's cancel; a store that cannot be read or written
        gets `unavailable`, and the request then runs as if never cancelled."""
        try:
            await self._cancel(rid)
        except StoreError as exc:
            self.push(encode_error(ErrorCode.UNAVAILABLE, f"could not cancel: {exc}", rid))
            if isinstance(exc, Fenced):
                self._lost_ownership()

    async def _cancel(self, rid: str) -> None:
        seq = self._seq_of(rid)
        if seq is None:
            waiting = self._incoming_ids.get(rid)
            if waiting is not None:
                # Not accepted yet (in the pump): it ends `cancelled` right
                # after its `accepted`, so the client sees one final per seq.
                waiting.cancel = True
                return
            record = await self.store.find_request(self.session_id, rid)
            seq = record.seq if record is not None and record.state != "done" else None
        if seq is None or seq not in self.unfinished or seq in self._cancels:
            self.push(encode_error(ErrorCode.NOT_FOUND, f"no unfinished request {rid!r}", rid))
            return
        consumer = self.consumer
        if consumer is not None and consumer.running_seq == seq:
            if not consumer.cancel_running(seq):
                self.push(encode_error(ErrorCode.NOT_CANCELLABLE,
                                       "the running request cannot be interrupted", rid))  # fmt: skip
            return
        # Queued: store the cancellation now (it survives a crash); the consumer
        # sends the final frame when it reaches the request, keeping seq order.
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._cancels[seq] = future
        frame = encode_error(ErrorCode.CANCELLED, "cancelled before it started", rid, seq)
        try:
            await self.store.finish_request(
                self.session_id, seq, self.epoch, frame.decode(), True, time.time()
            )
        except StoreError:
            self._cancels.pop(seq, None)
            future.set_result(b"")  # not cancelled after all: the consumer runs it
            raise
        future.set_result(frame)

    def _seq_of(self, rid: str) -> int | None:
        known = self.ids.get(rid)
        return known[0] if known is not None else None

    async def status(self, rid: str | None) -> bytes:
        pending = len(self.unfinished)
        last_done = (min(self.unfinished) - 1) if self.unfinished else self.last_seq
        if rid is None:
            return encode_status(self.session_id, pending, self.last_seq, last_done)
        seq = self._seq_of(rid)
        waiting = self._incoming_ids.get(rid) if seq is None else None
        if waiting is not None:
            # Submitted, not accepted yet (it rides the next broker message).
            ahead = len(self.unfinished) + next(
                (i for i, p in enumerate(self._incoming) if p is waiting), len(self._incoming)
            )
            return encode_status(self.session_id, pending, self.last_seq, last_done,
                                 rid, "queued", ahead)  # fmt: skip
        if seq is None:
            record = await self.store.find_request(self.session_id, rid)
            if record is None:
                return encode_error(ErrorCode.NOT_FOUND, f"no request {rid!r} in this session", rid)
            seq = record.seq
        if seq in self.unfinished:
            running = self.consumer is not None and self.consumer.started_seq == seq
            if running:
                return encode_status(self.session_id, pending, self.last_seq, last_done,
                                     rid, "running")  # fmt: skip
            ahead = sum(1 for s in self.unfinished if s < seq)
            return encode_status(self.session_id, pending, self.last_seq, last_done,
                                 rid, "queued", ahead)  # fmt: skip
        return encode_status(self.session_id, pending, self.last_seq, last_done, rid, "done")
