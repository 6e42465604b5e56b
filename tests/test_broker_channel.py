"""The broker boundary the consumer relies on (server.broker_channel), on a
real RabbitMQ: deliveries in order, acks that let the prefetch move on,
rejects that drop, and a cancel that lets the session's queue go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import BROKER_URL, UNIT, unique_name

from server.broker import Broker, BrokerError, Channel, Delivery
from server.broker_message import decode_batch, encode_batch


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = Broker(BROKER_URL, channels=1, prefetch=4, publish_timeout=UNIT)
    await broker.start(wait=UNIT)
    yield broker
    await broker.stop()


class Inbox:
    """A delivery callback that never awaits, and a way to wait for it."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.arrived.set()

    async def wait_for(self, count: int) -> list[Delivery]:
        async with asyncio.timeout(UNIT):
            while len(self.deliveries) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.deliveries

    def seqs(self) -> list[int]:
        return [decode_batch(d.body)[0][0] for d in self.deliveries]


async def open_queue(broker: Broker) -> tuple[Channel, str]:
    channel = broker.pick_channel()
    name = unique_name("sessionq.test.")
    await broker.declare_session_queue(channel, name, max_length=100)
    return channel, name


def message(seq: int) -> bytes:
    return encode_batch([(seq, f"r{seq}", "echo", "{}")])


async def test_deliveries_come_in_order_and_each_ack_lets_the_next_in(broker: Broker) -> None:
    channel, queue = await open_queue(broker)
    for seq in range(1, 21):
        await broker.publish(channel, queue, message(seq))
    inbox = Inbox()
    subscription = await channel.subscribe(queue, inbox)
    # The prefetch (4) only pipelines: the rest come as the first are acked.
    acked = 0
    while acked < 20:
        for delivery in (await inbox.wait_for(acked + 1))[acked:]:
            assert delivery.delivery_tag is not None
            await subscription.ack(delivery.delivery_tag)
            acked += 1
    assert inbox.seqs() == list(range(1, 21))
    assert not subscription.closed
    await subscription.cancel()


async def test_a_rejected_delivery_is_dropped_not_delivered_again(broker: Broker) -> None:
    channel, queue = await open_queue(broker)
    for seq in (1, 2, 3):
        await broker.publish(channel, queue, message(seq))
    inbox = Inbox()
    subscription = await channel.subscribe(queue, inbox)
    for delivery in await inbox.wait_for(3):
        assert delivery.delivery_tag is not None
        await subscription.reject(delivery.delivery_tag)
    # Requeued, they would come back ahead of the next message.
    await broker.publish(channel, queue, message(4))
    await inbox.wait_for(4)
    assert inbox.seqs() == [1, 2, 3, 4]
    await subscription.cancel()


async def test_cancel_ends_deliveries_and_lets_the_queue_go(broker: Broker) -> None:
    channel, queue = await open_queue(broker)
    await broker.publish(channel, queue, message(1))
    inbox = Inbox()
    subscription = await channel.subscribe(queue, inbox)
    (delivery,) = await inbox.wait_for(1)
    assert delivery.delivery_tag is not None
    await subscription.ack(delivery.delivery_tag)
    await subscription.cancel()
    await subscription.cancel()  # a second cancel is harmless
    # Its last consumer gone, the auto-delete queue is gone: a publish to it
    # is refused, so a session never publishes into a queue nobody reads.
    with pytest.raises(BrokerError, match="is gone"):
        await broker.publish(channel, queue, message(2))
    assert inbox.seqs() == [1]
