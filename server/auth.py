"""Authentication: bcrypt password hashes, HS256 JWTs, failed-login limits.

* Passwords are hashed with bcrypt off the event loop (a hash costs tens of
  milliseconds of CPU and must not hold other sessions up). At most
  ``hash_concurrency`` hashes for registrations and as many checks for logins
  run at once, each kind under its own bound: a flood of registrations (from
  many addresses) then holds at most that many threads of the shared thread
  pool and waits behind itself, not in front of logins.
* A login for an unknown user still checks a dummy hash, so an unknown user and
  a wrong password look the same from outside: same code, similar time. A login
  whose username cannot exist (not :func:`~protocol.valid_username`) is
  answered ``invalid_credentials`` at once, before any limiter or store work,
  and the reply never echoes it (PROTOCOL.md, "Client addresses"): such names
  never become limiter keys, so they cost nothing to remember.
* Tokens carry ``sub``, ``iat``, ``exp``, ``jti``, ``iss``, ``aud`` and
  ``ver`` (the user's token version); verification pins the algorithm, so
  ``alg: none`` and tokens signed with another key are refused, and requires
  the configured issuer and audience.
* Every token authentication (handshake, ``auth``, ``refresh``) reads the
  user's revocation state in one store read (:meth:`Store.token_state`): a
  deleted or disabled user, a ``ver`` that is not the user's version (passwd,
  disable, delete revoked it) or a revoked ``jti`` (logout) is
  ``invalid_token``. Nothing is cached, so a revocation holds everywhere at
  once.
* Failed logins are counted per username and per client address in a sliding
  window; only login is held back by them (PROTOCOL.md). Registrations are
  counted per client address (``register_per_minute``, 0 = unlimited).
  Every limiter forgets a key once its window has passed, whether or not the
  key comes back, and holds at most ``max_keys`` keys (the least recently
  counted go first): a spray of unique names or addresses costs bounded memory.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import bcrypt
import jwt

from protocol import ErrorCode, valid_username, weak_password
from server.store import Store, TokenState, UserExists

ALGORITHM = "HS256"
BCRYPT_ROUNDS = 12
HASH_CONCURRENCY = 2  # bcrypt hashes (and, separately, checks) running at once
LIMITER_MAX_KEYS = 100_000
REGISTER_WINDOW = 60.0


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
    token: str = field(repr=False)  # a secret: never in a repr, so never in a log line
    expires_at: int = 0
    jti: str = ""
    version: int = 0  # the user's token version the token was issued under


class FailureLimiter:
    """Sliding-window count of events per key; ``retry_after`` tells when the
    oldest event of a full window leaves it.

    Keys are kept in the order they were last counted, so the stalest key is
    always first: every call first drops the keys whose newest event has left
    the window (amortised O(1) per key ever counted), so an entry expires on
    the clock, not when its key is seen again. A key keeps at most ``limit``
    timestamps (older ones cannot matter), and beyond ``max_keys`` keys the
    least recently counted is dropped: memory stays bounded under a spray of
    unique keys. Dropping a key early only forgets failures, it never refuses.
    """

    def __init__(self, limit: int, window: float, max_keys: int = LIMITER_MAX_KEYS) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be at least 1, window positive")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def expire(self, now: float) -> None:
        """Forget every key whose newest event is older than the window."""
        events = self._events
        horizon = now - self.window
        while events:
            key, times = next(iter(events.items()))
            if times[-1] > horizon:
                break
            del events[key]

    def retry_after(self, key: str, now: float) -> float:
        self.expire(now)
        events = self._events.get(key)
        if events is None or len(events) < self.limit:
            return 0.0
        # Full: the window reopens when its oldest kept event leaves it.
        return max(0.0, events[0] + self.window - now)

    def record(self, key: str, now: float) -> None:
        self.expire(now)
        events = self._events.get(key)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
            if len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(key)
        events.append(now)

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
        register_per_minute: int = 20,
        hash_concurrency: int = HASH_CONCURRENCY,
        limiter_max_keys: int = LIMITER_MAX_KEYS,
        issuer: str = "sessionq",
        audience: str = "sessionq",
    ) -> None:
        if register_per_minute < 0 or hash_concurrency < 1:
            raise ValueError("register_per_minute must be >= 0 and hash_concurrency >= 1")
        self.store = store
        self.secret = secret
        self.token_ttl = token_ttl
        self.issuer = issuer
        self.audience = audience
        self.rounds = bcrypt_rounds
        self.by_user = FailureLimiter(login_failures, login_window, limiter_max_keys)
        self.by_addr = FailureLimiter(login_failures * 4, login_window, limiter_max_keys)
        self.registrations: FailureLimiter | None = None  # None: unlimited
        if register_per_minute > 0:
            self.registrations = FailureLimiter(
                register_per_minute, REGISTER_WINDOW, limiter_max_keys
            )
        # Separate bounds: registrations queue behind registrations, logins
        # behind logins, and neither kind can hold every thread of the pool.
        self._hashing = asyncio.Semaphore(hash_concurrency)
        self._checking = asyncio.Semaphore(hash_concurrency)
        self._dummy_hash = hash_password_sync("dummy-password-for-timing", bcrypt_rounds)

    # -- tokens --------------------------------------------------------------
    def issue(
        self, username: str, version: int = 0, now: float | None = None, after: int = 0
    ) -> Identity:
        """A token for ``username`` under token ``version``, expiring after
        ``after`` (a refresh never hands out a token that ends sooner)."""
        issued = int(now if now is not None else time.time())
        expires = max(issued + self.token_ttl, after + 1)
        jti = uuid.uuid4().hex
        claims = {
            "sub": username, "iat": issued, "exp": expires, "jti": jti,
            "iss": self.issuer, "aud": self.audience, "ver": version,
        }  # fmt: skip
        token = jwt.encode(claims, self.secret, algorithm=ALGORITHM)
        return Identity(username, token, expires, jti, version)

    def verify(self, token: str) -> Identity:
        """Check signature, algorithm, issuer, audience and expiry; raise
        AuthError otherwise. No store work: see :meth:`authenticate_token`."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["sub", "iat", "exp", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired") from None
        except jwt.InvalidTokenError:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token is not valid") from None
        sub, jti, version = claims.get("sub"), claims.get("jti"), claims.get("ver", 0)
        if not isinstance(sub, str) or not sub:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token has no subject")
        if not isinstance(jti, str) or type(version) is not int:
            raise AuthError(ErrorCode.INVALID_TOKEN, "token is not valid")
        return Identity(sub, token, int(claims["exp"]), jti, version)

    async def authenticate_token(self, token: str) -> Identity:
        """Verify ``token`` and check it against the store's revocation state
        (one read). Raises AuthError, or StoreError when the store fails."""
        identity = self.verify(token)
        state = await self.store.token_state(identity.username, identity.jti)
        if not _token_valid(identity, state):
            raise AuthError(ErrorCode.INVALID_TOKEN, "token is not valid")
        return identity

    async def refresh(self, current: Identity) -> Identity:
        """A fresh token (new ``jti``, later ``exp``) for the user of
        ``current``, which must still be valid: no password needed."""
        identity = await self.authenticate_token(current.token)
        return self.issue(identity.username, identity.version, after=identity.expires_at)

    async def logout(self, identity: Identity) -> None:
        """Revoke ``identity``'s token (by jti) until it would have expired."""
        await self.store.revoke_token(identity.jti, identity.expires_at, time.time())

    # -- passwords -----------------------------------------------------------
    async def hash_password(self, password: str) -> bytes:
        async with self._hashing:
            return await asyncio.to_thread(hash_password_sync, password, self.rounds)

    async def login(self, username: str, password: str, address: str) -> Identity:
        if not valid_username(username):
            # No such user can exist: no limiter key, no store read, no hash.
            raise AuthError(ErrorCode.INVALID_CREDENTIALS, "unknown user or wrong password")
        # Failures count per (username, client address) and per address: a
        # flood of wrong passwords for a name from one address locks out that
        # address, never the user logging in correctly from another one.
        # Guessing one name from many addresses is bounded by each address's
        # own limit (docs/operations.md, "Security").
        user_key = f"{username.lower()}@{address}"
        self._refuse_if_limited(user_key, address)
        user = await self.store.get_user(username)
        state = await self.store.token_state(username) if user is not None else None
        if state is not None and state.disabled:
            user = None  # a disabled user's login fails like a wrong password
        stored = user.password_hash if user is not None else self._dummy_hash
        async with self._checking:
            # Again: failures recorded while this login waited count too, so
            # queued guesses cannot all pass the limit they were checked against.
            self._refuse_if_limited(user_key, address)
            ok = await asyncio.to_thread(bcrypt.checkpw, password.encode()[:72], stored)
        if user is None or not ok:
            now = time.monotonic()
            self.by_user.record(user_key, now)
            self.by_addr.record(address, now)
            raise AuthError(ErrorCode.INVALID_CREDENTIALS, "unknown user or wrong password")
        self.by_user.clear(user_key)
        return self.issue(user.username, state.version if state is not None else 0)

    def _refuse_if_limited(self, user_key: str, address: str) -> None:
        now = time.monotonic()
        wait = max(self.by_user.retry_after(user_key, now), self.by_addr.retry_after(address, now))
        if wait > 0:
            raise AuthError(
                ErrorCode.RATE_LIMITED, "too many failed logins; try again later", _seconds(wait)
            )

    async def register(self, username: str, password: str, address: str | None = None) -> Identity:
        """Create a user and issue its first token.

        ``address`` is the client address that registrations are counted by
        (``register_per_minute``; ``None``, as for the admin CLI, is not
        counted); every attempt that passes the cheap checks counts, whether or
        not the name is free.
        """
        limiter = self.registrations if address is not None else None
        key = address or ""
        if limiter is not None:
            wait = limiter.retry_after(key, time.monotonic())
            if wait > 0:
                raise AuthError(
                    ErrorCode.RATE_LIMITED,
                    "too many registrations from this address; try again later",
                    _seconds(wait),
                )
        if not valid_username(username):
            raise AuthError(
                ErrorCode.BAD_REQUEST, "username must be 1..64 characters of A-Z a-z 0-9 _ . -"
            )
        if weak_password(username, password):
            raise AuthError(
                ErrorCode.WEAK_PASSWORD,
                "password must be at least 8 characters and differ from the username",
            )
        if limiter is not None:
            limiter.record(key, time.monotonic())
        if await self.store.get_user(username) is not None:
            raise AuthError(ErrorCode.USER_EXISTS, "that username is taken")
        try:
            user = await self.store.create_user(username, await self.hash_password(password))
        except UserExists:
            raise AuthError(ErrorCode.USER_EXISTS, "that username is taken") from None
        # A name registered before and deleted keeps its version: start above it.
        state = await self.store.token_state(user.username)
        return self.issue(user.username, state.version if state is not None else 0)


def _token_valid(identity: Identity, state: TokenState | None) -> bool:
    """A token holds while its user exists and is enabled, its version is the
    user's, and its jti was not revoked."""
    return (
        state is not None
        and not state.disabled
        and state.version == identity.version
        and not state.jti_revoked
    )


def _seconds(wait: float) -> float:
    """``retry_after`` on the wire: tenths of a second, never 0 while refusing."""
    return max(0.1, round(wait, 1))
