"""The per-run directory that ``--workers N`` share their metrics through."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from server import metrics


def test_a_fresh_directory_per_run_named_in_the_environment_and_removed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    # Left by a parent that was SIGKILLed (no such pid), and one of a live parent.
    orphan = tmp_path / f"{metrics.DIR_PREFIX}999999999-x"
    orphan.mkdir()
    (orphan / "counter_1.db").write_bytes(b"old")
    alive = tmp_path / f"{metrics.DIR_PREFIX}{os.getppid()}-y"
    alive.mkdir()

    with metrics.shared_across_workers() as path:
        assert os.environ[metrics.MULTIPROC_ENV] == path
        assert Path(path).parent == tmp_path and not os.listdir(path)
        assert not orphan.exists()
        assert alive.exists()
        (Path(path) / "counter_2.db").write_bytes(b"new")

    assert not Path(path).exists()
    assert metrics.MULTIPROC_ENV not in os.environ
    assert alive.exists()


def test_takeover_kinds_are_bounded() -> None:
    with pytest.raises(ValueError, match="takeover how must be one of"):
        metrics.takeover("stolen")


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_prime_shows_known_label_values_as_zeros() -> None:
    metrics.prime(["unit.op"])
    body = metrics.render()[0].decode()
    for series in (
        'sessionq_closes_total{code="4503"}',
        'sessionq_requests_refused_total{code="queue_full"}',
        'sessionq_consumer_failures_total{cause="fenced"}',
        'sessionq_session_takeovers_total{how="adopt"}',
        'sessionq_sessions{state="recovering"}',
        'sessionq_requests_finished_total{op="unit.op",outcome="crashed"}',
        'sessionq_request_seconds_count{op="unit.op"}',
        'sessionq_store_seconds_count{op="finish_requests"}',
    ):
        # Present from the start (zero in a fresh process; other tests in
        # the same run may have counted some already).
        assert f"\n{series} " in body, series


def test_a_session_moving_between_states_moves_between_gauges() -> None:
    before = {s: _sample("sessionq_sessions", state=s) for s in metrics.SESSION_STATES}
    metrics.session_moved(None, "open")
    metrics.session_moved("open", "draining")
    metrics.session_moved("draining", "recovering")
    metrics.session_moved("recovering", "closing")  # closing is not counted
    metrics.session_moved(None, "open")
    after = {s: _sample("sessionq_sessions", state=s) for s in metrics.SESSION_STATES}
    assert {s: after[s] - before[s] for s in after} == {"open": 1, "draining": 0, "recovering": 0}
