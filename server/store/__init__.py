"""The store: one interface (:mod:`.base`), a backend chosen by URL.

``sqlite:///var/sq.db`` (three slashes: relative to the working directory) and
``sqlite:////srv/sq.db`` (four: absolute) select SQLite; ``mongodb://...`` and
``mongodb+srv://...`` select MongoDB, in the database named by the URL's path
(``sessionq`` when it names none); ``postgresql://user:password@host:port/db``
(or ``postgres://``) selects PostgreSQL. Backends are imported when chosen, so
a deployment loads only the driver it uses.
"""

from __future__ import annotations

from .base import (
    Fenced,
    NewRequest,
    RequestRecord,
    RequestState,
    SessionCounts,
    SessionRecord,
    Store,
    StoreError,
    TokenState,
    User,
    UserExists,
)
from .budgets import Budget, BudgetExceeded, UserUsage

__all__ = [
    "Budget",
    "BudgetExceeded",
    "Fenced",
    "NewRequest",
    "RequestRecord",
    "RequestState",
    "SessionCounts",
    "SessionRecord",
    "Store",
    "StoreError",
    "TokenState",
    "User",
    "UserExists",
    "UserUsage",
    "open_store",
]

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_store(url: str) -> Store:
    """The store for ``url``, not yet opened: callers ``await store.open()``."""
    if url.startswith(SQLITE_PREFIX):
        path = url.removeprefix(SQLITE_PREFIX)
        if not path:
            raise ValueError(f"store URL {url!r} names no file: use sqlite:///relative/path.db")
        from .sqlite import SqliteStore

        return SqliteStore(path)  # the parent directory is created on open()
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from .mongodb import MongoStore

        return MongoStore(url)
    if url.startswith(POSTGRES_PREFIXES):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(
        f"store URL {url!r} is not supported: use sqlite:///relative/path.db,"
        " sqlite:////absolute/path.db, mongodb://host/database"
        " or postgresql://user:password@host:port/database"
    )
