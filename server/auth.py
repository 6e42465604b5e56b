"""Authentication: bcrypt password hashes, HS256 JWTs, failed-login limits.

* Passwords are hashed with bcrypt off the event loop (a hash costs tens of
  milliseconds of CPU and must not hold other sessions up).
* A login for an unknown user still checks a dummy hash, so an unknown user and
  a wrong password look the same from outside: same code, similar time.
* Tokens carry ``sub``, ``iat``, ``exp``, ``jti``; verification pins the
  algorithm, so ``alg: none`` and tokens signed with another key are refused.
* Failed logins are counted per username and per client address in a sliding
  window; only login is held back by them (PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

import bcrypt
import jwt

from protocol import ErrorCode, valid_username, weak_password
from server.store import Store, UserExists

ALGORITHM = "HS256"
BCRYPT_ROUNDS = 12


class AuthError(Exception):
    """Authentication failed; ``code`` is the wire error code."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Identity:
    username: str
    token: str
    expires_at: int


class FailureLimiter:
    """Sliding-window count of failures per key; ``retry_after`` tells when the
    oldest failure in a full window leaves it."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float) -> float:
        events = self._events.get(key)
        if not events:
            return 0.0
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return 0.0
        if len(events) < self.limit:
            return 0.0
        return events[0] + self.window - now

    def record(self, key: str, now: float) -> None:
        self._events.setdefault(key, deque()).append(now)
        if len(self._events) > 100_000:  # bound memory under a spraying attack
            oldest = next(iter(self._events))
            del self._events[oldest]

    def clear(self, key: str) -> None:
        self._events.pop(key, None)


def hash_password_sync(password: str, rounds: int = BCRYPT_ROUNDS) -> bytes:
    return bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds))


class Authenticator:
    def __init__(
        self,
        store: Store,
        secret: str,
        token_ttl: int,
        *,
        login_failures: int = 5,
        login_window: float = 60.0,
        bcrypt_rounds: int = BCRYPT_ROUNDS,
    ) -> None:
        self.store = store
        self.secret = secret
        self.token_ttl = token_ttl
        self.rounds = bcrypt_rounds
        self.by_user = FailureLimiter(login_failures, login_window)
        self.by_addr = FailureLimiter(login_failures * 4, login_window)
        self._dummy_hash = hash_password_sync("dummy-password-for-timing", bcrypt_rounds)

    # -- tokens --------------------------------------------------------------
    def issue(self, username: str, now: float | None = None) -> Identity:
        issued = int(now if now is not None else time.time())
        expires = issued + self.token_ttl
        claims = {"sub": username, "iat": issued, "exp": expires, "jti": uuid.uuid4().hex}
        token = jwt.encode(claims, self.secret, algorithm=ALGORITHM)
        return Identity(username, token, expires)

    def verify(self, token: str) -> Identity:
        """Check signature, algorithm and expiry; raise AuthError otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired") from None
        except jwt.InvalidTokenError:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token is not valid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token has no subject")
        return Identity(sub, token, int(claims["exp"]))

    async def authenticate_token(self, token: str) -> Identity:
        identity = self.verify(token)
        # A deleted user's token stops working even before it expires.
        if await self.store.get_user(identity.username) is None:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token is not valid")
        return identity

    # -- passwords -----------------------------------------------------------
    async def hash_password(self, password: str) -> bytes:
        return await asyncio.to_thread(hash_password_sync, password, self.rounds)

    async def login(self, username: str, password: str, address: str) -> Identity:
        now = time.monotonic()
        user_key = username.lower()
        wait = max(self.by_user.retry_after(user_key, now), self.by_addr.retry_after(address, now))
        if wait > 0:
            raise AuthError(
                ErrorCode.RATE_LIMITED, "too many failed logins; try again later", round(wait, 1)
            )
        user = await self.store.get_user(username)
        stored = user.password_hash if user is not None else self._dummy_hash
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode()[:72], stored)
        if user is None or not ok:
            self.by_user.record(user_key, now)
            self.by_addr.record(address, now)
            raise AuthError(ErrorCode.INVALID_CREDENTIALS, "unknown user or wrong password")
        self.by_user.clear(user_key)
        return self.issue(user.username)

    async def register(self, username: str, password: str) -> Identity:
        if not valid_username(username):
            raise AuthError(
                ErrorCode.BAD_REQUEST, "username must be 1..64 characters of A-Z a-z 0-9 _ . -"
            )
        if weak_password(username, password):
            raise AuthError(
                ErrorCode.WEAK_PASSWORD,
                "password must be at least 8 characters and differ from the username",
            )
        if await self.store.get_user(username) is not None:
            raise AuthError(ErrorCode.USER_EXISTS, "that username is taken")
        try:
            user = await self.store.create_user(username, await self.hash_password(password))
        except UserExists:
            raise AuthError(ErrorCode.USER_EXISTS, "that username is taken") from None
        return self.issue(user.username)
