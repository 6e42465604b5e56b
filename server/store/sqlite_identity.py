"""The SQLite store's revocation methods (``base.py``, "identity"): a mixin of
:class:`.sqlite.SqliteStore`, kept apart so the identity rules read in one place.

The token check (:meth:`token_state`) is one read on the reader connection:
the user, its version and disabled flag, and whether the jti is revoked. The
writes go through the group commit like every other write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from . import sqlite_writes as writes
from .base import TokenState
from .sqlite_writes import one

T = TypeVar("T")


class SqliteIdentity:
    """SqliteStore's revocation methods."""

    def _write(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def token_state(self, username: str, jti: str | None = None) -> TokenState | None:
        row = await self._read(
            lambda c: one(
                c,
                "SELECT u.username, COALESCE(t.version, 0), COALESCE(t.disabled, 0),"
                " EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ?)"
                " FROM users u LEFT JOIN user_tokens t ON t.username_lower = u.username_lower"
                " WHERE u.username_lower = ?",
                (jti or "", username.lower()),
            )
        )
        if row is None:
            return None
        return TokenState(row[0], int(row[1]), bool(row[2]), bool(row[3]) and jti is not None)

    async def revoke_user(self, username: str) -> int | None:
        return cast("int | None", await self._write(writes.revoke_user, username))

    async def set_disabled(self, username: str, disabled: bool) -> int | None:
        return cast("int | None", await self._write(writes.set_disabled, username, disabled))

    async def set_password(self, username: str, password_hash: bytes) -> int | None:
        return cast("int | None", await self._write(writes.set_password, username, password_hash))

    async def delete_user(self, username: str) -> int | None:
        return cast("int | None", await self._write(writes.delete_user, username))

    async def revoke_token(self, jti: str, expires_at: float, now: float) -> None:
        await self._write(writes.revoke_token, jti, expires_at, now)
