"""Limits: token expiry, slow readers, submit rate (bad settings: tests/unit/test_settings.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import sys
import time

import pytest
import websockets
from conftest import PASSWORD, UNIT, ClientFactory, ServerFactory, finals_of, unique_name


async def test_token_expiry_closes_with_4401_after_token_expired(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(token_ttl=1)
    # Tokens count whole seconds: register at the start of one, so the token
    # lives about a second (not a few ms) and the submit lands before expiry.
    await asyncio.sleep(math.ceil(time.time()) - time.time())
    client = await user_client(target=server)
    session = client.welcome["session"]
    drained = asyncio.get_running_loop().create_future()
    server.sessions[session].on_closed = drained.set_result
    await client.submit("q", "sleep", {"seconds": 0.2})
    frames = await client.recv_until(lambda f: f.get("code") == "token_expired", timeout=3 * UNIT)
    assert (await client.closed())[0] == 4401
    assert "seq" not in frames[-1]
    # Queued work still drained: its result is there for resume.
    await asyncio.wait_for(drained, UNIT)
    assert [seq for seq, _ in await server.store.finals_after(session, 0)] == [1]


async def test_fresh_auth_frame_keeps_the_connection(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(token_ttl=2, token_notice=0)  # no token_expiring frames
    client = await user_client(target=server)
    first_expiry = client.welcome["expires_at"]
    fresh = client.welcome
    while fresh["expires_at"] <= first_expiry:  # until a token from a later second
        other = await connect(target=server)
        await other.send(
            {"type": "login", "username": client.welcome["user"], "password": PASSWORD}
        )
        fresh = await other.recv()
        await other.close()
    await client.send({"type": "auth", "token": fresh["token"]})
    renewed = await client.recv()
    assert renewed["type"] == "welcome"
    assert renewed["session"] == client.welcome["session"]
    assert renewed["expires_at"] == fresh["expires_at"]
    await client.recv_until(lambda f: f.get("code") == "token_expired", timeout=4 * UNIT)
    assert time.time() >= fresh["expires_at"] - 0.05  # not at the first expiry


async def test_a_client_that_does_not_read_is_closed_with_4503_and_loses_nothing(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(slow_client_timeout=0.3)
    reader = await user_client(target=server)
    session, token = reader.welcome["session"], reader.welcome["token"]
    # A client that stops reading: its library buffers one frame, its kernel
    # a small receive window, so the server's socket fills up.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    slow = await connect(target=server, path=f"/ws?token={token}", max_queue=1, sock=sock)
    await slow.recv()
    await slow.send({"type": "resume", "session": session, "after": 0})
    await slow.recv_until(lambda f: f["type"] == "resumed")
    outbox = server.sessions[session].outbox
    assert outbox is not None and outbox.on_slow is not None
    gave_up = asyncio.get_running_loop().create_future()
    close = outbox.on_slow

    def note_and_close() -> None:
        gave_up.set_result(True)
        close()

    outbox.on_slow = note_and_close
    blob = "x" * 300_000
    for i in range(60):
        await slow.submit(f"b{i}", "echo", {"blob": blob, "i": i})
    # Not reading: the server gives up on this socket while the other sessions
    # and the broker acks go on.
    await asyncio.wait_for(gave_up, 4 * UNIT)
    code, _ = await slow.closed(timeout=6 * UNIT)  # reads the backlog, then the close
    assert code == 4503
    # Everything was stored: resume from a client that reads gets all 60. It
    # reads 18 MB, some of it live while the session still runs: on a loaded
    # machine a reader can fall further behind than this server's 0.3 s, or
    # its 8 MiB backlog, allow. New connections get room for all of it.
    server.settings = dataclasses.replace(
        server.settings, slow_client_timeout=10.0, max_message_bytes=8 << 20
    )
    again = await connect(target=server, path=f"/ws?token={token}")
    await again.recv()
    await again.send({"type": "resume", "session": session, "after": 0})
    frames = await again.recv_until(lambda f: f["type"] == "resumed")
    finals = finals_of(await again.finals(60, timeout=6 * UNIT))
    assert frames[-1]["last_seq"] == 60
    assert [f["value"]["i"] for f in finals] == list(range(60))


async def test_submit_rate_limit_per_session(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(max_submits_per_second=5)
    client = await user_client(target=server)
    for i in range(8):
        await client.submit(f"r{i}", "echo", {})
    frames = await client.finals(5)
    limited = [f for f in frames if f.get("code") == "rate_limited"]
    assert len(limited) == 3 and all("seq" not in f for f in limited)
    assert [f["seq"] for f in finals_of(frames)] == [1, 2, 3, 4, 5]


async def test_user_add_then_login(server_factory: ServerFactory, connect: ClientFactory) -> None:
    server = await server_factory()
    name = unique_name("cli")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "user", "add", name, "--password-stdin",
        "--store-url", server.settings.store_url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(PASSWORD.encode() + b"\n"), 3 * UNIT)
    assert proc.returncode == 0, out
    client = await connect(target=server)
    await client.send({"type": "login", "username": name, "password": PASSWORD})
    assert (await client.recv())["type"] == "welcome"
    again = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "user", "add", name.upper(), "--password-stdin",
        "--store-url", server.settings.store_url,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(again.communicate(PASSWORD.encode() + b"\n"), 3 * UNIT)
    assert again.returncode == 1 and b"exists" in err


async def test_registration_can_be_closed(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    server = await server_factory(open_registration=False)
    client = await connect(target=server)
    await client.send({"type": "register", "username": unique_name(), "password": PASSWORD})
    reply = await client.recv()
    assert (reply["type"], reply["code"]) == ("error", "unauthorized")
    with pytest.raises(websockets.ConnectionClosed):
        for _ in range(10):
            await client.send({"type": "register", "username": unique_name(), "password": PASSWORD})
            await client.recv()


async def test_a_peer_that_stops_answering_pings_is_closed(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """One keepalive for all connections: a peer that vanished (never answers a
    ping) is closed with 1011 after two keepalive periods; others stay."""
    server = await server_factory(keepalive=0.2)
    alive = await user_client(target=server)  # its library answers pings
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    assert len(server.open_sockets) == 2
    # Never answer: the server pings, waits a period, then gives up.
    async with asyncio.timeout(UNIT):
        while await reader.read(4096):
            pass
    writer.close()
    assert len(server.open_sockets) == 1
    await alive.send({"type": "status"})
    assert (await alive.recv())["type"] == "status"
