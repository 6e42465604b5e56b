"""What the consumer depends on, as small interfaces: its session, the store's
result writes, and the broker's subscription to the session's queue. The
server implements them (server.session, server.store, server.broker_channel);
nothing here imports the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from consumers.consumer import SessionConsumer


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


class Delivery(Protocol):
    """One broker message: its body (see server.broker_message) and the tag
    that acks it."""

    @property
    def body(self) -> bytes: ...

    @property
    def delivery_tag(self) -> int | None: ...


class Subscription(Protocol):
    """The consumer's subscription to its session's queue (implemented by
    server.broker_channel.Subscription, which explains the ordering)."""

    @property
    def closed(self) -> bool:
        """The channel is gone, and every unacked delivery with it."""

    def ack(self, tag: int) -> Awaitable[None]:
        """Ack a delivery; raises (awaited) once the channel is closed."""

    def reject(self, tag: int) -> Awaitable[None]:
        """Drop a delivery without requeueing it; raises (awaited) once the
        channel is closed."""

    async def cancel(self) -> None:
        """End the deliveries (bounded; never raises). Every delivery before
        it has been handed to the callback when it returns."""


class Subscriber(Protocol):
    """Where the consumer subscribes: a broker channel (server.broker_channel)."""

    async def subscribe(self, queue: str, on_delivery: Callable[[Delivery], None]) -> Subscription:
        """Hand each delivery of ``queue`` to ``on_delivery``, in order; the
        callback must not await."""
