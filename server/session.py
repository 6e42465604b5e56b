"""The session driver: runs a :class:`~server.session_core.SessionCore`'s
commands against the socket, the store and the broker, and owns the
session's tasks.

Every rule (max_pending, duplicate ids, cancel, status, accepted order, when
to close, the lifecycle edges) lives in the core; this module does the I/O
those rules ask for. Recovery of the queue and consumer (after a broker
outage, a consumer that failed, a close called off) is in
:mod:`server.session_recovery`.

The submit path (coalesced: one store write and one broker message per
burst) is :mod:`server.session_pump`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from loguru import logger

from consumers.consumer import SessionConsumer
from consumers.registry import BadArgs, Registry
from protocol import CloseCode, ErrorCode, Submit, encode_error
from server import metrics
from server.broker import Broker, BrokerError, Channel
from server.errors import error_frame
from server.session_core import (
    BEGIN_CLOSE,
    START_PUMP,
    Command,
    Refuse,
    SendAll,
    SessionCore,
)
from server.session_pump import SubmitPump
from server.session_recovery import Recovery, Work
from server.session_state import SessionState
from server.settings import Settings
from server.store import Fenced, Store, StoreError

if TYPE_CHECKING:
    from server.outbox import Outbox

__all__ = ["Session", "Work"]


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
        attached: bool = True,
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
        self.core = SessionCore(
            session_id, settings.max_pending, self._check_op,
            max_submits_per_second=settings.max_submits_per_second,
            batch_max=settings.batch_max, last_seq=last_seq, attached=attached,
            on_move=self._moved,
        )  # fmt: skip
        metrics.session_moved(None, self.core.state)
        self.outbox: Outbox | None = None
        self.close_connection: Callable[[int, str], None] | None = None
        self.careful = False  # taken from an owner that died (see SessionPort.careful)
        self.channel: Channel | None = None
        self.queue_name: str | None = None
        self.consumer: SessionConsumer | None = None
        self.recovery = Recovery(self)
        self.pump = SubmitPump(self)
        self._accept_waiter: tuple[int, asyncio.Future[bool]] | None = None
        # (first seq, last seq, when) of each batch accepted and not yet wholly
        # begun, for the queue wait: one entry a batch, not one a request
        self._accepted_at: deque[tuple[int, int, float]] = deque()
        self._closer: asyncio.Task[None] | None = None
        self._giving_up: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # every task of this session
        self._close_settled = asyncio.Event()  # no close under way (done or called off)
        self._close_settled.set()
        self.log = logger.bind(session=session_id, user=username)

    def _moved(self, old: SessionState | None, new: SessionState) -> None:
        """Every lifecycle edge: the sessions gauge, and one INFO line."""
        metrics.session_moved(old, new)
        core = self.core
        if new is SessionState.DRAINING:
            self.log.info("session draining: {} unfinished", len(core.unfinished))
        elif new is SessionState.CLOSING:
            self.log.info("session drained")
        elif new is SessionState.CLOSED:
            self.log.info(
                "session closed here: {} unfinished left in the store", len(core.unfinished)
            )
        elif new is SessionState.RECOVERING:
            self.log.info("session recovering: its queue is reopened from the store")
        elif old is SessionState.DRAINING:
            self.log.info("session resumed")

    def _check_op(self, name: str, args: dict[str, Any]) -> tuple[ErrorCode, str] | None:
        op = self.registry.get(name)
        if op is None:
            return ErrorCode.UNKNOWN_OP, f"unknown op {name!r}"
        if op.validate is not None:
            try:
                op.validate(args, {"max_sleep": self.settings.max_sleep,
                                   "kv_max_value_bytes": self.settings.kv_max_value_bytes})  # fmt: skip
            except BadArgs as exc:
                return ErrorCode.BAD_REQUEST, exc.message
        return None

    # -- what the rest of the server reads ---------------------------------------------
    @property
    def state(self) -> SessionState:
        return self.core.state

    @property
    def closing(self) -> bool:
        """Closing or closed: a resume waits for it to settle (wait_close_settled)."""
        return self.core.closing

    @property
    def unfinished(self) -> dict[int, str]:
        return self.core.unfinished

    @property
    def last_seq(self) -> int:
        return self.core.last_seq

    @property
    def replayed_finals(self) -> set[int]:
        return self.core.replayed_finals

    @replayed_finals.setter
    def replayed_finals(self, seqs: set[int]) -> None:
        self.core.replayed_finals = seqs

    def spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``job`` as one of this session's tasks: :meth:`stop` joins them all."""
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def run(self, commands: Iterable[Command]) -> None:
        """Carry out what the core asked for."""
        for command in commands:
            if type(command) is SendAll:
                outbox = self.outbox
                if outbox is not None:
                    for frame in command.frames:
                        outbox.push(frame)
            elif command is START_PUMP:
                self.pump.start()
            elif command is BEGIN_CLOSE:
                self._begin_close()
            elif isinstance(command, Refuse):
                metrics.refused(command.code.value)
                self.push(encode_error(command.code, command.message, command.id))
            else:
                self.push(command.frame)  # type: ignore[union-attr]

    # -- lifecycle ---------------------------------------------------------------------
    async def take_up(self) -> int:
        """Start a session taken up from the store (from another owner, or
        adopted): republish its stored work. Returns how many requests that is."""
        work = await self.recovery.stored_work()
        await self.start(work)
        return len(work)

    async def start(self, unfinished: list[Work] | None = None) -> None:
        """Declare a fresh queue, (re)publish ``unfinished`` requests from the
        store in seq order, and start the consumer and the submit pump."""
        if unfinished:
            for item in unfinished:
                self.core.unfinished[item[0]] = item[1]
        try:
            await self.recovery.open_queue(unfinished or [])
        except BrokerError as exc:
            # No broker now: the session still works for status/resume, submits
            # get `unavailable`, and the broker's recovery callback retries.
            self.log.warning("session queue not ready: {}", exc)

    async def recover(self, failed: SessionConsumer | None = None, *, repair: bool = False) -> None:
        await self.recovery.recover(failed, repair=repair)

    def consumer_failed(self, consumer: SessionConsumer, exc: Exception) -> None:
        self.recovery.consumer_failed(consumer, exc)

    def lost_ownership(self) -> None:
        """The store fenced a write: another process claimed the session after
        this one's lease lapsed (it was stalled or cut off from the store)."""
        if self._giving_up is None and not self.core.closed:
            self._giving_up = self.spawn(self._give_up())

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
        self.core.attach()

    def detach(self, outbox: Outbox | None) -> None:
        """The connection carrying this session went away: drain, then close."""
        if self.outbox is not outbox:
            return  # a newer connection already carries the session
        self.outbox = None
        self.close_connection = None
        self.run(self.core.detach())

    def _begin_close(self) -> None:
        self._close_settled.clear()
        if self._closer is None:
            self._closer = self.spawn(self._close_after(self.consumer))

    def _call_off_close(self) -> None:
        self._closer = None
        self.core.close_called_off()
        self._close_settled.set()

    async def _close_after(self, consumer: SessionConsumer | None) -> None:
        while consumer is not None:
            consumer.stop()
            await consumer.wait_ended()
            if consumer is self.consumer or self.state is not SessionState.CLOSING:
                break
            consumer = self.consumer  # reopened and drained again meanwhile: stop it too
        if consumer is not self.consumer or self.state is SessionState.RECOVERING:
            # Recovered (or recovering) meanwhile: the recovery carries on,
            # and closes the session when it is done if there is nothing to run.
            self._call_off_close()
            return
        if consumer is not None and not self.core.should_finish_close():
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
        if self.core.closed:
            return
        self.core.closed_now()
        self._stop_tasks()
        name, self.queue_name = self.queue_name, None
        try:
            if name is not None and self.channel is not None:
                # auto-delete removes it once the consumer is gone; make sure
                await self.broker.delete_queue(self.channel, name)
        finally:  # whatever the broker did, the session leaves this process
            await self._release()
            if self.on_closed is not None:
                self.on_closed(self)

    async def stop(self, grace: float) -> None:
        """Shutdown: finish the running request within ``grace``, start no more,
        keep the rest stored for the next owner."""
        self.core.closed_now()
        self._stop_tasks()
        consumer = self.consumer
        if consumer is not None:
            consumer.stop()
            try:
                await asyncio.wait_for(consumer.wait_ended(), grace)
            except TimeoutError:
                consumer.abort()
                await consumer.wait_ended()
        await self._release()
        # Whatever the session still runs (a close, a recovery that sees the
        # session closed and stops what it opened) ends now: join it here.
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=self.settings.publish_timeout + 1)

    def _stop_tasks(self) -> None:
        self.pump.cancel()
        self.recovery.cancel_sleeping_repair()

    async def _release(self) -> None:
        await self.pump.forget_refused()
        try:
            await self.store.release_session(self.session_id, self.epoch)
        except StoreError as exc:
            self.log.warning("could not release session: {}", exc)
        self._close_settled.set()

    async def wait_close_settled(self) -> None:
        """Wait until a closing session has either released its ownership or
        been carried on after all (a resume attached it while it closed)."""
        await self._close_settled.wait()

    # -- SessionPort (used by the consumer) ------------------------------------------
    def push(self, frame: bytes) -> None:
        outbox = self.outbox
        if outbox is not None:
            outbox.push(frame)

    def push_final(self, seq: int, frame: bytes) -> None:
        if self.core.should_send_final(seq):
            self.push(frame)

    async def wait_accepted(self, seq: int) -> bool:
        while self.core.accepted_through < seq:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._accept_waiter = (seq, future)
            if not await future:
                return False  # abandoned: the consumer is stopping
        return True

    def accepted(self, first: int, count: int) -> None:
        """Seqs ``first`` .. were accepted: a consumer waiting for one goes on."""
        self._accepted_at.append((first, first + count - 1, time.perf_counter()))
        waiter = self._accept_waiter
        if waiter is not None and waiter[0] <= self.core.accepted_through:
            self._accept_waiter = None
            if not waiter[1].done():
                waiter[1].set_result(True)

    def abandon_accept_wait(self) -> None:
        waiter, self._accept_waiter = self._accept_waiter, None
        if waiter is not None and not waiter[1].done():
            waiter[1].set_result(False)

    def cancel_pending(self, seq: int) -> asyncio.Future[bytes] | None:
        future: asyncio.Future[bytes] | None = self.core.cancels.get(seq)
        return future

    def begin(self, seq: int, rid: str) -> bool:
        batches = self._accepted_at
        while batches and batches[0][1] < seq:
            batches.popleft()  # batches wholly begun (or carried past)
        if batches and batches[0][0] <= seq:
            metrics.observe_queue_wait(time.perf_counter() - batches[0][2])
        return self.core.begin(seq, rid)

    def finished(self, seq: int) -> None:
        commands = self.core.finished(seq)
        if not self.core.unfinished:
            self.pump.queue_drained()
        if commands:
            self.run(commands)

    def owned(self) -> bool:
        return not self.core.closed

    # -- client requests ---------------------------------------------------------------
    def submit(self, frame: Submit) -> None:
        """Check a submit and queue it for the pump, or refuse it at once."""
        consumer = self.consumer
        ready = consumer is not None and not consumer.ended and self.broker.connected
        commands = self.core.submit(frame, now=time.monotonic, broker_ready=ready)
        if commands:
            self.run(commands)

    async def cancel(self, rid: str) -> None:
        """Answer a client's cancel; a store that cannot be read or written
        gets `unavailable`, and the request then runs as if never cancelled."""
        try:
            await self._cancel(rid)
        except StoreError as exc:
            self.log.warning("cancel of {!r} failed: {}", rid, exc)
            self.push(error_frame(exc, rid))
            if isinstance(exc, Fenced):
                self.lost_ownership()

    async def _cancel(self, rid: str) -> None:
        core = self.core
        target = core.cancel(rid)
        if target.lookup:
            record = await self.store.find_request(self.session_id, rid)
            seq = record.seq if record is not None and record.state != "done" else None
            target = core.cancel_target(rid, seq)
        if target.reply is not None:
            self.run((target.reply,))
        seq = target.seq
        if seq is None:
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
        core.cancels[seq] = future
        frame = encode_error(ErrorCode.CANCELLED, "cancelled before it started", rid, seq)
        try:
            await self.store.finish_request(
                self.session_id, seq, self.epoch, frame.decode(), True, time.time()
            )
        except StoreError:
            core.cancels.pop(seq, None)
            future.set_result(b"")  # not cancelled after all: the consumer runs it
            raise
        future.set_result(frame)

    async def status(self, rid: str | None) -> bytes:
        consumer = self.consumer
        running = consumer.started_seq if consumer is not None else None
        reply = self.core.status(rid, running)
        if reply is None:
            assert rid is not None
            record = await self.store.find_request(self.session_id, rid)
            seq = record.seq if record is not None else None
            consumer = self.consumer  # the store read awaited: look again
            running = consumer.started_seq if consumer is not None else None
            reply = self.core.stored_status(rid, seq, running)
        return reply
