"""The session core: every rule of a session, and no I/O.

The shape is websockets' ``protocol.py``: events go in as method calls (a
submit arrived, a batch was stored and published, a request finished, the
connection went away...), and what to do comes out as commands (send this
frame, refuse that submit, start the pump, begin closing). The driver in
:mod:`server.session` runs the commands against the socket, the store and
the broker; this module imports nothing from asyncio, websockets, aiormq,
aio_pika or a store driver, so its rules are unit-tested in milliseconds
(``tests/unit/test_session_core.py``).

Where each rule lives:

* **max_pending** -- :meth:`SessionCore.pending`: every unfinished request
  counts, the running one, the queued ones, and those still being stored and
  published (:attr:`SessionCore.in_flight`); a request stops counting in
  :meth:`SessionCore.finished`, before its final frame is sent, so a client
  that keeps at most max_pending in flight is never refused.
* **duplicate ids** -- :meth:`SessionCore.submit` (an id already accepted gets
  the same ``accepted`` again; one still being accepted rides along and gets
  it too) and :meth:`SessionCore.drop_known` (ids from before this process).
* **accepted order** -- :meth:`SessionCore.batch_accepted`: ``accepted``
  frames leave in submit order, each with its ``ahead``.
* **cancel** -- :meth:`SessionCore.cancel` and :meth:`SessionCore.cancel_target`.
* **status** -- :meth:`SessionCore.status`.
* **when to close** -- :meth:`SessionCore.maybe_close` (no connection, nothing
  unfinished, nothing on its way in), and the lifecycle edges of
  :mod:`server.session_state`, taken only through :meth:`SessionCore.to`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from protocol import ErrorCode, Submit, encode_accepted, encode_error, encode_json, encode_status
from server.session_state import TRANSITIONS, InvalidTransition, SessionState

__all__ = [
    "BEGIN_CLOSE",
    "START_PUMP",
    "CancelTarget",
    "Command",
    "Pending",
    "Refuse",
    "Send",
    "SendAll",
    "SessionCore",
]

# Checks a submit's op and args before it is accepted: None if they are fine,
# else the refusal's (code, message). The driver builds it from the op registry.
OpCheck = Callable[[str, dict[str, Any]], "tuple[ErrorCode, str] | None"]

REPAIR_FIRST_DELAY = 0.2  # recovery after a consumer failed: first retry ...
REPAIR_MAX_DELAY = 5.0  # ... doubling up to this


# -- commands --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Queue this frame for the client."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class SendAll:
    """Queue these frames for the client, in order (one command for a batch)."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a submit or cancel: an ``error`` frame with no seq (counted by code)."""

    code: ErrorCode
    message: str
    id: str


@dataclass(frozen=True, slots=True)
class _Signal:
    name: str


START_PUMP: Final = _Signal("start pump")  # submits wait: start the pump task
BEGIN_CLOSE: Final = _Signal("begin close")  # drained: stop the consumer, release

Command = Send | SendAll | Refuse | _Signal
_START: Final = (START_PUMP,)
_TAKING: Final = frozenset({SessionState.OPEN, SessionState.DRAINING})  # submits go in
_CLOSE: Final = (BEGIN_CLOSE,)
_NOTHING: Final[tuple[Command, ...]] = ()


@dataclass(slots=True)
class Pending:
    """A submit on its way in; duplicates of its id ride along."""

    frame: Submit
    args_json: str
    duplicates: int = 0
    cancel: bool = False  # cancelled before it was accepted: cancel once it is


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """What a cancel of an id comes to: ``seq`` to cancel (running or queued),
    or ``reply`` to send, or neither when there is nothing to do yet (it
    rides a submit still being accepted) or the store must be asked
    (``lookup``)."""

    seq: int | None = None
    reply: Command | None = None
    lookup: bool = False


@dataclass(slots=True)
class SessionCore:
    """One session's state and rules, with the settings it enforces."""

    session_id: str
    max_pending: int
    check_op: OpCheck
    max_submits_per_second: float = 0.0
    batch_max: int = 64
    last_seq: int = 0
    attached: bool = True
    state: SessionState = SessionState.OPEN
    accepted_through: int = 0
    # seq -> client id of every accepted, unfinished request, in seq order
    unfinished: dict[int, str] = field(default_factory=dict)
    # client id -> (seq, ahead at acceptance) of every id accepted here
    ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    incoming: list[Pending] = field(default_factory=list)  # waiting for the pump
    in_flight: list[Pending] = field(default_factory=list)  # being stored and published
    waiting_ids: dict[str, Pending] = field(default_factory=dict)  # incoming + in flight
    pumping: bool = False
    # seqs with a cancel stored or being stored -> the driver's handle for it
    cancels: dict[int, Any] = field(default_factory=dict)
    replayed_finals: set[int] = field(default_factory=set)  # sent by a resume replay
    unremoved: list[int] = field(default_factory=list)  # refused, still in the store
    resumed_from_store: bool = False  # ids from before this process: ask the store
    repair_delay: float = 0.0
    # Told every edge taken, (from, to), and (None, state) at birth (metrics).
    on_move: Callable[[SessionState | None, SessionState], object] | None = None
    _submit_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_through = self.last_seq
        self.resumed_from_store = self.last_seq > 0
        if not self.attached and self.state is SessionState.OPEN:
            self.state = SessionState.DRAINING

    # -- lifecycle ------------------------------------------------------------------
    def to(self, target: SessionState) -> None:
        """Take the edge to ``target`` (staying put is always allowed)."""
        if target is self.state:
            return
        if (self.state, target) not in TRANSITIONS:
            raise InvalidTransition(self.state, target)
        old, self.state = self.state, target
        if self.on_move is not None:
            self.on_move(old, target)

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def closing(self) -> bool:
        """Closing or closed: it cannot be carried on as it is."""
        return self.state is SessionState.CLOSING or self.state is SessionState.CLOSED

    def attach(self) -> None:
        """A connection carries the session (new, or a resume)."""
        self.attached = True
        if self.state is SessionState.DRAINING:
            self.to(SessionState.OPEN)

    def detach(self) -> tuple[Command, ...]:
        """The connection carrying the session went away: drain, then close."""
        self.attached = False
        if self.state is SessionState.OPEN:
            self.to(SessionState.DRAINING)
        return self.maybe_close()

    def idle(self) -> bool:
        """Nothing accepted is unfinished and no submit is on its way in (a
        batch being stored and published counts: its client may have sent it
        just before going away, and it is accepted all the same)."""
        return not self.unfinished and not self.incoming and not self.in_flight and not self.pumping

    def maybe_close(self) -> tuple[Command, ...]:
        """Close a drained session: no connection, nothing left to run."""
        if self.state is SessionState.DRAINING and self.idle():
            self.to(SessionState.CLOSING)
            return _CLOSE
        return _NOTHING

    def recovering(self) -> None:
        """Its queue and consumer are being reopened from the store."""
        if self.state is not SessionState.CLOSED:
            self.to(SessionState.RECOVERING)

    def recovered(self) -> tuple[Command, ...]:
        """The recovery is over (done, or left to the repair loop)."""
        if self.state is not SessionState.RECOVERING:
            return _NOTHING
        if not self.attached and self.idle():
            self.to(SessionState.CLOSING)  # its client left and nothing is left to run
            return _CLOSE
        self.to(SessionState.OPEN if self.attached else SessionState.DRAINING)
        return _NOTHING

    def recovery_failed(self) -> tuple[Command, ...]:
        """A recovery failed; the repair loop tries again, unless the session
        has no connection and nothing to run: then it closes all the same."""
        if self.state is SessionState.RECOVERING and not self.attached and self.idle():
            self.to(SessionState.CLOSING)
            return _CLOSE
        return _NOTHING

    def close_called_off(self) -> None:
        """A close found the session wanted again; whatever called it off
        (a resume, a recovery) carries it on."""
        if self.state is SessionState.CLOSING:
            self.to(SessionState.RECOVERING)

    def should_finish_close(self) -> bool:
        """After its consumer stopped: close for good, or call the close off
        (a resume attached the session meanwhile, or work arrived)."""
        return self.state is SessionState.CLOSING and not self.attached and self.idle()

    def closed_now(self) -> None:
        """Released, handed over, fenced or shut down: nothing runs here now."""
        self.to(SessionState.CLOSED)

    def next_repair_delay(self) -> float:
        """How long the repair loop waits before its next try: at once first,
        then backing off while failures follow each other with no result
        stored in between (a store that reads but cannot write)."""
        delay = self.repair_delay
        self.repair_delay = min(max(REPAIR_FIRST_DELAY, delay * 2), REPAIR_MAX_DELAY)
        return delay

    # -- submits --------------------------------------------------------------------
    def pending(self) -> int:
        """What max_pending counts: every unfinished request, accepted or not."""
        return len(self.unfinished) + len(self.in_flight) + len(self.incoming)

    def submit(
        self, frame: Submit, *, now: Callable[[], float], broker_ready: bool
    ) -> tuple[Command, ...]:
        """Check a submit: answer a duplicate, refuse it, or queue it for the pump
        (``now`` is read only when a submit rate is configured)."""
        rid = frame.id
        known = self.ids.get(rid)
        if known is not None:
            return (Send(encode_accepted(rid, known[0], known[1])),)
        waiting = self.waiting_ids.get(rid)
        if waiting is not None:
            waiting.duplicates += 1
            return _NOTHING
        refusal = self.check_op(frame.op, frame.args)
        if refusal is not None:
            return (Refuse(refusal[0], refusal[1], rid),)
        if len(self.unfinished) + len(self.in_flight) + len(self.incoming) >= self.max_pending:
            message = f"the session already has {self.max_pending} unfinished requests"
            return (Refuse(ErrorCode.QUEUE_FULL, message, rid),)
        if self.max_submits_per_second > 0 and not self._rate_ok(now()):
            return (Refuse(ErrorCode.RATE_LIMITED, "too many submits per second", rid),)
        if not broker_ready or self.state not in _TAKING:
            # No live queue to publish into: the broker is away, or the
            # session is being recovered or closed.
            return (Refuse(ErrorCode.UNAVAILABLE, "the broker is unreachable; retry", rid),)
        try:
            args_json = encode_json(frame.args).decode()
        except TypeError:
            return (Refuse(ErrorCode.BAD_REQUEST, "args must be JSON", rid),)
        pending = Pending(frame, args_json)
        self.incoming.append(pending)
        self.waiting_ids[rid] = pending
        if self.pumping:
            return _NOTHING
        self.pumping = True  # started per burst: an idle session holds no task
        return _START

    def _rate_ok(self, now: float) -> bool:
        times = self._submit_times
        while times and times[0] <= now - 1.0:
            times.pop(0)
        if len(times) >= self.max_submits_per_second:
            return False
        times.append(now)
        return True

    def take_batch(self) -> list[Pending]:
        """The next batch for the pump (oldest first); it counts as in flight."""
        batch = self.incoming[: self.batch_max]
        del self.incoming[: len(batch)]
        self.in_flight = batch
        return batch

    def drop_known(
        self, batch: list[Pending], known: dict[str, int]
    ) -> tuple[list[Pending], tuple[Command, ...]]:
        """For a session that existed before this process owned it: ids the
        store already has (``known``: id -> seq) get their original
        ``accepted`` again; the rest are new."""
        keep: list[Pending] = []
        sends: list[Command] = []
        for p in batch:
            seq = known.get(p.frame.id)
            if seq is None:
                keep.append(p)
                continue
            self.ids[p.frame.id] = (seq, 0)
            sends.extend(Send(encode_accepted(p.frame.id, seq, 0)) for _ in range(1 + p.duplicates))
        return keep, tuple(sends)

    def batch_accepted(self, batch: Sequence[Pending], first_seq: int) -> tuple[Command, ...]:
        """``batch`` is stored and confirmed by the broker as seqs
        ``first_seq`` ...: queue their ``accepted`` frames in submit order."""
        frames: list[bytes] = []
        unfinished, ids = self.unfinished, self.ids
        ahead = len(unfinished)
        seq = first_seq
        for p in batch:
            rid = p.frame.id
            unfinished[seq] = rid
            ids[rid] = (seq, ahead)
            frame = encode_accepted(rid, seq, ahead)
            frames.append(frame)
            if p.duplicates:
                frames.extend([frame] * p.duplicates)
            ahead += 1
            seq += 1
        if batch:
            self.last_seq = self.accepted_through = seq - 1
        return (SendAll(frames),)

    def batch_refused(
        self, batch: Iterable[Pending], code: ErrorCode, message: str
    ) -> tuple[Command, ...]:
        return tuple(Refuse(code, message, p.frame.id) for p in batch)

    def batch_done(self) -> list[str]:
        """The in-flight batch is answered (accepted or refused); returns the
        ids cancelled while it was in flight, to cancel now that they have a seq."""
        batch, self.in_flight = self.in_flight, []
        cancelled = []
        for p in batch:
            self.waiting_ids.pop(p.frame.id, None)
            if p.cancel:
                cancelled.append(p.frame.id)
        return cancelled

    def pump_ended(self) -> tuple[Command, ...]:
        self.pumping = False
        return self.maybe_close()  # the client left while its last submits went in

    def next_seq(self) -> int:
        return self.last_seq + 1

    # -- the consumer's side ---------------------------------------------------------
    def begin(self, seq: int, rid: str) -> bool:
        """Whether seq is unfinished and is the request ``rid`` (False for a
        duplicate after recovery, and for a stale message whose publish was
        refused after all: its seq was reused)."""
        return self.unfinished.get(seq) == rid

    def finished(self, seq: int) -> tuple[Command, ...]:
        """seq has its final stored: it stops counting before its frame is sent."""
        self.repair_delay = 0.0  # a result was stored: a later failure retries at once
        self.unfinished.pop(seq, None)
        self.cancels.pop(seq, None)
        if self.state is SessionState.DRAINING:
            return self.maybe_close()
        return _NOTHING

    def should_send_final(self, seq: int) -> bool:
        """A final stored before a resume's replay read it, but handed over
        after the replay was sent, would otherwise reach the client twice."""
        if self.replayed_finals and seq in self.replayed_finals:
            self.replayed_finals.discard(seq)
            return False
        return True

    # -- cancel and status ------------------------------------------------------------
    def cancel(self, rid: str) -> CancelTarget:
        """First step of a client's cancel."""
        known = self.ids.get(rid)
        if known is not None:
            return self.cancel_target(rid, known[0])
        waiting = self.waiting_ids.get(rid)
        if waiting is not None:
            # Not accepted yet: it ends `cancelled` right after its
            # `accepted`, so the client sees one final per seq.
            waiting.cancel = True
            return CancelTarget()
        return CancelTarget(lookup=True)

    def cancel_target(self, rid: str, seq: int | None) -> CancelTarget:
        """Second step: ``seq`` is the id's unfinished seq (from this session
        or the store), None if it has none."""
        if seq is None or seq not in self.unfinished or seq in self.cancels:
            # An answer to a cancel, not a refused submit (not counted as one).
            reply = Send(encode_error(ErrorCode.NOT_FOUND, f"no unfinished request {rid!r}", rid))
            return CancelTarget(reply=reply)
        return CancelTarget(seq=seq)

    def status(self, rid: str | None, running_seq: int | None) -> bytes | None:
        """The reply to ``status``; None when the store must say which seq
        ``rid`` had (then :meth:`stored_status`)."""
        if rid is None:
            return self._status()
        known = self.ids.get(rid)
        if known is not None:
            return self.stored_status(rid, known[0], running_seq)
        waiting = self.waiting_ids.get(rid)
        if waiting is None:
            return None
        # Submitted, not accepted yet: it rides the next broker message.
        ahead = len(self.unfinished)
        if waiting in self.in_flight:
            ahead += self.in_flight.index(waiting)
        else:
            ahead += len(self.in_flight) + self.incoming.index(waiting)
        return self._status(rid, "queued", ahead)

    def stored_status(self, rid: str, seq: int | None, running_seq: int | None) -> bytes:
        if seq is None:
            return encode_error(ErrorCode.NOT_FOUND, f"no request {rid!r} in this session", rid)
        if seq not in self.unfinished:
            return self._status(rid, "done")
        if running_seq == seq:
            return self._status(rid, "running")
        return self._status(rid, "queued", sum(1 for s in self.unfinished if s < seq))

    def _status(self, rid: str | None = None, state: str | None = None,
                ahead: int | None = None) -> bytes:  # fmt: skip
        unfinished = self.unfinished
        last_done = (min(unfinished) - 1) if unfinished else self.last_seq
        return encode_status(
            self.session_id, len(unfinished), self.last_seq, last_done, rid, state, ahead
        )
