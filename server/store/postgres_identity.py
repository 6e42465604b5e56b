"""The PostgreSQL store's revocation methods (``base.py``, "identity"): a mixin
of :class:`.postgres.PostgresStore`.

The tables (``user_tokens``, ``revoked_tokens``) come with the schema's
identity migration (:mod:`.postgres_schema`). The token check
(:meth:`token_state`) is one statement on the read pool. The writes are rare
(an operator's command, a logout) and each needs several statements that must
hold together, so each runs as one transaction of its own on the read pool
rather than through the batch writer: a delete removes the user, its
sessions, their requests and its key-value data, and raises the name's token
version, or does none of it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg

from .base import Store, StoreError, TokenState
from .postgres_writer import CONNECTION_ERRORS

P = ParamSpec("P")
R = TypeVar("R")

# Raise the name's version (creating its row): every earlier token is revoked.
# The user name's next token version (every token issued before is refused).
_NEXT_VERSION = (
    "INSERT INTO user_tokens (username_lower, version) VALUES ($1, 1)"
    " ON CONFLICT (username_lower) DO UPDATE"
    " SET version = user_tokens.version + 1 RETURNING version"
)
_BUMP = (
    "INSERT INTO user_tokens (username_lower, version, disabled) VALUES ($1, $2, $3)"
    " ON CONFLICT (username_lower) DO UPDATE"
    " SET version = user_tokens.version + $2, disabled = excluded.disabled"
    " RETURNING version"
)


def _translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """asyncpg's and the OS's errors become StoreError, counted (as postgres.py)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS, TimeoutError) as e:
            if args and isinstance(args[0], Store):
                args[0]._failed()
            raise StoreError(f"postgresql: {e}") from e

    return wrapper


class PostgresIdentity:
    """PostgresStore's revocation methods."""

    def _pool_(self) -> asyncpg.Pool:
        raise NotImplementedError

    @_translated
    async def token_state(self, username: str, jti: str | None = None) -> TokenState | None:
        row = await self._pool_().fetchrow(
            "SELECT u.username, COALESCE(t.version, 0), COALESCE(t.disabled, false),"
            " EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $1)"
            " FROM users u LEFT JOIN user_tokens t ON t.username_lower = u.username_lower"
            " WHERE u.username_lower = $2",
            jti or "",
            username.lower(),
        )
        if row is None:
            return None
        return TokenState(row[0], int(row[1]), bool(row[2]), bool(row[3]) and jti is not None)

    async def _user_tx(
        self, username: str, body: Callable[[asyncpg.Connection, str], Awaitable[int]]
    ) -> int | None:
        """Run ``body(connection, lower-case name)`` in one transaction with the
        user's row locked; None (nothing done) if there is no such user."""
        key = username.lower()
        async with self._pool_().acquire() as c, c.transaction():
            found = await c.fetchval(
                "SELECT 1 FROM users WHERE username_lower = $1 FOR UPDATE", key
            )
            if found is None:
                return None
            return await body(c, key)

    @_translated
    async def revoke_user(self, username: str) -> int | None:
        async def bump(c: asyncpg.Connection, key: str) -> int:
            return int(await c.fetchval(_NEXT_VERSION, key))

        return await self._user_tx(username, bump)

    @_translated
    async def set_disabled(self, username: str, disabled: bool) -> int | None:
        async def flag(c: asyncpg.Connection, key: str) -> int:
            return int(await c.fetchval(_BUMP, key, 1 if disabled else 0, disabled))

        return await self._user_tx(username, flag)

    @_translated
    async def set_password(self, username: str, password_hash: bytes) -> int | None:
        async def change(c: asyncpg.Connection, key: str) -> int:
            await c.execute(
                "UPDATE users SET password_hash = $2 WHERE username_lower = $1", key, password_hash
            )
            return int(await c.fetchval(_NEXT_VERSION, key))

        return await self._user_tx(username, change)

    @_translated
    async def delete_user(self, username: str) -> int | None:
        async def delete(c: asyncpg.Connection, key: str) -> int:
            version = int(await c.fetchval(_BUMP, key, 1, False))
            await c.execute(
                "DELETE FROM requests WHERE session_id IN"
                " (SELECT session_id FROM sessions WHERE lower(username) = $1)",
                key,
            )
            await c.execute("DELETE FROM sessions WHERE lower(username) = $1", key)
            await c.execute("DELETE FROM kv WHERE lower(username) = $1", key)
            await c.execute("DELETE FROM user_budgets WHERE lower(username) = $1", key)
            await c.execute("DELETE FROM users WHERE username_lower = $1", key)
            return version

        return await self._user_tx(username, delete)

    @_translated
    async def revoke_token(self, jti: str, expires_at: float, now: float) -> None:
        async with self._pool_().acquire() as c, c.transaction():
            await c.execute("DELETE FROM revoked_tokens WHERE expires_at < $1", now)
            await c.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2)"
                " ON CONFLICT (jti) DO UPDATE"
                " SET expires_at = GREATEST(revoked_tokens.expires_at, excluded.expires_at)",
                jti,
                expires_at,
            )
