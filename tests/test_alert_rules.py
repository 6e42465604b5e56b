"""The alert rules in compose/prometheus/ load, and their promtool unit tests
pass: each alert fires on series that should fire it and stays silent on
healthy ones. promtool comes from Debian's prometheus package
(scripts/sessionq test installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PROMETHEUS_DIR = ROOT / "compose" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: scripts/sessionq test installs Debian's prometheus")
    return subprocess.run(
        [exe, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )


def alert_names() -> set[str]:
    return set(
        re.findall(r"^\s*- alert: (\w+)$", (PROMETHEUS_DIR / "alerts.yml").read_text(), re.M)
    )


def test_the_rules_and_the_compose_config_that_loads_them_are_valid() -> None:
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in rules.stdout
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_every_alert_fires_when_it_should_and_stays_silent_otherwise() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_a_runbook_entry() -> None:
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    docs = (ROOT / "docs" / "operations.md").read_text()
    names = alert_names()
    assert len(names) >= 10
    for name in sorted(names):
        # A firing case: the alert name followed by expected alerts.
        assert re.search(rf"alertname: {name}\n\s*exp_alerts:\n\s*- exp_labels:", tests), name
        assert f"`{name}`" in docs, f"{name} is not described in docs/operations.md"
