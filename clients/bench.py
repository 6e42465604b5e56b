"""``sessionq bench``: a load generator that measures what a client sees.

    sessionq bench [--url URL] --connections N --requests M [--op echo] [--args JSON]
                   [--inflight W | --rate R] [--ramp PER_S] [--duration S] [--hold S] [--json]

Opens N authenticated connections (at ``--ramp`` per second), then each
submits M requests of one op: closed loop with W in flight per connection, or
open loop (``--rate``: R requests/s offered in total, Poisson or evenly
spaced arrivals, latency counted from the scheduled send time so a slow server
cannot hide queueing). Reports connect time, sessions/s, requests/s, errors by
code and latency percentiles (submit->accepted, submit->result,
accepted->result) of successful requests.

Users: by default it registers ceil(N / --per-user) users named
``bench-<random>-<i>`` (one bcrypt hash each, outside the timed phases) and
opens the connections with their tokens in the handshake, so the server's
per-user connection limit (``SESSIONQ_MAX_CONNECTIONS_PER_USER``, default 10)
is respected. ``--token`` or ``--username``/``--password`` use given
credentials instead.

The client side is kept cheap, since it shares the machine with the server:
one event loop (uvloop when installed), orjson, ids that are list indexes,
pre-built submit text, and ``time.perf_counter`` stamps appended to lists;
percentiles come from sorting at the end.

Bounded: only loopback targets unless ``--allow-remote``; ``--duration`` stops
submitting (outstanding results get ``--grace`` seconds); ``--timeout`` caps
the whole run. Exit codes: 0 clean run; 1 errors, failed connections,
unfinished requests or timeout; 2 bad usage; 3 could not set up (no user, no
connection).

As a library: ``await run_bench(BenchConfig(...))`` returns the report dict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from clients._conn import (
    DEFAULT_URL,
    AuthFailed,
    ClientError,
    ConnectFailed,
    Credentials,
    is_loopback,
    normalize_url,
    open_connection,
    open_session,
    recv_json,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3


class BenchError(Exception):
    """The run could not start: bad configuration or no usable user/connection."""


@dataclass
class BenchConfig:
    url: str = DEFAULT_URL
    connections: int = 10
    requests: int = 100  # per connection; 0 with a duration = until the duration ends
    op: str = "echo"
    args: dict[str, Any] = field(default_factory=dict)
    inflight: int = 1  # closed loop: requests in flight per connection
    rate: float = 0.0  # open loop: total requests/s offered; 0 = closed loop
    arrivals: str = "poisson"  # or "uniform" (open loop)
    ramp: float = 0.0  # connections opened per second; 0 = as fast as allowed
    connect_concurrency: int = 64  # handshakes in progress at once
    connect_timeout: float = 10.0
    duration: float = 0.0  # stop submitting after this many seconds; 0 = no limit
    warmup: float = 0.0  # leave the first seconds of load out of latencies and req/s
    grace: float = 10.0  # after --duration, wait this long for outstanding results
    hold: float = 0.0  # keep the connections idle this long once all are open
    timeout: float = 120.0  # hard cap on the whole run
    users: int = 0  # users to create; 0 = ceil(connections / per_user)
    per_user: int = 10
    username: str | None = None
    password: str | None = None
    token: str | None = None
    allow_remote: bool = False
    progress: bool = False  # draw a progress bar on stderr
    # Called once every connection is open (before --hold); may return an
    # awaitable, which is awaited before the hold starts.
    on_established: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BenchConfig:
        """From a plain dict (``window`` is accepted for ``inflight``); unknown
        keys raise BenchError rather than being silently ignored."""
        known = {f.name for f in fields(cls)}
        renamed = {("inflight" if k == "window" else k): v for k, v in values.items()}
        unknown = sorted(set(renamed) - known)
        if unknown:
            raise BenchError(f"unknown bench settings {unknown}; known: {sorted(known)}")
        return cls(**renamed)

    def validate(self) -> None:
        try:
            self.url = normalize_url(self.url)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if self.connections < 1:
            raise BenchError("--connections must be at least 1")
        if self.requests < 0 or self.inflight < 1:
            raise BenchError("--requests must be >= 0 and --inflight >= 1")
        if min(self.rate, self.ramp, self.duration, self.hold, self.warmup) < 0:
            raise BenchError("--rate, --ramp, --duration, --hold, --warmup must not be negative")
        if self.timeout <= 0:
            raise BenchError("--timeout must be positive")
        if self.arrivals not in ("poisson", "uniform"):
            raise BenchError("--arrivals must be poisson or uniform")
        if not self.allow_remote and not is_loopback(self.url):
            raise BenchError(f"{self.url} is not a loopback address; add --allow-remote")


# --- measurement ------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, Any]:
    """count, mean and nearest-rank percentiles in milliseconds."""
    n = len(seconds)
    if not n:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    values = sorted(seconds)

    def pct(p: float) -> float:
        return round(values[min(n - 1, max(0, math.ceil(p * n / 100) - 1))] * 1000, 3)

    return {
        "count": n,
        "mean": round(sum(values) / n * 1000, 3),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(values[-1] * 1000, 3),
    }


class _Stats:
    def __init__(self) -> None:
        self.connect: list[float] = []
        self.connect_errors: Counter[str] = Counter()
        self.accepted: list[float] = []  # submit -> accepted
        self.result: list[float] = []  # submit -> result
        self.after_accept: list[float] = []  # accepted -> result
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.measured_ok = 0  # results of requests submitted after the warmup
        self.measure_from = 0.0
        self.done = 0
        self.lost = 0  # connections closed during the load phase
        self.stop = False
        self.last_final = 0.0


class _Conn:
    __slots__ = ("finished", "max_pending", "outstanding", "sent", "t_accepted", "t_submit", "ws")

    def __init__(self, ws: ClientConnection, max_pending: int) -> None:
        self.ws = ws
        self.max_pending = max_pending
        self.sent = 0
        self.outstanding = 0
        self.t_submit: list[float] = []
        self.t_accepted: list[float] = []
        self.finished = asyncio.Event()


# --- phases ---------------------------------------------------------------------------


async def _tokens(config: BenchConfig) -> tuple[list[str], int]:
    """One token per user; returns (tokens, users created)."""
    url = config.url
    timeout = config.connect_timeout
    if config.token:
        return [config.token], 0
    if config.username:
        if config.password is None:
            raise BenchError("--username needs --password or SESSIONQ_PASSWORD")
        creds = Credentials(config.username, config.password)
        ws, welcome, _ = await open_session(url, creds, timeout=timeout, ping_interval=None)
        await ws.close()
        return [str(welcome["token"])], 0
    count = config.users or math.ceil(config.connections / max(1, config.per_user))
    prefix = f"bench-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    gate = asyncio.Semaphore(4)  # registering costs a bcrypt hash on the server

    async def register(i: int) -> str:
        async with gate:
            creds = Credentials(f"{prefix}-{i}", password, register=True)
            ws, welcome, _ = await open_session(url, creds, timeout=timeout, ping_interval=None)
            await ws.close()
            return str(welcome["token"])

    return list(await asyncio.gather(*(register(i) for i in range(count)))), count


async def _open_one(config: BenchConfig, token: str, st: _Stats) -> _Conn | None:
    start = time.perf_counter()
    try:
        # Straight to the server: a proxy would be measured instead, and
        # looking one up in the environment costs a third of the client's
        # CPU per connection, which the server and the broker need when they
        # share the machine.
        ws = await open_connection(
            config.url, token, open_timeout=config.connect_timeout, ping_interval=None, proxy=None
        )
    except ConnectFailed as exc:
        cause = exc.__cause__
        st.connect_errors[type(cause).__name__ if cause else "connect"] += 1
        return None
    try:
        frame = await recv_json(ws, config.connect_timeout)
    except ConnectFailed as exc:
        st.connect_errors[f"closed_{exc.close_code}" if exc.close_code else "timeout"] += 1
        await ws.close()
        return None
    except asyncio.CancelledError:  # the run's timeout: do not leave the socket open
        ws.transport.abort()
        raise
    if frame.get("type") != "welcome":
        st.connect_errors[str(frame.get("code", frame.get("type")))] += 1
        await ws.close()
        return None
    st.connect.append(time.perf_counter() - start)
    limits = frame.get("limits") or {}
    return _Conn(ws, int(limits.get("max_pending") or config.inflight))


async def _open_all(config: BenchConfig, tokens: list[str], st: _Stats, conns: list[_Conn]) -> None:
    """Open every connection into ``conns`` (as each opens, so that a timeout
    leaves nothing unclosed)."""
    gate = asyncio.Semaphore(max(1, config.connect_concurrency))
    start = time.perf_counter()

    async def one(i: int) -> None:
        if config.ramp:
            delay = start + i / config.ramp - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        async with gate:
            conn = await _open_one(config, tokens[i % len(tokens)], st)
        if conn is not None:
            conns.append(conn)

    await asyncio.gather(*(one(i) for i in range(config.connections)))


def _submit_text(op: str, args: dict[str, Any]) -> str:
    """The constant part of every submit; the id (the request's index) ends it."""
    op_json = orjson.dumps(op).decode()
    args_json = orjson.dumps(args).decode()
    return f'{{"type":"submit","op":{op_json},"args":{args_json},"id":"'


def _on_frame(conn: _Conn, raw: bytes, st: _Stats) -> bool:
    """Account one frame; True when it was a request's final frame."""
    now = time.perf_counter()
    frame = orjson.loads(raw)
    kind = frame["type"]
    if kind == "progress":
        return False
    rid = frame.get("id")
    if kind == "accepted":
        i = int(rid)
        conn.t_accepted[i] = now
        submitted = conn.t_submit[i]
        if submitted >= st.measure_from:
            st.accepted.append(now - submitted)
        return False
    if kind == "result":
        i = int(rid)
        st.ok += 1
        submitted = conn.t_submit[i]
        if submitted >= st.measure_from:
            st.measured_ok += 1
            st.result.append(now - submitted)
            accepted = conn.t_accepted[i]
            if accepted:
                st.after_accept.append(now - accepted)
    elif kind == "error":
        st.errors[str(frame.get("code"))] += 1
        if rid is None:
            return False
    else:
        return False
    conn.outstanding -= 1
    st.done += 1
    st.last_final = now
    return True


async def _closed_loop(conn: _Conn, config: BenchConfig, st: _Stats) -> None:
    ws = conn.ws
    prefix = _submit_text(config.op, config.args)
    limit = config.requests or math.inf
    window = min(config.inflight, conn.max_pending)
    perf = time.perf_counter
    t_submit, t_accepted = conn.t_submit, conn.t_accepted

    async def send() -> None:
        i = conn.sent
        conn.sent += 1
        conn.outstanding += 1
        t_accepted.append(0.0)
        t_submit.append(perf())
        await ws.send(prefix + str(i) + '"}')

    while conn.sent < min(window, limit) and not st.stop:
        await send()
    while conn.outstanding > 0:
        raw = await ws.recv(decode=False)
        if _on_frame(conn, raw, st) and not st.stop and conn.sent < limit:
            await send()


async def _open_loop(conn: _Conn, config: BenchConfig, st: _Stats, t0: float) -> None:
    """Send on a schedule regardless of answers; a receiver task collects them."""
    ws = conn.ws
    prefix = _submit_text(config.op, config.args)
    limit = config.requests or math.inf
    per_conn = config.rate / config.connections
    deadline = t0 + config.duration if config.duration else math.inf
    poisson = config.arrivals == "poisson"
    rng = random.Random()
    sending = True

    async def receive() -> None:
        while True:
            raw = await ws.recv(decode=False)
            if _on_frame(conn, raw, st) and not sending and conn.outstanding == 0:
                conn.finished.set()

    receiver = asyncio.create_task(receive())
    try:
        # Evenly spaced arrivals start at a random phase so connections interleave.
        at = t0 + (rng.expovariate(per_conn) if poisson else rng.random() / per_conn)
        while conn.sent < limit and at < deadline and not st.stop:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():
                break
            i = conn.sent
            conn.sent += 1
            conn.outstanding += 1
            conn.t_accepted.append(0.0)
            conn.t_submit.append(at)  # the intended time: queueing delay counts
            await ws.send(prefix + str(i) + '"}')
            at += rng.expovariate(per_conn) if poisson else 1 / per_conn
        sending = False
        if conn.outstanding > 0 and not receiver.done():
            waiter = asyncio.ensure_future(conn.finished.wait())
            try:
                await asyncio.wait([receiver, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if receiver.done():
            receiver.result()  # re-raise ConnectionClosed
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)


async def _drive(conn: _Conn, config: BenchConfig, st: _Stats, t0: float) -> None:
    try:
        if config.rate:
            await _open_loop(conn, config, st, t0)
        else:
            await _closed_loop(conn, config, st)
    except ConnectionClosed as exc:
        st.lost += 1
        code = exc.rcvd.code if exc.rcvd else None
        st.errors[f"connection_closed_{code}"] += 1


async def _draw_progress(
    config: BenchConfig, st: _Stats, t0: list[float], planned: int | None
) -> None:
    """A one-line progress bar on stderr, redrawn four times a second."""
    while True:
        width = shutil.get_terminal_size((80, 20)).columns
        if not t0:
            text = f"connecting {len(st.connect)}/{config.connections}"
            if st.connect_errors:
                text += f"  failed {sum(st.connect_errors.values())}"
            frac = len(st.connect) / config.connections
        else:
            elapsed = max(1e-9, time.perf_counter() - t0[0])
            frac = st.done / planned if planned else min(1.0, elapsed / (config.duration or 1))
            text = (f"{st.done}{'/' + str(planned) if planned else ''} done  "
                    f"{st.ok / elapsed:,.0f} req/s  errors {sum(st.errors.values())}")  # fmt: skip
        bar_width = max(10, width - len(text) - 4)
        filled = int(bar_width * min(1.0, frac))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (bar_width - filled)}] {text}"[: width - 1])
        sys.stderr.flush()
        await asyncio.sleep(0.25)


def _raise_fd_limit(wanted: int) -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_bench(config: BenchConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run one benchmark and return its report (see docs/clients.md).

    ``config`` is a :class:`BenchConfig` or a dict of its fields.

    Raises BenchError for a bad configuration and AuthFailed / ConnectFailed
    when no user can be set up; everything after that is measured, not raised.
    """
    if not isinstance(config, BenchConfig):
        config = BenchConfig.from_mapping(config)
    config.validate()
    _raise_fd_limit(config.connections + 256)
    begin = time.perf_counter()
    st = _Stats()
    async with asyncio.timeout(config.timeout):
        tokens, created = await _tokens(config)
    setup_s = time.perf_counter() - begin
    planned = config.connections * config.requests if config.requests else None
    t0: list[float] = []  # start of the load phase, once known (read by the bar)
    conns: list[_Conn] = []
    bar = None
    if config.progress:
        bar = asyncio.create_task(_draw_progress(config, st, t0, planned))
    timed_out = False
    connect_s = 0.0
    try:
        remaining = config.timeout - (time.perf_counter() - begin)
        connect_start = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.001, remaining)):
                await _open_all(config, tokens, st, conns)
        except TimeoutError:
            timed_out = True
        connect_s = time.perf_counter() - connect_start
        info = {"connections_ok": len(conns), "connect_s": connect_s}
        if config.on_established is not None and not timed_out:
            maybe = config.on_established(info)
            if maybe is not None:
                await maybe
        if config.hold and not timed_out:
            remaining = config.timeout - (time.perf_counter() - begin)
            await asyncio.sleep(max(0.0, min(config.hold, remaining)))
        load = conns and (config.requests or config.duration) and not timed_out
        if load:
            t0.append(time.perf_counter())
            st.measure_from = t0[0] + config.warmup
            stopper = None
            if config.duration:
                stopper = asyncio.get_running_loop().call_later(
                    config.duration, setattr, st, "stop", True
                )
            tasks = [asyncio.create_task(_drive(c, config, st, t0[0])) for c in conns]
            limit = config.timeout - (time.perf_counter() - begin)
            if config.duration:
                limit = min(limit, config.duration + config.grace)
            _, late = await asyncio.wait(tasks, timeout=max(0.001, limit))
            if stopper is not None:
                stopper.cancel()
            if late:
                timed_out = True
                st.stop = True
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
    finally:
        if bar is not None:
            bar.cancel()
            await asyncio.gather(bar, return_exceptions=True)
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)

    sent = sum(c.sent for c in conns)
    # Throughput over the measured window: from the end of the warmup to the
    # last final frame.
    elapsed = max(0.0, (st.last_final or time.perf_counter()) - st.measure_from) if t0 else 0.0
    connected = len(conns)
    return {
        "url": config.url,
        "op": config.op,
        "mode": "open" if config.rate else "closed",
        "connections": config.connections,
        "requests_per_connection": config.requests,
        "inflight": None if config.rate else config.inflight,
        "rate": config.rate or None,
        "users": len(tokens),
        "users_created": created,
        "setup_s": round(setup_s, 3),
        "connections_ok": connected,
        "connections_failed": config.connections - connected,
        "connect_errors": dict(st.connect_errors),
        "connect_s": round(connect_s, 3),
        "sessions_per_s": round(connected / connect_s, 1) if connect_s > 0 else None,
        "connect_ms": summary(st.connect),
        "requests_planned": planned,
        "requests_sent": sent,
        "requests_ok": st.ok,
        "requests_failed": st.done - st.ok,
        "requests_unfinished": sent - st.done,
        "errors": dict(st.errors),
        "connections_lost": st.lost,
        "elapsed_s": round(elapsed, 3),
        "warmup_s": config.warmup,
        "requests_per_s": round(st.measured_ok / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "submit_to_accepted": summary(st.accepted),
            "submit_to_result": summary(st.result),
            "accepted_to_result": summary(st.after_accept),
        },
        "timed_out": timed_out,
    }


def clean(report: dict[str, Any]) -> bool:
    """No failed connection, no error, nothing unfinished, no timeout."""
    return (
        report["connections_failed"] == 0
        and report["requests_failed"] == 0
        and report["requests_unfinished"] == 0
        and not report["errors"]
        and not report["timed_out"]
    )


def format_report(report: dict[str, Any]) -> str:
    def lat(name: str, s: dict[str, Any]) -> str:
        if not s["count"]:
            return f"  {name:<20} -"
        return (f"  {name:<20} p50 {s['p50']:.2f}  p90 {s['p90']:.2f}  p99 {s['p99']:.2f}"
                f"  max {s['max']:.2f} ms  (n={s['count']})")  # fmt: skip

    mode = (f"open loop, {report['rate']:g} req/s offered" if report["mode"] == "open"
            else f"closed loop, {report['inflight']} in flight per connection")  # fmt: skip
    c = report["connect_ms"]
    lines = [
        f"target      {report['url']}  op {report['op']}  ({mode})",
        f"users       {report['users']} ({report['users_created']} created in "
        f"{report['setup_s']:.2f} s)",
        f"connections {report['connections_ok']} ok, {report['connections_failed']} failed"
        f" {report['connect_errors'] or ''} in {report['connect_s']:.2f} s"
        f" ({report['sessions_per_s'] or 0:g} sessions/s)",
    ]
    if c["count"]:
        lines.append(f"  connect           p50 {c['p50']:.2f}  p99 {c['p99']:.2f}"
                     f"  max {c['max']:.2f} ms")  # fmt: skip
    planned = report["requests_planned"]
    lines += [
        f"requests    {report['requests_ok']} ok, {report['requests_failed']} failed, "
        f"{report['requests_unfinished']} unfinished of {report['requests_sent']} sent"
        + (f" ({planned} planned)" if planned else ""),
        f"errors      {report['errors'] or 'none'}",
        f"throughput  {report['requests_per_s']:,.1f} req/s over {report['elapsed_s']:.2f} s",
        "latency (ms, successful requests)",
        lat("submit -> accepted", report["latency_ms"]["submit_to_accepted"]),
        lat("submit -> result", report["latency_ms"]["submit_to_result"]),
        lat("accepted -> result", report["latency_ms"]["accepted_to_result"]),
    ]
    if report["timed_out"]:
        lines.append("TIMED OUT: the run hit --timeout (or --duration + --grace)")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "bench",
        help="load generator: N connections x M requests, latency percentiles",
        description="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--url", default=None, help=f"server URL (env SESSIONQ_URL, default {DEFAULT_URL})")
    add("--connections", "-c", type=int, default=10, metavar="N", help="sessions to open")
    add("--requests", "-n", type=int, default=100, metavar="M",
        help="requests per connection (0 with --duration: until it ends)")  # fmt: skip
    add("--op", default="echo", help="operation to submit (default echo)")
    add("--args", default="{}", metavar="JSON", help="its arguments (default {})")
    add("--inflight", "-w", type=int, default=1, metavar="W",
        help="closed loop: requests in flight per connection (default 1)")  # fmt: skip
    add("--rate", type=float, default=0.0, metavar="R",
        help="open loop: total requests/s offered across connections")  # fmt: skip
    add("--arrivals", choices=("poisson", "uniform"), default="poisson",
        help="open-loop arrival process (default poisson)")  # fmt: skip
    add("--ramp", type=float, default=0.0, metavar="PER_S",
        help="open connections at this rate (default: as fast as possible)")  # fmt: skip
    add("--duration", type=float, default=0.0, metavar="S", help="stop submitting after S s")
    add("--warmup", type=float, default=0.0, metavar="S",
        help="leave the first S s of load out of latencies and req/s")  # fmt: skip
    add("--grace", type=float, default=10.0, metavar="S",
        help="after --duration, wait S s for outstanding results (default 10)")  # fmt: skip
    add("--hold", type=float, default=0.0, metavar="S",
        help="keep the connections open and idle S s once all are established")  # fmt: skip
    add("--timeout", type=float, default=120.0, metavar="S",
        help="hard cap on the whole run (default 120)")  # fmt: skip
    add("--users", type=int, default=0, metavar="K",
        help="users to create (default ceil(N / --per-user))")  # fmt: skip
    add("--per-user", type=int,
        default=int(os.environ.get("SESSIONQ_MAX_CONNECTIONS_PER_USER") or 10),
        help="connections per user (the server's limit; env "
             "SESSIONQ_MAX_CONNECTIONS_PER_USER, default 10)")  # fmt: skip
    add("--username", "-u", default=None, help="use this existing user")
    add("--password", default=None, help="its password (env SESSIONQ_PASSWORD)")
    add("--token", default=None, help="use this token (env SESSIONQ_TOKEN)")
    add("--allow-remote", action="store_true", help="allow a non-loopback target")
    add("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        op_args = orjson.loads(args.args)
    except orjson.JSONDecodeError as exc:
        raise BenchError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(op_args, dict):
        raise BenchError("--args must be a JSON object")
    token = args.token
    if token is None and args.username is None:
        token = os.environ.get("SESSIONQ_TOKEN") or None
    return BenchConfig(
        url=args.url or os.environ.get("SESSIONQ_URL") or DEFAULT_URL,
        connections=args.connections,
        requests=args.requests,
        op=args.op,
        args=op_args,
        inflight=args.inflight,
        rate=args.rate,
        arrivals=args.arrivals,
        ramp=args.ramp,
        duration=args.duration,
        warmup=args.warmup,
        grace=args.grace,
        hold=args.hold,
        timeout=args.timeout,
        users=args.users,
        per_user=args.per_user,
        username=args.username,
        password=args.password or os.environ.get("SESSIONQ_PASSWORD"),
        token=token,
        allow_remote=args.allow_remote,
        progress=sys.stderr.isatty(),
    )


def _announce(config: BenchConfig) -> Callable[[dict[str, Any]], None]:
    def established(info: dict[str, Any]) -> None:
        if config.progress:
            sys.stderr.write("\r\x1b[K")
        hold = f"; holding {config.hold:g} s" if config.hold else ""
        print(f"{info['connections_ok']}/{config.connections} connections established in "
              f"{info['connect_s']:.2f} s{hold}", file=sys.stderr, flush=True)  # fmt: skip

    return established


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        config.on_established = _announce(config)
        if (config.token or config.username) and config.connections > config.per_user:
            print(f"sessionq bench: one user, {config.connections} connections: the server "
                  f"closes those over its per-user limit ({config.per_user}) with 4429",
                  file=sys.stderr)  # fmt: skip
        with _runner() as runner:
            report = runner.run(run_bench(config))
    except BenchError as exc:
        print(f"sessionq bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuthFailed as exc:
        print(f"sessionq bench: cannot set up users: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except (ClientError, TimeoutError) as exc:
        print(f"sessionq bench: cannot set up: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(orjson.dumps(report).decode(), flush=True)
    else:
        print(format_report(report), flush=True)
    if report["connections_ok"] == 0:
        return EXIT_SETUP
    return EXIT_OK if clean(report) else EXIT_FAILED
