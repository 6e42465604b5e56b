"""The peer: RabbitMQ's own Web-STOMP plugin doing sessionq's broker round trip.

Web-STOMP (``rabbitmq_web_stomp``, shipped with Debian's rabbitmq-server)
speaks STOMP over WebSocket inside the broker, in Erlang: the closest
off-the-shelf thing to "a WebSocket client owns a queue and gets its messages
back". Each session here is a minimal STOMP 1.2 client that

1. CONNECTs (guest/guest, heart-beats off),
2. SUBSCRIBEs to ``/queue/bench.stomp.<unique>`` declared non-durable,
   exclusive and auto-delete (RabbitMQ's ``durable``/``exclusive``/
   ``auto-delete`` SUBSCRIBE headers: the same kind of queue sessionq gives
   every session; ``/temp-queue/`` cannot be subscribed to), ack mode auto,
   and waits for the RECEIPT of that subscription,
3. SENDs ``{"i":k}`` to ``/amq/queue/<that queue>`` (the default exchange, no
   re-declaration) and reads the MESSAGE back.

With ``receipts=True`` (the default) every SEND carries a ``receipt`` header;
RabbitMQ sends the RECEIPT once the message is confirmed, i.e. publisher
confirms, as sessionq has on every publish. The closed loop counts the
MESSAGE, never waits for the RECEIPT (which usually arrives just after it).
``receipts=False`` measures the fire-and-forget variant.

The plugin runs inside the broker, so its "server CPU" is the broker's.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Sequence

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from bench.loadgen import Opener, Session, wait_port

WEB_STOMP_URL = "ws://127.0.0.1:15674/ws"
PLUGIN = "rabbitmq_web_stomp"


class StompError(Exception):
    """The broker answered with an ERROR frame, or something we did not expect."""


def _frame(command: str, headers: dict[str, str], body: str = "") -> str:
    lines = [command, *(f"{k}:{v}" for k, v in headers.items())]
    return "\n".join(lines) + "\n\n" + body + "\0"


def _parse(data: str | bytes) -> list[tuple[str, str]]:
    """(command, body) of every frame in one WebSocket message (heart-beat EOLs skipped)."""
    text = data.decode() if isinstance(data, bytes) else data
    frames = []
    for raw in text.split("\0"):
        raw = raw.lstrip("\r\n")
        if not raw:
            continue
        head, _, body = raw.partition("\n\n")
        frames.append((head.partition("\n")[0], body))
    return frames


class StompSession:
    def __init__(self, ws: ClientConnection, queue: str, receipts: bool) -> None:
        self.ws = ws
        self.queue = queue
        self.receipts = receipts
        self._send_prefix = f"SEND\ndestination:/amq/queue/{queue}\ncontent-type:application/json\n"

    @classmethod
    async def open(
        cls, url: str = WEB_STOMP_URL, *, receipts: bool = True, timeout: float = 10.0
    ) -> StompSession:
        ws = await connect(
            url,
            subprotocols=[Subprotocol("v12.stomp")],
            compression=None,
            open_timeout=timeout,
            ping_interval=None,
            max_queue=None,
            proxy=None,  # loopback: no proxy lookup per connection
        )
        try:
            await ws.send(
                _frame(
                    "CONNECT",
                    {
                        "accept-version": "1.2",
                        "host": "/",
                        "login": "guest",
                        "passcode": "guest",
                        "heart-beat": "0,0",
                    },
                )
            )
            await cls._expect(ws, "CONNECTED", timeout)
            queue = f"bench.stomp.{uuid.uuid4().hex}"
            await ws.send(
                _frame(
                    "SUBSCRIBE",
                    {
                        "id": "0",
                        "destination": f"/queue/{queue}",
                        "ack": "auto",
                        "durable": "false",
                        "exclusive": "true",
                        "auto-delete": "true",
                        "receipt": "subscribed",
                    },
                )
            )
            await cls._expect(ws, "RECEIPT", timeout)
        except BaseException:
            await ws.close()
            raise
        return cls(ws, queue, receipts)

    @staticmethod
    async def _expect(ws: ClientConnection, command: str, timeout: float) -> None:
        frames = _parse(await asyncio.wait_for(ws.recv(), timeout))
        if not frames or frames[0][0] != command:
            raise StompError(f"expected {command}, got {frames[:1]!r}")

    async def send(self, k: int) -> None:
        receipt = f"receipt:{k}\n" if self.receipts else ""
        await self.ws.send(f'{self._send_prefix}{receipt}\n{{"i":{k}}}\0')

    async def recv(self) -> Sequence[int]:
        out = []
        for command, body in _parse(await self.ws.recv()):
            if command == "MESSAGE":
                out.append(orjson.loads(body)["i"])
            elif command == "ERROR":
                raise StompError(body.strip() or "ERROR frame")
            # RECEIPT: the publish was confirmed; the loop waits for the MESSAGE.
        return out

    async def close(self) -> None:
        # DISCONNECT without a receipt, then the WebSocket close: the queue auto-deletes.
        try:
            await self.ws.send(_frame("DISCONNECT", {}))
        finally:
            await self.ws.close()


def stomp_opener(url: str = WEB_STOMP_URL, *, receipts: bool = True) -> Opener:
    async def opener(_i: int) -> Session:
        return await StompSession.open(url, receipts=receipts)

    return opener


# -- the plugin, on for the run and off after ---------------------------------------------
def plugin_enabled(plugin: str = PLUGIN) -> bool:
    """Whether ``plugin`` is explicitly enabled (``rabbitmq-plugins list -E``)."""
    out = subprocess.run(
        ["rabbitmq-plugins", "list", "-E", "-m", f"^{plugin}$"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return plugin in out.split()


def set_plugin(enabled: bool, plugin: str = PLUGIN) -> None:
    subprocess.run(
        ["rabbitmq-plugins", "enable" if enabled else "disable", plugin],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


class WebStompPlugin:
    """Context manager: the plugin is on inside, and back as found outside.

    Enabled with ``rabbitmq-plugins enable`` (no broker restart), disabled again
    on the way out, even on an error or Ctrl-C, unless it was already enabled
    before we came.
    """

    def __init__(self) -> None:
        self.was_enabled = False
        self.enabled_by_us = False

    def __enter__(self) -> WebStompPlugin:
        self.was_enabled = plugin_enabled()
        if not self.was_enabled:
            self.enabled_by_us = True
            set_plugin(True)
        try:
            wait_port("127.0.0.1", 15674, 30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled_by_us:
            set_plugin(False)
