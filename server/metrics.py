"""Every Prometheus metric sessionq exports, under the ``sessionq_`` namespace.

One module, defined once at import (metric objects hold no connections). With
``--workers N`` each process serves its own ``/metrics``; scrape each worker or
aggregate at the load balancer (docs/operations.md).
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

NS = "sessionq"

connections = Gauge(f"{NS}_connections", "Open WebSocket connections")
sessions_live = Gauge(f"{NS}_sessions", "Sessions owned by this process", ["state"])
auth_total = Counter(f"{NS}_auth_total", "Authentication attempts", ["method", "outcome"])
frames_in = Counter(f"{NS}_frames_received_total", "Client frames received", ["type"])
bad_frames = Counter(f"{NS}_bad_frames_total", "Client frames refused as bad_request")
requests_accepted = Counter(f"{NS}_requests_accepted_total", "Requests accepted")
requests_refused = Counter(f"{NS}_requests_refused_total", "Submits refused", ["code"])
requests_finished = Counter(f"{NS}_requests_finished_total", "Requests finished", ["op", "outcome"])
request_seconds = Histogram(
    f"{NS}_request_seconds",
    "Handler run time",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
batch_size = Histogram(
    f"{NS}_publish_batch_requests",
    "Requests carried by one broker message",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
broker_up = Gauge(f"{NS}_broker_up", "1 while the AMQP connection is open")
broker_reconnects = Counter(f"{NS}_broker_reconnects_total", "AMQP reconnections")
store_errors = Counter(f"{NS}_store_errors_total", "Store operations that failed")
consumer_failures = Counter(
    f"{NS}_consumer_failures_total", "Session consumers that ended on an error", ["cause"]
)
closes = Counter(f"{NS}_closes_total", "Connections closed by the server", ["code"])


# Hot-path children, bound once per label set: ``labels()`` costs a lock and
# a dict lookup per call, several per request otherwise.
@functools.lru_cache(maxsize=4096)
def finished(op: str, outcome: str) -> Any:
    return requests_finished.labels(op, outcome)


@functools.lru_cache(maxsize=1024)
def run_time(op: str) -> Any:
    return request_seconds.labels(op)


def observe_request(op: str, outcome: str, seconds: float | None) -> None:
    """The consumer's hook: one final (``seconds`` None: no handler ran)."""
    if seconds is not None:
        run_time(op).observe(seconds)
    finished(op, outcome).inc()


submits_in = frames_in.labels("submit")


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
