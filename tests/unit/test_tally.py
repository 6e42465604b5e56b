"""A tally scrapes exactly as prometheus_client's own counter and histogram
would, fed the same values (the series dashboards and alerts read)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server import tally

BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1, 10)
amounts = st.floats(min_value=0, max_value=100, allow_nan=False) | st.sampled_from(BUCKETS)
ops = st.sampled_from(["echo", "sleep", "kv.put"])


def _scrape(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines without ``_created`` (a tally has none)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@given(st.lists(st.tuples(ops, amounts), max_size=40))
def test_a_histogram_tally_scrapes_like_a_prometheus_histogram(
    observations: list[tuple[str, float]],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h = Histogram("x_seconds", "X", ["op"], buckets=BUCKETS, registry=theirs)
    t = tally.HistogramTally("x_seconds", "X", ["op"], buckets=BUCKETS, registry=ours)
    for op in ("echo", "sleep", "kv.put"):  # primed, as metrics.prime() does
        h.labels(op)
        t.labels(op)
    for op, amount in observations:
        h.labels(op).observe(amount)
        t.labels(op).observe(amount)
    assert _scrape(ours) == _scrape(theirs)


@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_an_unlabelled_histogram_and_counter_tally_scrape_alike(sizes: list[int]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h = Histogram("batch", "B", buckets=(1, 2, 4, 8, 16, 32), registry=theirs)
    c = Counter("accepted_total", "A", registry=theirs)
    th = tally.HistogramTally("batch", "B", buckets=(1, 2, 4, 8, 16, 32), registry=ours)
    tc = tally.CounterTally("accepted_total", "A", (), ours)
    for size in sizes:
        h.observe(size)
        th.observe(size)
        c.inc(size)
        tc.inc(size)
    assert _scrape(ours) == _scrape(theirs)


def test_labels_must_match_the_label_names() -> None:
    t = tally.CounterTally("y_total", "Y", ["op", "outcome"], CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        t.labels("echo")
    with pytest.raises(ValueError, match="labels"):
        t.inc()  # a labelled metric is updated through its children
    h = tally.HistogramTally("h", "H", ["op"], buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        h.observe(1.0)


def test_with_workers_the_values_are_prometheus_clients_shared_ones() -> None:
    registry = CollectorRegistry()
    assert isinstance(tally.counter("z_total", "Z", shared=True, registry=registry), Counter)
    shared = tally.histogram("w", "W", buckets=BUCKETS, shared=True, registry=registry)
    assert isinstance(shared, Histogram)
    alone = tally.counter("v_total", "V", shared=False, registry=registry)
    assert isinstance(alone, tally.CounterTally)
