"""Identity end to end (PROTOCOL.md, "Tokens" and "Client addresses"): the
token lifecycle (refresh, token_expiring, logout, iss/aud), revocation by the
admin CLI and across processes, trusted proxies, and secrets kept out of logs.

Real servers on port 0, the real broker and store; the admin commands run as
the ``sessionq user`` subprocess an operator would run.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from conftest import (
    BROKER_URL,
    PASSWORD,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    finals_of,
    unique_name,
)
from loguru import logger
from store_servers import EVERY_STORE, every_store_url
from test_faults import ServerProcess, spawn_server

from server import logs
from server.app import Server

ROOT = Path(__file__).parent.parent
REVOKED_WITHIN = 5.0  # PROTOCOL.md: live connections close within 5 seconds


async def admin(server: Server, *args: str, stdin: str = "") -> tuple[int, str]:
    """Run ``sessionq user ARGS`` against ``server``'s store and the broker."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "user", *args,
        "--store-url", server.settings.store_url, "--broker-url", BROKER_URL,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "SESSIONQ_BCRYPT_ROUNDS": "4"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 6 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def auth_with(connect: ClientFactory, token: str, target: Server | None = None) -> Client:
    client = await connect(target=target)
    await client.send({"type": "auth", "token": token})
    return client


async def login(connect: ClientFactory, name: str, password: str = PASSWORD) -> dict[str, Any]:
    client = await connect()
    await client.send({"type": "login", "username": name, "password": password})
    return await client.recv()


# -- 1. the token lifecycle ------------------------------------------------------------
async def test_refresh_returns_a_new_token_the_connection_runs_on(
    connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    old = client.welcome
    await client.send({"type": "refresh"})
    frame = await client.recv()
    assert frame["type"] == "token" and set(frame) == {"type", "token", "expires_at"}
    old_claims = jwt.decode(old["token"], options={"verify_signature": False})
    claims = jwt.decode(frame["token"], options={"verify_signature": False})
    assert claims["jti"] != old_claims["jti"]
    assert frame["expires_at"] == claims["exp"] > old_claims["exp"]
    # The new token works on its own...
    other = await auth_with(connect, frame["token"])
    assert (await other.recv())["type"] == "welcome"
    # ...and the connection now runs on it: its logout revokes the new token,
    # not the one it authenticated with.
    await client.submit("r1", "echo", {"x": 1})
    assert finals_of(await client.finals(1))[0]["value"] == {"x": 1}
    await client.send({"type": "logout"})
    assert (await client.closed())[0] == 1000
    assert (await other.closed(REVOKED_WITHIN))[0] == 4401
    again = await auth_with(connect, frame["token"])
    assert (await again.recv())["code"] == "invalid_token"
    first = await auth_with(connect, old["token"])
    assert (await first.recv())["type"] == "welcome"


async def test_refresh_needs_authentication(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "refresh"})
    assert (await client.recv())["code"] == "unauthorized"


async def test_token_expiring_arrives_once_before_expiry(
    server_factory: ServerFactory, connect: ClientFactory, user_client: ClientFactory
) -> None:
    short = await server_factory(token_ttl=3, token_notice=2)
    client = await user_client(target=short)
    expires_at = client.welcome["expires_at"]
    frames = await client.recv_until(lambda f: f["type"] == "token_expiring", 2 * UNIT)
    assert frames[-1] == {"type": "token_expiring", "expires_at": expires_at}
    # Then nothing but the expiry itself: no second notice.
    rest = await client.recv_until(lambda f: f.get("code") == "token_expired", 2 * UNIT)
    assert [f["type"] for f in rest] == ["error"]
    assert (await client.closed())[0] == 4401


async def test_a_refreshed_token_gets_its_own_notice(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    short = await server_factory(token_ttl=3, token_notice=2)
    client = await user_client(target=short)
    await client.recv_until(lambda f: f["type"] == "token_expiring", 2 * UNIT)
    await client.send({"type": "refresh"})
    token = (await client.recv_until(lambda f: f["type"] == "token"))[-1]
    notice = await client.recv_until(lambda f: f["type"] == "token_expiring", 2 * UNIT)
    assert notice[-1]["expires_at"] == token["expires_at"]


async def test_logout_closes_1000_and_the_token_is_revoked_everywhere(
    connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    token = client.welcome["token"]
    twin = await connect(additional_headers={"Authorization": f"Bearer {token}"})
    assert (await twin.recv())["type"] == "welcome"
    await client.send({"type": "logout"})
    assert (await client.closed())[0] == 1000
    code, reason = await twin.closed(REVOKED_WITHIN)
    assert code == 4401 and "revoked" in reason
    later = await auth_with(connect, token)
    assert (await later.recv())["code"] == "invalid_token"
    # Another token of the same user is untouched.
    assert (await login(connect, client.welcome["user"]))["type"] == "welcome"


async def test_iss_and_aud_are_issued_and_required(
    server: Server, server_factory: ServerFactory, connect: ClientFactory,
    user_client: ClientFactory,
) -> None:  # fmt: skip
    client = await user_client()
    claims = jwt.decode(client.welcome["token"], options={"verify_signature": False})
    assert claims["iss"] == "sessionq" and claims["aud"] == "sessionq"
    secret = server.settings.jwt_secret
    base = {k: v for k, v in claims.items() if k not in ("iss", "aud")}
    for extra in ({}, {"iss": "sessionq"}, {"aud": "sessionq"},
                  {"iss": "other", "aud": "sessionq"}, {"iss": "sessionq", "aud": "other"}):  # fmt: skip
        token = jwt.encode({**base, **extra}, secret, "HS256")
        probe = await auth_with(connect, token)
        assert (await probe.recv())["code"] == "invalid_token", extra
    good = await auth_with(connect, jwt.encode(claims, secret, "HS256"))
    assert (await good.recv())["type"] == "welcome"
    # A server with another issuer and audience refuses this server's tokens.
    other = await server_factory(
        store_url=server.settings.store_url, jwt_issuer="billing", jwt_audience="billing"
    )
    elsewhere = await auth_with(connect, client.welcome["token"], target=other)
    assert (await elsewhere.recv())["code"] == "invalid_token"


# -- 2. revocation by the operator ------------------------------------------------------
async def test_disable_closes_live_connections_and_blocks_login(
    server: Server, connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    name, token = client.welcome["user"], client.welcome["token"]
    code, out = await admin(server, "disable", name)
    assert code == 0, out
    closed, reason = await client.closed(REVOKED_WITHIN)
    assert closed == 4401 and "revoked" in reason
    assert (await login(connect, name))["code"] == "invalid_credentials"
    assert (await (await auth_with(connect, token)).recv())["code"] == "invalid_token"
    code, out = await admin(server, "enable", name)
    assert code == 0, out
    assert (await login(connect, name))["type"] == "welcome"
    # Enabling brings no revoked token back.
    assert (await (await auth_with(connect, token)).recv())["code"] == "invalid_token"


async def test_passwd_revokes_old_tokens(
    server: Server, connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    name, token = client.welcome["user"], client.welcome["token"]
    new_password = "a brand new passphrase"
    code, out = await admin(server, "passwd", name, "--password-stdin", stdin=new_password + "\n")
    assert code == 0, out
    assert new_password not in out
    assert (await client.closed(REVOKED_WITHIN))[0] == 4401
    assert (await (await auth_with(connect, token)).recv())["code"] == "invalid_token"
    assert (await login(connect, name))["code"] == "invalid_credentials"
    assert (await login(connect, name, new_password))["type"] == "welcome"


async def test_admin_commands_refuse_unknown_users_and_weak_passwords(server: Server) -> None:
    code, out = await admin(server, "disable", unique_name("ghost"))
    assert code == 1 and "no user" in out
    name = unique_name()
    code, out = await admin(server, "passwd", name, stdin="short\n")
    assert code == 2 and "at least 8" in out


async def test_delete_then_register_again_inherits_nothing(
    server: Server, connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    name, old = client.welcome["user"], client.welcome
    await client.submit("p", "kv.put", {"key": "k", "value": "secret data"})
    await client.submit("e", "echo", {"n": 1})
    assert len(finals_of(await client.finals(2))) == 2
    code, out = await admin(server, "delete", name)
    assert code == 0, out
    assert (await client.closed(REVOKED_WITHIN))[0] == 4401
    assert (await login(connect, name))["code"] == "invalid_credentials"
    fresh = await user_client(name)
    assert fresh.welcome["user"] == name
    # The old token does not become the new user's.
    assert (await (await auth_with(connect, old["token"])).recv())["code"] == "invalid_token"
    await fresh.send({"type": "resume", "session": old["session"], "after": 0})
    assert (await fresh.recv())["code"] == "not_found"
    await fresh.submit("g", "kv.get", {"key": "k"})
    got = finals_of(await fresh.finals(1))[0]
    assert got["value"]["found"] is False


async def test_disable_without_a_broker_still_revokes_and_says_so(
    server: Server, connect: ClientFactory, user_client: ClientFactory
) -> None:
    client = await user_client()
    name, token = client.welcome["user"], client.welcome["token"]
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "user", "disable", name,
        "--store-url", server.settings.store_url,
        "--broker-url", f"amqp://guest:secret-pw@127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 6 * UNIT)
    assert proc.returncode == 1
    assert b"could not be told" in out and b"secret-pw" not in out, out
    # The store change stands: the token is refused at its next check.
    await client.send({"type": "refresh"})
    assert (await client.recv())["code"] == "invalid_token"
    assert (await login(connect, name))["code"] == "invalid_credentials"
    assert (await (await auth_with(connect, token)).recv())["code"] == "invalid_token"


# -- 2b. across processes ---------------------------------------------------------------
@pytest.fixture(params=EVERY_STORE)
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return every_store_url(request, tmp_path)


@pytest.fixture
async def two_processes(shared_store: str) -> AsyncIterator[list[int]]:
    """Two ``sessionq serve`` processes on one store; yields their ports."""
    servers: list[ServerProcess] = []
    try:
        for _ in range(2):
            servers.append(await spawn_server(shared_store))
        yield [server.port for server in servers]
    finally:
        for server in servers:
            await server.kill()


async def open_on(port: int, frame: dict[str, Any]) -> Client:
    client = Client(await websockets.connect(f"ws://127.0.0.1:{port}/ws"))
    await client.send(frame)
    client.welcome = await client.recv()
    assert client.welcome["type"] == "welcome", client.welcome
    return client


async def test_revocation_reaches_the_other_process(
    two_processes: list[int], shared_store: str
) -> None:
    a, b = two_processes
    name = unique_name()
    here = await open_on(a, {"type": "register", "username": name, "password": PASSWORD})
    token = here.welcome["token"]
    there = await open_on(b, {"type": "auth", "token": token})
    other = await open_on(b, {"type": "login", "username": name, "password": PASSWORD})
    # logout on A closes B's connection on the same token, not B's other token.
    await here.send({"type": "logout"})
    assert (await here.closed())[0] == 1000
    assert (await there.closed(REVOKED_WITHIN))[0] == 4401
    await other.send({"type": "status"})
    assert (await other.recv())["type"] == "status"
    # An operator's disable closes the user's connections in every process.
    also = await open_on(a, {"type": "auth", "token": other.welcome["token"]})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "user", "disable", name,
        "--store-url", shared_store, "--broker-url", BROKER_URL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 6 * UNIT)
    assert proc.returncode == 0, out
    assert (await other.closed(REVOKED_WITHIN))[0] == 4401
    assert (await also.closed(REVOKED_WITHIN))[0] == 4401
    for client in (here, there, other, also):
        await client.close()


# -- 3. trusted proxies --------------------------------------------------------------------
async def flood_failed_logins(connect: ClientFactory, target: Server, forged: str) -> None:
    """Failed logins (for unknown names, so no per-user limit is reached)
    until this client address is refused with rate_limited."""
    async with asyncio.timeout(4 * UNIT):
        while True:
            client = await connect(target=target, additional_headers={"X-Forwarded-For": forged})
            for _ in range(target.settings.auth_tries):
                await client.send({"type": "login", "username": unique_name("nobody"),
                                   "password": "wrong password"})  # fmt: skip
                reply = await client.recv()
                if reply["code"] == "rate_limited":
                    await client.close()
                    return
                assert reply["code"] == "invalid_credentials"
            await client.closed()


async def login_from(connect: ClientFactory, target: Server, xff: str, name: str) -> dict[str, Any]:
    client = await connect(target=target, additional_headers={"X-Forwarded-For": xff})
    await client.send({"type": "login", "username": name, "password": PASSWORD})
    return await client.recv()


async def test_a_trusted_proxy_names_the_client_address(
    server_factory: ServerFactory, connect: ClientFactory, user_client: ClientFactory
) -> None:
    proxy = await server_factory(trusted_proxies=("127.0.0.1",), login_failures=2)
    name = (await user_client(target=proxy)).welcome["user"]
    # A client forges an address before the proxy's: only the last one counts.
    await flood_failed_logins(connect, proxy, "6.6.6.6, 10.0.0.1")
    assert (await login_from(connect, proxy, "10.0.0.1", name))["code"] == "rate_limited"
    # A user behind the same proxy from another address logs in.
    assert (await login_from(connect, proxy, "6.6.6.6, 10.0.0.2", name))["type"] == "welcome"


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    server_factory: ServerFactory, connect: ClientFactory, user_client: ClientFactory
) -> None:
    direct = await server_factory(trusted_proxies=("10.9.0.0/16",), login_failures=2)
    name = (await user_client(target=direct)).welcome["user"]
    await flood_failed_logins(connect, direct, "10.0.0.1")
    # The limit keyed on the TCP peer: another forged header does not dodge it.
    assert (await login_from(connect, direct, "10.0.0.2", name))["code"] == "rate_limited"


async def test_registrations_are_counted_per_forwarded_address(
    server_factory: ServerFactory, connect: ClientFactory
) -> None:
    proxy = await server_factory(trusted_proxies=("127.0.0.0/8",), register_per_minute=1)

    async def register(xff: str) -> dict[str, Any]:
        client = await connect(target=proxy, additional_headers={"X-Forwarded-For": xff})
        await client.send({"type": "register", "username": unique_name(), "password": PASSWORD})
        return await client.recv()

    assert (await register("10.0.0.1"))["type"] == "welcome"
    assert (await register("10.0.0.1"))["code"] == "rate_limited"
    assert (await register("10.0.0.2"))["type"] == "welcome"


# -- 4. secrets out of logs ------------------------------------------------------------------
@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the server logs at DEBUG, as the production sink writes it."""
    stream = io.StringIO()
    logs.configure("json", "DEBUG", stream)
    try:
        yield stream
    finally:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")


async def test_no_token_or_password_reaches_the_logs(
    captured_logs: io.StringIO, server: Server, connect: ClientFactory
) -> None:
    name, password = unique_name(), "a-password-nobody-logs"
    secrets: list[str] = [password, PASSWORD]

    def note(token: str) -> str:
        secrets.append(token)
        secrets.append(token.rsplit(".", 1)[-1])  # the signature alone
        return token

    # register, login (right and wrong), handshake header and query, auth, refresh, logout
    client = await connect()
    await client.send({"type": "register", "username": name, "password": password})
    token = note((await client.recv())["token"])
    bad = await connect()
    await bad.send({"type": "login", "username": name, "password": PASSWORD})
    assert (await bad.recv())["code"] == "invalid_credentials"
    logged = await connect()
    await logged.send({"type": "login", "username": name, "password": password})
    login_token = note((await logged.recv())["token"])
    header = await connect(additional_headers={"Authorization": f"Bearer {token}"})
    assert (await header.recv())["type"] == "welcome"
    query = await connect(f"/ws?token={login_token}")
    assert (await query.recv())["type"] == "welcome"
    framed = await auth_with(connect, token)
    assert (await framed.recv())["type"] == "welcome"
    await framed.send({"type": "refresh"})
    refreshed = note((await framed.recv())["token"])
    await framed.send({"type": "logout"})
    assert (await framed.closed())[0] == 1000
    revoked = await auth_with(connect, refreshed)
    assert (await revoked.recv())["code"] == "invalid_token"
    await (await connect(f"/ws?token=not.a.{password}")).close()
    # The store fails: every token and password check answers unavailable.
    await server.store.close()
    store_down = [
        await connect(additional_headers={"Authorization": f"Bearer {login_token}"}),
        await connect(f"/ws?token={login_token}"),
        await auth_with(connect, login_token),
    ]
    for down in store_down:
        assert (await down.recv())["code"] == "unavailable"
    for frame in (
        {"type": "login", "username": name, "password": password},
        {"type": "register", "username": unique_name(), "password": password},
    ):
        await store_down[0].send(frame)
        assert (await store_down[0].recv())["code"] == "unavailable"
    await logged.send({"type": "refresh"})
    assert (await logged.recv())["code"] == "unavailable"
    await logged.send({"type": "logout"})
    assert (await logged.recv())["code"] == "unavailable"
    text = captured_logs.getvalue()
    assert "auth store error" in text  # the capture saw the failures
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"secrets in the log: {leaked}"


async def test_a_flood_against_a_name_locks_out_only_the_flooding_address(
    server_factory: ServerFactory, connect: ClientFactory, user_client: ClientFactory
) -> None:
    proxy = await server_factory(trusted_proxies=("127.0.0.1",), login_failures=2)
    name = (await user_client(target=proxy)).welcome["user"]
    async with asyncio.timeout(4 * UNIT):
        refused = False
        while not refused:  # wrong passwords for the user's own name, from one address
            client = await connect(
                target=proxy, additional_headers={"X-Forwarded-For": "10.0.0.66"}
            )
            for _ in range(proxy.settings.auth_tries):
                await client.send({"type": "login", "username": name, "password": "wrong guess"})
                reply = await client.recv()
                if reply["code"] == "rate_limited":
                    refused = True
                    break
            await client.close()
    assert (await login_from(connect, proxy, "10.0.0.66", name))["code"] == "rate_limited"
    # The user, from its own address, logs in: the flood did not lock it out.
    assert (await login_from(connect, proxy, "10.0.0.7", name))["type"] == "welcome"
