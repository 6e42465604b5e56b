"""Revocation of live connections, in every process (PROTOCOL.md, "Tokens").

The store holds the truth (a user's token version, the revoked jtis) and every
token check reads it. What the store cannot do is reach a connection that
authenticated before the revocation: that is this module's job. Each process
keeps its authenticated connections by user (:class:`LiveTokens`); a
revocation is announced on the broker's control exchange, which every process
(this one included) receives, as one message::

    {"revoke": {"user": "alice", "version": 3}}   every token before version 3
    {"revoke": {"user": "alice", "jti": "..."}}   one token (logout)

and each process closes the matching connections with 4401. The announcing
process also applies it at once, without waiting for the broker.

A connection that was authenticating while the revocation was written (its
token read before the write, its registration here after the message) would
miss it: the last ``RECENT`` seconds of revocations are remembered and checked
when a connection registers. An announcement the broker cannot take is
logged; the connections it would have closed are refused at their next token
check (``auth``/``refresh``) and at expiry.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger

from protocol import CloseCode, encode_json
from server.auth import Identity

RECENT = 30.0  # seconds a revocation is remembered for connections still registering
RECENT_MAX = 10_000


class Revocable(Protocol):
    """A live, authenticated connection."""

    identity: Identity | None

    def close(self, code: int, reason: str) -> None: ...


def revocation_message(user: str, *, version: int | None = None, jti: str | None = None) -> bytes:
    """The control-exchange message revoking ``user``'s tokens before
    ``version``, or the one token ``jti``."""
    body: dict[str, Any] = {"user": user.lower()}
    if version is not None:
        body["version"] = version
    if jti is not None:
        body["jti"] = jti
    return encode_json({"revoke": body})


class LiveTokens:
    """This process's authenticated connections, by user (lower-case name)."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self._by_user: dict[str, set[Revocable]] = {}
        # (time, user, version or None, jti or None), oldest first
        self._recent: deque[tuple[float, str, int | None, str | None]] = deque(maxlen=RECENT_MAX)

    def add(self, conn: Revocable) -> bool:
        """Register ``conn``; False (and nothing registered) if a revocation
        that covers its token arrived in the last ``RECENT`` seconds."""
        identity = conn.identity
        assert identity is not None
        user = identity.username.lower()
        horizon = time.monotonic() - RECENT
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        for _, who, version, jti in self._recent:
            if who == user and _covers(identity, version, jti):
                return False
        self._by_user.setdefault(user, set()).add(conn)
        return True

    def discard(self, conn: Revocable) -> None:
        identity = conn.identity
        if identity is None:
            return
        user = identity.username.lower()
        conns = self._by_user.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._by_user[user]

    def apply(self, user: str, version: int | None = None, jti: str | None = None) -> int:
        """Close (4401) this process's connections of ``user`` whose token is
        revoked; return how many."""
        user = user.lower()
        self._recent.append((time.monotonic(), user, version, jti))
        closed = 0
        for conn in list(self._by_user.get(user, ())):
            identity = conn.identity
            if identity is not None and _covers(identity, version, jti):
                self.discard(conn)
                conn.close(CloseCode.UNAUTHORIZED, "token revoked")
                closed += 1
        if closed:
            logger.bind(user=user).info("closed {} connections of a revoked token", closed)
        return closed

    def on_message(self, payload: Any) -> None:
        """A ``revoke`` message from the control exchange."""
        try:
            user = payload["user"]
            version, jti = payload.get("version"), payload.get("jti")
            if not isinstance(user, str) or (version is None and jti is None):
                raise ValueError
            if version is not None and type(version) is not int:
                raise ValueError
            if jti is not None and not isinstance(jti, str):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.warning("ignoring a malformed revocation message")
            return
        self.apply(user, version, jti)

    async def announce(
        self, user: str, *, version: int | None = None, jti: str | None = None
    ) -> None:
        """Apply a revocation here and tell every other process."""
        self.apply(user, version, jti)
        try:
            await self._send(revocation_message(user, version=version, jti=jti))
        except Exception as exc:  # BrokerError: the store check still refuses the token
            logger.warning("could not announce a revocation to other processes: {}", exc)


def _covers(identity: Identity, version: int | None, jti: str | None) -> bool:
    if version is not None and identity.version < version:
        return True
    return jti is not None and identity.jti == jti


async def announce_to_servers(broker_url: str, body: bytes) -> None:
    """From outside a server (the admin CLI): publish ``body`` on the control
    exchange through the first broker node that answers. Raises on failure."""
    import aio_pika

    from server.broker import CONTROL_EXCHANGE
    from server.broker_urls import scrub, split_broker_urls

    urls = split_broker_urls(broker_url)
    error: Exception | None = None
    for url in urls:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception as exc:
            error = exc
            continue
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT
            )
            await exchange.publish(aio_pika.Message(body), routing_key="")
        return
    raise ConnectionError(f"no broker node answered: {scrub(str(error), urls)}")
