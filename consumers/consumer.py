"""The per-session consumer coroutine: runs a session's requests one at a time.

Ordering rules (the reason this file is shaped as it is):

* Deliveries come from the broker's subscription in order, to a callback
  that appends them to an inbox and does nothing else (it never awaits: see
  server.broker_channel for why that keeps the order). One task takes what
  the inbox holds and runs it; it exists only while there is something to
  run, so an idle session costs no task. A prefetch above one only pipelines
  deliveries; processing and acks stay strictly in order.
* One broker message carries one or more consecutive requests of the session
  (the submit path coalesces what arrived together). They run in seq order.
* A request starts only after its ``accepted`` frame was queued for sending,
  so a client never sees progress or a result before ``accepted``.
* Handlers run in that task, started eagerly: one that finishes without
  waiting (``echo``, ``kv.get``) costs no task and no timer; one that waits
  runs on under its time limit in the same task.
* A result is written to the store before its frame is sent, and the message
  is acked only after every request in it has its result stored. Result
  writes are pipelined (see consumers.results).
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
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from loguru import logger

from consumers.context import KV, Context
from consumers.handler_call import Expired, call_handler, describe
from consumers.ports import Delivery, Finisher, Observer, SessionPort, Subscriber, Subscription
from consumers.registry import Operation, OpError, Registry
from consumers.results import ResultPipeline
from protocol import ErrorCode, encode_error, encode_progress, encode_result
from server.broker_message import decode_batch

# Their homes are consumers.ports and server.broker_message; kept importable here.
__all__ = ["Finisher", "Observer", "SessionConsumer", "SessionPort"]

MAX_GROUP = 64  # delivered messages run as one unit


class SessionConsumer:
    """Runs one session's requests from its queue (see the module docstring)."""

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
        max_result_bytes: int = 1 << 20,
        on_progress_dropped: Callable[[], object] | None = None,
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
        self.max_result_bytes = max_result_bytes
        self.on_progress_dropped = on_progress_dropped
        self.running_seq: int | None = None  # taken from the queue, being started or run
        self.started_seq: int | None = None  # ... and past its last checks (status: running)
        self.running_since: float | None = None  # loop.time() its handler started
        self._running_op = ""
        self._in_handler = False  # the worker task is inside a handler's await
        self._parked = False  # the worker task waits for a request's `accepted`
        self._cancel_seq: int | None = None
        self._cancel_sent = False  # the worker task was cancelled for _cancel_seq
        self._stop = False
        self._subscription: Subscription | None = None
        self._inbox: deque[Delivery] = deque()
        self._worker: asyncio.Task[None] | None = None  # only while there is work
        self._ended: asyncio.Future[None] | None = None
        self._ending: asyncio.Task[None] | None = None
        self._unacked: list[Delivery] = []  # taken, not acked: rejected at the end
        self._epoch = port.epoch
        self._loop = asyncio.get_running_loop()  # once: each lookup costs a getpid()
        self._results = ResultPipeline(port, store, self._epoch, self._loop)

    # -- control (called by the session) -------------------------------------------
    async def start(self, channel: Subscriber, queue: str) -> None:
        """Subscribe to the session's queue on ``channel`` (a broker channel,
        server.broker_channel.Channel); deliveries are run as they come."""
        self._subscription = await channel.subscribe(queue, self._deliver)
        if self._ending is not None and self._ending.done():
            # Stopped while subscribing: the end ran with no subscription to cancel.
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
        subscription = self._subscription
        if subscription is not None and not subscription.closed:
            await subscription.cancel()  # bounded; never raises
            # No delivery comes after the cancel (those before it have been
            # handed to _deliver by now, and joined _unacked).
            unacked, self._unacked = self._unacked, []
            try:
                for message in unacked:
                    if message.delivery_tag is not None and not subscription.closed:
                        await subscription.reject(message.delivery_tag)
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
    def _deliver(self, message: Delivery) -> None:
        """The subscription's callback, called in delivery order: keep the
        message, wake the worker. Never awaits, so the order holds."""
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
                subscription = self._subscription
                assert subscription is not None  # deliveries come after start() has it
                for message in messages:
                    tag = message.delivery_tag
                    assert tag is not None
                    await subscription.ack(tag)
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
        subscription = self._subscription
        return (
            not self._stop
            and self.port.owned()
            and self.port.epoch == self._epoch
            and (subscription is None or not subscription.closed)
        )

    async def _process(self, messages: list[Delivery]) -> bool:
        """Run every request carried by the messages, in order; True once all
        of them have their final frame stored (then the messages may be acked).
        Results go out through the pipeline (consumers.results): the next
        requests run while a write commits."""
        items = (
            decode_batch(messages[0].body)  # the common case: no second list
            if len(messages) == 1
            else [item for m in messages for item in decode_batch(m.body)]
        )
        port = self.port
        results = self._results
        results.error = None
        complete = True
        for seq, rid, opname, args, attempt in items:
            self._parked = True
            try:
                await port.wait_accepted(seq)  # False (abandoned): _can_start() says no
            finally:
                self._parked = False
            if results.error is not None or not self._can_start():
                complete = False
                break
            cancelled = port.cancel_pending(seq)
            if cancelled is not None:
                final = await cancelled  # b"": the cancel could not be stored, run it
                if final:
                    results.add(seq, final, store=False)
                    if opname:  # "": a result carried over, counted where it ran
                        self._count(opname, "cancelled")
                    continue
            if not port.begin(seq, rid):
                continue  # already finished, or not this request (see SessionPort.begin)
            # In a session taken over from an owner that died, the results
            # before a request are made durable before it starts: if it kills
            # the process too, it is then the first unfinished request in the
            # store, and it alone is charged the crash (see Server._claim_once).
            if port.careful and results.busy:
                results.flush()
                await results.drain()
                if results.error is not None:
                    complete = False
                    break
            self.running_seq = self.started_seq = seq
            self._running_op = opname
            self.running_since = self._loop.time()
            try:
                final, failed = await self._run(seq, rid, opname, args, attempt)
            finally:
                self.running_seq = self.started_seq = self.running_since = None
            results.add(seq, final, store=True, failed=failed)
        results.flush()
        await results.drain()
        results.push_ready()
        if results.error is not None:
            raise results.error
        return complete

    # -- running one request -------------------------------------------------
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
                frame = encode_progress(rid, seq, data)
            except TypeError:
                logger.warning("op {} sent progress that is not JSON", opname)
                return
            if len(frame) > self.max_result_bytes:  # dropped, never sent (PROTOCOL.md 1.1)
                if self.on_progress_dropped is not None:
                    self.on_progress_dropped()
                return
            port.push(frame)

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
                if len(final) > self.max_result_bytes:
                    # The quota on one final frame: the request ends, the session goes on.
                    outcome = ErrorCode.RESULT_TOO_LARGE
                    message = (
                        f"the final frame would be {len(final)} bytes;"
                        f" the limit is {self.max_result_bytes}"
                    )
                    return encode_error(ErrorCode.RESULT_TOO_LARGE, message, rid, seq), True
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
            value = await call_handler(op, args, ctx, self._loop.time() + timeout, self._loop)
        except Expired:
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
            frame = encode_error(ErrorCode.HANDLER_ERROR, describe(exc), rid, seq)
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
