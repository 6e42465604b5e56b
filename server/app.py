"""The server process: wires settings, store, broker and sessions together.

One :class:`Server` per process. It owns every long-lived task (lease renewal,
retention purge, the broker supervisor, the websockets server) and shuts them
down in a fixed order: stop listening and refusing submits, let running
requests finish within the grace period, close sockets with 1001, then stop
the broker and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import mimetypes
import multiprocessing
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ProcessPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, cast

from loguru import logger
from websockets.asyncio.server import Server as WSServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from consumers.builtin import register_builtins
from consumers.registry import Registry
from consumers.registry import registry as default_registry
from protocol import CloseCode, ErrorCode, decode_json, encode_error, encode_json, encode_resumed
from server import metrics
from server.auth import Authenticator
from server.broker import Broker, BrokerError
from server.connection import Connection, SQConnection
from server.lifetime import end_with_parent
from server.outbox import Outbox
from server.session import Session
from server.settings import Settings
from server.store import Store, StoreError, open_store

# Stored finals a resume reads per store query: a long replay is never held in
# memory whole (the outbox paces it to the client's reading speed).
REPLAY_PAGE = 256

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def sqlite_dir(store_url: str) -> Path | None:
    if not store_url.startswith("sqlite:///"):
        return None
    return Path(store_url[len("sqlite:///") :]).parent


class Server:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
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
        self.sessions: dict[str, Session] = {}
        self.user_connections: Counter[str] = Counter()
        self._claim_locks: dict[str, asyncio.Lock] = {}
        self.open_sockets: set[SQConnection] = set()
        self._crashed_owner: set[str] = set()  # claimed from a dead owner, not yet started
        self.cpu_pool: Executor | None = None
        self.stopping = False
        self.ws_server: WSServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._static = resources.files("server") / "static"
        self.port = settings.port

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
        )  # fmt: skip
        if self.registry.get("echo") is None:
            register_builtins(self.registry)
        self.registry.load(settings.ops)
        # spawn, not fork: a forked pool process would keep copies of every
        # descriptor open at that moment (listening sockets, the SQLite
        # writer's pipe, which then never sees EOF). And a pool process waits
        # for work forever: it must die with the server, even a SIGKILLed one.
        self.cpu_pool = ProcessPoolExecutor(
            max_workers=max(1, (os.cpu_count() or 2) - 1),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=end_with_parent,
            initargs=(os.getpid(),),
        )
        self.broker.on_recover(self._recover_sessions)
        self.broker.on_control(self._control)
        try:
            await self.broker.start(wait=10)
        except BrokerError as exc:
            logger.warning("{}; serving anyway, /readyz says 503 until it answers", exc)
        kwargs: dict[str, Any] = dict(
            process_request=self._process_request,
            create_connection=SQConnection,
            max_size=settings.max_message_bytes,
            compression="deflate" if settings.compression else None,
            # One keepalive task for all connections (see _keepalive) instead
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
        self._tasks.append(asyncio.create_task(self._renew_leases(), name="leases"))
        self._tasks.append(asyncio.create_task(self._purge(), name="purge"))
        self._tasks.append(asyncio.create_task(self._adopt_orphans(), name="orphans"))
        self._tasks.append(asyncio.create_task(self._keepalive(), name="keepalive"))
        logger.info("sessionq serving on {}:{} as {}", settings.host, self.port, self.owner)

    async def stop(self) -> None:
        """SIGTERM: stop accepting, let running requests finish within the grace
        period, keep the rest stored, close sockets with 1001."""
        if self.stopping:
            return
        self.stopping = True
        logger.info("shutting down: {} sessions", len(self.sessions))
        if self.ws_server is not None:
            self.ws_server.server.close()  # stop listening; open sockets stay
        grace = self.settings.shutdown_grace
        sessions = list(self.sessions.values())
        await asyncio.gather(*(s.stop(grace) for s in sessions))
        # Let the last results reach their clients before the sockets close.
        await asyncio.gather(*(s.outbox.flush(1.0) for s in sessions if s.outbox is not None))
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

    async def _renew_leases(self) -> None:
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.store.renew_leases(self.owner, time.time() + lease)
            except StoreError as exc:
                logger.warning("lease renewal failed: {}", exc)

    async def _adopt_orphans(self) -> None:
        """Sessions with accepted work and no live owner (their process died
        or shut down) are claimed and drained here, as after a disconnect:
        the work runs and its results wait in the store for ``resume``."""
        while True:
            if self.broker.connected and not self.stopping:
                try:
                    for session_id in await self.store.orphaned_sessions(time.time()):
                        if session_id not in self.sessions:
                            await self._adopt(session_id)
                except StoreError as exc:
                    logger.warning("orphan sweep failed: {}", exc)
            await asyncio.sleep(self.settings.lease_seconds)

    async def _adopt(self, session_id: str) -> None:
        async with self._session_lock(session_id):
            if session_id not in self.sessions:
                await self._adopt_unlocked(session_id)

    async def _adopt_unlocked(self, session_id: str) -> None:
        epoch = await self._claim_once(session_id)
        record = await self.store.get_session(session_id)
        if epoch is None or record is None:
            return  # another process got there first
        session = self._make_session(session_id, record.username, epoch, record.last_seq)
        session.state = "draining"
        work = await session.take_up()
        if not session.unfinished:
            session.detach(None)
        logger.bind(session=session_id).info("adopted orphaned session: {} to run", work)

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

    def _control(self, body: bytes) -> None:
        """A message on the control exchange: another process asks us to let a
        session go because its client resumed there."""
        try:
            message = decode_json(body)
            session_id, by = message["release"], message["by"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed control message")
            return
        session = self.sessions.get(session_id)
        if by == self.owner or session is None or session.state == "closed":
            return
        task = asyncio.create_task(self._hand_over(session), name=f"handover-{session_id}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _hand_over(self, session: Session) -> None:
        """Another process claims the session for a resume: let it go."""
        await session.hand_over("session resumed elsewhere")  # on_closed drops it here
        logger.bind(session=session.session_id).info("session handed over")

    async def _recover_sessions(self) -> None:
        await asyncio.gather(
            *(s.recover() for s in list(self.sessions.values()) if s.state != "closed"),
            return_exceptions=True,
        )

    # -- HTTP routes -------------------------------------------------------------
    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            if not self._origin_ok(request):
                return self._response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n")
            if self.stopping:
                return self._response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n")
            return None
        if path == "/healthz":
            return self._response(http.HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            return await self._ready()
        if path == "/metrics":
            body, content_type = metrics.render()
            return self._response(http.HTTPStatus.OK, body, content_type)
        if path == "/" or path.startswith("/static/"):
            return self._static_file("index.html" if path == "/" else path[len("/static/") :])
        return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n")

    def _origin_ok(self, request: Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        host = request.headers.get("Host", "")
        if origin in (f"http://{host}", f"https://{host}"):
            return True
        return origin in self.settings.allowed_origins

    async def _ready(self) -> Response:
        problems = []
        try:
            await asyncio.wait_for(self.store.ping(), 2)
        except (StoreError, TimeoutError) as exc:
            problems.append(f"store: {exc or 'timeout'}")
        try:
            await self.broker.ping()
        except BrokerError as exc:
            problems.append(f"broker: {exc}")
        if self.stopping:
            problems.append("shutting down")
        if problems:
            text = "\n".join(problems) + "\n"
            return self._response(http.HTTPStatus.SERVICE_UNAVAILABLE, text.encode())
        return self._response(http.HTTPStatus.OK, b"ready\n")

    def _static_file(self, name: str) -> Response:
        if "/" in name or name.startswith("."):
            return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        item = self._static / name
        if not item.is_file():
            return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        response = self._response(http.HTTPStatus.OK, item.read_bytes(), content_type)
        response.headers.update(SECURITY_HEADERS)
        return response

    @staticmethod
    def _response(
        status: http.HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        headers = Headers(
            [("Content-Type", content_type), ("Content-Length", str(len(body))),
             ("Connection", "close"), ("Cache-Control", "no-store")]
        )  # fmt: skip
        return Response(status.value, status.phrase, headers, body)

    # -- connections and sessions ----------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, SQConnection)
        self.open_sockets.add(ws)
        try:
            await Connection(self, ws).run()
        finally:
            self.open_sockets.discard(ws)

    async def _keepalive(self) -> None:
        """Ping every connection each SESSIONQ_KEEPALIVE seconds; one whose previous
        ping got no pong by then is dead (e.g. a vanished peer) and is closed
        with 1011, as websockets' own keepalive would."""
        pending: dict[SQConnection, asyncio.Future[float]] = {}
        while True:
            await asyncio.sleep(self.settings.keepalive)
            for ws in list(self.open_sockets):
                waiter = pending.pop(ws, None)
                if waiter is not None and not waiter.done():
                    ws.protocol.fail(1011, "keepalive ping timeout")
                    ws.send_data()
                    ws.transport.close()
                    continue
                try:
                    pending[ws] = cast("asyncio.Future[float]", await ws.ping())
                except Exception:  # closing already: nothing to keep alive
                    continue
            for ws in [w for w in pending if w not in self.open_sockets]:
                del pending[ws]

    def take_user_slot(self, username: str) -> bool:
        key = username.lower()
        if self.user_connections[key] >= self.settings.max_connections_per_user:
            return False
        self.user_connections[key] += 1
        return True

    def free_user_slot(self, username: str) -> None:
        key = username.lower()
        self.user_connections[key] -= 1
        if self.user_connections[key] <= 0:
            del self.user_connections[key]

    def _make_session(self, session_id: str, username: str, epoch: int, last_seq: int) -> Session:
        careful = session_id in self._crashed_owner
        self._crashed_owner.discard(session_id)
        session = Session(
            session_id, username, epoch,
            settings=self.settings, store=self.store, broker=self.broker,
            registry=self.registry, cpu_pool=self.cpu_pool, owner=self.owner,
            last_seq=last_seq, on_closed=self._session_closed,
        )  # fmt: skip
        session.careful = careful
        self.sessions[session_id] = session
        metrics.sessions_live.labels("live").set(len(self.sessions))
        return session

    def _session_closed(self, session: Session) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            metrics.sessions_live.labels("live").set(len(self.sessions))

    async def new_session(self, username: str) -> Session:
        session_id = secrets.token_urlsafe(16)
        record = await self.store.create_session(
            session_id, username, self.owner, time.time() + self.settings.lease_seconds
        )
        session = self._make_session(session_id, username, record.epoch, 0)
        await session.start()
        return session

    async def take_session(self, session_id: str, username: str, conn: Connection) -> Session:
        """Make ``conn`` carry ``session_id``: the local session if this process
        owns it, otherwise claim it from the store and recover it here."""
        async with self._session_lock(session_id):
            return await self._take_session(session_id, username, conn)

    def _session_lock(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """One claim of a session at a time in this process (a resume and the
        orphan sweep may both want it)."""

        @contextlib.asynccontextmanager
        async def held() -> AsyncIterator[None]:
            lock = self._claim_locks.setdefault(session_id, asyncio.Lock())
            try:
                async with lock:
                    yield
            finally:
                if not lock.locked() and self._claim_locks.get(session_id) is lock:
                    del self._claim_locks[session_id]

        return held()

    async def _take_session(self, session_id: str, username: str, conn: Connection) -> Session:
        local = self.sessions.get(session_id)
        if local is not None and local.closing:
            # Draining just ended (or a hand-over is under way): let it release
            # ownership and take the session up afresh from the store, or, if
            # the close was called off, carry on with it.
            await local.wait_close_settled()
            local = self.sessions.get(session_id)
        if local is not None and (local.closing or local.state == "closed"):
            local = None
        if local is not None and local.state != "closed":
            if local.username.lower() != username.lower():
                raise LookupError("not found")
            if local.close_connection is not None and local.outbox is not conn.outbox:
                # Unhook the older connection first: when its close completes
                # it must not start draining the session it no longer carries.
                close = local.close_connection
                local.outbox, local.close_connection = None, None
                close(CloseCode.TAKEN_OVER, "session resumed elsewhere")
            return local
        record = await self.store.get_session(session_id)
        if record is None or record.username.lower() != username.lower():
            raise LookupError("not found")
        epoch = await self._claim(session_id)
        record = await self.store.get_session(session_id)
        assert record is not None
        session = self._make_session(session_id, record.username, epoch, record.last_seq)
        await session.take_up()
        return session

    async def _claim_once(self, session_id: str) -> int | None:
        """One try at ownership. Taking a session from an owner whose lease
        lapsed without a release means that owner died: its first unfinished
        request is the one that was running (FIFO), and is charged an attempt.

        The owner writes results in groups, so a request that finished just
        before the death may still look unfinished and take that charge
        instead (one extra run for the real culprit, never a false 'crashed'
        after it: the session then runs "careful", storing each result before
        the next request starts, so the next death is charged exactly)."""
        now = time.time()
        before = await self.store.get_session(session_id)
        epoch = await self.store.claim_session(
            session_id, self.owner, now + self.settings.lease_seconds, now
        )
        if epoch is None or before is None:
            return epoch
        if before.owner is not None and before.owner != self.owner and before.lease_until < now:
            rows = await self.store.unfinished(session_id)
            if rows:
                await self.store.start_request(session_id, rows[0].seq, epoch)
            self._crashed_owner.add(session_id)
        return epoch

    async def _claim(self, session_id: str) -> int:
        """Claim ownership; if another process holds a live lease, wait for it
        to release or lapse (bounded by one lease period)."""
        lease = self.settings.lease_seconds
        # The owner finishes its running request first; a dead owner's lease lapses.
        deadline = time.monotonic() + max(lease, self.settings.op_timeout) + 1
        delay = 0.05
        asked = False
        while True:
            epoch = await self._claim_once(session_id)
            if epoch is not None:
                return epoch
            if not asked:
                asked = True
                with contextlib.suppress(BrokerError):
                    await self.broker.send_control(
                        encode_json({"release": session_id, "by": self.owner})
                    )
            if time.monotonic() > deadline:
                raise LookupError("busy: another server still owns it")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _replay_finals(
        self,
        sid: str,
        outbox: Outbox,
        after: int,
        last: int,
        live: set[int],
        running: bool,
        replayed: set[int],
    ) -> None:
        """Send the stored finals of seqs ``after + 1 .. last`` that do not come
        live (see replay()), reading them a page at a time; add each one sent
        to ``replayed``."""
        # Without a running consumer: up to the first unfinished seq with no
        # stored final. Finals come in seq order, so the first unfinished seq
        # passed without its final is that gap.
        waiting = sorted(live) if not running else []
        i = 0
        cursor = after
        while True:
            page = await self.store.finals_after(sid, cursor, REPLAY_PAGE)
            for seq, frame in page:
                if seq > last:
                    return
                if not running:
                    if i < len(waiting) and waiting[i] < seq:
                        return  # the gap: the recovery carries the rest
                    if i < len(waiting) and waiting[i] == seq:
                        i += 1  # stored, not yet sent live: the replay sends it
                elif seq in live:
                    continue
                if not await outbox.push_replayed(frame.encode()):
                    return  # the client went away
                replayed.add(seq)
            if len(page) < REPLAY_PAGE:
                return
            cursor = page[-1][0]

    async def replay(self, session: Session, conn: Connection, after: int) -> None:
        """Answer ``resume``: ``resumed``, then every stored final with seq >
        ``after`` in order, then live frames (without duplicating a final)."""
        sid = session.session_id
        # Every accepted request has a row (stored before `accepted`) until
        # retention purges it: fewer rows than seqs means some results are gone.
        last = session.last_seq
        if after < last and await self.store.count_requests(sid, after, last) < last - after:
            conn.outbox.push(encode_error(
                ErrorCode.EXPIRED, f"results of session {sid!r} have passed their retention"
            ))  # fmt: skip
            if session.outbox is None and session is not conn.session:
                session.detach(None)  # taken for this resume, carried by no one: drain
            return
        outbox = conn.outbox
        outbox.hold()
        previous = conn.session
        if previous is not None and previous is not session:
            previous.detach(outbox)
        conn.session = session
        session.attach(outbox, conn.close)
        # The client lacks every final above ``after``: an earlier replay's
        # record of what it sent must not hold back any of those now.
        session.replayed_finals = {seq for seq in session.replayed_finals if seq <= after}
        # Live frames are held from here on. Which finals the replay sends:
        # - unfinished requests (those cancelled while queued included: their
        #   final is stored early, sent when the queue reaches them) send
        #   theirs live, in seq order, into the held frames; so do requests
        #   accepted from here on (seq above ``last``);
        # - every other final was sent before the hold, so it is stored: the
        #   replay sends it. FIFO puts all of these before any unfinished one.
        # - Without a running consumer nothing comes live for now: the replay
        #   sends stored finals up to the first unfinished request with none;
        #   the recovery that starts a consumer again carries the rest, in
        #   order, skipping what the replay sent (replayed_finals).
        consumer = session.consumer
        running = consumer is not None and not consumer.ended
        live = set(session.unfinished)
        last = session.last_seq
        replayed: set[int] = set()
        whole = False
        try:
            await outbox.push_replayed(
                encode_resumed(sid, session.last_seq, len(session.unfinished))
            )
            await self._replay_finals(sid, outbox, after, last, live, running, replayed)
            whole = True
        finally:
            # Finals the replay sent must not go out again live (a recovery
            # after the replay hands over stored finals of unfinished seqs).
            session.replayed_finals |= {seq for seq in replayed if seq in session.unfinished}

            def keep(frame: bytes) -> bool:
                data = decode_json(frame)
                seq = data.get("seq")
                if not isinstance(seq, int) or data.get("type") == "accepted":
                    return True
                # A replay cut short (the store failed mid-way; the connection
                # then closes with 1011) sends no held final: a client that
                # resumes after the highest final it saw must not skip any.
                return whole and seq not in replayed

            outbox.release(keep)
