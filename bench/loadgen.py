"""Closed-loop load generator: N sessions, each keeping W messages in flight.

What it measures, and why this shape:

* **Closed loop.** Each session sends W messages, then sends one more each time a
  reply comes back, so there are always exactly W in flight per session (1 =
  strict request/response, 16 = pipelined). Throughput is what the system under
  test sustains at that concurrency, not what a client can push into a buffer;
  the round-trip time is measured per message, from just before it is sent to
  the moment its reply is read.
* **Warm-up, then a fixed window.** Connections are opened first (bounded
  concurrency), the loop runs ``warmup`` seconds unmeasured (queues declared,
  caches warm, TCP windows open), then replies are counted and timed for
  ``duration`` seconds. After the window no new message is sent; the loop waits
  (bounded) for the ones in flight, then closes every session. Nothing here runs
  unbounded: a stuck server shows up as errors and a low rate, not a hang.
* **CPU per message.** CPU time of the processes involved (the server under
  test, the RabbitMQ broker, this client) is read from ``/proc/<pid>/stat`` at
  the start and end of the window, so a report can say "µs of server CPU per
  message", the figure that decides how many cores a load needs. The busy time
  of the whole machine (``/proc/stat``) is read too: what is neither of them
  ("other") is noise from outside the benchmark, or loopback networking work
  in softirq that no process is billed for.

The engine is transport-agnostic: a :class:`Session` sends message ``k`` and
returns the ``k`` of the replies it reads. :class:`WsJsonSession` is the one
for the WebSocket ceilings (text frames ``{"i":k}``, echoed back);
``bench.ceilings`` has one for a bare AMQP round trip and ``bench.stomp`` one
for STOMP over WebSocket.

Ad hoc use against any echo-like server::

    .venv/bin/python -m bench.loadgen ws://127.0.0.1:8800/ -c 100 -w 16 -d 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU accounting from /proc ------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rabbitmq_status() -> dict[str, Any]:
    """``rabbitmqctl status`` as JSON (raises OSError, SubprocessError or
    ValueError when the node cannot be asked)."""
    out = subprocess.run(
        ["rabbitmqctl", "status", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    status: dict[str, Any] = json.loads(out)
    return status


def find_broker_pid() -> int | None:
    """The local RabbitMQ node's beam.smp process, found by its command line.

    Looked up afresh for every run: another test on the machine may have
    restarted the broker.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"beam.smp" in cmdline and b"\0rabbit\0boot" in cmdline:
            return int(entry)
    return None


def wait_port(host: str, port: int, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.1)


Pids = int | Sequence[int] | None


def _as_list(pids: Pids) -> list[int]:
    if pids is None:
        return []
    return [pids] if isinstance(pids, int) else list(pids)


def open_files_limit(pid: int) -> int | None:
    """A process's soft limit on open files (``/proc/<pid>/limits``), None if unknown."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None


class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`.

    A name may stand for several processes (a server with ``--workers 2``): their
    times are summed. A process that exits within the window is left out.
    """

    def __init__(self, pids: dict[str, Pids]) -> None:
        self.pids = {name: _as_list(p) for name, p in pids.items() if _as_list(p)}
        self._t0: dict[tuple[str, int], float | None] = {}
        self._busy0 = 0.0
        self.seconds: dict[str, float] = {}
        self.machine_busy = 0.0

    def start(self) -> None:
        self._t0 = {
            (name, pid): cpu_seconds(pid) for name, pids in self.pids.items() for pid in pids
        }
        self._busy0 = machine_busy_seconds()

    def stop(self) -> None:
        self.machine_busy = machine_busy_seconds() - self._busy0
        for (name, pid), t0 in self._t0.items():
            t1 = cpu_seconds(pid)
            if t0 is not None and t1 is not None:
                self.seconds[name] = self.seconds.get(name, 0.0) + t1 - t0


# -- results -------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One measured window. ``cpu`` is CPU seconds per process name within it."""

    connections: int
    window: int
    seconds: float = 0.0
    messages: int = 0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    first_error: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    other_cores: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)  # row-specific figures

    def cpu_us_per_msg(self, name: str) -> float | None:
        if name not in self.cpu or not self.messages:
            return None
        return self.cpu[name] / self.messages * 1e6

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cpu_us_per_msg"] = {name: self.cpu_us_per_msg(name) for name in self.cpu}
        return d


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- the engine ------------------------------------------------------------------------
class Session(Protocol):
    """One client session of the system under test."""

    async def send(self, k: int) -> None:
        """Send message number ``k``."""

    async def recv(self) -> Sequence[int]:
        """Read what arrives next; return the ``k`` of every reply in it (maybe none)."""

    async def close(self) -> None:
        """Close the session (bounded; errors are the caller's to ignore)."""


Opener = Callable[[int], Awaitable[Session]]


class _Loop:
    """State shared by the session drivers: which phase we are in, and the tally."""

    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.count = 0
        self.latencies: list[float] = []


async def _drive(session: Session, window: int, loop: _Loop) -> None:
    clock = time.perf_counter
    in_flight: dict[int, float] = {}
    k = 0
    for _ in range(window):
        in_flight[k] = clock()
        await session.send(k)
        k += 1
    while in_flight:
        for i in await session.recv():
            t0 = in_flight.pop(i)  # KeyError: a reply we never asked for
            if loop.measuring:
                loop.count += 1
                loop.latencies.append(clock() - t0)
            if not loop.stopping:
                in_flight[k] = clock()
                await session.send(k)
                k += 1


async def open_all(opener: Opener, connections: int, concurrency: int = 100) -> list[Session]:
    """Open ``connections`` sessions, at most ``concurrency`` handshakes at a time.

    All or nothing: if one fails, the others are closed and the error raised.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Session:
        async with gate:
            return await opener(i)

    results = await asyncio.gather(*(one(i) for i in range(connections)), return_exceptions=True)
    sessions = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(sessions)
        raise errors[0]
    return sessions


async def close_all(sessions: Sequence[Session], timeout: float = 10.0) -> None:
    async def one(s: Session) -> None:
        with contextlib.suppress(Exception):
            await s.close()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(one(s) for s in sessions)), timeout)


async def closed_loop(
    opener: Opener,
    connections: int,
    window: int,
    *,
    warmup: float = 1.0,
    duration: float = 3.0,
    drain_timeout: float = 5.0,
    connect_concurrency: int = 100,
    cpu_pids: dict[str, Pids] | None = None,
) -> LoadResult:
    """Run ``connections`` sessions x ``window`` messages in flight; measure one window.

    ``cpu_pids`` names the processes whose CPU time is reported (e.g.
    ``{"server": pid, "broker": pid, "client": os.getpid()}``).
    """
    sessions = await open_all(opener, connections, connect_concurrency)
    state = _Loop()
    meter = CpuMeter(cpu_pids or {})
    result = LoadResult(connections=connections, window=window)
    tasks = [asyncio.create_task(_drive(s, window, state)) for s in sessions]
    try:
        await asyncio.sleep(warmup)
        meter.start()
        t0 = time.perf_counter()
        state.measuring = True
        await asyncio.sleep(duration)
        state.measuring = False
        state.stopping = True
        t1 = time.perf_counter()
        meter.stop()
        _done, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await close_all(sessions)

    for task in tasks:
        if task.cancelled():
            result.errors += 1
            result.first_error = result.first_error or "no reply within drain timeout"
        elif (exc := task.exception()) is not None:
            result.errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
    lat = sorted(state.latencies)
    result.seconds = t1 - t0
    result.messages = state.count
    result.rate = state.count / result.seconds if result.seconds > 0 else 0.0
    result.p50_ms = percentile(lat, 0.50) * 1e3
    result.p99_ms = percentile(lat, 0.99) * 1e3
    result.cpu = meter.seconds
    if result.seconds > 0:
        result.other_cores = max(0.0, meter.machine_busy - sum(meter.seconds.values())) / (
            result.seconds
        )
    return result


# -- WebSocket JSON echo sessions (ceilings a and c) ---------------------------------
class WsJsonSession:
    """Sends ``{"i":k}`` as a text frame; expects the same frame back."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, *, open_timeout: float = 10.0) -> WsJsonSession:
        ws = await connect(
            url,
            compression=None,
            open_timeout=open_timeout,
            ping_interval=None,  # runs last seconds; keep the client's own work minimal
            max_queue=None,
            proxy=None,  # loopback: no proxy lookup per connection
        )
        return cls(ws)

    async def send(self, k: int) -> None:
        await self.ws.send(f'{{"i":{k}}}')

    async def recv(self) -> Sequence[int]:
        return (orjson.loads(await self.ws.recv())["i"],)

    async def close(self) -> None:
        await self.ws.close()


def ws_json_opener(url: str) -> Opener:
    async def opener(_i: int) -> Session:
        return await WsJsonSession.open(url)

    return opener


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="ws:// URL of a server that echoes each text frame")
    parser.add_argument("-c", "--connections", type=int, default=100)
    parser.add_argument("-w", "--window", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--server-pid", type=int, help="report this process's CPU as 'server'")
    args = parser.parse_args()
    pids = {"client": os.getpid(), "broker": find_broker_pid(), "server": args.server_pid}
    result = asyncio.run(
        closed_loop(
            ws_json_opener(args.url),
            args.connections,
            args.window,
            warmup=args.warmup,
            duration=args.duration,
            cpu_pids=pids,
        )
    )
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    _main()
