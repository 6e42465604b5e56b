"""The store interface: users, sessions, the request log and the key-value data.

The store is the source of truth (DESIGN.md). Every caller goes through
:class:`Store`; the SQLite and MongoDB backends implement it and pass the same
contract tests (``tests/test_store_contract.py``).

Contract highlights that callers rely on:

* ``add_requests`` is durable when it returns. The server sends ``accepted`` only
  after it (and the broker confirm).
* Writes that change a request's state carry the session's *epoch* (fencing
  token). A write from an owner whose epoch is not the session's current epoch
  raises :class:`Fenced`, so an owner that lost the session can neither start
  nor finish a request.
* ``finish_request`` is idempotent per (session, seq): the first final frame
  wins; a later one for the same seq returns ``False`` and changes nothing.
  This is what makes "exactly one final frame per seq" hold across crashes.
* Final frames are stored as the exact JSON text that was (or will be) sent, so
  ``resume`` re-sends them byte for byte.
* Per-user budgets (PROTOCOL.md, "Budgets across a user's connections" and
  "Quotas") are enforced here, so every process and replica on one store
  shares one count: ``create_session``, ``add_requests`` and ``kv_put`` take
  the limits and raise :class:`BudgetExceeded`, storing nothing, in the same
  transaction (or conditional update) as the write. A session counts against
  its user while some process owns it with a live lease (open or draining);
  a crashed process's sessions stop counting when their lease lapses.

Backends may group concurrent writes into one transaction (group commit); the
methods' semantics are the same as if each ran alone.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from .budgets import UserUsage

T = TypeVar("T")


class StoreError(Exception):
    """The store could not do what was asked (unreachable, disk full, ...)."""


class UserExists(StoreError):
    """A user with that name (compared without regard to case) exists."""


class Fenced(StoreError):
    """The write came from an owner whose epoch is no longer the session's."""


class RequestState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    username: str
    created_at: float
    last_seq: int
    owner: str | None
    epoch: int
    lease_until: float


@dataclass(frozen=True, slots=True)
class NewRequest:
    seq: int
    client_id: str
    op: str
    args: str  # JSON text of the args object


@dataclass(frozen=True, slots=True)
class RequestRecord:
    session_id: str
    seq: int
    client_id: str
    op: str
    args: str  # JSON text
    state: RequestState
    attempts: int
    failed: bool  # final frame is an error
    final: str | None  # JSON text of the final frame once DONE
    created_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RequestRecord:
        """From a row of the SQL stores' columns, in the fields' order."""
        session_id, seq, client_id, op, args, state, attempts, failed, final, created, done = row
        return cls(
            session_id, seq, client_id, op, args, RequestState(state), attempts, bool(failed),
            final, created, done,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SessionCounts:
    last_seq: int  # highest seq accepted
    last_done: int  # highest seq such that every seq <= it is DONE
    pending: int  # requests not DONE


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``
    (None when there is none, e.g. for the empty prefix)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code <= 0x10FFFF:
            if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored: skip them
                code = 0xE000
            return "".join(chars) + chr(code)
    return None


def _timed(
    method: Callable[..., Awaitable[T]], observe: Callable[[float], object]
) -> Callable[..., Awaitable[T]]:
    clock = time.perf_counter

    async def timed(*args: Any, **kwargs: Any) -> T:
        started = clock()
        try:
            return await method(*args, **kwargs)
        finally:
            observe(clock() - started)

    return timed


class Store(abc.ABC):
    """Async storage for sessionq. One instance per process, shared by all tasks."""

    #: Told the number of operations that failed for the store's own reasons
    #: (unreachable, full disk, I/O error, lock not granted), not for what was
    #: asked (a taken name, a fenced epoch). The server counts them in
    #: ``sessionq_store_errors_total``.
    on_failure: Callable[[int], object] | None = None

    def _failed(self, operations: int = 1) -> None:
        if self.on_failure is not None:
            self.on_failure(operations)

    def instrument(
        self, timer: Callable[[str], Callable[[float], object]], ops: Iterable[str]
    ) -> None:
        """Time every call of the methods named ``ops`` on this instance:
        ``timer(name)`` gives the function told each call's seconds, whatever
        the backend (a call that rode a group commit is one call)."""
        for name in ops:
            setattr(self, name, _timed(getattr(self, name), timer(name)))

    # -- lifecycle -----------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create tables / indexes if missing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and disconnect. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError if the store cannot serve requests right now."""

    # -- users ---------------------------------------------------------------
    @abc.abstractmethod
    async def create_user(self, username: str, password_hash: bytes) -> User:
        """Create a user; raise UserExists if the name exists in any case."""

    @abc.abstractmethod
    async def get_user(self, username: str) -> User | None:
        """Look a user up without regard to case."""

    # -- sessions and ownership ----------------------------------------------
    @abc.abstractmethod
    async def create_session(
        self,
        session_id: str,
        username: str,
        owner: str,
        lease_until: float,
        *,
        max_sessions: int | None = None,
        max_connections: int | None = None,
        now: float | None = None,
    ) -> SessionRecord:
        """Create a session owned by ``owner`` at epoch 1, carried by a
        connection. With limits given, raise BudgetExceeded (creating nothing)
        if the user already has ``max_connections`` carried sessions, or
        ``max_sessions`` sessions, that some owner holds with a lease that
        has not ended at ``now`` (default: the current time)."""

    @abc.abstractmethod
    async def set_carried(self, session_id: str, epoch: int, carried: bool) -> bool:
        """Record whether a connection carries the session (what
        ``max_connections`` counts); a no-op returning False if ``epoch`` is
        not current. ``claim_session`` and ``release_session`` clear it."""

    @abc.abstractmethod
    async def usage(self, username: str, now: float | None = None) -> UserUsage:
        """What ``username`` uses of each budget (sessions counted as
        ``create_session`` counts them at ``now``)."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def claim_session(
        self, session_id: str, owner: str, lease_until: float, now: float
    ) -> int | None:
        """Take ownership if the session has no owner, or its lease ended
        before ``now``, or ``owner`` already holds it. Returns the new epoch
        (always incremented on success) or None if another live owner holds it
        (or the session does not exist).
        """

    @abc.abstractmethod
    async def orphaned_sessions(self, now: float, limit: int = 100) -> list[str]:
        """Ids of sessions that have unfinished requests but no live owner
        (no owner, or a lease that ended before ``now``): work whose process
        died or shut down, which a live process should adopt and drain."""

    @abc.abstractmethod
    async def release_session(self, session_id: str, epoch: int) -> bool:
        """Give ownership up (owner cleared, lease 0) if ``epoch`` is current."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, lease_until: float) -> int:
        """Extend the lease of every session ``owner`` holds; return how many."""

    @abc.abstractmethod
    async def renew_session(self, session_id: str, epoch: int, lease_until: float) -> None:
        """Extend one session's lease if ``epoch`` is current: a write that
        proves the store takes writes and that the session is still ours.
        Raises Fenced if another owner took it since (or it is gone)."""

    # -- requests ------------------------------------------------------------
    @abc.abstractmethod
    async def add_requests(
        self,
        session_id: str,
        epoch: int,
        requests: Sequence[NewRequest],
        now: float,
        *,
        max_pending: int | None = None,
    ) -> None:
        """Store requests as QUEUED, durably, and raise the session's last_seq
        to the highest seq given. Raises Fenced if epoch is not current (or the
        session is gone), and plain StoreError, storing none of them, if a seq
        or client id is already in the session. With ``max_pending``, raises
        BudgetExceeded (storing none of them) if the user's unfinished
        requests over all sessions plus these would exceed it."""

    @abc.abstractmethod
    async def remove_requests(self, session_id: str, epoch: int, seqs: Sequence[int]) -> None:
        """Forget QUEUED requests that were never accepted (their publish
        failed); lower last_seq back to the highest remaining seq (never below
        the lowest seq given minus one, so seqs of purged requests are not reused).
        Raises Fenced, removing nothing, if ``epoch`` is not current: the
        session's new owner may already run those requests."""

    @abc.abstractmethod
    async def start_request(self, session_id: str, seq: int, epoch: int) -> int:
        """Mark a QUEUED or RUNNING request RUNNING and count one more start;
        return the attempt number (1 for the first start). Returns 0, changing
        nothing, if the request is DONE (cancelled meanwhile) or missing. Raises Fenced."""

    @abc.abstractmethod
    async def finish_request(
        self,
        session_id: str,
        seq: int,
        epoch: int | None,
        final: str,
        failed: bool,
        now: float,
        start_next: int | None = None,
    ) -> tuple[bool, int | None]:
        """Record the final frame of a request that is not DONE yet and mark it
        DONE. ``epoch`` None skips fencing (used by cancel of a queued request
        by its owner's connection path). If ``start_next`` is given, that seq is
        started (as start_request) in the same transaction.

        Returns (stored, attempt of start_next or None). ``stored`` is False
        when the request was already DONE or is missing (nothing changed then;
        ``start_next`` is still started). Raises Fenced.
        """

    async def finish_requests(
        self, session_id: str, epoch: int, finals: Sequence[tuple[int, str, bool]], now: float
    ) -> list[bool]:
        """Record several (seq, final frame, failed) of one session in one
        write, with finish_request's semantics each; return ``stored`` per
        item. Raises Fenced (and stores nothing) if epoch is not current.
        Backends override this to make it one transaction."""
        return [
            (await self.finish_request(session_id, seq, epoch, final, failed, now))[0]
            for seq, final, failed in finals
        ]

    @abc.abstractmethod
    async def get_request(self, session_id: str, seq: int) -> RequestRecord | None: ...

    @abc.abstractmethod
    async def find_request(self, session_id: str, client_id: str) -> RequestRecord | None:
        """The request of this session with that client id, if any."""

    async def seqs_of(self, session_id: str, client_ids: Sequence[str]) -> dict[str, int]:
        """{client id: seq} for those of ``client_ids`` this session has, in
        one query (duplicate-id checks of a whole submit batch). Backends
        override this default."""
        found = {}
        for client_id in client_ids:
            record = await self.find_request(session_id, client_id)
            if record is not None:
                found[client_id] = record.seq
        return found

    @abc.abstractmethod
    async def unfinished(self, session_id: str) -> list[RequestRecord]:
        """Requests not DONE, in seq order."""

    @abc.abstractmethod
    async def finals_after(
        self, session_id: str, after: int, limit: int | None = None
    ) -> list[tuple[int, str]]:
        """(seq, final frame) of DONE requests with seq > after, in seq order;
        the first ``limit`` (at least 1) of them if given (a page: a replay reads these
        page by page, so a long one is never held in memory whole)."""

    @abc.abstractmethod
    async def count_requests(self, session_id: str, after: int, through: int) -> int:
        """How many requests, of any state, the store holds with
        ``after < seq <= through`` (fewer than ``through - after``: some
        were purged by retention)."""

    @abc.abstractmethod
    async def session_counts(self, session_id: str) -> SessionCounts: ...

    @abc.abstractmethod
    async def failed_requests(self, limit: int = 100) -> list[RequestRecord]:
        """DONE requests whose final frame is an error, newest first (the
        dead-letter list an operator reads)."""

    @abc.abstractmethod
    async def purge(self, finished_before: float, sessions_before: float | None = None) -> int:
        """Delete DONE requests finished before ``finished_before``, and sessions
        with no request left that were created, and whose lease ended, before
        ``sessions_before`` (default: the same time; a live owner may be idle
        for longer than the TTL). Keeping session records longer than results
        lets ``resume`` tell "expired" from "unknown". Return how many requests
        were deleted."""

    # -- key-value (per user) ------------------------------------------------
    @abc.abstractmethod
    async def kv_put(
        self, username: str, key: str, value: str, *, max_bytes: int | None = None
    ) -> None:
        """Set key to value (JSON text). With ``max_bytes``, raise
        BudgetExceeded (changing nothing) if the user's entries would then
        take more than that many bytes (:func:`kv_size` each); a put that
        does not grow the total always succeeds."""

    @abc.abstractmethod
    async def kv_get(self, username: str, key: str) -> str | None: ...

    @abc.abstractmethod
    async def kv_delete(self, username: str, key: str) -> bool:
        """Delete; return whether the key existed."""

    @abc.abstractmethod
    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000, after: str | None = None
    ) -> list[tuple[str, str]]:
        """(key, value) pairs whose key starts with prefix, sorted by key; the
        first ``limit`` of them, of the keys above ``after`` if given (a page)."""

    # -- identity: revocation (PROTOCOL.md, "Tokens") ----------------------------
    # Each user has a token *version* that every token carries (claim ``ver``);
    # revoking a user's tokens raises it, so a token is good only while its
    # ``ver`` equals the user's version. The version is kept per name, not per
    # user record: deleting a user raises it and keeps it (a tombstone of one
    # integer), so a later registration of the same name starts above every
    # token issued to the deleted one. Single tokens (logout) are revoked by
    # ``jti`` until they would have expired anyway.
    @abc.abstractmethod
    async def token_state(self, username: str, jti: str | None = None) -> TokenState | None:
        """The user's token version and disabled flag, and whether ``jti`` is
        revoked, in one read; None if no such user (without regard to case)."""

    @abc.abstractmethod
    async def revoke_user(self, username: str) -> int | None:
        """Revoke every token issued to the user so far; return the new
        version (None if no such user)."""

    @abc.abstractmethod
    async def set_disabled(self, username: str, disabled: bool) -> int | None:
        """Disable (which also revokes, as revoke_user) or enable the user;
        return the version (None if no such user). Enabling brings no
        revoked token back."""

    @abc.abstractmethod
    async def set_password(self, username: str, password_hash: bytes) -> int | None:
        """Replace the password hash and revoke every earlier token, in one
        write; return the new version (None if no such user)."""

    @abc.abstractmethod
    async def delete_user(self, username: str) -> int | None:
        """Delete the user, its sessions, their requests and its key-value
        data, and raise the name's version past every token of the deleted
        user (kept for a later registration of the name). Return that
        version, or None if no such user."""

    @abc.abstractmethod
    async def revoke_token(self, jti: str, expires_at: float, now: float) -> None:
        """Revoke one token until ``expires_at`` (its ``exp``); entries whose
        time passed before ``now`` may be forgotten meanwhile."""


# -- identity --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenState:
    """What a token check reads, in one store round trip."""

    username: str  # as registered
    version: int  # tokens with another ``ver`` are revoked
    disabled: bool
    jti_revoked: bool  # the jti asked about was revoked (logout)
