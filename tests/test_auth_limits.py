"""Bounded auth work and bounded CPU ops, on a real server (real RabbitMQ, SQLite).

Auth: usernames that cannot exist are refused before any limiter or store
work; limiter memory stays bounded and expires on the clock; registrations are
limited per client address; bcrypt runs under its own bounds so that a flood
of registrations does not hold logins up. CPU ops: a cancelled or timed-out
``hash`` stops its work, and one user's CPU ops hold at most
``SESSIONQ_CPU_SLOTS_PER_USER`` pool workers.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import PASSWORD, UNIT, Client, ClientFactory, ServerFactory, unique_name
from prometheus_client import REGISTRY

from server.app import Server
from server.auth import Authenticator, AuthError, FailureLimiter


def auth_count(method: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("sessionq_auth_total", {"method": method, "outcome": outcome})
    return value or 0.0


async def register(connect: ClientFactory, server: Server, name: str | None = None) -> Client:
    client = await connect(target=server)
    await client.send({"type": "register", "username": name or unique_name(), "password": PASSWORD})
    return client


# --- usernames that cannot exist ---------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "has space", "naïve", "line\nbreak", "<script>alert(1)</script>" * 40_000],
)
async def test_a_login_with_an_invalid_username_is_refused_without_limiter_work(
    server_factory: ServerFactory, connect: ClientFactory, name: str
) -> None:
    server = await server_factory(auth_tries=100)
    client = await connect(target=server)
    # More than the per-address failure limit (20): none of these is counted.
    for _ in range(25):
        await client.send({"type": "login", "username": name, "password": PASSWORD})
        reply = await client.recv()
        assert (reply["type"], reply["code"]) == ("error", "invalid_credentials"), reply
        if name:
            assert name not in reply["message"]
    assert len(server.auth.by_user) == 0
    assert len(server.auth.by_addr) == 0


# --- limiter memory ------------------------------------------------------------


async def test_a_spray_of_unique_names_and_addresses_leaves_the_limiters_bounded(
    server: Server,
) -> None:
    auth = Authenticator(server.store, "y" * 40, 900, bcrypt_rounds=4, limiter_max_keys=50)
    for i in range(300):
        valid_unknown = unique_name("nobody")
        invalid = f"{valid_unknown} {'x' * 1000}"
        for name in (valid_unknown, invalid):
            with pytest.raises(AuthError) as caught:
                await auth.login(name, PASSWORD, f"10.{i // 256}.{i % 256}.{len(name) % 7}")
            assert caught.value.code == "invalid_credentials"
    assert len(auth.by_user) == 50
    assert len(auth.by_addr) == 50


def test_limiter_entries_expire_on_the_clock_without_their_key_coming_back() -> None:
    limiter = FailureLimiter(limit=3, window=60.0, max_keys=1000)
    for i in range(500):
        limiter.record(f"sprayed{i}", now=float(i % 10))
    assert len(limiter) == 500
    # Another key's failure a window later: every sprayed key is forgotten.
    limiter.record("later", now=200.0)
    assert len(limiter) == 1
    assert limiter.retry_after("sprayed1", now=200.0) == 0.0


def test_a_limiter_key_keeps_at_most_limit_timestamps_and_still_refuses() -> None:
    limiter = FailureLimiter(limit=3, window=60.0)
    for t in range(1000):
        limiter.record("alice", now=t / 100)
    assert limiter.retry_after("alice", now=10.0) > 0
    assert len(limiter._events["alice"]) == 3
    assert limiter.retry_after("alice", now=80.0) == 0.0


# --- registrations per client address -------------------------------------------


async def test_registrations_are_limited_per_address_with_retry_after(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    server = await server_factory(register_per_minute=3)
    before = auth_count("register", "rate_limited")
    for _ in range(3):
        client = await register(connect, server)
        assert (await client.recv())["type"] == "welcome"
    refused = await register(connect, server)
    reply = await refused.recv()
    assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply
    assert 0 < reply["retry_after"] <= 60
    assert auth_count("register", "rate_limited") == before + 1
    # Logins are not held back by the registration limit.
    login = await connect(target=server)
    await login.send({"type": "login", "username": unique_name("nobody"), "password": PASSWORD})
    assert (await login.recv())["code"] == "invalid_credentials"


async def test_register_per_minute_zero_is_unlimited(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    server = await server_factory(register_per_minute=0)
    clients = [await register(connect, server) for _ in range(25)]
    for client in clients:
        assert (await client.recv())["type"] == "welcome"


async def test_a_login_answers_while_registrations_flood(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    server = await server_factory(bcrypt_rounds=10, register_per_minute=0)
    name = unique_name()
    first = await register(connect, server, name)
    assert (await first.recv(timeout=4 * UNIT))["type"] == "welcome"

    flood = [await connect(target=server) for _ in range(30)]
    for client in flood:
        await client.send(
            {"type": "register", "username": unique_name("flood"), "password": PASSWORD}
        )
    replies = [asyncio.create_task(client.recv(timeout=12 * UNIT)) for client in flood]
    # The flood is under way: its first hash is done, the rest are waiting.
    await asyncio.wait(replies, return_when=asyncio.FIRST_COMPLETED)

    login = await connect(target=server)
    await login.send({"type": "login", "username": name, "password": PASSWORD})
    welcome = await login.recv(timeout=4 * UNIT)
    answered = sum(task.done() for task in replies)
    assert welcome["type"] == "welcome"
    # The login did not wait behind the flood's hashes.
    assert answered < len(flood) // 2, answered
    assert all(f["type"] == "welcome" for f in await asyncio.gather(*replies))
