"""bench.ab's summary: each build's rounds, their mean and spread, and the
ratio that docs/performance.md quotes."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from bench.ab import main, medians, order, summary


def report(rows: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    return {
        "rows": [
            {"key": key, "error": "",
             "runs": [{"rate": rate, "cpu_us_per_msg": {"server": cpu}} for rate, cpu in runs]}
            for key, runs in rows.items()
        ]
    }  # fmt: skip


def test_a_round_is_the_median_of_each_rows_runs_and_failed_rows_are_left_out() -> None:
    got = medians(report({"a:1": [(100, 9), (300, 7), (200, 8)], "b:2": []}))
    assert got == {"a:1": (200, 8)}


def test_the_summary_gives_every_round_the_mean_the_spread_and_the_ratio() -> None:
    rounds = [
        {"before": {"a:1": (2000.0, 400.0)}, "after": {"a:1": (1900.0, 420.0)}},
        {"before": {"a:1": (2200.0, 380.0)}, "after": {"a:1": (2100.0, 400.0)}},
    ]
    lines = summary(rounds).splitlines()
    assert lines[2] == "| `a:1` | before | 2,000, 2,200 | 2,100 | 6.7% | 390 |  |"
    assert lines[3] == "| `a:1` | after | 1,900, 2,100 | 2,000 | 7.1% | 410 | 0.952 |"


def test_the_builds_take_turns_at_going_first() -> None:
    assert [order(n) for n in (1, 2, 3, 4)] == [
        ("before", "after"), ("after", "before"), ("before", "after"), ("after", "before")
    ]  # fmt: skip


def test_a_build_is_not_compared_with_itself(capsys: pytest.CaptureFixture[str]) -> None:
    # This virtualenv twice: both run this tree's server; refused before any run.
    assert main(["--before", sys.executable, "--after", sys.executable, "--rounds", "1"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
