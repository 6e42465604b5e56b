"""One ``/metrics`` answers for every ``--workers`` process.

``sessionq serve --workers 2`` runs as a subprocess on a real SQLite file and
the local RabbitMQ. Requests go through several connections, which the kernel
spreads over both workers; every scrape, whichever worker answers it, shows
the whole server's total. SIGTERM removes the shared metrics directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets
from conftest import BROKER_URL, PASSWORD, UNIT, Client, finals_of, unique_name, until
from prometheus_client.multiprocess import MultiProcessCollector

from server.metrics import DIR_PREFIX

CONNECTIONS = 8
PER_CONNECTION = 5
SCRAPES = 30


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, Path]]:
    """A two-worker server whose temporary files (the metrics directory
    included) go under ``tmp_path/tmp``."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "SESSIONQ_BROKER_URL": BROKER_URL,
        "SESSIONQ_STORE_URL": f"sqlite:///{tmp_path}/sq.db",
        "SESSIONQ_JWT_SECRET": "metrics-workers-secret-of-32-bytes-at-least",
        "SESSIONQ_BCRYPT_ROUNDS": "4",
        "SESSIONQ_LOG_FORMAT": "json",
        "SESSIONQ_LOG_LEVEL": "WARNING",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        ports = set()
        for _ in range(2):  # each worker says where it listens (the same port)
            line = await asyncio.wait_for(proc.stdout.readline(), 6 * UNIT)
            assert b"listening on" in line, line
            ports.add(int(line.rsplit(b":", 1)[1].split(b"/")[0]))
        (port,) = ports
        yield proc, port, tmp
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=UNIT) as response:
        return str(response.read().decode())


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{series} missing from /metrics"
    return float(match.group(1))


def _accepted_by_worker(metrics_dir: Path) -> dict[str, float]:
    """Each worker's own count, read from its counter file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == "sessionq_requests_accepted_total":
                    counts[path.stem.split("_")[1]] = sample.value
    return counts


async def _drive(port: int, n: int) -> None:
    client = Client(await websockets.connect(f"ws://127.0.0.1:{port}/ws"))
    try:
        await client.send({"type": "register", "username": unique_name("mw"), "password": PASSWORD})
        assert (await client.recv())["type"] == "welcome"
        for k in range(n):
            await client.submit(f"r{k}", "echo", {"k": k})
        finals = finals_of(await client.finals(n, timeout=4 * UNIT))
        assert [f["type"] for f in finals] == ["result"] * n
    finally:
        await client.close()


async def _load_both(port: int, metrics_dir: Path) -> tuple[int, dict[str, float]]:
    """Connections land on either worker: open more until both have accepted
    some. Returns the total accepted and each worker's share (by pid)."""
    total = 0
    for _ in range(10):
        await asyncio.gather(*(_drive(port, PER_CONNECTION) for _ in range(CONNECTIONS)))
        total += CONNECTIONS * PER_CONNECTION
        per_worker = _accepted_by_worker(metrics_dir)
        if len(per_worker) == 2 and all(per_worker.values()):
            break
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert sum(per_worker.values()) == total
    return total, per_worker


async def test_every_scrape_shows_the_total_of_both_workers(
    workers: tuple[asyncio.subprocess.Process, int, Path],
) -> None:
    proc, port, tmp = workers
    (metrics_dir,) = tmp.glob(f"{DIR_PREFIX}*")
    total, _ = await _load_both(port, metrics_dir)

    for _ in range(SCRAPES):
        text = await asyncio.to_thread(_scrape, port)
        assert _value(text, "sessionq_requests_accepted_total") == total
        assert _value(text, 'sessionq_requests_finished_total{op="echo",outcome="result"}') == total
        # Known label values exist before anything happened to them.
        assert _value(text, 'sessionq_closes_total{code="4503"}') == 0
        assert _value(text, 'sessionq_session_takeovers_total{how="adopt"}') == 0
        # Gauges are one series for the server (no pid label), summed or the minimum.
        assert _value(text, "sessionq_broker_up") == 1
        assert 'pid="' not in text

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 4 * UNIT) == 0
    assert not metrics_dir.exists()
    assert not list(tmp.glob(f"{DIR_PREFIX}*"))


async def test_a_dead_worker_keeps_its_counts_and_leaves_the_live_gauges(
    workers: tuple[asyncio.subprocess.Process, int, Path],
) -> None:
    proc, port, tmp = workers
    (metrics_dir,) = tmp.glob(f"{DIR_PREFIX}*")
    total, per_worker = await _load_both(port, metrics_dir)
    dead = min(per_worker)
    os.kill(int(dead), signal.SIGKILL)
    # The parent marks it dead: its live gauges (connections, sessions,
    # pending, broker_up) leave the sums; its counters stay.
    await until(lambda: not list(metrics_dir.glob(f"gauge_live*_{dead}.db")), 4 * UNIT, 0.05)
    assert (metrics_dir / f"counter_{dead}.db").exists()
    for _ in range(5):  # every scrape now reaches the surviving worker
        text = await asyncio.to_thread(_scrape, port)
        assert _value(text, "sessionq_requests_accepted_total") == total
        assert _value(text, "sessionq_broker_up") == 1
        assert _value(text, "sessionq_connections") == 0
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 4 * UNIT)
    assert not metrics_dir.exists()
