"""The unit tier runs with no broker and no network; the integration tier says
clearly why it cannot.

Each test runs pytest in a child process with ``SESSIONQ_TEST_BROKER_URL``
pointing at a port that refuses connections (bound, never listening), or in a
network namespace with no interfaces at all where the system allows one.
This file is left out of those runs so that it does not run itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import UNIT

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().relative_to(ROOT)


@pytest.fixture
def closed_broker_url() -> Iterator[str]:
    """An AMQP URL whose port refuses connections for as long as the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        yield f"amqp://guest:guest@127.0.0.1:{sock.getsockname()[1]}/"


def run_pytest(
    *args: str, broker_url: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SESSIONQ_TEST_BROKER_URL": broker_url}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider",
         f"--ignore={HERE}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=24 * UNIT,
    )  # fmt: skip


def test_the_unit_tier_passes_with_no_broker(closed_broker_url: str) -> None:
    run = run_pytest("tests/unit", broker_url=closed_broker_url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout and "RabbitMQ does not answer" not in run.stdout


def test_the_integration_tier_stops_with_a_clear_message_with_no_broker(
    closed_broker_url: str,
) -> None:
    run = run_pytest("tests/test_server.py", "-k", "welcome", broker_url=closed_broker_url)
    port = closed_broker_url.rsplit(":", 1)[1].rstrip("/")
    assert run.returncode == 3, run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert f"RabbitMQ does not answer on 127.0.0.1:{port}" in output
    assert "scripts/sessionq test" in output and " passed" not in output


def _network_namespaces() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=UNIT)
    return probe.returncode == 0


@pytest.mark.skipif(not _network_namespaces(), reason="unshare --net is not permitted here")
def test_the_unit_tier_passes_with_no_network_at_all() -> None:
    # A fresh network namespace has only a loopback interface, and it is down:
    # not even 127.0.0.1 answers, so anything that opens a socket fails.
    run = run_pytest(
        "tests/unit", broker_url="amqp://guest:guest@127.0.0.1:5672/", prefix=("unshare", "--net")
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout
