"""A MongoDB for the tests: a real one when given, else the wire emulator.

``mongodb_url`` (session scope) is ``SESSIONQ_TEST_MONGODB_URL`` when that is
set, else the emulator of ``scripts/mongo-emulator``, started once on a free
port for the whole run and stopped after it. ``mongodb_database`` gives each
test a database of its own, dropped afterwards, and ``mongodb_store_url`` the
same database as a ``SESSIONQ_STORE_URL``.

No MongoDB test is skipped silently: an emulator that cannot be built or does
not start fails the tests that need it, saying why. Only
``SESSIONQ_TEST_MONGODB=off`` skips them (saying so).

The emulator's virtualenv (.venv-mongo, made once) is built when the run's
tests are collected, before any of them starts, so the first build's download
is not counted against a test's timeout.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "scripts" / "mongo-emulator"
URL_VARIABLE = "SESSIONQ_TEST_MONGODB_URL"
SWITCH_VARIABLE = "SESSIONQ_TEST_MONGODB"  # "off" skips every MongoDB test
START_TIMEOUT = 60.0  # seconds for the emulator's ready line
PING_TIMEOUT_MS = 5000
READY_PREFIX = "mongo-emulator: ready "

_setup_failure: str | None = None  # why .venv-mongo could not be made, if it could not


def mongodb_disabled() -> bool:
    return os.environ.get(SWITCH_VARIABLE, "").strip().lower() == "off"


def with_database(url: str, database: str) -> str:
    """``url`` with its path (the default database) set to ``database``; the
    query (directConnection, credentials' authSource...) is kept."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mongodb: needs a MongoDB (the emulator unless SESSIONQ_TEST_MONGODB_URL)"
    )


def _wants_mongodb(item: pytest.Item) -> bool:
    return "mongodb_url" in getattr(item, "fixturenames", ()) or bool(
        item.get_closest_marker("mongodb")
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    global _setup_failure
    wanted = any(_wants_mongodb(item) for item in session.items)
    if not wanted or mongodb_disabled() or os.environ.get(URL_VARIABLE):
        return
    done = subprocess.run([str(EMULATOR), "--setup"], capture_output=True, text=True, check=False)
    if done.returncode:
        _setup_failure = (done.stderr or done.stdout).strip()[-2000:]


@pytest.fixture(scope="session")
def mongodb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if mongodb_disabled():
        pytest.skip(f"MongoDB tests turned off by {SWITCH_VARIABLE}=off")
    given = os.environ.get(URL_VARIABLE)
    if given:
        _ping(given, f"{URL_VARIABLE}={given}")
        yield given
        return
    if _setup_failure is not None:
        pytest.fail(f"the MongoDB emulator could not be set up:\n{_setup_failure}", pytrace=False)
    log = tmp_path_factory.mktemp("mongo-emulator") / "emulator.log"
    with log.open("w") as errors:
        process = subprocess.Popen(
            [str(EMULATOR), "--port", "0", "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    try:
        url = _ready_url(process, log)
        _ping(url, f"the emulator at {url}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture
def mongodb_database(mongodb_url: str) -> Iterator[str]:
    """A fresh database name for one test; the database is dropped after it."""
    database = f"sessionq_test_{uuid.uuid4().hex[:12]}"
    yield database
    client: MongoClient[dict[str, object]] = MongoClient(
        mongodb_url, serverSelectionTimeoutMS=PING_TIMEOUT_MS
    )
    try:
        client.drop_database(database)
    finally:
        client.close()


@pytest.fixture
def mongodb_store_url(mongodb_url: str, mongodb_database: str) -> str:
    """The test's database as a store URL (``SESSIONQ_STORE_URL``)."""
    return with_database(mongodb_url, mongodb_database)


def _ready_url(process: subprocess.Popen[bytes], log: Path) -> str:
    """Read the emulator's ready line; fail the test, saying why, without one."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    output = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in output:
        left = deadline - time.monotonic()
        if left <= 0:
            process.kill()
            _fail_start(f"no ready line within {START_TIMEOUT:.0f} s", output, log)
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:  # it exited
                process.wait()
                _fail_start(f"it exited with {process.returncode}", output, log)
            output += chunk
    line = output.split(b"\n", 1)[0].decode(errors="replace")
    if not line.startswith(READY_PREFIX):
        _fail_start("it printed something else than its ready line", output, log)
    return line[len(READY_PREFIX) :].strip()


def _fail_start(why: str, output: bytes, log: Path) -> None:
    printed = (output.decode(errors="replace") + log.read_text(errors="replace")).strip()
    pytest.fail(
        f"the MongoDB emulator (scripts/mongo-emulator) did not start: {why}\n{printed[-2000:]}\n"
        f"(set {URL_VARIABLE} to use a real MongoDB, or {SWITCH_VARIABLE}=off to skip)",
        pytrace=False,
    )


def _ping(url: str, what: str) -> None:
    client: MongoClient[dict[str, object]] = MongoClient(
        url, serverSelectionTimeoutMS=PING_TIMEOUT_MS
    )
    try:
        client.admin.command("ping")
    except Exception as e:
        pytest.fail(f"MongoDB does not answer at {what}: {e}", pytrace=False)
    finally:
        client.close()
