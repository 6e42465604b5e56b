"""The outbox on a real WebSocket connection: resume replays and held live frames."""

from __future__ import annotations

import asyncio
import base64
import os

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


async def test_a_paced_replay_ends_when_its_client_goes_away() -> None:
    """A replay waiting for a client that does not read gives up once the
    connection is gone, instead of holding its handler for good."""
    stalled = asyncio.Event()
    outcome = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        outbox = Outbox(ws, limit_bytes=LIMIT, slow_timeout=60.0)

        async def replay() -> bool:
            for _ in range(2000):  # 125 MiB: far more than the socket buffers take
                if not await outbox.push_replayed(FRAME):
                    return False
            return True

        task = asyncio.create_task(replay())
        # It cannot finish (the client does not read); give it time to fill
        # the socket buffers and wait for room.
        finished, _ = await asyncio.wait({task}, timeout=0.5)
        assert not finished
        stalled.set()
        outcome.set_result(await asyncio.wait_for(task, 2 * UNIT))

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        # A raw client: the WebSocket handshake, then it never reads again.
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        writer.transport.pause_reading()
        await stalled.wait()
        writer.transport.abort()  # gone without a close
        assert await asyncio.wait_for(outcome, 3 * UNIT) is False  # gave up, not finished
