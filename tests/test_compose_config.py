"""The compose stack, checked by reading it (no Docker engine runs here) and by
HAProxy's own configuration check (Debian's haproxy, installed by
scripts/sessionq)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).parent.parent / "compose"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return loaded


def haproxy_cfg() -> str:
    return (COMPOSE / "haproxy.cfg").read_text()


def test_haproxy_accepts_its_configuration(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy is not installed: run the tests with scripts/sessionq test")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = tmp_path / "sessionq.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_cfg().replace("/usr/local/etc/haproxy/certs/sessionq.pem", str(bundle)))
    checked = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_haproxy_ends_tls_hides_metrics_and_logs_no_query_string() -> None:
    cfg = haproxy_cfg()
    assert re.search(r"^\s*bind :8443 ssl crt \S+sessionq\.pem", cfg, re.M)
    assert re.search(r"^\s*http-request deny deny_status 404 if \{ path /metrics \}", cfg, re.M)
    assert re.search(r"^\s*option forwardfor", cfg, re.M)
    (log_format,) = re.findall(r'^\s*log-format "(.*)"', cfg, re.M)
    assert "%HP" in log_format  # the path without its query string
    for whole_request in ("%r", "%HU", "%HQ", "%{+Q}r"):
        assert whole_request not in log_format.split(), whole_request
    assert not re.search(r"^\s*option httplog", cfg, re.M)  # it would log the query string


def test_the_replicas_trust_the_proxy_and_prometheus_scrapes_their_metrics_port() -> None:
    stack = compose()
    env = stack["services"]["sessionq"]["environment"]
    proxy = stack["services"]["haproxy"]["networks"]["default"]["ipv4_address"]
    assert env["SESSIONQ_TRUSTED_PROXIES"] == proxy
    assert env["SESSIONQ_METRICS_PORT"] == "9100"
    prometheus = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "sessionq"]
    assert [c["port"] for c in job["dns_sd_configs"]] == [9100]
    assert "9100" not in str(stack["services"]["sessionq"].get("ports", []))  # not published


def test_the_image_runs_in_production() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^\s*SESSIONQ_ENV=production", dockerfile, re.M)


def test_the_postgresql_override_swaps_the_store() -> None:
    base = compose()
    override: dict[str, Any] = yaml.safe_load((COMPOSE / "postgres.yml").read_text())
    services = override["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["mongo"]["profiles"] == ["mongodb"]  # left out unless asked
    url = services["sessionq"]["environment"]["SESSIONQ_STORE_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    depends = services["sessionq"]["depends_on"]["postgres"]
    assert depends == {"condition": "service_healthy"}
    # The base stack may then do without MongoDB.
    assert base["services"]["sessionq"]["depends_on"]["mongo"]["required"] is False
    assert "postgres-data" in override["volumes"]
