"""Nothing accepted is lost: resume, broker restarts, takeovers.

Each test checks, per seq, exactly one final frame across the live socket and
the resume, in seq order, and that every accepted request is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    finals_of,
    process_state,
    rabbitmqctl,
    unread_input,
    until,
)
from prometheus_client import REGISTRY

from server.app import REPLAY_PAGE, Server


def assert_exactly_once(finals: list[dict[str, Any]], expected: int) -> None:
    """One final per seq 1..expected, in seq order."""
    seqs = [f["seq"] for f in finals]
    assert seqs == list(range(1, expected + 1)), seqs


async def resume(client: Client, session: str, after: int) -> dict[str, Any]:
    await client.send({"type": "resume", "session": session, "after": after})
    frames = await client.recv_until(lambda f: f["type"] in ("resumed", "error"))
    return frames[-1]


async def test_disconnect_mid_queue_then_resume(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    for i in range(1, 7):
        await client.submit(f"r{i}", "sleep", {"seconds": 0.05 * (i % 3)})
    frames = await client.recv_until(lambda f: f.get("seq") == 1 and f["type"] == "result")
    seen = finals_of(frames)
    await client.close()  # gone with requests 2..6 queued or running

    again = await connect(path=f"/ws?token={token}")
    assert (await again.recv())["type"] == "welcome"
    resumed = await resume(again, session, after=seen[-1]["seq"])
    assert resumed["session"] == session and resumed["last_seq"] == 6
    rest = finals_of(await again.finals(6 - len(seen)))
    assert_exactly_once(seen + rest, 6)
    assert [f["id"] for f in seen + rest] == [f"r{i}" for i in range(1, 7)]
    # The connection now carries that session: new submits continue its seq.
    await again.submit("r7", "echo", {"n": 7})
    frames = await again.finals(1)
    assert [(f["type"], f["seq"]) for f in frames] == [("accepted", 7), ("result", 7)]


async def test_a_long_replay_comes_whole_and_in_order(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    """A replay longer than the page the server reads at a time (REPLAY_PAGE):
    every final, once, in seq order, from wherever the client asks."""
    count = 2 * REPLAY_PAGE + 88
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    for i in range(1, count + 1):
        await client.submit(f"r{i}", "echo", {"i": i})
    assert len(finals_of(await client.finals(count, timeout=4 * UNIT))) == count
    await client.close()
    for after in (0, REPLAY_PAGE + 1):
        again = await connect(path=f"/ws?token={token}")
        assert (await again.recv())["type"] == "welcome"
        resumed = await resume(again, session, after=after)
        assert (resumed["last_seq"], resumed["pending"]) == (count, 0)
        finals = finals_of(await again.finals(count - after, timeout=2 * UNIT))
        assert [f["seq"] for f in finals] == list(range(after + 1, count + 1))
        assert [f["value"]["i"] for f in finals] == list(range(after + 1, count + 1))
        await again.close()


async def test_resume_after_a_cancelled_queued_request_keeps_seq_order(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    """A cancelled queued request's final is stored before the ones ahead of it
    finish; a resume must still deliver it after them, once."""
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    await client.submit("slow", "sleep", {"seconds": 0.5})
    await client.submit("later", "echo", {})
    await client.recv_until(lambda f: f.get("id") == "later" and f["type"] == "accepted")
    await client.send({"type": "cancel", "id": "later"})
    await client.send({"type": "status", "id": "later"})  # answered after the cancel is stored
    await client.recv_until(lambda f: f["type"] == "status")
    await client.close()

    again = await connect(path=f"/ws?token={token}")
    assert (await again.recv())["type"] == "welcome"
    resumed = await resume(again, session, after=0)
    assert (resumed["type"], resumed["pending"]) == ("resumed", 2)
    finals = finals_of(await again.finals(2, timeout=2 * UNIT))
    assert [(f["seq"], f["id"], f.get("code")) for f in finals] == [
        (1, "slow", None), (2, "later", "cancelled")
    ]  # fmt: skip
    await again.submit("next", "echo", {})
    tail = await again.finals(1)
    assert [f["seq"] for f in finals_of(tail)] == [3]  # and no second final for 1 or 2


async def test_resume_takes_over_a_live_connection_with_4409(
    user_client: ClientFactory, connect: ClientFactory
) -> None:
    first = await user_client()
    session, token = first.welcome["session"], first.welcome["token"]
    await first.submit("a", "sleep", {"seconds": 0.3})
    await first.submit("b", "echo", {"x": 1})
    await first.recv_until(lambda f: f.get("id") == "b")
    second = await connect(path=f"/ws?token={token}")
    await second.recv()
    resumed = await resume(second, session, after=0)
    assert resumed["pending"] in (1, 2)
    assert (await first.closed())[0] == 4409
    finals = finals_of(await second.finals(2))
    assert [(f["id"], f["seq"]) for f in finals] == [("a", 1), ("b", 2)]


async def test_resume_of_unknown_or_foreign_session_is_not_found(
    user_client: ClientFactory,
) -> None:
    alice, bob = await user_client(), await user_client()
    for target in ("no-such-session", alice.welcome["session"]):
        reply = await resume(bob, target, after=0)
        assert (reply["type"], reply["code"]) == ("error", "not_found")
    await bob.submit("still", "echo", {})
    assert (await bob.recv())["seq"] == 1  # bob's own session is untouched


async def test_resume_past_retention_is_expired(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    await client.submit("old", "echo", {})
    await client.finals(1)
    await client.close()
    # What the retention sweep does once the results are past SESSIONQ_RESULT_TTL
    # (session records are kept longer than results).
    await server.store.purge(time.time() + 1, sessions_before=0)
    again = await connect(path=f"/ws?token={token}")
    await again.recv()
    reply = await resume(again, session, after=0)
    assert (reply["type"], reply["code"]) == ("error", "expired")
    reply = await resume(again, session, after=1)  # nothing asked for is gone
    assert reply["type"] == "resumed"


async def test_broker_restart_mid_queue(server: Server, user_client: ClientFactory) -> None:
    client = await user_client()
    for i in range(1, 6):
        await client.submit(f"r{i}", "sleep", {"seconds": 0.3})
    frames = await client.recv_until(lambda f: f.get("id") == "r5" and f["type"] == "accepted")
    # r4 is cancelled while queued: its final is stored at once, and must still
    # be sent, in its place, by the queue re-created after the outage.
    await client.send({"type": "cancel", "id": "r4"})
    await client.send({"type": "status", "id": "r5"})  # answered after the cancel is stored
    frames += await client.recv_until(lambda f: f["type"] == "status")
    session = server.sessions[client.welcome["session"]]
    queue_before = session.queue_name
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        async with asyncio.timeout(UNIT):
            await server.broker._lost.wait()
        # While the broker is away: /readyz says so, and a submit gets a clear error.
        await client.submit("during", "echo", {})
        refusal = await client.recv_until(lambda f: f.get("id") == "during")
        assert refusal[-1]["code"] == "unavailable"
        frames += refusal
        ready = await server._ready()
        assert ready.status_code == 503 and b"broker" in ready.body
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    await asyncio.wait_for(server.broker.wait_up(), 6 * UNIT)
    frames += await client.finals(5 - len(finals_of(frames)), timeout=6 * UNIT)
    finals = finals_of(frames)
    assert_exactly_once(finals, 5)
    # Accepted requests saw no error; the cancelled one ended cancelled.
    assert [f.get("code") for f in finals] == [None, None, None, "cancelled", None]
    assert session.queue_name != queue_before  # it was re-created, not reused
    await client.submit("after", "echo", {"ok": True})
    done = finals_of(await client.finals(1, timeout=2 * UNIT))
    assert done[0]["seq"] == 6 and done[0]["value"] == {"ok": True}


async def test_a_request_finished_during_an_outage_keeps_the_cancel_behind_it(
    server: Server, user_client: ClientFactory
) -> None:
    """The running request finishes (and is stored) while the broker is away;
    the cancelled one behind it has its final stored but not sent. The queue
    re-created after the outage must still send that final, in its place."""
    client = await user_client()
    sid = client.welcome["session"]
    await client.submit("run", "sleep", {"seconds": 0.5})
    await client.submit("gone", "echo", {})
    await client.submit("after", "echo", {})
    await client.recv_until(lambda f: f.get("id") == "after" and f["type"] == "accepted")
    await client.send({"type": "cancel", "id": "gone"})
    await client.send({"type": "status", "id": "after"})  # answered after the cancel is stored
    await client.recv_until(lambda f: f["type"] == "status")
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        async with asyncio.timeout(2 * UNIT):
            # The store has no change notification: ask it until the running
            # request's result is in (it finishes while the broker is away).
            while (record := await server.store.get_request(sid, 1)) is None or (  # noqa: ASYNC110
                record.state != "done"
            ):
                await asyncio.sleep(0.02)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    finals = finals_of(await client.finals(3, timeout=6 * UNIT))
    assert [(f["seq"], f["id"], f.get("code")) for f in finals] == [
        (1, "run", None), (2, "gone", "cancelled"), (3, "after", None)
    ]  # fmt: skip


async def test_second_server_takes_over_on_resume(
    server_factory: ServerFactory, user_client: ClientFactory, connect: ClientFactory
) -> None:
    """Two server processes (two owners, one store): a resume that lands on the
    other one takes the session over; the old socket gets 4409; FIFO and one
    final per seq hold across the move."""
    one = await server_factory()
    two = await server_factory()
    client = await user_client(target=one)
    session, token = client.welcome["session"], client.welcome["token"]
    await client.submit("r1", "sleep", {"seconds": 0.3})
    for i in range(2, 6):
        await client.submit(f"r{i}", "echo", {"i": i})
    await client.recv_until(lambda f: f.get("id") == "r5")
    other = await connect(target=two, path=f"/ws?token={token}")
    await other.recv()
    resumed = await resume(other, session, after=0)
    assert resumed["type"] == "resumed" and resumed["last_seq"] == 5
    code, _ = await client.closed()
    assert code == 4409
    finals = finals_of(await other.finals(5, timeout=3 * UNIT))
    assert_exactly_once(finals, 5)
    await other.submit("r6", "echo", {})
    assert finals_of(await other.finals(1))[0]["seq"] == 6
    assert session in two.sessions and session not in one.sessions
    # Ids accepted by the previous owner are still known: answered, not re-run.
    await other.submit("r2", "echo", {"i": 2})
    await other.submit("r7", "echo", {})
    frames = await other.finals(1)
    assert [(f["type"], f["id"], f["seq"]) for f in frames] == [
        ("accepted", "r2", 2), ("accepted", "r7", 7), ("result", "r7", 7)
    ]  # fmt: skip
    # The old owner rejected the deliveries it took but did not run: none stays
    # unacked on its pooled channels (where consumer_timeout would one day
    # close the channel and every session on it).
    for _ in range(30):  # the broker's own count, asked until it settles
        if await asyncio.to_thread(_unacked_deliveries) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("deliveries left unacked on the server's channels")


def _unacked_deliveries() -> int:
    out = rabbitmqctl("list_channels", "messages_unacknowledged")
    return sum(int(line) for line in out.split() if line.isdigit())


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_store_write_failure_refuses_instead_of_accepting(
    tmp_path: Path, server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """A real full disk under the SQLite file: submits are refused with a clear
    error (never accepted), and work again once there is room."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs for the full-disk fault")
    disk = tmp_path / "small"
    disk.mkdir()
    await asyncio.to_thread(
        subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True
    )
    try:
        server = await server_factory(store_url=f"sqlite:///{disk}/sq.db")
        client = await user_client(target=server)
        await client.submit("before", "echo", {})
        assert finals_of(await client.finals(1))[0]["seq"] == 1
        filler = disk / "filler"
        with filler.open("wb") as f:  # take every free byte
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        errors = REGISTRY.get_sample_value("sessionq_store_errors_total") or 0.0
        await client.submit("full", "echo", {"blob": "x" * 200_000})
        reply = await client.recv()
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "full", "unavailable")
        assert "seq" not in reply
        assert (REGISTRY.get_sample_value("sessionq_store_errors_total") or 0.0) > errors
        filler.unlink()
        await client.submit("after", "echo", {"ok": 1})
        frames = await client.finals(1)
        assert [(f["type"], f["seq"]) for f in frames] == [("accepted", 2), ("result", 2)]
        await server.stop()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)


def _consumer_failures() -> float:
    return REGISTRY.get_sample_value("sessionq_consumer_failures_total", {"cause": "error"}) or 0.0


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_result_the_store_lost_runs_again_and_the_queue_goes_on(
    server: Server, user_client: ClientFactory
) -> None:
    """The store's writer process dies with a request's result in flight. The
    consumer cannot store it and stops; the session carries on by itself from
    the store, without a reconnect: the request runs again, the one queued
    behind it runs, and each ends in exactly one final, in order."""
    client = await user_client()
    await client.submit("slow", "sleep", {"seconds": 0.3})
    await client.submit("next", "echo", {"n": 2})
    await client.recv_until(lambda f: f["type"] == "accepted" and f["id"] == "next")
    writer = server.store.writer_pid  # type: ignore[attr-defined]
    assert writer is not None
    failures = _consumer_failures()
    os.kill(writer, signal.SIGSTOP)
    try:
        await until(lambda: process_state(writer) == "T")  # stopped, not about to read
        await until(lambda: unread_input(writer) > 0)  # "slow" finished: its result waits
    finally:
        os.kill(writer, signal.SIGKILL)
    finals = finals_of(await client.finals(2, timeout=2 * UNIT))
    assert_exactly_once(finals, 2)
    assert [f["value"] for f in finals] == [{"slept": 0.3}, {"n": 2}]
    await client.send({"type": "status"})
    status = await client.recv()
    assert (status["pending"], status["last_done"]) == (0, 2), status
    assert _consumer_failures() == failures + 1  # the result's write, not another, failed


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_recovery_the_store_failed_is_tried_again(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """The broker comes back, and the session's recovery meets a store that
    fails (its writer dies under the recovery's first write). The session
    tries again by itself instead of waiting for the next broker reconnect:
    the request queued through the outage runs, once, in order."""
    server = await server_factory(lease_seconds=60)  # no lease renewal in the pipe
    client = await user_client(target=server)
    await client.submit("a", "sleep", {"seconds": 2})
    await client.submit("b", "echo", {"n": 2})
    frames = await client.recv_until(lambda f: f.get("id") == "b" and f["type"] == "accepted")
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        async with asyncio.timeout(UNIT):
            await server.broker._lost.wait()
        # "a" was running: it finishes and is sent; "b" waits for the queue.
        frames += await client.recv_until(lambda f: f.get("id") == "a" and "seq" in f, 2 * UNIT)
        assert not finals_of([f for f in frames if f.get("id") == "b"])
        writer = server.store.writer_pid  # type: ignore[attr-defined]
        assert writer is not None
        os.kill(writer, signal.SIGSTOP)
        await until(lambda: process_state(writer) == "T")
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    try:  # the recovery's first write (the fenced lease renewal) waits in the pipe
        await until(lambda: unread_input(writer) > 0, 6 * UNIT)
    finally:
        os.kill(writer, signal.SIGKILL)
    frames += await client.finals(1, timeout=4 * UNIT)
    finals = finals_of(frames)
    assert_exactly_once(finals, 2)
    assert [f["id"] for f in finals] == ["a", "b"]


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_refused_batch_the_store_could_not_forget_does_not_block_the_session(
    tmp_path: Path, server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """A publish fails (the broker holds every publisher back: a memory alarm),
    and the store then fails to forget the request it had stored for it. The
    client got `unavailable`; its next submit is accepted as soon as the store
    answers (before, the session reused the leftover request's seq, and every
    later submit was refused), and the refused request never runs."""
    server = await server_factory(publish_timeout=1, lease_seconds=60)
    client = await user_client(target=server)
    writer = server.store.writer_pid  # type: ignore[attr-defined]
    assert writer is not None

    def stored(rid: str) -> bool:
        with contextlib.closing(sqlite3.connect(tmp_path / "sq.db")) as c:
            return bool(c.execute("SELECT 1 FROM requests WHERE client_id = ?", (rid,)).fetchall())

    # 0.4, or {absolute,Bytes}: set back as it was
    current = await asyncio.to_thread(
        rabbitmqctl, "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."
    )
    watermark = current.strip().strip("{}").replace("absolute,", "absolute ").split()
    await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", "0")
    try:
        await client.submit("x", "echo", {"n": 1})
        await until(lambda: stored("x"))  # stored; its publish is held back
        os.kill(writer, signal.SIGSTOP)
        await until(lambda: process_state(writer) == "T")
        try:  # the publish times out; the removal waits in the pipe
            await until(lambda: unread_input(writer) > 0, 2 * UNIT)
        finally:
            os.kill(writer, signal.SIGKILL)
        refusal = await client.recv_until(lambda f: f.get("id") == "x")
        assert (refusal[-1]["type"], refusal[-1]["code"]) == ("error", "unavailable")
    finally:  # never leave the broker blocking publishers
        try:
            await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", *watermark)
        except subprocess.CalledProcessError:
            await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", "0.4")
    await client.submit("y", "echo", {"n": 2})
    frames = await client.finals(1, timeout=2 * UNIT)
    assert [(f["type"], f["id"], f["seq"]) for f in frames] == [
        ("accepted", "y", 1), ("result", "y", 1)
    ]  # fmt: skip
    assert not stored("x")


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_submit_being_stored_when_its_client_leaves_is_still_run(
    server: Server, user_client: ClientFactory, connect: ClientFactory
) -> None:
    """The client sends a submit and goes away while the server is storing it
    (a token that expires, a dropped network). The session stays until that
    submit is stored, published and run, then closes by itself: a resume
    finds its result."""
    client = await user_client()
    session_id, token = client.welcome["session"], client.welcome["token"]
    session = server.sessions[session_id]
    writer = server.store.writer_pid  # type: ignore[attr-defined]
    assert writer is not None
    os.kill(writer, signal.SIGSTOP)
    try:
        await until(lambda: process_state(writer) == "T")  # stopped, not about to read
        await client.submit("last", "echo", {"n": 1})
        await until(lambda: unread_input(writer) > 0)  # the submit waits in the writer's pipe
        await client.close()
        await until(lambda: session.state != "open")  # the server saw the client go
    finally:
        os.kill(writer, signal.SIGCONT)
    await until(lambda: session.state == "closed")  # drained and let go, before the resume
    again = await connect(path=f"/ws?token={token}")
    assert (await again.recv())["type"] == "welcome"
    resumed = await resume(again, session_id, after=0)
    assert resumed["last_seq"] == 1, resumed
    finals = finals_of(await again.finals(1))
    assert [(f["id"], f["value"]) for f in finals] == [("last", {"n": 1})]


async def test_resume_right_after_a_disconnect_while_the_session_closes(
    user_client: ClientFactory, connect: ClientFactory
) -> None:
    """Reconnect and resume at once, again and again: the resume can land while
    the drained session is closing down; it must be carried on, not lost."""
    client = await user_client()
    session, token = client.welcome["session"], client.welcome["token"]
    await client.close()
    for i in range(1, 11):
        again = await connect(path=f"/ws?token={token}")
        await again.recv()
        assert (await resume(again, session, after=i - 1))["type"] == "resumed"
        await again.submit(f"r{i}", "echo", {"i": i})
        finals = finals_of(await again.finals(1))
        assert (finals[0]["seq"], finals[0]["value"]) == (i, {"i": i})
        await again.close()
