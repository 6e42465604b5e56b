"""The sessions this process owns, and how ownership moves between processes.

One session, one owner (DESIGN.md). The owner is recorded in the store with a
lease that this process renews; each ownership has an epoch, a fencing token
the store checks on every write. A session changes owner in three ways, all
through :meth:`SessionDirectory._claim_once`:

* ``take_session``: a ``resume`` landed here; the owner is asked over the
  broker's control exchange to let go (``hand_over`` there), or its lease
  lapses;
* the orphan sweep: a session with accepted work and no live owner (its
  process died or shut down) is adopted and drained;
* a new session is created here, owned from the start.

A new session is created through the store, which refuses it (BudgetExceeded)
when the user is at ``SESSIONQ_MAX_SESSIONS_PER_USER`` live sessions or
``SESSIONQ_MAX_CONNECTIONS_PER_USER`` carried ones over every process and
replica. The per-process count of each user's connections here is only a
cheap pre-check of the latter.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from loguru import logger

from consumers.registry import Registry
from protocol import CloseCode, decode_json, encode_json
from server import metrics
from server.broker import Broker, BrokerError
from server.errors import SessionBusy, SessionNotFound
from server.session import Session
from server.settings import Settings
from server.store import Store, StoreError

if TYPE_CHECKING:
    from server.ports import Carrier

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class SessionDirectory:
    """Owns the ``sessions`` dict of this process and every change to it.

    ``spawn`` starts a task that the server keeps referenced (and cancels on
    stop). ``settings`` and ``cpu_pool`` are set again by ``Server.start`` once
    they are final.
    """

    #: Receives the payload of each ``{"revoke": ...}`` control message
    #: (server.revocation); set by the server.
    on_revoke: Callable[[Any], None] | None = None

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        registry: Registry,
        owner: str,
        spawn: Spawn,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.registry = registry
        self.owner = owner
        self.cpu_pool: Executor | None = None
        self.stopping = False
        self.sessions: dict[str, Session] = {}
        self.user_connections: Counter[str] = Counter()
        self._spawn = spawn
        self._claim_locks: dict[str, asyncio.Lock] = {}
        self._crashed_owner: set[str] = set()  # claimed from a dead owner, not yet started

    # -- per-user connection slots (a pre-check; the store holds the real count) -----
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

    # -- the sessions dict -------------------------------------------------------------
    def _make_session(
        self, session_id: str, username: str, epoch: int, last_seq: int, *, attached: bool = True
    ) -> Session:
        careful = session_id in self._crashed_owner
        self._crashed_owner.discard(session_id)
        session = Session(
            session_id, username, epoch,
            settings=self.settings, store=self.store, broker=self.broker,
            registry=self.registry, cpu_pool=self.cpu_pool, owner=self.owner,
            last_seq=last_seq, attached=attached, on_closed=self._session_closed,
        )  # fmt: skip
        session.careful = careful
        self.sessions[session_id] = session
        return session

    @contextlib.asynccontextmanager
    async def _undone_on_failure(self, session: Session) -> AsyncIterator[None]:
        """A session that failed to start here (the store or the broker failed
        while it was taken up) leaves this process again: released, its work
        left in the store for the next claim, instead of staying in the
        directory with no queue, no consumer and no connection."""
        try:
            yield
        except BaseException:
            session.log.warning("session could not be started here; released")
            await session.stop(0)
            self._session_closed(session)
            raise

    def _session_closed(self, session: Session) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    async def stop_sessions(self, grace: float) -> None:
        """Shutdown: no more adoptions; running requests get ``grace`` seconds,
        then the last results get a moment to reach their clients."""
        self.stopping = True
        sessions = list(self.sessions.values())
        await asyncio.gather(*(s.stop(grace) for s in sessions))
        # Let the last results reach their clients before the sockets close.
        await asyncio.gather(*(s.outbox.flush(1.0) for s in sessions if s.outbox is not None))

    # -- new sessions and resumes ------------------------------------------------------
    async def new_session(self, username: str) -> Session:
        """A new session owned here; raises BudgetExceeded when the user's
        sessions or connections are at their limit (deployment-wide)."""
        session_id = secrets.token_urlsafe(16)
        now = time.time()
        settings = self.settings
        record = await self.store.create_session(
            session_id, username, self.owner, now + settings.lease_seconds,
            max_sessions=settings.max_sessions_per_user,
            max_connections=settings.max_connections_per_user,
            now=now,
        )  # fmt: skip
        session = self._make_session(session_id, username, record.epoch, 0)
        session.log.info("session opened")
        async with self._undone_on_failure(session):
            await session.start()
        return session

    async def take_session(self, session_id: str, username: str, carrier: Carrier) -> Session:
        """Make ``carrier`` carry ``session_id``: the local session if this process
        owns it, otherwise claim it from the store and recover it here.
        Raises SessionNotFound (unknown, or another user's) or SessionBusy."""
        async with self._session_lock(session_id):
            return await self._take_session(session_id, username, carrier)

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

    async def _take_session(self, session_id: str, username: str, carrier: Carrier) -> Session:
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
                raise SessionNotFound(session_id)
            if local.close_connection is not None and local.outbox is not carrier.outbox:
                # Unhook the older connection first: when its close completes
                # it must not start draining the session it no longer carries.
                close = local.close_connection
                local.outbox, local.close_connection = None, None
                close(CloseCode.TAKEN_OVER, "session resumed elsewhere")
                metrics.takeover("resume")
                local.log.info("session taken over by another connection")
            return local
        record = await self.store.get_session(session_id)
        if record is None or record.username.lower() != username.lower():
            raise SessionNotFound(session_id)
        epoch = await self._claim(session_id)
        record = await self.store.get_session(session_id)
        assert record is not None
        session = self._make_session(session_id, record.username, epoch, record.last_seq)
        metrics.takeover("resume")
        session.log.info("session taken over for a resume (epoch {})", epoch)
        async with self._undone_on_failure(session):
            await session.take_up()
        return session

    # -- claims ------------------------------------------------------------------------
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
                raise SessionBusy(session_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def renew_leases(self) -> None:
        """Keep this process's leases alive: every third of a lease period."""
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.store.renew_leases(self.owner, time.time() + lease)
            except StoreError as exc:
                logger.warning("lease renewal failed: {}", exc)

    async def sample_pending(self, every: float = 1.0) -> None:
        """Keep ``sessionq_pending_requests`` current: the sessions' unfinished
        requests, counted each ``every`` seconds (off the request path)."""
        while True:
            metrics.pending_requests.set(sum(len(s.unfinished) for s in self.sessions.values()))
            await asyncio.sleep(every)

    # -- orphans -----------------------------------------------------------------------
    async def adopt_orphans(self) -> None:
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
        session = self._make_session(
            session_id, record.username, epoch, record.last_seq, attached=False
        )
        metrics.takeover("adopt")
        async with self._undone_on_failure(session):
            work = await session.take_up()
        if not session.unfinished:
            session.detach(None)
        logger.bind(session=session_id).info("adopted orphaned session: {} to run", work)

    # -- the broker's side: control messages and recovery ------------------------------
    def on_control(self, body: bytes) -> None:
        """A message on the control exchange: another process asks us to let a
        session go because its client resumed there, or a token was revoked
        (``{"revoke": ...}``, handed to ``on_revoke``)."""
        try:
            message = decode_json(body)
            if isinstance(message, dict) and "revoke" in message:
                if self.on_revoke is not None:
                    self.on_revoke(message["revoke"])
                return
            session_id, by = message["release"], message["by"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed control message")
            return
        session = self.sessions.get(session_id)
        if by == self.owner or session is None or session.state == "closed":
            return
        self._spawn(self._hand_over(session), f"handover-{session_id}")

    async def _hand_over(self, session: Session) -> None:
        """Another process claims the session for a resume: let it go."""
        await session.hand_over("session resumed elsewhere")  # on_closed drops it here
        logger.bind(session=session.session_id).info("session handed over")

    async def recover_sessions(self) -> None:
        """The broker connection came back: every live session re-publishes its
        unfinished requests from the store into a fresh queue."""
        await asyncio.gather(
            *(s.recover() for s in list(self.sessions.values()) if s.state != "closed"),
            return_exceptions=True,
        )
