"""RabbitMQ wiring: one AMQP connection per process, a small pool of channels.

Why this shape:

* RabbitMQ allows 2047 channels per connection, and every channel costs memory
  on both sides, so sessions do not get a channel each. A session's queue and
  consumer live on one of ``amqp_channels`` pooled channels (round robin); a
  channel carries many consumers, each with its own prefetch (``basic.qos``
  with ``global=False`` is per consumer). 10,000 sessions on 16 channels is
  ~625 consumers per channel.
* Every channel has publisher confirms on. A session publishes on its own
  channel, so its messages keep their order; different sessions' publishes on
  one channel pipeline their confirms.
* ``url`` may list several AMQP URLs, comma-separated: the nodes of a
  RabbitMQ cluster. Every connect, the first and each reconnect, tries them
  in the order given and keeps the first that answers. Starting again from
  the first (rather than from the one after the node that failed) keeps the
  order the operator wrote meaningful: give each replica its own first node
  to spread the connections, and a replica whose node comes back returns to
  it at its next reconnect. A node that refuses costs milliseconds; one that
  does not answer costs the 5 s connect timeout per try, and the supervisor's
  backoff runs between whole rounds, not between URLs.
* We do not use aio-pika's robust connection: after a broker restart its
  consumer restore has open bugs, and exclusive queues are gone anyway. The
  supervisor here reconnects with capped backoff (never more than 5 s between
  tries) and bumps :attr:`Broker.generation`; sessions watch that and recover
  themselves from the store (fresh queue name, re-publish unfinished requests).
* Only server/broker* speaks AMQP. A session gets a pooled channel
  (:class:`server.broker_channel.Channel`) to declare, publish to and
  subscribe to its queue; its consumer gets deliveries in order and acks them
  through that subscription. The message format is :mod:`server.broker_message`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from loguru import logger

from server import broker_urls, metrics
from server.broker_channel import Channel, Delivery, Subscription

__all__ = [
    "Broker",
    "BrokerError",
    "Channel",
    "Delivery",
    "QueueFull",
    "Subscription",
]


class BrokerError(Exception):
    """The broker cannot take the message now (down, timed out, queue gone)."""


class QueueFull(BrokerError):
    """The broker refused the publish: the queue is at x-max-length."""


Properties = aiormq.spec.Basic.Properties
RecoverCallback = Callable[[], Awaitable[None]]
ControlCallback = Callable[[bytes], None]
CONTROL_EXCHANGE = "sessionq.control"


class Broker:
    def __init__(
        self,
        url: str,
        *,
        channels: int = 16,
        prefetch: int = 4,
        publish_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.urls = broker_urls.split_broker_urls(url)  # ValueError names the bad one
        self.connected_url: str | None = None  # the URL of the live connection
        self.n_channels = channels
        self.prefetch = prefetch
        self.publish_timeout = publish_timeout
        self.generation = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channels: list[AbstractChannel] = []
        self._pool: list[Channel] = []  # the same channels, as sessions see them
        self._rr = itertools.count()
        self._message_ids = itertools.count(1)
        self._up = asyncio.Event()  # the connection and channel pool are usable
        self._ready = asyncio.Event()  # ... and sessions have recovered on them
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._on_recover: list[RecoverCallback] = []
        self._on_control: ControlCallback | None = None

    # -- lifecycle -----------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Up and every session recovered: what submits and /readyz go by."""
        return self._ready.is_set()

    def on_recover(self, callback: RecoverCallback) -> None:
        """Called (awaited) after every reconnect, once the pool is ready."""
        self._on_recover.append(callback)

    def on_control(self, callback: ControlCallback) -> None:
        """Receive every message sent to the control exchange (by any process,
        this one included). Set before start()."""
        self._on_control = callback

    async def send_control(self, body: bytes) -> None:
        """Tell every server process something (e.g. "release session S")."""
        channel = self.pick_channel()
        try:
            await channel.raw.basic_publish(body, exchange=CONTROL_EXCHANGE, routing_key="",
                                            timeout=self.publish_timeout)  # fmt: skip
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
            raise BrokerError(f"control publish failed: {exc!r}") from exc

    async def start(self, wait: float | None = 30.0) -> None:
        """Start the supervisor and wait until the first connection is up
        (raise BrokerError after ``wait`` seconds)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")
        if wait is not None:
            try:
                await asyncio.wait_for(self._ready.wait(), wait)
            except TimeoutError:
                raise BrokerError(f"no broker answered at {self.safe_url} in {wait:g}s") from None

    async def stop(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._close_connection()

    @property
    def safe_url(self) -> str:
        """The URL(s) without passwords, for logs and errors: the one
        connected to, else every URL of the list."""
        if self.connected_url is not None:
            return broker_urls.safe_url(self.connected_url)
        return broker_urls.safe_urls(self.urls)

    async def wait_up(self) -> None:
        await self._ready.wait()

    async def _supervise(self) -> None:
        delay = 0.2
        first = True
        while not self._closing:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = broker_urls.scrub(str(exc) or repr(exc), self.urls)
                logger.warning("broker connect failed: {}; retry in {:.1f}s", why, delay)
                await asyncio.sleep(delay * (0.75 + random.random() / 2))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            self.generation += 1
            self._lost.clear()
            self._up.set()
            metrics.broker_up.set(1)
            if not first:
                metrics.broker_reconnects.inc()
                logger.info("broker reconnected (generation {})", self.generation)
                for callback in list(self._on_recover):
                    try:
                        await callback()
                    except Exception:
                        logger.exception("session recovery after reconnect failed")
            first = False
            self._ready.set()
            await self._lost.wait()
            self._ready.clear()
            self._up.clear()
            metrics.broker_up.set(0)
            logger.warning("broker connection lost ({}); reconnecting", self.safe_url)
            await self._close_connection()

    async def _connect(self) -> None:
        connection, url = await self._open_first()
        try:
            channels = []
            for _ in range(self.n_channels):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await channel.set_qos(prefetch_count=self.prefetch)
                channel.close_callbacks.add(self._channel_closed)
                channels.append(channel)
        except BaseException:
            await connection.close()
            raise
        if self._on_control is not None:
            await self._listen_control(channels[0])
        connection.close_callbacks.add(self._connection_closed)
        self._connection = connection
        self._channels = channels
        self._pool = [Channel(await channel.get_underlay_channel()) for channel in channels]
        self.connected_url = url
        logger.info("broker connected: {} ({} channels)", self.safe_url, len(channels))

    async def _open_first(self) -> tuple[aio_pika.abc.AbstractConnection, str]:
        """Open a connection to the first URL of the list that answers, trying
        them in order; BrokerError (naming each URL and why) when none does."""
        failures = []
        for url in self.urls:
            try:
                return await aio_pika.connect(url, timeout=5), url
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = broker_urls.scrub(str(exc) or repr(exc), self.urls)
                failures.append(f"{broker_urls.safe_url(url)}: {why}")
                if len(self.urls) > 1:
                    logger.info("broker {} did not answer: {}", broker_urls.safe_url(url), why)
        raise BrokerError("; ".join(failures))

    async def _listen_control(self, channel: AbstractChannel) -> None:
        exchange = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        callback = self._on_control
        assert callback is not None

        async def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            callback(message.body)

        await queue.consume(deliver, no_ack=True)

    def _connection_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        # Callbacks of an earlier connection can fire after the next one is up:
        # only the current connection's loss counts.
        if not self._closing and sender is self._connection:
            self._lost.set()

    def _channel_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        # A channel the broker closed (consumer_timeout, precondition) takes its
        # sessions' consumers with it. Treat it as a lost connection: every
        # session recovers on fresh channels, from the store. A lost connection
        # closes every channel: say so once, not once per channel.
        if self._closing or not self._up.is_set() or self._lost.is_set():
            return
        if any(c is sender for c in self._channels):
            logger.warning("broker closed a channel: {}", exc)
            self._lost.set()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channels = self._connection, None, []
        self.connected_url = None
        self._pool = []
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception:  # already dead: nothing to clean up on the wire
                pass

    # -- per-session queues ----------------------------------------------------
    # Sessions use aiormq's channel directly, wrapped (see server.broker_channel).
    def pick_channel(self) -> Channel:
        """The next pooled channel, round robin, for a session's queue, its
        publishes and its subscription (Channel.subscribe)."""
        if not self._up.is_set() or not self._pool:
            raise BrokerError("broker is unreachable")
        return self._pool[next(self._rr) % len(self._pool)]

    async def declare_session_queue(self, channel: Channel, name: str, max_length: int) -> None:
        """Declare an exclusive, auto-delete queue that refuses publishes past
        ``max_length`` ready messages (instead of dropping the oldest)."""
        try:
            # Bounded here rather than by aiormq's timeout= (a task per RPC).
            async with asyncio.timeout(self.publish_timeout):
                await channel.raw.queue_declare(
                    name,
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-max-length": max_length, "x-overflow": "reject-publish"},
                )
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: aiormq's ChannelInvalidStateError, for an RPC on a
            # channel that closed (broker lost, or an earlier RPC timed out).
            raise BrokerError(f"queue declare failed: {exc!r}") from exc

    async def delete_queue(self, channel: Channel, name: str) -> None:
        if channel.raw.is_closed:
            return  # the queue went with its channel's connection
        try:
            async with asyncio.timeout(self.publish_timeout):
                await channel.raw.queue_delete(name)
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError) as exc:
            logger.debug("queue delete {}: {!r}", name, exc)  # it goes with its channel

    async def publish(self, channel: Channel, queue: str, body: bytes) -> None:
        """Publish one message and wait for its confirm (bounded).

        Raises QueueFull on a broker nack (x-overflow reject-publish), BrokerError
        when the broker is unreachable, the confirm does not come in time, or the
        queue no longer exists (message returned as unroutable).
        """
        raw = channel.raw
        if not self._up.is_set() or raw.is_closed:
            raise BrokerError("broker is unreachable")
        try:
            # A message id of our own for every publish: aiormq maps a returned
            # (unroutable) message back to its confirm by message id, and
            # would otherwise write one into a shared properties object.
            # Transient: the store is what lasts.
            properties = Properties(delivery_mode=1, message_id=str(next(self._message_ids)))
            await raw.basic_publish(
                body, routing_key=queue, properties=properties, mandatory=True,
                timeout=self.publish_timeout,
            )  # fmt: skip
        except aiormq.exceptions.PublishError as exc:
            raise BrokerError(f"queue {queue} is gone") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise QueueFull(f"queue {queue} is full") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError) as exc:
            raise BrokerError(f"publish failed: {exc!r}") from exc

    async def ping(self) -> None:
        if not self._ready.is_set() or self._connection is None or self._connection.is_closed:
            raise BrokerError("broker is unreachable")
