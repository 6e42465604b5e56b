"""Helpers of the PostgreSQL store: errors into StoreError, text PostgreSQL
cannot hold, and the database's clock against this process's."""

from __future__ import annotations

import time

import asyncpg

from .base import StoreError
from .postgres_writer import CONNECTION_ERRORS
from .translate import translating

#: Turn asyncpg's and the OS's errors of a call into StoreError (counted).
translated = translating((asyncpg.PostgresError, *CONNECTION_ERRORS, TimeoutError), "postgresql")


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
