"""The outbox on a real WebSocket connection: resume replays and held live frames."""

from __future__ import annotations

import asyncio

import websockets
from conftest import UNIT
from websockets.asyncio.server import ServerConnection, serve

from server.outbox import Outbox

LIMIT = 1 << 20
FRAME = b"x" * (64 << 10)


async def test_a_replay_is_not_stalled_by_the_live_frames_it_holds_back() -> None:
    """While a resume replays stored finals, live frames are held back; when
    they add up to more than half the outbox's limit, the replay (paced to the
    reader) must still go on: the held frames can only leave after it."""
    done = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        outbox = Outbox(ws, limit_bytes=LIMIT, slow_timeout=UNIT)
        outbox.hold()
        for _ in range(10):  # 640 KiB of live frames held: over half the limit
            outbox.push(b"live" + FRAME)
        for _ in range(40):  # 2.5 MiB of replay, more than the limit
            await outbox.push_replayed(b"replay" + FRAME)
        outbox.release(lambda frame: True)
        await outbox.flush(UNIT)
        done.set_result(outbox.closed)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as client:
            kinds = []
            async with asyncio.timeout(4 * UNIT):
                while len(kinds) < 50:
                    frame = await client.recv(decode=False)
                    kinds.append("live" if frame.startswith(b"live") else "replay")
            assert kinds == ["replay"] * 40 + ["live"] * 10  # replay first, nothing lost
            assert await asyncio.wait_for(done, UNIT) is False  # not closed as a slow reader
