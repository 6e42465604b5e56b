"""Quotas on what one request can send back (PROTOCOL.md 1.1, "Quotas")."""

from __future__ import annotations

from conftest import ClientFactory, ServerFactory, finals_of
from prometheus_client import REGISTRY


async def test_an_oversized_result_ends_its_request_and_the_session_goes_on(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(max_result_bytes=2000)
    client = await user_client(target=server)
    await client.submit("big", "echo", {"pad": "x" * 3000})
    await client.submit("small", "echo", {"pad": "x" * 100})
    finals = finals_of(await client.finals(2))
    assert (finals[0]["id"], finals[0]["seq"], finals[0]["code"]) == ("big", 1, "result_too_large")
    assert "2000" in finals[0]["message"]
    assert (finals[1]["id"], finals[1]["value"]) == ("small", {"pad": "x" * 100})
    # The stored final is the error too: a resume replays the same frame.
    stored = dict(await server.store.finals_after(client.welcome["session"], 0))
    assert '"result_too_large"' in stored[1]


async def test_an_oversized_progress_frame_is_dropped_and_counted(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    server = await server_factory(max_result_bytes=2000, ops="tests.ops_for_tests")
    client = await user_client(target=server)
    dropped = REGISTRY.get_sample_value("sessionq_progress_dropped_total") or 0.0
    await client.submit("p", "test.progress", {"sizes": [10, 5000, 20]})
    frames = await client.finals(1)
    progress = [f["data"]["pad"] for f in frames if f["type"] == "progress"]
    assert progress == ["x" * 10, "x" * 20]
    assert finals_of(frames)[0]["value"] == {"sent": 3}
    assert REGISTRY.get_sample_value("sessionq_progress_dropped_total") == dropped + 1
