"""Helpers of the PostgreSQL store: errors into StoreError, text PostgreSQL
cannot hold, and the database's clock against this process's."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg

from .base import Store, StoreError
from .postgres_writer import CONNECTION_ERRORS

P = ParamSpec("P")
R = TypeVar("R")


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn asyncpg's and the OS's errors of a read into StoreError (counted)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS, TimeoutError) as e:
            if args and isinstance(args[0], Store):
                args[0]._failed()
            raise StoreError(f"postgresql: {e}") from e

    return wrapper


def check_text(*values: str) -> None:
    """Refuse a NUL character up front: asyncpg would send it and fail the call
    on the server (a read of a value that cannot be stored finds nothing)."""
    for value in values:
        if "\x00" in value:
            raise StoreError("postgresql: text cannot contain the NUL character")


async def clock_skew(connection: asyncpg.Connection) -> float:
    """The database's clock minus this process's, in seconds (the round
    trip's midpoint against the database's reading), in steps of 1/1024 s: a
    time moved there and back is then exactly the time it was."""
    before = time.time()
    database = float(await connection.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    after = time.time()
    return round((database - (before + after) / 2) * 1024) / 1024
