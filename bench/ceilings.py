"""The ceilings: what sessionq cannot beat on this machine, layer by layer.

Every sessionq request crosses a WebSocket twice and RabbitMQ once. These three
measure those costs alone, with nothing of sessionq in them (no auth, no store,
no protocol beyond a JSON echo), so the gap between a ceiling and sessionq is
what sessionq itself spends:

(a) **echo** (:func:`serve_echo`): a bare websockets server that sends every text
    frame back. The cost of the WebSocket layer: handshake-free steady state,
    one frame in, one frame out.
(b) **amqp** (:func:`amqp_opener`, run by the client alone): per session, one
    exclusive auto-delete queue and one consumer; each message is published
    with publisher confirms, consumed from the session's queue and acked. The
    cost of aio-pika plus RabbitMQ per message, without any WebSocket.
(c) **minimal** (:func:`serve_minimal`): the smallest thing shaped like sessionq.
    Per WebSocket connection one exclusive auto-delete queue and one consumer;
    every frame is published (confirmed) to that queue, consumed, sent back on
    the socket and acked. One broker message per frame, no batching: the
    design's "Where the time goes" puts it at ~2.2k msgs/s on 2 cores, the
    figure batching has to beat.

Both AMQP paths follow DESIGN.md's pitfalls the way sessionq does: one AMQP
connection per process, a small pool of channels (16) shared by all sessions
round robin, publisher confirms on every channel, consumers read with
``queue.iterator()`` (never a callback per message, which loses order), every
publish bounded by a timeout. A session publishes one message at a time and
waits for its confirm (so its messages keep their order); confirms pipeline
across the sessions that share a channel.

Servers run as their own process so that they do not share a CPU-bound event
loop with the load generator::

    .venv/bin/python -m bench.ceilings echo --port 8800
    .venv/bin/python -m bench.ceilings minimal --port 8801
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import uuid
from collections.abc import Sequence

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, AbstractQueueIterator
from websockets.asyncio.server import ServerConnection, serve

from bench.loadgen import Opener, Session

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CHANNELS = 16  # as sessionq's default pool
PREFETCH = 16  # deliveries in flight per consumer: never the limit at window <= 16
PUBLISH_TIMEOUT = 10.0
MAX_MESSAGE = 1 << 20


def install_uvloop() -> str:
    """Use uvloop when installed (sessionq's server does); return the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


class ChannelPool:
    """One AMQP connection, ``size`` channels with publisher confirms, round robin."""

    def __init__(self, connection: AbstractConnection, channels: list[AbstractChannel]) -> None:
        self.connection = connection
        self.channels = channels
        self._rr = itertools.count()

    @classmethod
    async def open(
        cls, url: str = DEFAULT_AMQP_URL, size: int = CHANNELS, prefetch: int = PREFETCH
    ) -> ChannelPool:
        connection = await aio_pika.connect(url, timeout=10)
        channels = []
        for _ in range(size):
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=prefetch)
            channels.append(channel)
        return cls(connection, channels)

    def pick(self) -> AbstractChannel:
        return self.channels[next(self._rr) % len(self.channels)]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 10)


async def declare_session_queue(channel: AbstractChannel, kind: str) -> AbstractQueue:
    """A fresh exclusive, auto-delete queue: gone when its consumer or connection is."""
    return await channel.declare_queue(
        f"bench.{kind}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
    )


async def publish(channel: AbstractChannel, queue: str, body: bytes) -> None:
    """Publish one transient message and wait for its confirm (bounded)."""
    await channel.default_exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
        routing_key=queue,
        timeout=PUBLISH_TIMEOUT,
    )


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- (a) bare websockets echo ----------------------------------------------------------
async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def serve_echo(host: str, port: int) -> None:
    """(a) Echo every frame back, until SIGTERM/SIGINT."""
    async with serve(
        _echo, host, port, compression=None, max_size=MAX_MESSAGE, backlog=1024
    ) as server:
        print(f"echo listening on ws://{host}:{port}/", flush=True)
        await _until_signalled()
        server.close()


# -- (c) minimal path: ws -> exclusive queue -> consumer -> ws --------------------------
async def _pump(queue: AbstractQueue, ws: ServerConnection) -> None:
    """The session's consumer: one message at a time, in order, acked after sending."""
    async with queue.iterator() as messages:
        async for message in messages:
            await ws.send(message.body.decode())
            await message.ack()


async def serve_minimal(host: str, port: int, amqp_url: str = DEFAULT_AMQP_URL) -> None:
    """(c) Per connection: a queue and a consumer; each frame published (confirmed),
    consumed and sent back. Until SIGTERM/SIGINT."""
    pool = await ChannelPool.open(amqp_url)

    async def session(ws: ServerConnection) -> None:
        channel = pool.pick()
        queue = await declare_session_queue(channel, "minimal")
        consumer = asyncio.create_task(_pump(queue, ws))
        try:
            async for frame in ws:
                body = frame.encode() if isinstance(frame, str) else frame
                await publish(channel, queue.name, body)
        finally:
            # Cancelling the consumer cancels basic.consume: the queue auto-deletes.
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    try:
        async with serve(
            session, host, port, compression=None, max_size=MAX_MESSAGE, backlog=1024
        ) as server:
            print(
                f"minimal listening on ws://{host}:{port}/ (amqp {len(pool.channels)} channels)",
                flush=True,
            )
            await _until_signalled()
            server.close()
    finally:
        await pool.close()


# -- (b) bare aio-pika round trip, client only --------------------------------------------
class AmqpSession:
    """One exclusive auto-delete queue and its consumer; each message published
    with a confirm, then read back from the queue and acked."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue
        self.messages: AbstractQueueIterator = queue.iterator()

    @classmethod
    async def open(cls, pool: ChannelPool) -> AmqpSession:
        channel = pool.pick()
        session = cls(channel, await declare_session_queue(channel, "amqp"))
        await session.messages.consume()
        return session

    async def send(self, k: int) -> None:
        await publish(self.channel, self.queue.name, b'{"i":%d}' % k)

    async def recv(self) -> Sequence[int]:
        message = await self.messages.__anext__()
        await message.ack()
        return (orjson.loads(message.body)["i"],)

    async def close(self) -> None:
        await asyncio.wait_for(self.messages.close(), 5)


def amqp_opener(pool: ChannelPool) -> Opener:
    async def opener(_i: int) -> Session:
        return await AmqpSession.open(pool)

    return opener


def _main() -> None:
    parser = argparse.ArgumentParser(description="Run a ceiling server (a: echo, c: minimal).")
    parser.add_argument("kind", choices=["echo", "minimal"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    args = parser.parse_args()
    # Handler failures (websockets logs them) must reach the driver's server log.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_uvloop()
    if args.kind == "echo":
        asyncio.run(serve_echo(args.host, args.port))
    else:
        asyncio.run(serve_minimal(args.host, args.port, args.amqp_url))


if __name__ == "__main__":
    _main()
