"""A pooled broker channel as a session sees it, and a subscription to a
session's queue: how deliveries reach the consumer, in order, and how it
acks them. With :mod:`server.broker`, the only AMQP the consumer depends on
(through the protocols in :mod:`consumers.ports`).

Sessions use aiormq's channel under aio-pika's: aio-pika's Queue, Message
and IncomingMessage objects cost more than the AMQP work they wrap (see
docs/performance.md), and a session needs none of what they add. A delivery
is handed on as aiormq made it (a body and a delivery tag), not copied.

Ordering (the reason a subscription is shaped as it is):

* aio-pika's ``queue.consume`` would run a task per message and lose the
  order. aiormq's own per-delivery tasks start in delivery order and finish
  in their first step, so a subscription hands each delivery to one plain
  callback that never awaits: the order holds, and the callback only keeps
  the delivery and wakes whoever runs it (an idle session costs no task).
* No delivery comes after ``basic.cancel-ok``: those before it have been
  handed to the callback by the time :meth:`Subscription.cancel` returns.
* Acks and rejects do not wait for the socket to drain (``wait=False``),
  and a prefetch above one only pipelines deliveries: the consumer processes
  and acks them strictly in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiormq.abc import AbstractChannel, DeliveredMessage
from loguru import logger

CANCEL_TIMEOUT = 5.0  # bound on basic.cancel when a subscription ends


class Delivery(Protocol):
    """One broker message as a subscription delivers it."""

    @property
    def body(self) -> bytes: ...

    @property
    def delivery_tag(self) -> int | None: ...


DeliveryCallback = Callable[[Delivery], None]


class Channel:
    """One of the broker's pooled channels: many sessions' queues, consumers
    and publishes share it (see :mod:`server.broker`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: AbstractChannel) -> None:
        self.raw = raw

    @property
    def is_closed(self) -> bool:
        return self.raw.is_closed

    async def subscribe(self, queue: str, on_delivery: DeliveryCallback) -> Subscription:
        """Consume ``queue``: ``on_delivery`` gets each delivery in order (it
        must not await, see the module docstring). Unbounded: the caller puts
        one deadline around it (aiormq would spend a task per RPC on one)."""
        subscription = Subscription(self.raw, on_delivery)
        ok = await self.raw.basic_consume(queue, subscription._deliver)
        # Deliveries are not handed on before this returns: their tasks were
        # queued after the one that resumes us with consume-ok.
        subscription.tag = ok.consumer_tag
        return subscription


class Subscription:
    """A consumer on a session's queue; acks and rejects go through it."""

    __slots__ = ("_channel", "_on_delivery", "tag")

    def __init__(self, channel: AbstractChannel, on_delivery: DeliveryCallback) -> None:
        self._channel = channel
        self._on_delivery = on_delivery
        self.tag: str | None = None

    async def _deliver(self, message: DeliveredMessage) -> None:
        # aiormq runs each call in a task of its own, started in delivery
        # order; the callback does not await, so the order holds.
        self._on_delivery(message)

    @property
    def closed(self) -> bool:
        """The channel is gone, and with it every unacked delivery (the
        broker's copy of a session's queue is transient)."""
        return self._channel.is_closed

    def ack(self, tag: int) -> Awaitable[None]:
        """Ack one delivery. Awaiting raises if the channel is closed."""
        return self._channel.basic_ack(tag, wait=False)

    def reject(self, tag: int) -> Awaitable[None]:
        """Drop one delivery without requeueing it. Awaiting raises if the
        channel is closed."""
        return self._channel.basic_reject(tag, requeue=False, wait=False)

    async def cancel(self) -> None:
        """Stop the deliveries (bounded by ``CANCEL_TIMEOUT``; a channel or
        broker that is gone has nothing to cancel). Every delivery that came
        before has been handed to the callback when this returns; the
        auto-delete queue goes once its last consumer is cancelled."""
        if self.tag is None or self._channel.is_closed:
            return
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self._channel.basic_cancel(self.tag)
        except Exception as exc:  # channel or broker gone: nothing to end
            logger.debug("basic.cancel: {!r}", exc)
