"""The per-session consumer coroutine: runs a session's requests one at a time.

Ordering rules (the reason this file is shaped as it is):

* Deliveries are appended to an inbox by a callback that does nothing else
  (aio-pika's ``queue.consume`` would run a task per message and lose the
  order; aiormq's own per-delivery tasks start in delivery order and finish
  in their first step). One task takes what the inbox holds and runs it; it
  exists only while there is something to run, so an idle session costs no
  task. A prefetch above one only pipelines deliveries; processing and acks
  stay strictly in order.
* One broker message carries one or more consecutive requests of the session
  (the submit path coalesces what arrived together). They run in seq order.
* A request starts only after its ``accepted`` frame was queued for sending,
  so a client never sees progress or a result before ``accepted``.
* Handlers run in that task, started eagerly: one that finishes without
  waiting (``echo``, ``kv.get``) costs no task and no timer; one that waits
  runs on under its time limit in the same task.
* A result is written to the store before its frame is sent, and the message
  is acked only after every request in it has its result stored. Result
  writes are pipelined (see ``_process``).
* Crashes are counted when a session is taken over from an owner that died
  (its lease lapsed): requests run strictly in order, so the first unfinished
  one is the one that was running, and only it is charged an attempt
  (``Server._claim``). No write is needed when a request starts.
* Before each request the consumer checks that it still owns the session and
  that its channel is alive; if not it stops without starting anything, and
  whoever recovers the session re-publishes the unfinished requests from the
  store. So a request is never run by two consumers at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from aiormq.abc import AbstractChannel, DeliveredMessage
from loguru import logger

from consumers.context import KV, Context
from consumers.registry import Operation, OpError, Registry
from protocol import ErrorCode, encode_error, encode_progress, encode_result
from server.broker_message import decode_batch, encode_batch

# encode_batch lives in server.broker_message; re-exported for the session.
__all__ = ["SessionConsumer", "SessionPort", "encode_batch"]

HOLD_RESULTS = 0.005  # longest a finished result waits for the rest of its message
MAX_GROUP = 64  # delivered messages run as one unit
CANCEL_TIMEOUT = 5.0  # bound on basic.cancel when the consumer stops


# The metrics hook, once per final: (op, outcome, seconds its handler ran, or
# None for a final no handler produced: cancelled while queued, crashed, unknown op).
Observer = Callable[[str, str, float | None], None]


class Finisher(Protocol):
    """The store calls the consumer needs (a slice of server.store.Store)."""

    async def finish_requests(
        self, session_id: str, epoch: int, finals: Sequence[tuple[int, str, bool]], now: float
    ) -> list[bool]: ...


class SessionPort(Protocol):
    """What the consumer needs from its session (implemented by server.session)."""

    session_id: str
    username: str
    epoch: int

    def push(self, frame: bytes) -> None:
        """Queue a frame for the client; never blocks (no-op when detached)."""

    def push_final(self, seq: int, frame: bytes) -> None:
        """Queue seq's stored final frame, unless a resume replay already
        sent it from the store."""

    async def wait_accepted(self, seq: int) -> bool:
        """Return True once ``accepted`` for seq has been queued for sending,
        or False if :meth:`abandon_accept_wait` was called first."""

    def abandon_accept_wait(self) -> None:
        """Make a pending :meth:`wait_accepted` return False now."""

    def cancel_pending(self, seq: int) -> asyncio.Future[bytes] | None:
        """If the client cancelled this queued request: a future of its stored
        final frame (resolved once the cancel is stored; to b"" if it could not
        be stored, and the request then runs)."""

    def begin(self, seq: int, rid: str) -> bool:
        """Whether seq is unfinished and is the request ``rid``. False for a
        request that already finished (a duplicate after recovery) and for a
        stale message whose publish was refused after all (its seq was reused)."""

    def finished(self, seq: int) -> None:
        """seq has its final frame stored; it no longer counts as pending."""

    def owned(self) -> bool:
        """Whether this process still owns the session at the consumer's epoch."""

    def consumer_failed(self, consumer: SessionConsumer, exc: Exception) -> None:
        """``consumer`` ended on an error (a result could not be stored, the
        session was fenced), not because it was asked to stop: whatever is
        unfinished is in the store, and the session has to carry it on."""

    @property
    def careful(self) -> bool:
        """Whether the session was taken from an owner that died: then each
        request starts only once the results before it are stored."""


class SessionConsumer:
    def __init__(
        self,
        port: SessionPort,
        store: Finisher,
        kv: KV,
        registry: Registry,
        *,
        limits: Mapping[str, Any],
        op_timeout: float,
        max_attempts: int,
        cpu_pool: Executor | None,
        observe: Observer | None = None,
    ) -> None:
        self.port = port
        self.store = store
        self.kv = kv
        self.registry = registry
        self.limits = dict(limits)
        self.op_timeout = op_timeout
        self.max_attempts = max_attempts
        self.cpu_pool = cpu_pool
        self.observe = observe
        self.running_seq: int | None = None  # taken from the queue, being started or run
        self.started_seq: int | None = None  # ... and past its last checks (status: running)
        self.running_since: float | None = None  # loop.time() its handler started
        self._running_op = ""
        self._in_handler = False  # the worker task is inside a handler's await
        self._parked = False  # the worker task waits for a request's `accepted`
        self._cancel_seq: int | None = None
        self._cancel_sent = False  # the worker task was cancelled for _cancel_seq
        self._stop = False
        self._channel: AbstractChannel | None = None
        self._tag: str | None = None
        self._inbox: deque[DeliveredMessage] = deque()
        self._worker: asyncio.Task[None] | None = None  # only while there is work
        self._ended: asyncio.Future[None] | None = None
        self._ending: asyncio.Task[None] | None = None
        self._unacked: list[DeliveredMessage] = []  # taken, not acked: rejected at the end
        self._collected: list[tuple[int, bytes, bool, bool]] = []
        self._writing: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._pipeline_error: BaseException | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._ready: list[tuple[int, bytes, bool]] = []
        self._push_timer: asyncio.TimerHandle | None = None
        self._epoch = port.epoch
        self._loop = asyncio.get_running_loop()  # once: each lookup costs a getpid()

    # -- control (called by the session) -------------------------------------------
    async def start(self, channel: AbstractChannel, queue: str) -> None:
        """Subscribe to the session's queue; deliveries are run as they come."""
        self._channel = channel
        ok = await channel.basic_consume(queue, self._deliver)
        self._tag = ok.consumer_tag
        if self._ending is not None and self._ending.done():
            # Stopped while subscribing: the end ran with no tag to cancel.
            await self._unsubscribe()

    def stop(self) -> None:
        """Finish the running request, start nothing more, then end (see
        :meth:`wait_ended`)."""
        self._stop = True
        if self._worker is None:
            self._end()
        elif self._parked:
            # Waiting for an `accepted` that may never come (its publish was
            # delivered, then failed): stop waiting, and end the group the
            # normal way (collected results still stored and sent).
            self.port.abandon_accept_wait()

    def abort(self) -> None:
        """Stop now, interrupting the running request (shutdown past its grace)."""
        self._stop = True
        if self._worker is not None:
            self._worker.cancel()
        else:
            self._end()

    @property
    def ended(self) -> bool:
        """True once the consumer has stopped (asked to, or on an error)."""
        return self._ended is not None and self._ended.done()

    async def wait_ended(self) -> None:
        """Return once the consumer has stopped for good: no request running,
        none will start, and the broker no longer delivers to it."""
        if self._ended is None:
            self._ended = self._loop.create_future()
        await asyncio.shield(self._ended)

    def _end(self) -> None:
        if self._ending is None:
            self._ending = self._loop.create_task(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        # Deliveries that will not be acked are rejected, not left unacked on
        # the pooled channel (where RabbitMQ's consumer_timeout would close it
        # one day, and every session on it with it). Nothing is lost: the
        # broker's copy is transient, the store has what they carried, and
        # whoever runs the session next re-publishes it from there. Cancelling
        # the subscription then lets the auto-delete queue go.
        channel, tag = self._channel, self._tag
        if channel is not None and tag is not None and not channel.is_closed:
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await channel.basic_cancel(tag)
            except Exception as exc:  # channel or broker gone: nothing to end
                logger.debug("basic.cancel: {!r}", exc)
            # No delivery comes after cancel-ok (those before it have been
            # handed to _deliver by now: aiormq starts them in order).
            unacked, self._unacked = self._unacked, []
            try:
                for message in unacked:
                    if message.delivery_tag is not None and not channel.is_closed:
                        await channel.basic_reject(message.delivery_tag, requeue=False, wait=False)
            except Exception as exc:
                logger.debug("basic.reject: {!r}", exc)
        self._unacked = []
        if self._ended is None:
            self._ended = self._loop.create_future()
        if not self._ended.done():
            self._ended.set_result(None)

    def cancel_running(self, seq: int) -> bool:
        """Interrupt the running request if it is ``seq`` and its handler allows
        it; returns whether a cancel was delivered. A cancel that lands before
        the handler starts takes effect then (it never runs)."""
        if self.running_seq != seq:
            return False
        op = self.registry.get(self._running_op)
        if op is not None and not op.cancellable:
            return False
        self._cancel_seq = seq
        if self._in_handler and not self._cancel_sent and self._worker is not None:
            self._cancel_sent = True
            self._worker.cancel()
        return True

    # -- the loop ------------------------------------------------------------------
    async def _deliver(self, message: DeliveredMessage) -> None:
        """aiormq's delivery callback (it runs each in a task of its own, in
        delivery order): keep the message, wake the worker. Never awaits, so
        the order holds."""
        if self._stop:
            self._unacked.append(message)  # rejected when the subscription ends
            return
        self._inbox.append(message)
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())

    async def _work(self) -> None:
        inbox = self._inbox
        try:
            while inbox and not self._stop:
                # Take every message already delivered (prefetch): run them
                # as one unit, so their results go out as one burst.
                messages = [inbox.popleft() for _ in range(min(len(inbox), MAX_GROUP))]
                self._unacked = list(messages)  # deliveries after a stop join it
                if not await self._process(messages):
                    self._stop = True  # not ours to run any more: end
                    break
                # From here on they are acked, never rejected: an ack fails only
                # with a closed channel, and rejecting a tag already acked would
                # make the broker close the channel under every session on it.
                del self._unacked[: len(messages)]
                channel = self._channel
                assert channel is not None
                for message in messages:
                    tag = message.delivery_tag
                    assert tag is not None
                    await channel.basic_ack(tag, wait=False)
        except asyncio.CancelledError:
            self._stop = True
            raise
        except Exception as exc:
            # The channel closed under us, or a result could not be stored.
            # Whatever is unfinished is in the store; the session's recovery
            # (or the next owner) re-publishes it.
            self._stop = True
            logger.bind(session=self.port.session_id).warning("consumer ended: {!r}", exc)
            self.port.consumer_failed(self, exc)
        finally:
            self._worker = None
            if self._stop:
                self._unacked.extend(inbox)
                inbox.clear()
                self._end()

    def _can_start(self) -> bool:
        # A dead channel means the broker's copy is gone: the session's
        # recovery re-publishes from the store, so start nothing more here
        # (prefetched messages would otherwise run while recovery lists them).
        channel = self._channel
        return (
            not self._stop
            and self.port.owned()
            and self.port.epoch == self._epoch
            and (channel is None or not channel.is_closed)
        )

    async def _process(self, messages: list[DeliveredMessage]) -> bool:
        """Run every request carried by the messages, in order; True once all
        of them have their final frame stored (then the messages may be acked).

        Results go to the store in a pipeline: the results of a message's
        requests are collected and written together once its last request has
        run, or as soon as a request is still running ``HOLD_RESULTS`` seconds
        after the first result was collected; while one write commits, the
        next requests run. A frame is sent only after its write has committed,
        in seq order. So a burst of submits comes back as a burst of results
        (and the client's next burst coalesces into one message again), a
        message costs one commit, and a single request waits for nothing.
        """
        items = [item for m in messages for item in decode_batch(m.body)]
        port = self.port
        self._pipeline_error = None
        complete = True
        for seq, rid, opname, args, attempt in items:
            self._parked = True
            try:
                await port.wait_accepted(seq)  # False (abandoned): _can_start() says no
            finally:
                self._parked = False
            if self._pipeline_error is not None or not self._can_start():
                complete = False
                break
            cancelled = port.cancel_pending(seq)
            if cancelled is not None:
                final = await cancelled  # b"": the cancel could not be stored, run it
                if final:
                    self._queue_final(seq, final, store=False)
                    if opname:  # "": a result carried over, counted where it ran
                        self._count(opname, "cancelled")
                    continue
            if not port.begin(seq, rid):
                continue  # already finished, or not this request (see SessionPort.begin)
            # In a session taken over from an owner that died, the results
            # before a request are made durable before it starts: if it kills
            # the process too, it is then the first unfinished request in the
            # store, and it alone is charged the crash (see Server._claim_once).
            if port.careful and (self._collected or self._writing is not None):
                self._flush_collected()
                await self._drain_pipeline()
                if self._pipeline_error is not None:
                    complete = False
                    break
            self.running_seq = self.started_seq = seq
            self._running_op = opname
            self.running_since = self._loop.time()
            try:
                final, failed = await self._run(seq, rid, opname, args, attempt)
            finally:
                self.running_seq = self.started_seq = self.running_since = None
            self._queue_final(seq, final, store=True, failed=failed)
        self._flush_collected()
        await self._drain_pipeline()
        self._push_ready()
        if self._pipeline_error is not None:
            raise self._pipeline_error
        return complete

    # -- the result pipeline -----------------------------------------------------
    def _queue_final(self, seq: int, final: bytes, *, store: bool, failed: bool = True) -> None:
        if not self._collected:
            self._hold_timer = self._loop.call_later(HOLD_RESULTS, self._flush_collected)
        self._collected.append((seq, final, store, failed))

    def _flush_collected(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._collected and self._writing is None:
            self._write_collected()

    def _write_collected(self) -> None:
        batch, self._collected = self._collected, []
        self._writing = self._loop.create_task(self._write(batch))

    async def _write(self, batch: list[tuple[int, bytes, bool, bool]]) -> None:
        port = self.port
        to_store = [(seq, final.decode(), failed) for seq, final, store, failed in batch if store]
        try:
            stored = iter(
                await self.store.finish_requests(
                    port.session_id, self._epoch, to_store, time.time()
                )
                if to_store
                else []
            )
        except Exception as exc:  # fenced or store down: stop; the next owner re-runs them
            self._push_ready()
            self._pipeline_error = exc
            self._collected = []
            self._writing = None
            self._drained.set()
            return
        for seq, final, store, _failed in batch:
            self._ready.append((seq, final, not store or next(stored)))
        if self._push_timer is None:
            self._push_timer = self._loop.call_later(HOLD_RESULTS, self._push_ready)
        if self._collected and self._pipeline_error is None:
            self._write_collected()
        else:
            self._writing = None
            self._drained.set()

    def _push_ready(self) -> None:
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

    async def _drain_pipeline(self) -> None:
        while self._writing is not None:
            self._drained.clear()
            await self._drained.wait()

    async def _run(
        self, seq: int, rid: str, opname: str, args: dict[str, Any], attempt: int
    ) -> tuple[bytes, bool]:
        op = self.registry.get(opname)
        if op is None:
            self._count(opname, ErrorCode.UNKNOWN_OP)
            return encode_error(ErrorCode.UNKNOWN_OP, f"unknown op {opname!r}", rid, seq), True
        if attempt > self.max_attempts:
            self._count(opname, ErrorCode.CRASHED)
            message = f"request ran {attempt - 1} times and its process died each time"
            return encode_error(ErrorCode.CRASHED, message, rid, seq), True
        loop = self._loop
        port = self.port

        def progress(data: Any) -> None:
            try:
                port.push(encode_progress(rid, seq, data))
            except TypeError:
                logger.warning("op {} sent progress that is not JSON", opname)

        ctx = Context(
            user=port.username, session=port.session_id, seq=seq, id=rid, attempt=attempt,
            store=self.kv, limits=self.limits, _emit_progress=progress, _loop=loop,
            _cpu=self.cpu_pool,
        )  # fmt: skip
        timeout = op.timeout if op.timeout is not None else self.op_timeout
        tries = 1 + op.retries
        started = time.perf_counter()
        outcome = "result"
        try:
            for attempt_no in range(1, tries + 1):
                ctx.retry = attempt_no - 1
                final, failed, outcome, retryable = await self._invoke(op, args, ctx, timeout)
                if not (failed and retryable) or attempt_no == tries:
                    return final, failed
                delay = op.retry_backoff * 2 ** (attempt_no - 1)
                port_log = logger.bind(session=port.session_id)
                port_log.info(
                    "op {} seq {} failed ({}); retry in {:.2f}s", opname, seq, outcome, delay
                )
                await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        finally:
            if self.observe is not None:
                self.observe(opname, outcome, time.perf_counter() - started)

    def _count(self, opname: str, outcome: str) -> None:
        if self.observe is not None:
            self.observe(opname, outcome, None)

    async def _invoke(
        self, op: Operation, args: dict[str, Any], ctx: Context, timeout: float
    ) -> tuple[bytes, bool, str, bool]:
        """Run the handler once: (final frame, failed, outcome, retryable)."""
        rid, seq = ctx.id, ctx.seq
        if self._cancel_seq == seq:
            self._cancel_seq = None
            frame = encode_error(ErrorCode.CANCELLED, "cancelled before it started", rid, seq)
            return frame, True, "cancelled", False
        self._in_handler = True
        try:
            value = await self._call(op, args, ctx, self._loop.time() + timeout)
        except _Expired:
            frame = encode_error(ErrorCode.TIMEOUT, f"op took longer than {timeout:g}s", rid, seq)
            return frame, True, "timeout", True
        except asyncio.CancelledError:
            if self._cancel_sent and self._cancel_seq == seq:
                self._cancel_sent = False
                task = asyncio.current_task()
                if task is not None and task.uncancel() == 0:  # ours alone, not a shutdown
                    frame = encode_error(ErrorCode.CANCELLED, "cancelled while running", rid, seq)
                    return frame, True, "cancelled", False
            raise
        except OpError as exc:
            return encode_error(exc.code, exc.message, rid, seq), True, exc.code, exc.retryable
        except Exception as exc:
            logger.opt(exception=exc).bind(session=ctx.session).warning("op {} failed", op.name)
            frame = encode_error(ErrorCode.HANDLER_ERROR, _describe(exc), rid, seq)
            return frame, True, "handler_error", True
        finally:
            self._in_handler = False
            if self._cancel_sent:  # delivered, but the handler swallowed it
                self._cancel_sent = False
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            self._cancel_seq = None
        try:
            return encode_result(rid, seq, value), False, "result", False
        except TypeError as exc:
            message = f"the op returned a value that is not JSON: {exc}"
            return (
                encode_error(ErrorCode.HANDLER_ERROR, message, rid, seq),
                True,
                "handler_error",
                False,
            )

    async def _call(
        self, op: Operation, args: dict[str, Any], ctx: Context, deadline: float
    ) -> Any:
        """Run the handler in this task and return its value. An async handler
        is started eagerly: if it returns without waiting, that is all (no
        task, no timer); if it waits, it goes on under its deadline."""
        if not op.is_async:
            call = functools.partial(op.func, args, ctx)
            return await _with_deadline(self._loop.run_in_executor(None, call), deadline)
        coro = op.func(args, ctx)
        try:
            waiting_on = coro.send(None)
        except StopIteration as done:
            return done.value
        return await _with_deadline(_resume(coro, waiting_on), deadline)


class _Expired(Exception):
    """The handler ran past its time limit (distinct from a TimeoutError the
    handler itself raised)."""


async def _with_deadline(awaitable: Any, deadline: float) -> Any:
    try:
        async with asyncio.timeout_at(deadline) as cm:
            return await awaitable
    except TimeoutError:
        if cm.expired():
            raise _Expired() from None
        raise


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Go on running a coroutine that was started by hand and is waiting on
    ``waiting_on``: what ``await coro`` would have done from the start."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation or a deadline: into the handler
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                return done.value


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
