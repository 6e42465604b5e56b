"""The HTTP side of the port: the WebSocket upgrade's checks and the small routes.

``/ws`` is upgraded when its ``Origin`` is the server's own or an allowed one
and the server is not shutting down; ``/healthz`` says the process runs,
``/readyz`` that the store and the broker answer; ``/metrics`` is Prometheus'
scrape; ``/`` and ``/static/*`` serve the browser page. Routing looks at the
path without its query string (``/ws?token=...`` is ``/ws``).
"""

from __future__ import annotations

import asyncio
import http
import mimetypes
from collections.abc import Callable
from importlib import resources

from loguru import logger
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from server import metrics
from server.broker import Broker, BrokerError
from server.settings import Settings
from server.store import Store, StoreError

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Routes:
    """``process_request`` for websockets' ``serve``: None lets the upgrade go
    on, a Response answers the request instead."""

    def __init__(
        self, settings: Settings, store: Store, broker: Broker, stopping: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self._stopping = stopping
        self._static = resources.files("server") / "static"

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            if not self.origin_ok(request):
                return response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n")
            if self._stopping():
                return response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n")
            return None
        if path == "/healthz":
            return response(http.HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            return await self.ready()
        if path == "/metrics" and not self.settings.metrics_port:
            return metrics_response()
        if path == "/" or path.startswith("/static/"):
            return self.static_file("index.html" if path == "/" else path[len("/static/") :])
        return response(http.HTTPStatus.NOT_FOUND, b"not found\n")

    def origin_ok(self, request: Request) -> bool:
        """No Origin (not a browser), the server's own, or an allowed one."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        host = request.headers.get("Host", "")
        if origin in (f"http://{host}", f"https://{host}"):
            return True
        return origin in self.settings.allowed_origins

    async def ready(self) -> Response:
        """200 when the store and the broker answer and no shutdown began;
        503 with one short reason a line otherwise (``store``, ``broker``,
        ``stopping``): the port is public, so the failures' own text goes to
        the log, not into the answer."""
        problems = []
        try:
            await asyncio.wait_for(self.store.ping(), 2)
        except (StoreError, TimeoutError) as exc:
            logger.debug("readyz: store: {!r}", exc)
            problems.append("store")
        try:
            await self.broker.ping()
        except BrokerError as exc:
            logger.debug("readyz: broker: {!r}", exc)
            problems.append("broker")
        if self._stopping():
            problems.append("stopping")
        if problems:
            text = "\n".join(problems) + "\n"
            return response(http.HTTPStatus.SERVICE_UNAVAILABLE, text.encode())
        return response(http.HTTPStatus.OK, b"ready\n")

    def static_file(self, name: str) -> Response:
        if "/" in name or name.startswith("."):
            return response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        item = self._static / name
        if not item.is_file():
            return response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        answer = response(http.HTTPStatus.OK, item.read_bytes(), content_type)
        answer.headers.update(SECURITY_HEADERS)
        return answer


async def metrics_only(ws: ServerConnection, request: Request) -> Response:
    """``process_request`` of the metrics port: ``/metrics`` and nothing else."""
    if request.path.partition("?")[0] == "/metrics":
        return metrics_response()
    return response(http.HTTPStatus.NOT_FOUND, b"not found\n")


def metrics_response() -> Response:
    body, content_type = metrics.render()
    return response(http.HTTPStatus.OK, body, content_type)


def response(
    status: http.HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))),
         ("Connection", "close"), ("Cache-Control", "no-store")]
    )  # fmt: skip
    return Response(status.value, status.phrase, headers, body)
