"""Fixtures: a real server on port 0, real RabbitMQ, a real SQLite file.

``server`` starts :class:`server.app.Server` in the test's event loop; ``client``
opens real WebSocket connections to it. Timeouts are multiples of ``UNIT``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from server import logs
from server.app import Server
from server.settings import Settings

# tests/ is on sys.path, as for "from conftest import"; store_servers: store_url, PostgreSQL
pytest_plugins = ["mongo_server", "store_servers"]

# The server objects run in the test's process: show warnings and worse only.
logs.configure("text", os.environ.get("SESSIONQ_TEST_LOG_LEVEL", "WARNING"))

UNIT = float(os.environ.get("SESSIONQ_TEST_UNIT", "5"))
BROKER_URL = os.environ.get("SESSIONQ_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
PASSWORD = "correct horse battery"
_names = itertools.count(1)


def unique_name(prefix: str = "user") -> str:
    return f"{prefix}{os.getpid()}x{next(_names)}"


def broker_address(url: str = BROKER_URL) -> tuple[str, int]:
    """The host and port the tests' broker URL names (AMQP's default ports)."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (5671 if parts.scheme == "amqps" else 5672)


@pytest.fixture(scope="session", autouse=True)
def _broker_answers() -> None:
    """Stop the run before the first test that needs RabbitMQ when none answers
    at ``SESSIONQ_TEST_BROKER_URL``. The pure tier, tests/unit, overrides this
    fixture with one that checks nothing: it runs with no network at all."""
    host, port = broker_address()
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        pytest.exit(
            f"RabbitMQ does not answer on {host}:{port} (SESSIONQ_TEST_BROKER_URL): "
            "run the tests with scripts/sessionq test, which installs and starts it; "
            "only the unit tier (pytest tests/unit) runs without it",
            returncode=3,
        )


class Client:
    """A test client speaking PROTOCOL.md over a real socket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send(orjson.dumps(frame).decode())
        else:
            await self.ws.send(frame)

    async def recv(self, timeout: float = UNIT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = orjson.loads(raw)
        return frame

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = UNIT
    ) -> list[dict[str, Any]]:
        """Frames received up to and including the first that matches."""
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                frames.append(frame)
                if predicate(frame):
                    return frames

    async def finals(self, count: int, timeout: float = UNIT) -> list[dict[str, Any]]:
        """Collect frames until ``count`` final frames (result/error with seq)."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while sum(1 for f in frames if _is_final(f)) < count:
                frames.append(await self.recv(timeout))
        return frames

    async def submit(self, rid: str, op: str, args: dict[str, Any] | None = None) -> None:
        await self.send({"type": "submit", "id": rid, "op": op, "args": args or {}})

    async def closed(self, timeout: float = UNIT) -> tuple[int | None, str]:
        """Wait for the server to close; return (code, reason)."""
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.ws:
                    pass
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code, self.ws.close_reason or ""

    async def close(self) -> None:
        await self.ws.close()


async def until(condition: Callable[[], bool], timeout: float = UNIT, every: float = 0.01) -> None:
    """Wait for a condition that nothing announces (another process's pipe or
    store row, a stopped process's state): check it every ``every`` seconds,
    TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(every)


def _is_final(frame: dict[str, Any]) -> bool:
    return frame.get("type") in ("result", "error") and "seq" in frame


def finals_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if _is_final(f)]


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def server_factory(store_url: str) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    async def make(**overrides: Any) -> Server:
        values: dict[str, Any] = dict(
            port=0,
            broker_url=BROKER_URL,
            store_url=store_url,  # SESSIONQ_TEST_STORE's (tests/store_servers.py)
            jwt_secret="x" * 40,
            bcrypt_rounds=4,
            log_format="text",
            log_level="WARNING",
        )
        values.update(overrides)
        server = Server(Settings.from_env(environ={}, **values))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(server_factory: ServerFactory) -> Server:
    return await server_factory()


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[ClientFactory]:
    """Open a raw connection to ``server`` (no auth)."""
    clients: list[Client] = []

    async def make(path: str = "/ws", target: Server | None = None, **kwargs: Any) -> Client:
        port = (target or server).port
        ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", **kwargs)
        client = Client(ws)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def user_client(connect: ClientFactory) -> ClientFactory:
    """Open a connection and register a fresh user on it."""

    async def make(username: str | None = None, target: Server | None = None) -> Client:
        client = await connect(target=target)
        name = username or unique_name()
        await client.send({"type": "register", "username": name, "password": PASSWORD})
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        client.welcome = welcome
        return client

    return make


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def unread_input(pid: int) -> int:
    """Bytes written to process ``pid``'s stdin pipe that it has not read."""
    import fcntl
    import struct
    import termios

    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])
    finally:
        os.close(fd)


def process_state(pid: int) -> str:
    """A process's state letter from /proc (R running, S sleeping, T stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
