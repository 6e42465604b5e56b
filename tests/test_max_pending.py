"""max_pending counts every unfinished request (PROTOCOL.md 1.1, "Budgets")."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import (
    ClientFactory,
    ServerFactory,
    finals_of,
    process_state,
    unread_input,
    until,
)


@pytest.mark.sqlite_only  # SQLite's writer process or file
async def test_a_burst_while_a_batch_is_being_stored_gets_no_more_than_max_pending(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """One request runs; the next is being stored (the store's writer is
    held); nine more arrive frame by frame meanwhile. The one being stored
    counts: exactly max_pending requests are accepted, the rest are refused
    with queue_full and no seq."""
    server = await server_factory(max_pending=5, lease_seconds=60)  # no lease write in the pipe
    client = await user_client(target=server)
    await client.submit("running", "sleep", {"seconds": 30})
    await client.recv_until(lambda f: f["type"] == "accepted" and f["id"] == "running")
    writer = server.store.writer_pid  # type: ignore[attr-defined]
    assert writer is not None
    os.kill(writer, signal.SIGSTOP)
    try:
        await until(lambda: process_state(writer) == "T")
        await client.submit("r0", "sleep", {"seconds": 0})
        await until(lambda: unread_input(writer) > 0)  # r0's batch waits for the store
        for i in range(1, 10):
            await client.submit(f"r{i}", "sleep", {"seconds": 0})
        refused = await client.recv_until(lambda f: f.get("id") == "r9")
    finally:
        os.kill(writer, signal.SIGCONT)
    assert [(f["type"], f["id"], f.get("code")) for f in refused] == [
        ("error", f"r{i}", "queue_full") for i in range(4, 10)
    ]
    assert all("seq" not in f for f in refused)
    frames = await client.recv_until(lambda f: f["type"] == "accepted" and f["id"] == "r3")
    assert [f["id"] for f in frames if f["type"] == "accepted"] == ["r0", "r1", "r2", "r3"]
    await client.send({"type": "status"})
    status = await client.recv_until(lambda f: f["type"] == "status")
    assert status[-1]["pending"] == 5
    await client.send({"type": "cancel", "id": "running"})
    finals = finals_of(await client.finals(5))
    assert [(f["id"], f["type"]) for f in finals] == [("running", "error")] + [
        (f"r{i}", "result") for i in range(4)
    ]


async def test_a_client_keeping_max_pending_in_flight_is_never_refused(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    """A new submit on each final, max_pending always in flight: every one is
    accepted, none refused (a request stops counting before its final is sent)."""
    server = await server_factory(max_pending=4)
    client = await user_client(target=server)
    total, sent, done = 120, 0, 0
    for _ in range(4):
        await client.submit(f"r{sent}", "echo", {"n": sent})
        sent += 1
    refusals = []
    while done < total:
        frame = await client.recv()
        if frame["type"] == "error" and "seq" not in frame:
            refusals.append(frame)
        if frame["type"] in ("result", "error") and "seq" in frame:
            done += 1
            if sent < total:
                await client.submit(f"r{sent}", "echo", {"n": sent})
                sent += 1
    assert refusals == []
