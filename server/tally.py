"""Counters and histograms for the request path, cheap to update.

Every request updates about ten series (queue wait, publish, store calls,
handler time, batch size, the accepted, finished and received counts).
prometheus_client's own objects take 0.4 µs per counter increment and 0.8 µs
per histogram observation (a lock per value, two checks, a Python loop over
the buckets): several µs a request, on the process that is the bottleneck
(docs/performance.md). A tally keeps its numbers in plain Python ints and
floats (the event loop is one thread: no lock), finds the bucket with
:func:`bisect.bisect_left`, and is a collector: a scrape reads the numbers.
An observation costs about 0.15 µs.

With ``--workers N`` the values must live in prometheus_client's shared
memory-mapped files, so :func:`counter` and :func:`histogram` return
prometheus_client's own objects when told ``shared`` (server.metrics says
so from ``PROMETHEUS_MULTIPROC_DIR``); both kinds have the same
``labels(...)``, ``inc(...)`` and ``observe(...)``. A tally exposes no
``_created`` series (nor does multiprocess mode).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = ["CounterTally", "HistogramTally", "counter", "histogram"]


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets are "less or equal".
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Tally(Collector):
    """Children by label values, like prometheus_client's metrics."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: Any
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:  # the metric is its one child: bind its update
            child = self._children[()] = self._child()
            self._bind(child)
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def _bind(self, child: Any) -> None:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, given {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class CounterTally(_Tally):
    def _child(self) -> _Count:
        return _Count()

    def _bind(self, child: _Count) -> None:
        self.inc = child.inc  # type: ignore[method-assign]

    def inc(self, amount: float = 1) -> None:
        """Unlabelled only (replaced by the child's own ``inc``)."""
        raise ValueError(f"{self.name} has labels {self.labelnames}: use labels(...).inc()")

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class HistogramTally(_Tally):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: Any = REGISTRY,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        if not bounds or bounds[-1] != math.inf:
            bounds += (math.inf,)
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def _bind(self, child: _Buckets) -> None:
        self.observe = child.observe  # type: ignore[method-assign]

    def observe(self, amount: float) -> None:
        """Unlabelled only (replaced by the child's own ``observe``)."""
        raise ValueError(f"{self.name} has labels {self.labelnames}: use labels(...).observe()")

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds, list(child.counts), strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            family.add_metric(list(values), buckets, child.sum)
        yield family


def counter(
    name: str, documentation: str, labelnames: Sequence[str] = (), *,
    shared: bool, registry: CollectorRegistry | None = REGISTRY,
) -> Any:  # fmt: skip
    """A counter for the request path: a tally in one process, prometheus_client's
    Counter when the values are ``shared`` between workers."""
    if shared:
        return Counter(name, documentation, labelnames, registry=registry)
    return CounterTally(name, documentation, labelnames, registry)


def histogram(
    name: str, documentation: str, labelnames: Sequence[str] = (), *,
    buckets: Sequence[float], shared: bool, registry: CollectorRegistry | None = REGISTRY,
) -> Any:  # fmt: skip
    """A histogram for the request path (see :func:`counter`)."""
    if shared:
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
    return HistogramTally(name, documentation, labelnames, buckets=buckets, registry=registry)
