"""Every Prometheus metric sessionq exports, under the ``sessionq_`` namespace.

One module, defined once at import (metric objects hold no connections). The
names, types and labels are a contract (DESIGN.md "Metrics"): dashboards and
alerts use them.

One scrape answers for the whole server. With ``--workers N`` (N > 1) the
parent process creates a fresh directory before it starts the workers and
names it in ``PROMETHEUS_MULTIPROC_DIR`` (:func:`shared_across_workers`); each
worker, a fresh interpreter, imports prometheus_client with that variable set,
so every value lives in a small memory-mapped file per process, and
:func:`render` sums the files of all processes. Gauges say how to combine
processes (``multiprocess_mode``): live counts are summed over the workers
alive, ``broker_up`` is the smallest (0 if any worker lost its broker). A
single process keeps its values in memory: a multiprocess increment costs
about twice as much (one mmap write under a lock) and buys nothing there.

Label values known in advance are created by :func:`prime`, once at start, so
a healthy server shows zeros rather than gaps. Hot paths call the small
helpers below, which use label children bound once (``labels()`` costs a lock
and a dict lookup per call). The series every request updates are tallies
(:mod:`server.tally`: plain numbers read at scrape, a fifth of the cost) in a
single process, and prometheus_client's own objects with workers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from protocol import CloseCode, ErrorCode
from server import tally

NS = "sessionq"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_PREFIX = "sessionq-metrics-"


def multiprocess_dir() -> str | None:
    """The directory the worker processes share, or None for a single process."""
    return os.environ.get(MULTIPROC_ENV) or None


# In a fresh worker of --workers N the values live in shared files (the
# request path's series are then prometheus_client's own, not tallies).
_SHARED = multiprocess_dir() is not None

# Known label values (created by prime()).
SESSION_STATES = ("open", "draining", "recovering")
REFUSAL_CODES = tuple(
    c.value
    for c in (
        ErrorCode.UNKNOWN_OP,
        ErrorCode.BAD_REQUEST,
        ErrorCode.QUEUE_FULL,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UNAVAILABLE,
    )
)
FINAL_OUTCOMES = ("result", "handler_error", "timeout", "cancelled", "crashed", "result_too_large")
CONSUMER_FAILURE_CAUSES = ("error", "fenced")
BUDGETS = ("sessions", "connections", "pending", "kv_bytes")  # server.store.Budget
TAKEOVER_HOWS = ("resume", "adopt")
AUTH_METHODS = ("handshake", "auth", "login", "register")
# The store calls on every request's path (the op label is the store method).
STORE_OPS = ("add_requests", "start_request", "finish_requests", "claim_session", "renew_leases")

# Latency buckets shared by the short waits (store, publish): 100 us to 10 s.
_SHORT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
          2.5, 10)  # fmt: skip

connections = Gauge(f"{NS}_connections", "Open WebSocket connections", multiprocess_mode="livesum")
sessions = Gauge(
    f"{NS}_sessions",
    "Sessions this process owns, by state",
    ["state"],
    multiprocess_mode="livesum",
)
pending_requests = Gauge(
    f"{NS}_pending_requests",
    "Unfinished requests of the sessions this process owns",
    multiprocess_mode="livesum",
)
auth_total = Counter(f"{NS}_auth_total", "Authentication attempts", ["method", "outcome"])
frames_in = tally.counter(
    f"{NS}_frames_received_total", "Client frames received", ["type"], shared=_SHARED
)
bad_frames = Counter(f"{NS}_bad_frames_total", "Client frames refused as bad_request")
requests_accepted = tally.counter(
    f"{NS}_requests_accepted_total", "Requests accepted", shared=_SHARED
)
requests_refused = Counter(f"{NS}_requests_refused_total", "Submits refused", ["code"])
requests_finished = tally.counter(
    f"{NS}_requests_finished_total",
    "Requests finished",
    ["op", "outcome"],
    shared=_SHARED,
)
queue_wait_seconds = tally.histogram(
    f"{NS}_queue_wait_seconds",
    "Time from a request's acceptance to the start of its handler",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    shared=_SHARED,
)
request_seconds = tally.histogram(
    f"{NS}_request_seconds",
    "Handler run time",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    shared=_SHARED,
)
store_seconds = tally.histogram(
    f"{NS}_store_seconds",
    "One store call (a group commit counts once)",
    ["op"],
    buckets=_SHORT,
    shared=_SHARED,
)
publish_seconds = tally.histogram(
    f"{NS}_publish_seconds",
    "One broker publish until its confirm",
    buckets=_SHORT,
    shared=_SHARED,
)
batch_size = tally.histogram(
    f"{NS}_publish_batch_requests",
    "Requests carried by one broker message",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    shared=_SHARED,
)
session_takeovers = Counter(
    f"{NS}_session_takeovers_total", "Sessions this process took over", ["how"]
)
broker_up = Gauge(
    f"{NS}_broker_up",
    "1 while the AMQP connection is open (with workers: of every worker)",
    multiprocess_mode="livemin",
)
broker_reconnects = Counter(f"{NS}_broker_reconnects_total", "AMQP reconnections")
store_errors = Counter(f"{NS}_store_errors_total", "Store operations that failed")
consumer_failures = Counter(
    f"{NS}_consumer_failures_total", "Session consumers that ended on an error", ["cause"]
)
closes = Counter(f"{NS}_closes_total", "Connections closed by the server", ["code"])
budget_refusals = Counter(
    f"{NS}_budget_refusals_total",
    "Per-user budgets that refused something (no user label), by budget",
    ["budget"],
)
progress_dropped = Counter(
    f"{NS}_progress_dropped_total", "Progress frames over SESSIONQ_MAX_RESULT_BYTES, not sent"
)
cpu_slot_waits = Counter(
    f"{NS}_cpu_slot_waits_total",
    "CPU ops that had to wait for one of their user's SESSIONQ_CPU_SLOTS_PER_USER slots",
)
cpu_slot_waiting = Gauge(
    f"{NS}_cpu_slot_waiting",
    "CPU ops waiting for their user's slot now",
    multiprocess_mode="livesum",
)


def prime(ops: Iterable[str] = ()) -> None:
    """Create the children of every label value known in advance, so that a
    healthy server shows zeros instead of missing series (``rate()`` and
    alerts need a series to exist before its first increment). Call once at
    start with the registered operation names; calling again is harmless."""
    for state in SESSION_STATES:
        sessions.labels(state)
    for code in REFUSAL_CODES:
        requests_refused.labels(code)
    for close_code in CloseCode:
        closes.labels(str(int(close_code)))
    for cause in CONSUMER_FAILURE_CAUSES:
        consumer_failures.labels(cause)
    for budget in BUDGETS:
        budget_refusals.labels(budget)
    for how in TAKEOVER_HOWS:
        session_takeovers.labels(how)
    for method in AUTH_METHODS:
        auth_total.labels(method, "ok")
    for store_op in STORE_OPS:
        _store_time(store_op)
    for op in ops:
        run_time(op)
        for outcome in FINAL_OUTCOMES:
            finished(op, outcome)


# Hot-path children, bound once per label set.
@functools.lru_cache(maxsize=4096)
def finished(op: str, outcome: str) -> Any:
    return requests_finished.labels(op, outcome)


@functools.lru_cache(maxsize=1024)
def run_time(op: str) -> Any:
    return request_seconds.labels(op)


@functools.lru_cache(maxsize=64)
def _store_time(op: str) -> Any:
    return store_seconds.labels(op)


@functools.lru_cache(maxsize=64)
def _closed(code: int) -> Any:
    return closes.labels(str(int(code)))


@functools.lru_cache(maxsize=64)
def _refused(code: str) -> Any:
    return requests_refused.labels(code)


_takeovers = {how: session_takeovers.labels(how) for how in TAKEOVER_HOWS}
_sessions_in = {state: sessions.labels(state) for state in SESSION_STATES}
submits_in = frames_in.labels("submit")


def observe_request(op: str, outcome: str, seconds: float | None) -> None:
    """The consumer's hook: one final (``seconds`` None: no handler ran)."""
    if seconds is not None:
        run_time(op).observe(seconds)
    finished(op, outcome).inc()


def observe_queue_wait(seconds: float) -> None:
    """A request's handler starts, ``seconds`` after it was accepted."""
    queue_wait_seconds.observe(seconds)


def store_timer(op: str) -> Any:
    """What one call of the store method ``op`` (``add_requests``,
    ``finish_requests``, ...: a bounded set) reports its seconds to (a group
    commit is one call): ``Store.instrument`` binds one per method, once."""
    return _store_time(op).observe


def observe_publish(seconds: float) -> None:
    """One broker publish took ``seconds`` until its confirm."""
    publish_seconds.observe(seconds)


def takeover(how: str) -> None:
    """This process took a session over: ``resume`` (a connection resumed it
    from another connection or process) or ``adopt`` (its lease lapsed)."""
    try:
        child = _takeovers[how]
    except KeyError:
        raise ValueError(f"takeover how must be one of {TAKEOVER_HOWS}, not {how!r}") from None
    child.inc()


def session_moved(old: str | None, new: str | None) -> None:
    """A session owned here went from state ``old`` to ``new`` (``None``: it
    was not owned here before, or is not any more). States outside
    :data:`SESSION_STATES` (closing, closed) are not counted."""
    if old in _sessions_in:
        _sessions_in[old].dec()
    if new in _sessions_in:
        _sessions_in[new].inc()


def closed(code: int) -> None:
    """The server closed a connection with ``code``."""
    _closed(code).inc()


def budget_hit(budget: str) -> None:
    """A per-user budget (``sessions``, ``connections``, ``pending``,
    ``kv_bytes``) refused a session, a batch of submits or a put."""
    budget_refusals.labels(budget).inc()


def refused(code: str) -> None:
    """A submit was refused before acceptance with wire ``code``."""
    _refused(code).inc()


# --- one scrape for every worker -------------------------------------------


@functools.cache
def _registry() -> CollectorRegistry:
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def render() -> tuple[bytes, str]:
    """The body and content type of ``/metrics``: this process's metrics, or
    with workers every worker's, summed (dead workers' counters included)."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


@contextlib.contextmanager
def shared_across_workers() -> Iterator[str]:
    """In the parent of ``--workers N``: a fresh, empty directory for the
    workers' metric files, named in ``PROMETHEUS_MULTIPROC_DIR`` for the
    processes started inside the block (they must import prometheus_client
    after this, which a spawned interpreter does), and removed at the end.

    Directories left by a parent that was killed (SIGKILL) are removed first,
    when their parent process is gone."""
    _remove_orphaned_dirs()
    path = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    before = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = before
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int, path: str) -> None:
    """A worker is gone: drop its live gauges (connections, sessions, pending,
    broker_up) from the sums. Its counters and histograms stay counted."""
    _multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _remove_orphaned_dirs() -> None:
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if not name.startswith(DIR_PREFIX):
                continue
            pid_text = name[len(DIR_PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
