"""Store servers for the tests: a PostgreSQL database per run, a schema per test.

PostgreSQL is really started: ``scripts/sessionq test`` installs Debian's
``postgresql`` and starts its cluster when nothing answers on 127.0.0.1:5432,
with a role ``sessionq`` (password ``sessionq``) that may create databases.
``SESSIONQ_TEST_POSTGRES_URL`` names another server (a role that may create
databases) instead. The run creates one database of its own and drops it at the
end; each test that asks gets a fresh schema in it (``?search_path=`` in the
store URL), so tests stay independent at a fraction of a database's cost.

``SESSIONQ_TEST_STORE`` (``sqlite``, the default, or ``postgresql``) picks the
store the server tests (``store_url``, used by ``server_factory``) run on.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from server.store.postgres import PostgresStore

T = TypeVar("T")

POSTGRES_URL = os.environ.get(
    "SESSIONQ_TEST_POSTGRES_URL", "postgresql://sessionq:sessionq@127.0.0.1:5432/postgres"
)
STORES = ("sqlite", "postgresql")
TEST_STORE = os.environ.get("SESSIONQ_TEST_STORE", "sqlite")
# The store matrix: these modules' tests run once on each of SESSIONQ_TEST_STORES
# (default: every store), except those marked sqlite_only (they drive SQLite's
# writer process or read its file). Other modules use SESSIONQ_TEST_STORE.
MATRIX_MODULES = frozenset(
    {"test_server", "test_durability", "test_faults", "test_limits", "test_max_pending"}
)
MATRIX_STORES = tuple(
    name.strip()
    for name in os.environ.get("SESSIONQ_TEST_STORES", ",".join(STORES)).split(",")
    if name.strip()
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: drives SQLite's writer process or file; not in the store matrix"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_url" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__.rpartition(".")[2] not in MATRIX_MODULES:
        return
    if metafunc.definition.get_closest_marker("sqlite_only"):
        kinds = ["sqlite"]
    else:
        kinds = list(MATRIX_STORES)
    metafunc.parametrize("store_kind", kinds)


@pytest.fixture
def store_kind() -> str:
    """The store a server test runs on (the matrix parametrizes it)."""
    return TEST_STORE


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on a loop of its own, in a thread (a
    sync fixture may be set up while the test's loop runs)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name="store set-up")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _with_database(url: str, database: str, query: str = "") -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", query, ""))


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a database made for this run (dropped at its end)."""
    name = f"sessionq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        _run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as e:
        pytest.fail(
            f"PostgreSQL at {urlsplit(POSTGRES_URL).hostname}:{urlsplit(POSTGRES_URL).port}"
            f" cannot create a test database ({e}): run the tests with scripts/sessionq"
            " test, which installs and starts it, or set SESSIONQ_TEST_POSTGRES_URL",
            pytrace=False,
        )
    try:
        yield _with_database(POSTGRES_URL, name)
    finally:
        _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A store URL of a schema of its own in the run's database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        connection = await asyncpg.connect(postgres_database, timeout=10)
        try:
            await connection.execute(f"CREATE SCHEMA {schema}")
        finally:
            await connection.close()

    _run(create())
    return f"{postgres_database}?search_path={schema}"


@pytest.fixture
async def postgresql_store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(postgres_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path, store_kind: str) -> str:
    """The store URL of the server tests: the matrix's store, else SESSIONQ_TEST_STORE's."""
    if store_kind not in STORES:
        pytest.fail(f"store {store_kind!r}: use one of {', '.join(STORES)}")
    if store_kind == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path}/sq.db"


# -- every store, for the tests of processes that share one ----------------------------
EVERY_STORE = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql"),
    pytest.param("mongodb", id="mongodb", marks=pytest.mark.mongodb),
]


def every_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store that several server processes share, for a fixture parametrized
    over ``EVERY_STORE``: a SQLite file, a PostgreSQL schema of its own, or a
    MongoDB database (the emulator's unless SESSIONQ_TEST_MONGODB_URL)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(request.getfixturevalue("mongodb_store_url"))
