"""One INFO line per session lifecycle event; nothing per request at INFO."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ClientFactory, ServerFactory
from loguru import logger


@pytest.fixture
def info_lines() -> Iterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []

    def sink(message: Any) -> None:
        record = message.record
        lines.append({"msg": record["message"], **record["extra"]})

    handler = logger.add(sink, level="INFO", diagnose=False, backtrace=False)
    yield lines
    logger.remove(handler)


async def test_a_session_logs_its_life_in_one_line_per_event(
    server_factory: ServerFactory, user_client: ClientFactory, info_lines: list[dict[str, Any]]
) -> None:
    server = await server_factory()
    client = await user_client(target=server)
    sid = client.welcome["session"]
    for i in range(20):
        await client.submit(f"r{i}", "echo", {"i": i})
    await client.recv_until(lambda f: f.get("id") == "r19" and f["type"] == "result")
    closed = asyncio.get_running_loop().create_future()
    server.sessions[sid].on_closed = closed.set_result
    await client.close()
    await asyncio.wait_for(closed, 5)
    mine = [line["msg"] for line in info_lines if line.get("session") == sid]
    assert [m.split(":")[0] for m in mine] == [
        "session opened",
        "session draining",
        "session drained",
        "session closed here",
    ], mine
    assert not any("r1" in line["msg"] for line in info_lines)  # no per-request line
