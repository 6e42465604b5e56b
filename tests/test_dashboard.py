"""The Grafana dashboard and the alert rules, proven against a live server.

Debian's Prometheus runs with a temporary config (a 1 s scrape of a real
server, the compose alert rules, a free port, its own storage). After a
short load every panel query of compose/grafana/dashboards/*.json that is
built on sessionq's own metrics returns data, and every alert rule evaluates
without error and stays silent on the healthy server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT, Client, ClientFactory, finals_of, until

from server import metrics
from server.app import Server

ROOT = Path(__file__).parent.parent
DASHBOARDS = sorted((ROOT / "compose" / "grafana" / "dashboards").glob("*.json"))
ALERTS = ROOT / "compose" / "prometheus" / "alerts.yml"
# Grafana's variables, as the dashboard would fill them for "all instances"
# over the last minute with a 1 s scrape.
VARIABLES = {"$instance": ".*", "$__rate_interval": "10s", "$__range": "1m", "$__interval": "1s"}


def panel_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every target, rows' panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for path in DASHBOARDS:
        for panel in walk(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield path.name, panel.get("title", ""), target["expr"]


def own(expr: str) -> bool:
    """Built on sessionq's own metrics (not HAProxy's or RabbitMQ's)."""
    return "sessionq_" in expr or 'job="sessionq"' in expr


def fill(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=UNIT) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=UNIT) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await asyncio.to_thread(self._get, "/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        data = await asyncio.to_thread(self._get, "/api/v1/rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def has(self, expr: str) -> bool:
        return bool(await self.query(expr))


@pytest.fixture
async def prometheus(tmp_path: Path, server: Server) -> AsyncIterator[Prometheus]:
    """Debian's Prometheus scraping a live server every second (never the
    package's own service on :9090: a free port and a storage of its own)."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: scripts/sessionq test installs Debian's package")
    metrics.prime(server.registry.names())  # what `sessionq serve` does at start
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                           "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{
                    "job_name": "sessionq",
                    "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
                }],
            }
        )
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    prom = Prometheus(port)
    try:
        await until(lambda: proc.returncode is not None or prom.ready(), 4 * UNIT, 0.1)
        if proc.returncode is not None:
            assert proc.stderr is not None
            pytest.fail("prometheus did not start: " + (await proc.stderr.read()).decode()[-2000:])
        yield prom
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), 4 * UNIT)


async def load(user_client: ClientFactory, sessions: int = 4, each: int = 20) -> int:
    async def one() -> None:
        client: Client = await user_client()
        for k in range(each):
            await client.submit(f"r{k}", "echo", {"k": k})
        finals = finals_of(await client.finals(each, timeout=4 * UNIT))
        assert [f["type"] for f in finals] == ["result"] * each

    await asyncio.gather(*(one() for _ in range(sessions)))
    return sessions * each


async def eventually(prom: Prometheus, expr: str, timeout: float = 6 * UNIT) -> None:
    """Wait (polling Prometheus) until ``expr`` returns data."""
    async with asyncio.timeout(timeout):
        while not await prom.has(expr):  # noqa: ASYNC110 - Prometheus announces nothing
            await asyncio.sleep(0.2)


def test_the_dashboard_has_the_panels_the_operators_need() -> None:
    titles = {title for _, title, _ in panel_queries()}
    exprs = " ".join(expr for _, _, expr in panel_queries())
    assert DASHBOARDS and len(titles) > 20
    for family in (
        "queue_wait_seconds",
        "pending_requests",
        "sessions",
        "store_seconds",
        "publish_seconds",
        "session_takeovers_total",
        "requests_refused_total",
        "budget_refusals_total",
        "cpu_slot_waiting",
    ):
        assert f"sessionq_{family}" in exprs, family


async def test_every_panel_query_returns_data_and_no_alert_fires(
    prometheus: Prometheus, user_client: ClientFactory
) -> None:
    await eventually(prometheus, 'up{job="sessionq"} == 1')
    before = await prometheus.query("sessionq_requests_accepted_total")
    done = await load(user_client)
    # Prometheus has scraped the load's end and enough samples for a rate.
    start = float(before[0]["value"][1]) if before else 0.0
    await eventually(prometheus, f"sessionq_requests_accepted_total >= {start + done}")
    await eventually(prometheus, "rate(sessionq_requests_accepted_total[10s]) > 0")

    dead = []
    checked = 0
    for dashboard, title, expr in panel_queries():
        if not own(expr):
            continue
        checked += 1
        if not await prometheus.query(fill(expr)):
            dead.append(f"{dashboard}: {title}: {expr}")
    assert checked > 25
    assert not dead, "panels without data:\n" + "\n".join(dead)

    # Every rule has been evaluated at least once since the load, without error.
    async def evaluated() -> list[dict[str, Any]]:
        rules = await prometheus.rules()
        assert rules, "no rules loaded"
        return rules

    async with asyncio.timeout(4 * UNIT):
        while True:
            rules = await evaluated()
            if not any(r["lastEvaluation"].startswith("0001-") for r in rules):
                break
            await asyncio.sleep(0.2)
    assert len(rules) >= 10
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert rule["state"] != "firing", (rule["name"], rule["alerts"])
        assert await prometheus.query(rule["query"]) == [], rule["name"]
