"""One keepalive task for every connection of the process.

websockets' own keepalive runs a task per connection; one task that pings them
all each period keeps idle sessions cheap (the server is started with
``ping_interval=None``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Set
from typing import cast

from websockets.asyncio.server import ServerConnection


async def keepalive(sockets: Set[ServerConnection], interval: float) -> None:
    """Ping every connection in ``sockets`` each ``interval`` seconds; one whose
    previous ping got no pong by then is dead (e.g. a vanished peer) and is
    closed with 1011, as websockets' own keepalive would."""
    pending: dict[ServerConnection, asyncio.Future[float]] = {}
    while True:
        await asyncio.sleep(interval)
        for ws in list(sockets):
            waiter = pending.pop(ws, None)
            if waiter is not None and not waiter.done():
                ws.protocol.fail(1011, "keepalive ping timeout")
                ws.send_data()
                ws.transport.close()
                continue
            try:
                pending[ws] = cast("asyncio.Future[float]", await ws.ping())
            except Exception:  # closing already: nothing to keep alive
                continue
        for ws in [w for w in pending if w not in sockets]:
            del pending[ws]
