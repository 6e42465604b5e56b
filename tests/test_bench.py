"""``sessionq bench`` against a real server: the subprocess with ``--json``, and
``run_bench`` as a library in the test's own event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson
import pytest
from conftest import PASSWORD, UNIT, ClientFactory, ServerFactory

from clients.bench import BenchConfig, BenchError, clean, run_bench
from server.app import Server


def check_consistent(report: dict[str, Any]) -> None:
    """Counts add up and percentiles are ordered."""
    assert (
        report["requests_ok"] + report["requests_failed"] + report["requests_unfinished"]
        == (report["requests_sent"])
    )
    assert report["connections_ok"] + report["connections_failed"] == report["connections"]
    for stats in (report["connect_ms"], *report["latency_ms"].values()):
        if stats["count"]:
            assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    if not report["warmup_s"]:
        assert report["latency_ms"]["submit_to_result"]["count"] == report["requests_ok"]


async def bench(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONQ_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "bench", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 3 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_short_closed_loop_run_reports_consistent_json(server: Server) -> None:
    code, out, err = await bench(
        "--url", f"ws://127.0.0.1:{server.port}/ws", "--connections", "4", "--requests", "20",
        "--inflight", "4", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = orjson.loads(out)
    check_consistent(report)
    assert report["connections_ok"] == 4 and report["connect_errors"] == {}
    assert report["requests_ok"] == report["requests_planned"] == 80
    assert report["errors"] == {} and report["requests_unfinished"] == 0
    assert report["requests_per_s"] > 0 and report["sessions_per_s"] > 0
    assert report["latency_ms"]["submit_to_accepted"]["count"] == 80
    assert report["users_created"] == 1 and not report["timed_out"]


async def test_errors_are_counted_by_code_and_exit_1(server: Server) -> None:
    code, out, err = await bench(
        "--url", f"ws://127.0.0.1:{server.port}", "-c", "2", "-n", "3", "--op", "sleep",
        "--args", '{"seconds": 1000000}', "--json",
    )  # fmt: skip
    assert code == 1, err
    report = orjson.loads(out)
    check_consistent(report)
    assert report["errors"] == {"bad_request": 6} and report["requests_failed"] == 6


async def test_remote_target_refused_without_allow_remote() -> None:
    code, out, err = await bench("--url", "ws://192.0.2.1:8765/ws", "-c", "1")
    assert code == 2 and out == "" and "--allow-remote" in err


async def test_open_loop_library_run_with_users_over_the_connection_limit(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(max_connections_per_user=3)
    established: list[dict[str, Any]] = []
    config = BenchConfig(
        url=f"ws://127.0.0.1:{server.port}/ws", connections=7, requests=10, rate=700,
        per_user=3, hold=0.05, on_established=established.append, timeout=3 * UNIT,
    )  # fmt: skip
    report = await run_bench(config)
    check_consistent(report)
    assert clean(report), report
    assert report["mode"] == "open" and report["users_created"] == 3
    assert report["connections_ok"] == 7 and report["requests_ok"] == 70
    assert [info["connections_ok"] for info in established] == [7]


async def test_given_user_and_duration_bound(server: Server, user_client: ClientFactory) -> None:
    name = (await user_client()).welcome["user"]
    config = BenchConfig(
        url=f"ws://127.0.0.1:{server.port}/ws", connections=2, requests=0, duration=0.3,
        inflight=2, username=name, password=PASSWORD, timeout=3 * UNIT,
    )  # fmt: skip
    report = await run_bench(config)
    check_consistent(report)
    assert clean(report), report
    assert report["users_created"] == 0 and report["requests_ok"] > 0
    assert report["requests_planned"] is None and report["elapsed_s"] < 0.3 + UNIT


async def test_mapping_config_with_warmup(server: Server) -> None:
    with pytest.raises(BenchError, match="cpu_pids"):
        await run_bench({"url": f"ws://127.0.0.1:{server.port}/ws", "cpu_pids": [1]})
    report = await run_bench({
        "url": f"ws://127.0.0.1:{server.port}/ws", "connections": 2, "window": 2,
        "requests": 0, "duration": 0.4, "warmup": 0.2, "timeout": 3 * UNIT,
    })  # fmt: skip
    assert clean(report), report
    assert report["inflight"] == 2 and report["warmup_s"] == 0.2
    measured = report["latency_ms"]["submit_to_result"]["count"]
    assert 0 < measured < report["requests_ok"]
    assert report["requests_per_s"] > 0
