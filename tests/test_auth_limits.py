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
import hashlib
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor

import pytest
from conftest import (
    PASSWORD,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    finals_of,
    unique_name,
    until,
)
from prometheus_client import REGISTRY

from consumers.builtin import DIRECT_ROUNDS, pbkdf2_hex
from consumers.cpu import slots_for
from server.app import Server
from server.auth import HASH_CONCURRENCY, Authenticator, AuthError, FailureLimiter
from server.lifetime import end_with_parent
from server.settings import Settings, SettingsError


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


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


async def test_parallel_wrong_passwords_do_not_slip_past_the_failure_limit(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    server = await server_factory(bcrypt_rounds=8, login_failures=5)
    name = unique_name()
    owner = await register(connect, server, name)
    assert (await owner.recv())["type"] == "welcome"
    guesses = [await connect(target=server) for _ in range(20)]
    for client in guesses:
        await client.send({"type": "login", "username": name, "password": "wrong password"})
    codes = [(await client.recv(timeout=4 * UNIT))["code"] for client in guesses]
    # The limit (5) plus at most the checks already running when it filled.
    assert codes.count("invalid_credentials") <= 5 + HASH_CONCURRENCY - 1, codes
    assert set(codes) == {"invalid_credentials", "rate_limited"}


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


# --- CPU ops ---------------------------------------------------------------------

BIG = 10_000_000  # the protocol's cap: seconds of CPU in one call


async def one_worker_pool(server: Server) -> ProcessPoolExecutor:
    """Give ``server`` a one-worker CPU pool (before any session exists), started,
    so that any CPU work left running in it holds up everything after it."""
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=end_with_parent,
        initargs=(os.getpid(),),
    )
    old = server.cpu_pool
    # Whatever hands the pool to new sessions holds the same object.
    for holder in (server, getattr(server, "directory", None)):
        if holder is not None and getattr(holder, "cpu_pool", None) is old:
            holder.cpu_pool = pool
    if old is not None:
        old.shutdown(wait=False, cancel_futures=True)
    await asyncio.get_running_loop().run_in_executor(pool, pbkdf2_hex, "warm", 1)
    return pool


async def same_user(connect: ClientFactory, server: Server, first: Client) -> Client:
    client = await connect(target=server)
    await client.send({"type": "auth", "token": first.welcome["token"]})
    welcome = await client.recv()
    assert welcome["type"] == "welcome", welcome
    return client


async def wait_running(client: Client, rid: str) -> None:
    """Ask for the request's state until it is running (each ask waits on its reply)."""
    while True:
        await client.send({"type": "status", "id": rid})
        frames = await client.recv_until(lambda f: f["type"] == "status")
        if frames[-1].get("state") == "running":
            return


def expected_hex(data: str, rounds: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", data.encode(), b"sessionq", rounds, 32).hex()


async def test_long_hashes_give_the_standard_pbkdf2(user_client: ClientFactory) -> None:
    client = await user_client()
    cases = [("x", 1), ("x", DIRECT_ROUNDS), ("x", DIRECT_ROUNDS + 1), ("k" * 200, 65_537)]
    for i, (data, rounds) in enumerate(cases):
        await client.submit(f"h{i}", "hash", {"data": data, "rounds": rounds})
    finals = finals_of(await client.finals(len(cases), timeout=4 * UNIT))
    assert [f["value"]["hex"] for f in finals] == [expected_hex(d, r) for d, r in cases]


async def test_a_cancelled_big_hash_frees_its_worker(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    await one_worker_pool(server)
    alice = await user_client()
    sessions = [alice, await same_user(connect, server, alice)]
    for i, client in enumerate(sessions):
        await client.submit(f"big{i}", "hash", {"data": "x", "rounds": BIG})
    for i, client in enumerate(sessions):
        await wait_running(client, f"big{i}")
    for i, client in enumerate(sessions):
        await client.send({"type": "cancel", "id": f"big{i}"})
        final = finals_of(await client.finals(1))[0]
        assert (final["id"], final["code"]) == (f"big{i}", "cancelled"), final

    # Had the cancelled hashes kept running, both would stand before this one.
    bob = await user_client()
    await bob.submit("small", "hash", {"data": "y", "rounds": 1000})
    final = finals_of(await bob.finals(1))[0]
    assert final["value"] == {"hex": expected_hex("y", 1000)}


async def test_a_timed_out_big_hash_frees_its_worker(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(op_timeout=UNIT / 2)
    await one_worker_pool(server)
    alice = await user_client(target=server)
    sessions = [alice, await same_user(connect, server, alice)]
    for i, client in enumerate(sessions):
        await client.submit(f"big{i}", "hash", {"data": "x", "rounds": BIG})
    for client in sessions:
        final = finals_of(await client.finals(1, timeout=2 * UNIT))[0]
        assert final["code"] == "timeout", final

    bob = await user_client(target=server)
    await bob.submit("small", "hash", {"data": "y", "rounds": 1000})
    final = finals_of(await bob.finals(1))[0]
    assert final.get("value") == {"hex": expected_hex("y", 1000)}, final


async def test_one_users_big_hashes_do_not_stop_another_users_hash(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    pool = await one_worker_pool(server)
    waits_before = _sample("sessionq_cpu_slot_waits_total")
    waiting_before = _sample("sessionq_cpu_slot_waiting")
    alice = await user_client()
    sessions = [alice] + [await same_user(connect, server, alice) for _ in range(2)]
    for i, client in enumerate(sessions):
        await client.submit(f"big{i}", "hash", {"data": "x", "rounds": BIG})
    for i, client in enumerate(sessions):
        await wait_running(client, f"big{i}")
    slots = slots_for(pool, server.settings.cpu_slots_per_user)
    await until(lambda: slots.waiting() == 2)
    assert slots.held(alice.welcome["user"]) == 1
    # Exported without a user label: two of alice's ops wait, and waited.
    assert _sample("sessionq_cpu_slot_waiting") == waiting_before + 2
    assert _sample("sessionq_cpu_slot_waits_total") == waits_before + 2

    bob = await user_client()
    await bob.submit("small", "hash", {"data": "y", "rounds": 1000})
    final = finals_of(await bob.finals(1))[0]
    assert final["value"] == {"hex": expected_hex("y", 1000)}
    # ... while all three of alice's are still unfinished.
    for i, client in enumerate(sessions):
        await client.send({"type": "status", "id": f"big{i}"})
        status = (await client.recv_until(lambda f: f["type"] == "status"))[-1]
        assert status["state"] == "running", status
        await client.send({"type": "cancel", "id": f"big{i}"})
        assert finals_of(await client.finals(1))[0]["code"] == "cancelled"
    assert (slots.held(alice.welcome["user"]), slots.waiting()) == (0, 0)


async def test_cpu_slots_per_user_lets_a_user_hold_that_many_workers(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    server = await server_factory(cpu_slots_per_user=2)
    alice = await user_client(target=server)
    sessions = [alice] + [await same_user(connect, server, alice) for _ in range(2)]
    for i, client in enumerate(sessions):
        await client.submit(f"big{i}", "hash", {"data": "x", "rounds": BIG})
    for i, client in enumerate(sessions):
        await wait_running(client, f"big{i}")
    assert server.cpu_pool is not None
    slots = slots_for(server.cpu_pool, 2)
    await until(lambda: slots.waiting() == 1)
    assert slots.held(alice.welcome["user"]) == 2
    for i, client in enumerate(sessions):
        await client.send({"type": "cancel", "id": f"big{i}"})
        assert finals_of(await client.finals(1))[0]["code"] == "cancelled"


@pytest.mark.parametrize(
    ("env", "why"),
    [
        (
            {"SESSIONQ_REGISTER_PER_MINUTE": "-1"},
            "SESSIONQ_REGISTER_PER_MINUTE: must not be negative",
        ),
        ({"SESSIONQ_REGISTER_PER_MINUTE": "ten"}, "SESSIONQ_REGISTER_PER_MINUTE='ten'"),
        ({"SESSIONQ_CPU_SLOTS_PER_USER": "0"}, "SESSIONQ_CPU_SLOTS_PER_USER: must be at least 1"),
    ],
)
def test_the_limit_settings_are_checked(env: dict[str, str], why: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(why)):
        Settings.from_env(env)
    defaults = Settings.from_env({})
    assert (defaults.register_per_minute, defaults.cpu_slots_per_user) == (20, 1)
    assert Settings.from_env({"SESSIONQ_REGISTER_PER_MINUTE": "0"}).register_per_minute == 0
