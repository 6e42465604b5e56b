"""sessionq itself, driven by its own load client (``clients/bench.py``).

Wired into ``bench.run`` through its two hooks (:func:`scenarios` and
:func:`sections`); also runnable alone for development::

    .venv/bin/python -m bench.sessionq row -c 100 -w 16 [--workers 2] [--rate R]
    .venv/bin/python -m bench.sessionq idle [-n 10000]

Every run starts a fresh ``sessionq serve`` subprocess on a fresh SQLite file
in a temporary directory (WAL files included), with

- the per-user budgets generous (``SESSIONQ_MAX_CONNECTIONS_PER_USER`` and
  ``SESSIONQ_MAX_SESSIONS_PER_USER`` 100,000, ``SESSIONQ_MAX_PENDING_PER_USER``
  far above any load here: the rows use no ``kv.*`` op) and the client
  registering few users (one per :data:`PER_USER` sessions), so that the
  bcrypt hashes of registration (default 12 rounds, ~0.25 s each, before the
  measured window) stay a second or less; the budgets are still checked on
  every new session and every batch, as in production;
- a fixed ``SESSIONQ_JWT_SECRET``, ``SESSIONQ_LOG_LEVEL=WARNING``, every other
  setting at its default (prefetch, channel pool, batch size, SQLite
  ``synchronous``...), i.e. what ``sessionq serve`` does out of the box.

What a row measures (the full path: token in the handshake, every request
stored before ``accepted``, published with publisher confirms, consumed in
order, its result stored before it is sent):

- **req/s**: results received in the measured window (after the warm-up) per
  second, the same definition as the ceilings' msgs/s (replies counted in a
  fixed window), so the two compare directly.
- **submit→result** and **accepted→result** p50/p99: per request, from just
  before the submit frame is sent (open loop: from its *scheduled* send time,
  so a server that falls behind cannot hide its queueing) to when the
  ``result`` frame is read, and from ``accepted`` to ``result``; over the
  requests submitted after the warm-up.
- **CPU µs/req**: ``/proc/<pid>/stat`` CPU time over the measured window,
  divided by the results received in it: the server (its process and every
  ``--workers`` process), the RabbitMQ node, this client.

The open-loop row offers half of the highest closed-loop rate measured at
1,000 sessions in the same run (Poisson arrivals spread over the sessions) and
reports p99 submit→result. The idle section connects 10,000 sessions
(``--quick``: 1,000), holds them idle and reads the server's RSS and the
broker's memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.loadgen import CpuMeter, LoadResult, find_broker_pid, rabbitmq_status

if TYPE_CHECKING:
    from bench.run import Context, Row, Scenario, Server

GROUP = "sessionq"
PER_USER = 1_000  # sessions per registered user: 1,000 sessions -> 1 user, 10,000 -> 10
MAX_PER_USER = 100_000  # the server's connections and sessions per user in these runs
MAX_PENDING_PER_USER = 10_000_000  # 1,000 sessions x any window, with room to spare
JWT_SECRET = "bench-" + "x" * 40
IDLE_SESSIONS = 10_000
IDLE_SESSIONS_QUICK = 1_000
IDLE_CONNECT_CONCURRENCY = 128  # handshakes in progress at once in the idle test
IDLE_TIMEOUT = 240.0  # hard cap on connecting + holding the idle sessions
NOFILE = 65_536  # descriptors for this client and the server in the idle test
OPEN_LOOP_FRACTION = 0.5
GRACE = 30.0  # after the window: seconds for the outstanding results

# Closed-loop rates measured at 1,000 sessions in this process, by scenario key:
# the open-loop row offers half of the best of them.
_MAX_RATE_AT_1000: dict[str, list[float]] = {}
# Figures of the non-row sections, for the targets table.
RESULTS: dict[str, Any] = {}


# -- the server ------------------------------------------------------------------------
def server_argv(port: int, workers: int) -> list[str]:
    """``sessionq serve`` from the venv that runs the benchmark."""
    script = Path(sys.executable).parent / "sessionq"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
    return [*base, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def server_env(tmp: str) -> dict[str, str]:
    return {
        "SESSIONQ_STORE_URL": f"sqlite:///{tmp}/bench.db",  # tmp is absolute: four slashes
        "SESSIONQ_JWT_SECRET": JWT_SECRET,
        "SESSIONQ_MAX_CONNECTIONS_PER_USER": str(MAX_PER_USER),
        "SESSIONQ_MAX_SESSIONS_PER_USER": str(MAX_PER_USER),
        "SESSIONQ_MAX_PENDING_PER_USER": str(MAX_PENDING_PER_USER),
        "SESSIONQ_LOG_LEVEL": "WARNING",
        "SESSIONQ_LOG_FORMAT": "text",
    }


# The PostgreSQL rows: a role that may create databases (scripts/sessionq makes
# sessionq/sessionq on a local cluster); each run gets a fresh database.
POSTGRES_ADMIN_URL = os.environ.get(
    "SESSIONQ_BENCH_POSTGRES_URL", "postgresql://sessionq:sessionq@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run (dropped after it); its URL."""
    import asyncpg  # the PostgreSQL rows only

    name = f"sessionq_bench_{os.getpid()}_{int(time.time() * 1000)}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        head, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
        yield f"{head}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process (postmaster and backends), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() == b"postgres":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def sessionq_server(
    ctx: Context, *, workers: int = 1, nofile: int | None = None, store: str = "sqlite"
) -> Iterator[Server]:
    """A fresh ``sessionq serve`` on a fresh SQLite file (or, ``store`` postgresql,
    a fresh PostgreSQL database); yields once every worker has printed its
    ``sessionq listening`` line (broker connected)."""
    from bench.run import free_port

    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="sessionq-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        env = server_env(tmp)
        if store == "postgresql":
            env["SESSIONQ_STORE_URL"] = stack.enter_context(postgres_database())
        srv = stack.enter_context(
            ctx.server(
                server_argv(port, workers),
                port=port,
                env=env,
                name=f"sessionq-w{workers}",
                nofile=nofile,
            )
        )
        deadline = time.monotonic() + 30.0
        while srv.log.read_text(errors="replace").count("sessionq listening") < workers:
            if srv.proc.poll() is not None or time.monotonic() > deadline:
                tail = srv.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sessionq did not become ready:\n{tail}")
            time.sleep(0.05)
        yield srv


def ws_url(srv: Server) -> str:
    return f"ws://{srv.host}:{srv.port}/ws"


# -- reaching into the load client's state ---------------------------------------------------
@contextlib.contextmanager
def _capture_state(on_connect: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
    """Capture ``run_bench``'s private tally (``st``) and connection list while it runs,
    by wrapping ``clients.bench._open_all`` (called once per run, so nothing is
    added per frame). ``st.ok`` read at both ends of the measured window gives the
    results completed in it. Absent (renamed upstream), the caller falls back to the
    report's own ``requests_per_s``. ``on_connect`` is called when the connect phase
    starts (the users are registered by then)."""
    import clients.bench as cb

    box: dict[str, Any] = {}
    original = getattr(cb, "_open_all", None)
    if original is None:
        yield box
        return

    async def wrapper(config: Any, tokens: Any, st: Any, conns: Any, *a: Any, **kw: Any) -> Any:
        box["st"], box["conns"] = st, conns
        if on_connect is not None:
            on_connect()
        return await original(config, tokens, st, conns, *a, **kw)

    cb._open_all = wrapper
    try:
        yield box
    finally:
        cb._open_all = original


def _ok_count(box: Mapping[str, Any]) -> int | None:
    st = box.get("st")
    ok = getattr(st, "ok", None)
    return ok if isinstance(ok, int) else None


# -- one measured run -----------------------------------------------------------------------
@dataclass
class Window:
    """The measured window: CPU and results between two timer callbacks."""

    meter: CpuMeter
    box: dict[str, Any]
    t0: float = 0.0
    t1: float = 0.0
    ok0: int | None = None
    ok1: int | None = None

    def start(self) -> None:
        self.ok0 = _ok_count(self.box)
        self.t0 = time.perf_counter()
        self.meter.start()

    def stop(self) -> None:
        self.meter.stop()
        self.t1 = time.perf_counter()
        self.ok1 = _ok_count(self.box)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0 if self.t1 > self.t0 else 0.0

    @property
    def results(self) -> int | None:
        if self.ok0 is None or self.ok1 is None or not self.t1:
            return None
        return self.ok1 - self.ok0


async def measure(
    url: str,
    cpu_pids: Mapping[str, Any],
    *,
    connections: int,
    window: int = 1,
    rate: float = 0.0,
    warmup: float,
    duration: float,
) -> tuple[LoadResult, dict[str, Any]]:
    """One closed-loop (``rate`` 0) or open-loop run of ``clients.bench.run_bench``
    with a CPU meter over the measured window; returns the row's figures and the
    client's own report."""
    from clients.bench import run_bench

    meter = CpuMeter(dict(cpu_pids))
    with _capture_state() as box:
        win = Window(meter, box)

        def established(_info: dict[str, Any]) -> None:
            # run_bench starts its load right after this returns: the window is
            # [warmup, warmup + duration] of it, as the ceilings' closed loop.
            loop = asyncio.get_running_loop()
            loop.call_later(warmup, win.start)
            loop.call_later(warmup + duration, win.stop)

        report = await run_bench(
            {
                "url": url,
                "connections": connections,
                "requests": 0,
                "op": "echo",
                "inflight": window,
                "rate": rate,
                "warmup": warmup,
                "duration": warmup + duration,
                "grace": GRACE,
                "per_user": PER_USER,
                "timeout": 120.0 + warmup + duration + GRACE,
                "on_established": established,
            }
        )
    lat = report["latency_ms"]
    results = win.results
    if results is None or not win.seconds:  # fallback: the client's own figure
        seconds = duration
        results = int(report["requests_per_s"] * duration)
    else:
        seconds = win.seconds
    errors = (
        report["connections_failed"]
        + report["requests_failed"]
        + report["connections_lost"]
        + (1 if report["timed_out"] else 0)
    )
    notes = []
    if report["connections_failed"]:
        notes.append(
            f"{report['connections_failed']} sessions not opened {report['connect_errors']}"
        )
    if report["errors"]:
        notes.append(
            "requests answered with error "
            + ", ".join(f"`{code}` x{n}" for code, n in report["errors"].items())
        )
    if report["connections_lost"]:
        notes.append(f"{report['connections_lost']} sessions lost")
    if report["timed_out"]:
        notes.append(f"timed out with {report['requests_unfinished']} requests unfinished")
    first_error = "; ".join(notes)
    s2r, a2r = lat["submit_to_result"], lat["accepted_to_result"]
    result = LoadResult(
        connections=connections,
        window=window,
        seconds=seconds,
        messages=results,
        rate=results / seconds if seconds > 0 else 0.0,
        p50_ms=s2r["p50"] or 0.0,
        p99_ms=s2r["p99"] or 0.0,
        errors=errors,
        first_error=first_error,
        cpu=meter.seconds,
        other_cores=(
            max(0.0, meter.machine_busy - sum(meter.seconds.values())) / seconds
            if seconds > 0
            else 0.0
        ),
        extra={
            "accepted_p50_ms": a2r["p50"],
            "accepted_p99_ms": a2r["p99"],
            "offered": rate or None,
            "client_req_s": report["requests_per_s"],
            "sessions_per_s": report["sessions_per_s"],
        },
    )
    return result, report


def run_row(ctx: Context, sc: Scenario, *, workers: int = 1, store: str = "sqlite") -> LoadResult:
    """A closed-loop row: fresh server, ``sc.connections`` x ``sc.window``. On
    PostgreSQL the database server's processes are metered as ``database``
    (SQLite's writer process is the server's child: part of ``server``)."""
    with sessionq_server(ctx, workers=workers, store=store) as srv:
        pids: dict[str, Any] = dict(ctx.cpu_pids(srv))
        if store == "postgresql":
            pids["database"] = postgres_pids()
        result, _ = asyncio.run(
            measure(
                ws_url(srv),
                pids,
                connections=sc.connections,
                window=sc.window,
                warmup=ctx.options.warmup,
                duration=ctx.options.duration,
            )
        )
    result.extra["workers"] = workers
    result.extra["store"] = store
    if sc.connections == 1000 and store == "sqlite" and workers == 1 and not result.errors:
        _MAX_RATE_AT_1000.setdefault(sc.key, []).append(result.rate)
    return result


def max_rate_at_1000(window: int | None = None) -> tuple[float, str] | None:
    """The best median closed-loop rate measured at 1,000 sessions so far (with
    ``window`` in flight per session, or any), and its key."""
    best = [
        (statistics.median(v), k)
        for k, v in _MAX_RATE_AT_1000.items()
        if v and (window is None or k.endswith(f"x{window}"))
    ]
    return max(best) if best else None


def run_open_loop(ctx: Context, sc: Scenario, *, window: int | None = None) -> LoadResult:
    """Open loop at 1,000 sessions, offered half of the maximum rate measured in
    closed loop at 1,000 sessions (any window, or ``window``) earlier in the run."""
    found = max_rate_at_1000(window)
    if found is None:  # run alone (--only): find the maximum first, once
        probe_window = window or 16
        with sessionq_server(ctx) as srv:
            probe, _ = asyncio.run(
                measure(
                    ws_url(srv),
                    ctx.cpu_pids(srv),
                    connections=sc.connections,
                    window=probe_window,
                    warmup=ctx.options.warmup,
                    duration=ctx.options.duration,
                )
            )
        key = f"probe:{sc.connections}x{probe_window}"
        _MAX_RATE_AT_1000.setdefault(key, []).append(probe.rate)
        found = (probe.rate, key)
    top, source = found
    offered = max(1.0, top * OPEN_LOOP_FRACTION)
    with sessionq_server(ctx) as srv:
        result, _ = asyncio.run(
            measure(
                ws_url(srv),
                ctx.cpu_pids(srv),
                connections=sc.connections,
                rate=offered,
                warmup=ctx.options.warmup,
                duration=ctx.options.duration,
            )
        )
    result.window = 0
    result.extra.update({"workers": 1, "max_rate": top, "max_from": source})
    return result


def scenarios(quick: bool) -> list[Scenario]:
    """The sessionq rows, in the order they run (the 1,000-session closed loops
    before the open-loop row that needs their maximum)."""
    from bench.run import Scenario

    levels = [(1, 1), (100, 1), (100, 16), (1000, 1)] + ([] if quick else [(1000, 16)])
    out = [Scenario(f"sessionq:{c}x{w}", GROUP, "full path", c, w, run_row) for c, w in levels]
    out.append(
        Scenario(
            "sessionq-w2:100x16",
            GROUP,
            "full path, --workers 2",
            100,
            16,
            functools.partial(run_row, workers=2),
        )
    )
    for c, w in [(100, 1), (100, 16)]:
        out.append(
            Scenario(
                f"sessionq-pg:{c}x{w}",
                GROUP,
                "full path, PostgreSQL store",
                c,
                w,
                functools.partial(run_row, store="postgresql"),
            )
        )
    out.append(
        Scenario(
            "sessionq-open:1000",
            GROUP,
            "full path, open loop at ½ the max (any window)",
            1000,
            0,
            run_open_loop,
        )
    )
    out.append(
        Scenario(
            "sessionq-open-w1:1000",
            GROUP,
            "full path, open loop at ½ the window-1 max",
            1000,
            0,
            functools.partial(run_open_loop, window=1),
        )
    )
    return out


# -- the sessionq table ------------------------------------------------------------------------
SQ_HEAD = (
    "| row | sessions | window | workers | req/s | submit→result p50 ms | p99 ms "
    "| accepted→result p50 ms | p99 ms | server CPU µs/req | broker CPU µs/req "
    "| client CPU µs/req | database CPU µs/req | other cores |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
    "| ---: |"
)


def _x(r: LoadResult, name: str) -> float | None:
    v = r.extra.get(name)
    return float(v) if isinstance(v, int | float) else None


def table(rows: Sequence[Row]) -> str:
    from bench.run import _ms, _num, row_notes

    lines = [SQ_HEAD]
    for row in rows:
        sc = row.scenario
        workers = 2 if "--workers 2" in sc.label else 1
        if not row.runs:
            lines.append(
                f"| {sc.label} | {sc.connections:,} | {sc.window or 'open'} | {workers} "
                f"| {row.error if row.skipped else 'failed: ' + row.error} | | | | | | | | | |"
            )
            continue
        window = str(sc.window)
        if not sc.window:
            offered = row.median(lambda r: _x(r, "offered"))
            window = f"open, {offered:,.0f} req/s offered" if offered else "open"
        label = sc.label + row_notes(row)
        cells = [
            label,
            f"{sc.connections:,}",
            window,
            str(workers),
            _num(row.median(lambda r: r.rate), ",.0f"),
            _ms(row.median(lambda r: r.p50_ms)),
            _ms(row.median(lambda r: r.p99_ms)),
            _ms(row.median(lambda r: _x(r, "accepted_p50_ms"))),
            _ms(row.median(lambda r: _x(r, "accepted_p99_ms"))),
            *(_num(row.median_cpu(name), ".0f") for name in ("server", "broker", "client")),
            _num(row.median_cpu("database"), ".0f") if "PostgreSQL" in sc.label else "-",
            _num(row.median(lambda r: r.other_cores), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def intro(opts: Any) -> str:
    return (
        "The full path: a fresh `sessionq serve` (default settings, fresh SQLite file) "
        "for every run, sessions authenticated with a token in the handshake (the client "
        f"registers one user per {PER_USER:,} sessions before the window), op `echo` "
        "(`args` `{}`), every request stored before `accepted`, published with publisher "
        "confirms, consumed in order, its result stored before it is sent. Closed loop "
        "(`window` requests in flight per session), driven by `clients/bench.py` in this "
        "process. req/s: results received in the measured window per second (as the "
        "ceilings' msgs/s). submit→result: from just before the submit is sent (open loop: "
        "its scheduled send time) to the result frame; accepted→result: from the "
        "`accepted` frame to the result frame; both over the requests submitted after the "
        "warm-up. CPU µs/req: over the measured window, per result; server = the server "
        "process and its `--workers` processes. The open-loop rows offer, with Poisson "
        "arrivals spread over 1,000 sessions, half of the highest closed-loop req/s "
        "measured at 1,000 sessions earlier in the same run: the first half of the best "
        'of window 1 and window 16 (the target\'s reading of "the measured maximum"), '
        "the second half of the window-1 figure (arrivals at a few per second per session "
        "give the server little to coalesce within a session, as at window 1). "
        "The PostgreSQL rows are the same path with `SESSIONQ_STORE_URL` on a fresh "
        "database of the local PostgreSQL for every run; database CPU is every "
        "`postgres` process (SQLite's writer process is the server's child, so on "
        "the other rows the store's CPU is part of the server column)."
    )


# -- 10,000 idle sessions ---------------------------------------------------------------------
def _vmrss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kib(pids: Sequence[int]) -> int:
    return sum(v for p in pids if (v := _vmrss_kib(p)) is not None)


def broker_memory() -> dict[str, int | None]:
    """The RabbitMQ node: beam's VmRSS and what ``rabbitmqctl status`` reports
    (the node's own total, Erlang-allocated, queue processes), queue count."""
    pid = find_broker_pid()
    out: dict[str, int | None] = {"beam_rss_kib": _vmrss_kib(pid) if pid else None}
    try:
        status = rabbitmq_status()
        mem = status.get("memory", {})
        total = mem.get("total", {})
        out["erlang_kib"] = int(total["erlang"]) // 1024 if "erlang" in total else None
        out["queue_procs_kib"] = int(mem["queue_procs"]) // 1024 if "queue_procs" in mem else None
        out["queues"] = status.get("totals", {}).get("queue_count")
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        out.update(erlang_kib=None, queue_procs_kib=None, queues=None)
    return out


def _raise_own_nofile(wanted: int) -> int:
    """Raise this process's descriptor limit (soft and, as root, hard) towards
    ``wanted``; return the soft limit now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((wanted, max(hard, wanted)), (min(wanted, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _open_count(box: Mapping[str, Any]) -> int | None:
    conns = box.get("conns")
    if conns is None:
        return None
    from websockets.protocol import State

    return sum(1 for c in list(conns) if c.ws.state is State.OPEN)


async def _idle(url: str, srv_pids: Callable[[], list[int]], n: int) -> dict[str, Any]:
    """Warm the server up, read memory, connect ``n`` sessions, read memory again
    while they are held idle, close them, and time the broker's clean-up."""
    from clients.bench import run_bench

    out: dict[str, Any] = {"sessions": n}
    # Warm-up: code paths, the bcrypt thread, the store: not part of the per-session cost.
    await run_bench(
        {"url": url, "connections": 50, "requests": 20, "inflight": 4, "per_user": PER_USER}
    )
    await asyncio.sleep(2.0)
    out["server_rss_before_kib"] = rss_kib(srv_pids())
    out["broker_before"] = await asyncio.to_thread(broker_memory)
    meter = CpuMeter({"server": srv_pids(), "broker": find_broker_pid(), "client": os.getpid()})
    progress: list[tuple[float, int]] = []  # (time, sessions open) during the connect phase
    sampling: list[asyncio.Task[None]] = []

    async def sample() -> None:
        while True:
            progress.append((time.perf_counter(), len(box.get("conns") or ())))
            await asyncio.sleep(0.25)

    def connecting() -> None:
        meter.start()
        sampling.append(asyncio.get_running_loop().create_task(sample()))

    with _capture_state(on_connect=connecting) as box:
        held: dict[str, Any] = {}

        async def established(info: dict[str, Any]) -> None:
            for task in sampling:
                task.cancel()
            progress.append((time.perf_counter(), len(box.get("conns") or ())))
            meter.stop()
            held["connect_cpu"] = dict(meter.seconds)
            await asyncio.sleep(3.0)  # let the broker's queue processes settle
            held["open_after_3s"] = _open_count(box)
            held["server_rss_kib"] = rss_kib(srv_pids())
            held["broker"] = await asyncio.to_thread(broker_memory)
            held["open_after_measure"] = _open_count(box)

        report = await run_bench(
            {
                "url": url,
                "connections": n,
                "requests": 0,
                "per_user": PER_USER,
                "connect_concurrency": IDLE_CONNECT_CONCURRENCY,
                "connect_timeout": 30.0,
                "hold": 2.0,
                "timeout": IDLE_TIMEOUT,
                "on_established": established,
            }
        )
        out["open_at_end"] = _open_count(box)
        for task in sampling:
            task.cancel()
    out.update(held)
    out["rate_first_last"] = _first_last_rate(progress, n)
    out["report"] = {
        k: report[k]
        for k in (
            "users",
            "setup_s",
            "connections_ok",
            "connections_failed",
            "connect_errors",
            "connect_s",
            "sessions_per_s",
            "connect_ms",
            "timed_out",
        )
    }
    # After the close: how long until the broker has deleted the queues again.
    before_q = out["broker_before"].get("queues")
    t = time.monotonic()
    out["queues_gone_s"] = None
    if before_q is not None:
        while time.monotonic() - t < 30.0:
            q = (await asyncio.to_thread(broker_memory)).get("queues")
            if q is not None and q <= before_q + 5:
                out["queues_gone_s"] = round(time.monotonic() - t, 1)
                break
            await asyncio.sleep(1.0)
    return out


def _first_last_rate(progress: Sequence[tuple[float, int]], n: int) -> tuple[float, float] | None:
    """Sessions/s over the first and the last tenth of the connect phase (from the
    0.25 s samples of the open count): does connecting slow down as sessions pile up?"""
    if len(progress) < 3 or n < 100:
        return None
    t0, t1 = progress[0][0], progress[-1][0]
    tenth = n // 10
    first = next((t for t, k in progress if k >= tenth), None)
    last = next((t for t, k in progress if k >= n - tenth), None)
    if first is None or last is None or first <= t0 or t1 <= last:
        return None
    return tenth / (first - t0), tenth / (t1 - last)


def idle_test(ctx: Context, n: int) -> dict[str, Any]:
    soft = _raise_own_nofile(NOFILE)
    started = time.monotonic()
    try:
        with sessionq_server(ctx, nofile=NOFILE) as srv:
            server_nofile = _nofile_of(srv.pid)
            out = asyncio.run(_idle(ws_url(srv), srv.pids, n))
    except Exception as exc:  # reported, not raised: the rest of the document stands
        out = {"sessions": n, "error": f"{type(exc).__name__}: {exc}"}
        server_nofile = None
    out["client_nofile"] = soft
    out["server_nofile"] = server_nofile
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    return out


def _nofile_of(pid: int) -> int | None:
    from bench.loadgen import open_files_limit

    return open_files_limit(pid)


def _per(after: int | None, before: int | None, n: int) -> float | None:
    if after is None or before is None or n <= 0:
        return None
    return (after - before) / n


def idle_figures(out: Mapping[str, Any]) -> dict[str, Any]:
    """The derived figures of :func:`idle_test` (KiB per session, sessions/s)."""
    rep = out.get("report", {})
    ok = int(rep.get("connections_ok") or 0)
    held = out.get("open_after_measure")
    held = ok if held is None else held
    bb, ba = out.get("broker_before", {}), out.get("broker", {})
    return {
        "wanted": out.get("sessions"),
        "ok": ok,
        "held": held,
        "sessions_per_s": rep.get("sessions_per_s"),
        "server_kib": _per(out.get("server_rss_kib"), out.get("server_rss_before_kib"), held),
        "broker_rss_kib": _per(ba.get("beam_rss_kib"), bb.get("beam_rss_kib"), held),
        "broker_erlang_kib": _per(ba.get("erlang_kib"), bb.get("erlang_kib"), held),
        "broker_queue_kib": _per(ba.get("queue_procs_kib"), bb.get("queue_procs_kib"), held),
        "queues_added": (
            ba["queues"] - bb["queues"]
            if ba.get("queues") is not None and bb.get("queues") is not None
            else None
        ),
    }


def _kib(v: Any) -> str:
    return "-" if v is None else f"{v / 1024:,.1f} MiB" if v >= 10240 else f"{v:,} KiB"


def idle_section(ctx: Context, n: int | None = None) -> str:
    if n is None:
        n = IDLE_SESSIONS_QUICK if ctx.options.quick else IDLE_SESSIONS
    runs = max(1, ctx.options.runs)
    outs: list[dict[str, Any]] = []
    for i in range(runs):
        print(f"sessionq idle: {n:,} sessions held idle (run {i + 1}/{runs})...", flush=True)
        outs.append(idle_test(ctx, n))
        print(f"  idle: {json.dumps(idle_figures(outs[-1]))}", flush=True)
        if "error" in outs[-1]:
            break
    out, f, each = _median_idle(outs)
    RESULTS["idle"] = out
    RESULTS["idle_runs"] = each
    RESULTS["idle_figures"] = f
    title = f"### Scale: {out['sessions']:,} concurrent idle sessions"
    if "error" in out:
        return (
            f"{title}\n\nFailed: `{out['error']}` (client descriptor limit "
            f"{out.get('client_nofile')}, server {out.get('server_nofile')}).\n"
        )
    rep = out["report"]
    cpu = out.get("connect_cpu", {})
    ok = f["ok"]
    cms = rep.get("connect_ms") or {}
    lines = [
        title,
        "",
        f"One `sessionq serve` (`--workers 1`, fresh SQLite, descriptor limit "
        f"{out.get('server_nofile') or '?'}), warmed up with 50 sessions x 20 requests, "
        "then the client (descriptor limit "
        f"{out.get('client_nofile')}) opens {out['sessions']:,} sessions, "
        f"{IDLE_CONNECT_CONCURRENCY} handshakes at a time, each with a token in the "
        f"handshake ({rep.get('users')} user(s), registered before): the server "
        "verifies the JWT, creates the session in the store, declares its exclusive "
        "auto-delete queue and starts its consumer before the `welcome` frame, "
        "which is when the client counts the session established. Memory is read 3 s "
        "after the last session opened (server: VmRSS of its process(es) from "
        "`/proc`; broker: the beam process's VmRSS and `rabbitmqctl status`), minus "
        "the same figures before the sessions opened, divided by the sessions held. "
        f"The test runs {len(each)} time(s), each with a fresh server; the two bold "
        "figures are medians over the runs, the other rows are from the run with the "
        "median connect rate.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| sessions established / wanted | {ok:,} / {out['sessions']:,}"
        + (f" (failed: {rep.get('connect_errors')})" if rep.get("connections_failed") else "")
        + " |",
        "| still open while held (after the memory readings) | "
        + (f"{f['held']:,}" if f["held"] is not None else "-")
        + " |",
        f"| connect phase | {rep.get('connect_s', 0):.2f} s, "
        f"**{f['sessions_per_s'] or 0:,.0f} sessions/s** |",
        "| sessions/s, server RSS per idle session, in each run | "
        + "; ".join(f"{e['sessions_per_s'] or 0:,.0f}, {_num1(e['server_kib'])} KiB" for e in each)
        + " |",
        "| sessions/s over the first / the last tenth of them | "
        + (
            f"{out['rate_first_last'][0]:,.0f} / {out['rate_first_last'][1]:,.0f}"
            if out.get("rate_first_last")
            else "-"
        )
        + " |",
        f"| handshake→welcome p50 / p99 | {_num2(cms.get('p50'))} / {_num2(cms.get('p99'))} ms "
        f"({IDLE_CONNECT_CONCURRENCY} in progress at once) |",
        "| CPU per session established (server / broker / client) | "
        + " / ".join(
            f"{cpu[k] / ok * 1e6:,.0f} µs" if ok and k in cpu else "-"
            for k in ("server", "broker", "client")
        )
        + " |",
        f"| server RSS before → held | {_kib(out.get('server_rss_before_kib'))} → "
        f"{_kib(out.get('server_rss_kib'))} |",
        f"| **server RSS per idle session** | **{_num1(f['server_kib'])} KiB** |",
        f"| broker memory (`rabbitmqctl status`, Erlang-allocated) before → held | "
        f"{_kib(out['broker_before'].get('erlang_kib'))} → "
        f"{_kib(out['broker'].get('erlang_kib'))} |",
        f"| **broker memory per idle session** | **{_num1(f['broker_erlang_kib'])} KiB** "
        f"(queue processes alone: {_num1(f['broker_queue_kib'])} KiB) |",
        f"| broker (beam process) RSS before → held | "
        f"{_kib(out['broker_before'].get('beam_rss_kib'))} → "
        f"{_kib(out['broker'].get('beam_rss_kib'))}: {_num1(f['broker_rss_kib'])} KiB per "
        "session (RSS grows in allocator carriers, so it lags the allocated figure) |",
        f"| broker queues added | {f['queues_added'] if f['queues_added'] is not None else '-'} |",
        "| queues deleted after the close within | "
        + (f"{out['queues_gone_s']} s" if out.get("queues_gone_s") is not None else "> 30 s")
        + " |",
        "",
    ]
    if rep.get("timed_out"):
        lines.insert(2, f"**Timed out** after {IDLE_TIMEOUT:.0f} s: figures are partial.\n")
    return "\n".join(lines)


def _median_idle(
    outs: Sequence[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The run to show (the median connect rate; a failed run if all failed), its
    figures with the connect rate and server KiB per session as medians over the
    runs that worked, and every run's figures."""
    each = [idle_figures(o) for o in outs]
    good = [(o, e) for o, e in zip(outs, each, strict=True) if "error" not in o]
    if not good:
        return outs[-1], each[-1], each
    good.sort(key=lambda pair: pair[1]["sessions_per_s"] or 0.0)
    out, shown = good[len(good) // 2]
    f = dict(shown)
    for key in ("sessions_per_s", "server_kib"):
        values = [e[key] for _, e in good if e[key] is not None]
        f[key] = statistics.median(values) if values else None
    f["held"] = min((e["held"] for _, e in good if e["held"] is not None), default=None)
    return out, f, each


def _num1(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _num2(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def sections(ctx: Context) -> list[str]:
    return [idle_section(ctx)]


# -- targets ----------------------------------------------------------------------------------
def targets(rows: Sequence[Row]) -> str:
    """The issue's targets, each with the figure measured in this run."""
    by_key = {r.scenario.key: r for r in rows}

    def rate(key: str) -> float | None:
        row = by_key.get(key)
        return row.median(lambda r: r.rate) if row and row.runs else None

    lines = [
        "### Targets",
        "",
        "Computed from the rows above (medians of this run); figures, not timed tests.",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
    ]

    def add(target: str, measured: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else "**pass**" if ok else "**FAIL**"
        lines.append(f"| {target} | {measured} | {verdict} |")

    for n in (100, 1000):
        full, minimal = rate(f"sessionq:{n}x1"), rate(f"minimal:{n}x1")
        if full is not None and minimal:
            add(
                f"window 1 at {n:,} sessions: full path ≥ 70% of the minimal path",
                f"{full:,.0f} / {minimal:,.0f} req/s = {full / minimal:.1%}",
                full / minimal >= 0.70,
            )
        else:
            add(f"window 1 at {n:,} sessions: full path ≥ 70% of the minimal path",
                "not measured", None)  # fmt: skip
    full, peer = rate("sessionq:100x16"), rate("stomp:100x16")
    add(
        "window 16 at 100 sessions: full path ≥ Web-STOMP (receipts)",
        f"{full:,.0f} vs {peer:,.0f} req/s = {full / peer:.3f}x"
        if full is not None and peer
        else "not measured",
        full >= peer if full is not None and peer else None,
    )
    for w in (1, 16):
        pg, lite = rate(f"sessionq-pg:100x{w}"), rate(f"sessionq:100x{w}")
        add(
            f"100 sessions x {w}: PostgreSQL store ≥ 0.8x the SQLite store",
            f"{pg:,.0f} / {lite:,.0f} req/s = {pg / lite:.2f}x"
            if pg is not None and lite
            else "not measured",
            pg / lite >= 0.8 if pg is not None and lite else None,
        )
    row = by_key.get("sessionq-open:1000")
    if row and row.runs:
        p99 = row.median(lambda r: r.p99_ms)
        offered = row.median(lambda r: _x(r, "offered"))
        top = row.median(lambda r: _x(r, "max_rate"))
        measured = f"{p99:,.1f} ms at {offered:,.0f} req/s offered (½ of {top:,.0f})"
        w1 = by_key.get("sessionq-open-w1:1000")
        if w1 and w1.runs:
            w1_p99 = w1.median(lambda r: r.p99_ms) or 0.0
            w1_offered = w1.median(lambda r: _x(r, "offered")) or 0.0
            measured += (
                f"; for reference, at ½ the window-1 maximum ({w1_offered:,.0f} req/s "
                f"offered): {w1_p99:,.1f} ms"
            )
        add(
            "p99 submit→result < 20 ms at 1,000 sessions, open loop at ½ the max rate",
            measured,
            p99 is not None and p99 < 20.0,
        )
    else:
        add("p99 submit→result < 20 ms at 1,000 sessions, open loop at ½ the max rate",
            "not measured", None)  # fmt: skip
    f = RESULTS.get("idle_figures")
    if f:
        tried_all = (f["wanted"] or 0) >= IDLE_SESSIONS
        add(
            f"{IDLE_SESSIONS:,} idle authenticated sessions held",
            f"{f['held']:,} of {f['wanted']:,} held"
            + ("" if tried_all else f" (only {f['wanted']:,} tried)"),
            f["held"] is not None and f["held"] >= IDLE_SESSIONS if tried_all else None,
        )
        add(
            "≤ 30 KiB server RSS per idle session",
            f"{_num1(f['server_kib'])} KiB" if f["server_kib"] is not None else "-",
            f["server_kib"] <= 30.0 if f["server_kib"] is not None else None,
        )
        sps = f["sessions_per_s"]
        add(
            "≥ 500 sessions/s established with token auth",
            f"{sps:,.0f} sessions/s" if sps else "-",
            sps >= 500 if sps else None,
        )
    else:
        for t in (
            f"{IDLE_SESSIONS:,} idle authenticated sessions held",
            "≤ 30 KiB server RSS per idle session",
            "≥ 500 sessions/s established with token auth",
        ):
            add(t, "not measured", None)
    one, two = rate("sessionq:100x16"), rate("sessionq-w2:100x16")
    add(
        "`--workers 2` ≥ 1.3x `--workers 1` (100 sessions x 16)",
        f"{two:,.0f} / {one:,.0f} req/s = {two / one:.3f}x"
        if one and two is not None
        else "not measured",
        two / one >= 1.3 if one and two is not None else None,
    )
    return "\n".join(lines) + "\n"


# -- standalone ---------------------------------------------------------------------------------
def _main(argv: Sequence[str] | None = None) -> int:
    from bench.ceilings import install_uvloop
    from bench.run import Context, Options, Row, Scenario, _one_line

    p = argparse.ArgumentParser(
        prog="python -m bench.sessionq", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="what", required=True)
    row = sub.add_parser("row", help="one full-path run")
    row.add_argument("-c", "--connections", type=int, default=100)
    row.add_argument("-w", "--window", type=int, default=1)
    row.add_argument("--workers", type=int, default=1)
    row.add_argument("--rate", type=float, default=0.0, help="open loop: req/s offered")
    row.add_argument("--warmup", type=float, default=1.0)
    row.add_argument("--duration", type=float, default=3.0)
    idle = sub.add_parser("idle", help="the idle sessions test")
    idle.add_argument("-n", "--sessions", type=int, default=IDLE_SESSIONS)
    args = p.parse_args(argv)
    install_uvloop()
    _raise_own_nofile(NOFILE)
    logdir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    ctx = Context(
        Options(
            warmup=getattr(args, "warmup", 1.0),
            duration=getattr(args, "duration", 3.0),
            runs=1,
            quick=False,
            amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        ),
        logdir,
    )
    if args.what == "idle":
        print(idle_section(ctx, args.sessions))
        print(json.dumps(RESULTS["idle"], indent=2, default=str))
        return 0
    sc = Scenario(f"sessionq:{args.connections}x{args.window}", GROUP, "full path",
                  args.connections, 0 if args.rate else args.window, run_row)  # fmt: skip
    with sessionq_server(ctx, workers=args.workers) as srv:
        result, report = asyncio.run(
            measure(
                ws_url(srv),
                ctx.cpu_pids(srv),
                connections=args.connections,
                window=args.window,
                rate=args.rate,
                warmup=args.warmup,
                duration=args.duration,
            )
        )
    result.extra["workers"] = args.workers
    print(_one_line(result))
    print(table([Row(sc, [result])]))
    print(json.dumps(report, indent=2))
    print(f"logs in {logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
