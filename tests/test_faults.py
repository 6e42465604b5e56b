"""Fault injection against real server processes: SIGKILL and SIGTERM.

Each test starts ``sessionq serve`` as a subprocess on a real SQLite file and
the local RabbitMQ, kills or stops it mid-queue, starts another one on the
same store, resumes, and checks that every accepted request ends in exactly
one final frame, in seq order, across the live socket and the resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from conftest import BROKER_URL, PASSWORD, UNIT, Client, finals_of, unique_name, until

SECRET = "fault-injection-secret-of-32-bytes-at-least"


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 4 * UNIT)

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 4 * UNIT)


Start = Callable[..., Awaitable[ServerProcess]]


async def spawn_server(
    store_url: str, *, ops: str = "tests.ops_for_tests", **settings: Any
) -> ServerProcess:
    """A real ``sessionq serve`` on ``store_url`` and the local RabbitMQ, on a
    free port, leases of 1 s; ``settings`` become ``SESSIONQ_*`` variables.
    Returns once it prints its listening line. (Shared by the fault, replica
    and budget tests.)"""
    env = {
        **os.environ,
        "SESSIONQ_BROKER_URL": BROKER_URL,
        "SESSIONQ_STORE_URL": store_url,
        "SESSIONQ_JWT_SECRET": SECRET,
        "SESSIONQ_BCRYPT_ROUNDS": "4",
        "SESSIONQ_LEASE_SECONDS": "1",
        "SESSIONQ_OPS": ops,
        "SESSIONQ_LOG_FORMAT": "json",
        "SESSIONQ_LOG_LEVEL": os.environ.get("SESSIONQ_TEST_SERVER_LOG_LEVEL", "WARNING"),
    }
    env.update({f"SESSIONQ_{k.upper()}": str(v) for k, v in settings.items()})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 6 * UNIT)
    assert b"listening on" in line, line
    return ServerProcess(proc, int(line.rsplit(b":", 1)[1].split(b"/")[0]))


@pytest.fixture
async def start_server(store_url: str) -> AsyncIterator[Start]:
    procs: list[ServerProcess] = []

    async def start(**settings: Any) -> ServerProcess:
        server = await spawn_server(store_url, **settings)
        procs.append(server)
        return server

    yield start
    for server in procs:
        await server.kill()


def worker_pids(parent: int) -> list[str]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        pid for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]  # fmt: skip


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=UNIT) as response:
        return bytes(response.read())


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def writer_pid(server: int) -> int:
    """The pid of the SQLite writer process of the server (or worker) ``server``."""
    (pid,) = [
        p for p in _children(server)
        if b"sqlite_writer" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]  # fmt: skip
    return int(pid)


async def process_ended(pid: int) -> None:
    """Wait for ``pid`` (not necessarily our child) to exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, ended.set)  # a pidfd turns readable when its process exits
    try:
        await asyncio.wait_for(ended.wait(), 4 * UNIT)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def open_client(server: ServerProcess, token: str | None = None) -> Client:
    client = Client(await websockets.connect(server.url))
    if token is None:
        await client.send({"type": "register", "username": unique_name("f"), "password": PASSWORD})
    else:
        await client.send({"type": "auth", "token": token})
    client.welcome = await client.recv()
    assert client.welcome["type"] == "welcome", client.welcome
    return client


async def wait_running(client: Client, rid: str) -> None:
    async with asyncio.timeout(UNIT):
        while True:
            await client.send({"type": "status", "id": rid})
            frames = await client.recv_until(lambda f: f["type"] == "status")
            if frames[-1].get("state") == "running":
                return


async def resume_all(
    server: ServerProcess, welcome: dict[str, Any], after: int, count: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    client = await open_client(server, welcome["token"])
    await client.send({"type": "resume", "session": welcome["session"], "after": after})
    frames = await client.recv_until(lambda f: f["type"] in ("resumed", "error"), 4 * UNIT)
    resumed = frames[-1]
    assert resumed["type"] == "resumed", resumed
    rest = finals_of(await client.finals(count, timeout=4 * UNIT))
    await client.close()
    return resumed, rest


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_sigkill_mid_queue_then_restart_and_resume(start_server: Start) -> None:
    first = await start_server()
    client = await open_client(first)
    await client.submit("r1", "echo", {"n": 1})
    await client.submit("r2", "test.attempt", {"seconds": 1})
    for i in range(3, 6):
        await client.submit(f"r{i}", "echo", {"n": i})
    # Every request accepted (stored) before the crash, and r1's result seen.
    frames = await client.recv_until(lambda f: f.get("id") == "r5" and f["type"] == "accepted")
    if not finals_of(frames):
        frames += await client.recv_until(lambda f: f.get("id") == "r1" and f["type"] == "result")
    seen = finals_of(frames)
    assert [f["seq"] for f in seen] == [1]
    await wait_running(client, "r2")
    writer = writer_pid(first.proc.pid)
    await first.kill()  # r2 is running, r3..r5 queued
    await process_ended(writer)  # the store's writer process does not outlive it

    second = await start_server()
    resumed, rest = await resume_all(second, client.welcome, after=1, count=4)
    assert resumed["last_seq"] == 5
    finals = seen + rest
    assert [f["seq"] for f in finals] == [1, 2, 3, 4, 5]  # exactly once each, in order
    assert rest[0]["value"] == {"attempt": 2}  # r2 ran again after the crash
    assert [f["value"] for f in rest[1:]] == [{"n": 3}, {"n": 4}, {"n": 5}]


async def test_a_cancel_stored_before_a_crash_arrives_in_seq_order(start_server: Start) -> None:
    # r2 is cancelled while r1 runs: its final is stored at once but belongs
    # after r1's. The process dies; the next owner must keep that order.
    first = await start_server()
    client = await open_client(first)
    await client.submit("r1", "sleep", {"seconds": 1})
    await client.submit("r2", "echo", {"n": 2})
    await client.submit("r3", "echo", {"n": 3})
    await client.recv_until(lambda f: f.get("id") == "r3" and f["type"] == "accepted")
    await wait_running(client, "r1")
    await client.send({"type": "cancel", "id": "r2"})
    await client.send({"type": "status", "id": "r3"})  # answered after the cancel is stored
    await client.recv_until(lambda f: f["type"] == "status")
    await first.kill()

    second = await start_server()
    resumed, finals = await resume_all(second, client.welcome, after=0, count=3)
    assert resumed["last_seq"] == 3
    assert [(f["seq"], f.get("code")) for f in finals] == [(1, None), (2, "cancelled"), (3, None)]
    assert finals[2]["value"] == {"n": 3}


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_killed_server_leaves_no_process_behind(start_server: Start) -> None:
    server = await start_server()
    client = await open_client(server)
    await client.submit("h", "hash", {"data": "x", "rounds": 1000})  # starts the CPU pool
    frames = await client.recv_until(lambda f: f.get("id") == "h" and f["type"] == "result")
    assert len(frames[-1]["value"]["hex"]) == 64
    children = [int(p) for p in _children(server.proc.pid)]
    assert writer_pid(server.proc.pid) in children and len(children) >= 2
    await server.kill()
    # Neither the store's writer nor a CPU pool process outlives the server.
    await asyncio.gather(*(process_ended(pid) for pid in children))


async def test_request_that_keeps_killing_its_process_ends_crashed(start_server: Start) -> None:
    server = await start_server(max_attempts=2)
    client = await open_client(server)
    # The sleep holds the queue until both later requests are accepted.
    await client.submit("gate", "sleep", {"seconds": 0.5})
    await client.submit("poison", "test.die")
    await client.submit("after", "echo", {"ok": True})
    await client.recv_until(lambda f: f.get("id") == "after" and f["type"] == "accepted")
    await client.closed(4 * UNIT)  # the process died under it
    await server.kill()
    # Attempt 2 kills the next process as well, attempt 3 is refused. (If the
    # first process died before the gate's result was stored, the gate takes
    # the first charge and the poison runs once more: one more round.)
    for _ in range(3):
        server = await start_server(max_attempts=2)
        again = await open_client(server, client.welcome["token"])
        await again.send({"type": "resume", "session": client.welcome["session"], "after": 1})
        frames = []
        try:
            frames = await again.finals(2, timeout=4 * UNIT)
            break
        except websockets.ConnectionClosed:
            await server.kill()
    finals = finals_of(frames)
    assert [(f["id"], f["seq"], f.get("code")) for f in finals] == [
        ("poison", 2, "crashed"), ("after", 3, None)
    ]  # fmt: skip
    assert finals[1]["value"] == {"ok": True}
    metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
    assert b'sessionq_requests_finished_total{op="test.die",outcome="crashed"} 1.0' in metrics


async def test_sigterm_finishes_running_keeps_the_rest(start_server: Start) -> None:
    first = await start_server(shutdown_grace=3)
    client = await open_client(first)
    await client.submit("r1", "test.attempt", {"seconds": 0.5})
    for i in range(2, 5):
        await client.submit(f"r{i}", "echo", {"n": i})
    await client.recv_until(lambda f: f.get("id") == "r4" and f["type"] == "accepted")
    stop = asyncio.create_task(first.terminate())
    frames: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(4 * UNIT):
            while True:
                frames.append(await client.recv())
    except websockets.ConnectionClosed:
        pass
    assert client.ws.close_code == 1001
    assert await stop == 0
    seen = finals_of(frames)
    assert seen and seen[0]["id"] == "r1" and seen[0]["value"] == {"attempt": 1}

    second = await start_server()
    after = seen[-1]["seq"]
    resumed, rest = await resume_all(second, client.welcome, after=after, count=4 - after)
    assert resumed["last_seq"] == 4
    assert [f["seq"] for f in seen + rest] == [1, 2, 3, 4]
    assert all(f["type"] == "result" for f in seen + rest)


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_work_of_a_dead_process_runs_without_waiting_for_resume(start_server: Start) -> None:
    """A live process adopts a session whose owner died: its accepted requests
    run (as after a disconnect) before anyone resumes it."""
    first = await start_server()
    client = await open_client(first)
    await client.submit("r1", "test.attempt", {"seconds": 1})
    await client.submit("r2", "kv.put", {"key": "adopted", "value": True})
    await client.recv_until(lambda f: f.get("id") == "r2" and f["type"] == "accepted")
    await wait_running(client, "r1")
    await first.kill()
    second = await start_server()
    # Same user, its own new session: watch the user's kv data until the dead
    # session's last request has written it (each probe is a real request).
    watcher = await open_client(second, client.welcome["token"])
    probe = 0
    async with asyncio.timeout(4 * UNIT):
        while True:
            probe += 1
            await watcher.submit(f"p{probe}", "kv.get", {"key": "adopted"})
            if finals_of(await watcher.finals(1))[0]["value"]["found"]:
                break
    resumed, finals = await resume_all(second, client.welcome, after=0, count=2)
    assert resumed["pending"] == 0
    assert [(f["seq"], f["value"]) for f in finals] == [
        (1, {"attempt": 2}), (2, {"key": "adopted", "ok": True})
    ]  # fmt: skip


def session_epoch(db: Path, session_id: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        (epoch,) = c.execute(
            "SELECT epoch FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
    return int(epoch)


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_stalled_owner_whose_session_moved_closes_it_with_4409(
    start_server: Start, tmp_path: Path
) -> None:
    """A process stalls past its lease; another adopts its session and runs the
    work. When the stalled one wakes up, the store refuses its result (its
    epoch is stale): it lets the session go, and its client gets 4409 and
    resumes where the session now lives, with one final per seq."""
    first = await start_server()
    second = await start_server()
    client = await open_client(first)
    session = client.welcome["session"]
    await client.submit("r1", "test.attempt", {"seconds": 1})
    await wait_running(client, "r1")
    epoch = session_epoch(tmp_path / "sq.db", session)
    first.proc.send_signal(signal.SIGSTOP)
    try:  # the other process adopts it
        await until(lambda: session_epoch(tmp_path / "sq.db", session) != epoch, 4 * UNIT, 0.05)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert await client.closed(timeout=2 * UNIT) == (4409, "session taken over elsewhere")
    _, finals = await resume_all(second, client.welcome, after=0, count=1)
    assert [(f["seq"], f["value"]) for f in finals] == [(1, {"attempt": 2})]


async def test_workers_share_one_port_and_sessions_move_between_them(start_server: Start) -> None:
    """--workers 2: two processes on one port. Reconnects land on either; each
    resume takes the session over where needed, and FIFO with one final per
    seq holds across all the moves."""
    server = await start_server(workers=2)
    assert len(worker_pids(server.proc.pid)) == 2
    client = await open_client(server)
    welcome = client.welcome
    await client.submit("r1", "echo", {"n": 1})
    seen = finals_of(await client.finals(1))
    await client.close()
    seq = 1
    for round_no in range(6):
        again = await open_client(server, welcome["token"])
        await again.send({"type": "resume", "session": welcome["session"], "after": seq})
        frames = await again.recv_until(lambda f: f["type"] in ("resumed", "error"), 4 * UNIT)
        assert frames[-1]["type"] == "resumed", frames[-1]
        for k in range(2):
            await again.submit(f"m{round_no}-{k}", "echo", {"n": seq + k + 1})
        got = finals_of(await again.finals(2, timeout=4 * UNIT))
        seen += got
        seq += 2
        await again.close()
    assert [f["seq"] for f in seen] == list(range(1, 14))
    assert [f["value"]["n"] for f in seen] == list(range(1, 14))
