"""TLS on the one port, /metrics on a port of its own, and /readyz's short reasons."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from conftest import PASSWORD, ServerFactory, unique_name
from loguru import logger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_wss_and_https_on_the_one_port(
    server_factory: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server = await server_factory(tls_cert=str(cert), tls_key=str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    async with websockets.connect(f"wss://127.0.0.1:{server.port}/ws", ssl=trust) as ws:
        await ws.send(orjson.dumps(
            {"type": "register", "username": unique_name("tls"), "password": PASSWORD}
        ).decode())  # fmt: skip
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        await ws.send(
            orjson.dumps({"type": "submit", "id": "a", "op": "echo", "args": {"x": 1}}).decode()
        )
        frames = [orjson.loads(await ws.recv()) for _ in range(2)]
        assert frames[1]["value"] == {"x": 1}
    status, body = await asyncio.to_thread(get, f"https://127.0.0.1:{server.port}/healthz", trust)
    assert (status, body) == (200, b"ok\n")
    # Plain text on the TLS port gets nowhere.
    with pytest.raises((websockets.InvalidMessage, ConnectionError, OSError, EOFError)):
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=5):
            pass


async def test_metrics_on_their_own_port_only(server_factory: ServerFactory) -> None:
    port = free_port()
    server = await server_factory(metrics_port=port)
    status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics")
    assert status == 404
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and b"sessionq_requests_accepted_total" in body
    status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
    assert status == 404  # that port serves /metrics and nothing else
    await server.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")


async def test_readyz_says_what_is_down_in_one_word(server_factory: ServerFactory) -> None:
    server = await server_factory()
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/readyz")
    assert (status, body) == (200, b"ready\n")
    await server.broker.stop()
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/readyz")
    assert (status, body) == (503, b"broker\n")


async def test_production_closes_registration_and_says_so_at_start(
    server_factory: ServerFactory,
) -> None:
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        server = await server_factory(env="production")
    finally:
        logger.remove(handler)
    summary = [line for line in lines if line.startswith("security:")]
    assert summary == [
        "security: env production, registration closed, 40-byte JWT secret,"
        " TLS off (terminate it in front), metrics on the public port, token TTL 900s"
    ]
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        await ws.send(orjson.dumps(
            {"type": "register", "username": unique_name("p"), "password": PASSWORD}
        ).decode())  # fmt: skip
        reply: dict[str, Any] = orjson.loads(await ws.recv())
        assert (reply["type"], reply["code"]) == ("error", "unauthorized")
    opened = await server_factory(env="production", open_registration=True)
    async with websockets.connect(f"ws://127.0.0.1:{opened.port}/ws") as ws:
        await ws.send(orjson.dumps(
            {"type": "register", "username": unique_name("p"), "password": PASSWORD}
        ).decode())  # fmt: skip
        assert orjson.loads(await ws.recv())["type"] == "welcome"
