"""The server process: composes settings, store, broker and sessions, and
starts and stops them in a fixed order.

One :class:`Server` per process. Each concern lives in its own module:
the sessions this process owns and how ownership moves
(:mod:`server.directory`), the answer to ``resume`` (:mod:`server.replay`), the
HTTP routes (:mod:`server.routes`), keepalive (:mod:`server.keepalive`), one
connection (:mod:`server.connection`, which sees the server only through
:class:`server.ports.ConnectionHost`). The server owns every long-lived task
(lease renewal, retention purge, the orphan sweep, keepalive, hand-overs, the
broker supervisor, the websockets server) and shuts them down in a fixed order:
stop listening and refusing submits, let running requests finish within the
grace period, close sockets with 1001, then stop the broker and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from loguru import logger
from websockets.asyncio.server import Server as WSServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Response

from consumers.builtin import register_builtins
from consumers.registry import Registry
from consumers.registry import registry as default_registry
from server import metrics
from server.auth import Authenticator
from server.broker import Broker, BrokerError
from server.connection import Connection, SQConnection
from server.directory import SessionDirectory
from server.keepalive import keepalive
from server.lifetime import end_with_parent
from server.ports import Carrier
from server.replay import REPLAY_PAGE, replay
from server.revocation import LiveTokens
from server.routes import Routes, metrics_only
from server.session import Session
from server.settings import Settings
from server.store import Store, StoreError, open_store

__all__ = ["REPLAY_PAGE", "Server", "sqlite_dir"]


def sqlite_dir(store_url: str) -> Path | None:
    if not store_url.startswith("sqlite:///"):
        return None
    return Path(store_url[len("sqlite:///") :]).parent


class Server:
    """Implements :class:`server.ports.ConnectionHost` for its connections."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self._settings = settings
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.registry = registry if registry is not None else default_registry
        self.store: Store = open_store(settings.store_url)
        self.store.on_failure = metrics.store_errors.inc
        self.broker = Broker(
            settings.broker_url,
            channels=settings.amqp_channels,
            prefetch=settings.prefetch,
            publish_timeout=settings.publish_timeout,
        )
        self.auth: Authenticator
        self.directory = SessionDirectory(
            settings, self.store, self.broker, self.registry, self.owner, self._spawn
        )
        self.routes = Routes(settings, self.store, self.broker, lambda: self.stopping)
        self.open_sockets: set[SQConnection] = set()
        # Authenticated connections by user, closed when their token is revoked.
        self.live = LiveTokens(self.broker.send_control)
        self.directory.on_revoke = self.live.on_message
        self.cpu_pool: Executor | None = None
        self.stopping = False
        self.ws_server: WSServer | None = None
        self.metrics_server: WSServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.port = settings.port

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """Replaced once at start (the JWT secret), or by a test: the parts
        that read settings see the new ones from then on."""
        self._settings = self.directory.settings = self.routes.settings = settings

    @property
    def sessions(self) -> dict[str, Session]:
        return self.directory.sessions

    @property
    def user_connections(self) -> Counter[str]:
        return self.directory.user_connections

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        settings = self.settings
        await self.store.open()
        settings = settings.secret_for(sqlite_dir(settings.store_url))
        self.settings = settings
        self.auth = Authenticator(
            self.store, settings.jwt_secret, settings.token_ttl,
            login_failures=settings.login_failures, login_window=settings.login_window,
            bcrypt_rounds=settings.bcrypt_rounds,
            register_per_minute=settings.register_per_minute,
            issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )  # fmt: skip
        if self.registry.get("echo") is None:
            register_builtins(self.registry)
        self.registry.load(settings.ops)
        # Known label values from the start: a healthy server shows zeros.
        metrics.prime(self.registry.names())
        self.store.instrument(metrics.store_timer, metrics.STORE_OPS)
        # spawn, not fork: a forked pool process would keep copies of every
        # descriptor open at that moment (listening sockets, the SQLite
        # writer's pipe, which then never sees EOF). And a pool process waits
        # for work forever: it must die with the server, even a SIGKILLed one.
        self.cpu_pool = self.directory.cpu_pool = ProcessPoolExecutor(
            max_workers=max(1, (os.cpu_count() or 2) - 1),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=end_with_parent,
            initargs=(os.getpid(),),
        )
        self.broker.on_recover(self.directory.recover_sessions)
        self.broker.on_control(self.directory.on_control)
        try:
            await self.broker.start(wait=10)
        except BrokerError as exc:
            logger.warning("{}; serving anyway, /readyz says 503 until it answers", exc)
        tls = tls_context(settings)
        kwargs: dict[str, Any] = dict(
            process_request=self.routes.process_request,
            ssl=tls,
            create_connection=SQConnection,
            max_size=settings.max_message_bytes,
            compression="deflate" if settings.compression else None,
            # One keepalive task for all connections (server.keepalive) instead
            # of websockets' task per connection: idle sessions are cheaper.
            ping_interval=None,
            close_timeout=5,
            server_header="sessionq",
        )
        if sock is not None:
            self.ws_server = await serve(self._handle, sock=sock, **kwargs)
        else:
            self.ws_server = await serve(
                self._handle, settings.host, settings.port,
                reuse_port=settings.workers > 1, **kwargs,
            )  # fmt: skip
        self.port = self.ws_server.sockets[0].getsockname()[1]
        if settings.metrics_port:
            # /metrics alone, on its own (private) address; with --workers every
            # process listens there too and any one answers for all of them.
            self.metrics_server = await serve(
                _no_websocket, settings.metrics_host, settings.metrics_port,
                process_request=metrics_only, reuse_port=settings.workers > 1,
                server_header="sessionq",
            )  # fmt: skip
        self._spawn(self.directory.renew_leases(), "leases")
        self._spawn(self._purge(), "purge")
        self._spawn(self.directory.adopt_orphans(), "orphans")
        self._spawn(self.directory.sample_pending(), "pending")
        self._spawn(keepalive(self.open_sockets, settings.keepalive), "keepalive")
        scheme = "wss" if tls is not None else "ws"
        logger.info("sessionq serving {}://{}:{}/ws as {}", scheme, settings.host, self.port,
                    self.owner)  # fmt: skip
        logger.info(settings.security_summary())

    async def stop(self) -> None:
        """SIGTERM: stop accepting, let running requests finish within the grace
        period, keep the rest stored, close sockets with 1001."""
        if self.stopping:
            return
        self.stopping = True
        logger.info("shutting down: {} sessions", len(self.sessions))
        if self.ws_server is not None:
            self.ws_server.server.close()  # stop listening; open sockets stay
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self.directory.stop_sessions(self.settings.shutdown_grace)
        if self.ws_server is not None:
            self.ws_server.close(close_connections=True)  # 1001 going away
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ws_server.wait_closed(), 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.stop()
        await self.store.close()
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped")

    def _spawn(self, job: Coroutine[Any, Any, None], name: str) -> None:
        """Start a task kept in ``_tasks`` (cancelled by stop) until it ends."""
        task = asyncio.create_task(job, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _purge(self) -> None:
        while True:
            try:
                ttl = self.settings.result_ttl
                # Session records outlive their results, so that a late resume
                # is told "expired" rather than "not_found".
                now = time.time()
                removed = await self.store.purge(now - ttl, sessions_before=now - 8 * ttl)
                if removed:
                    logger.info("purged {} finished requests past retention", removed)
            except StoreError as exc:
                logger.warning("purge failed: {}", exc)
            await asyncio.sleep(min(3600.0, max(1.0, self.settings.result_ttl / 10)))

    async def _ready(self) -> Response:
        return await self.routes.ready()

    # -- connections (server.ports.ConnectionHost) ---------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, SQConnection)
        self.open_sockets.add(ws)
        try:
            await Connection(self, ws).run()
        finally:
            self.open_sockets.discard(ws)

    def take_user_slot(self, username: str) -> bool:
        return self.directory.take_user_slot(username)

    def free_user_slot(self, username: str) -> None:
        self.directory.free_user_slot(username)

    async def new_session(self, username: str) -> Session:
        return await self.directory.new_session(username)

    async def take_session(self, session_id: str, username: str, carrier: Carrier) -> Session:
        return await self.directory.take_session(session_id, username, carrier)

    async def replay(self, session: Session, carrier: Carrier, after: int) -> None:
        await replay(self.store, session, carrier, after)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from SESSIONQ_TLS_CERT / _KEY, or None (plain)."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def _no_websocket(ws: ServerConnection) -> None:
    """The metrics port upgrades nothing: process_request answers every request."""
