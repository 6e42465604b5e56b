"""A session's lifecycle states and the transitions between them.

Pure data: the session core (:mod:`server.session_core`) moves a session
along these edges and nowhere else, and docs/architecture.md draws the same
table as a state diagram (a unit test compares the two, so neither drifts).

Whether a connection carries the session is kept beside the state (the
core's ``attached``): a session that is recovering or closing may gain or
lose its connection meanwhile, and goes on to ``open`` or ``draining``
accordingly.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TRANSITIONS", "InvalidTransition", "SessionState"]


class SessionState(StrEnum):
    """Where a session is in its life (the values are the metrics' ``state`` label)."""

    OPEN = "open"  # a connection carries it; its consumer runs its queue
    DRAINING = "draining"  # no connection; accepted work runs, results are stored
    RECOVERING = "recovering"  # its queue and consumer are reopened from the store
    CLOSING = "closing"  # nothing left to run; the consumer stops, ownership goes
    CLOSED = "closed"  # released, handed over or shut down: nothing runs here


S = SessionState

# (from, to) -> the event that takes that edge.
TRANSITIONS: dict[tuple[SessionState, SessionState], str] = {
    (S.OPEN, S.DRAINING): "connection gone",
    (S.DRAINING, S.OPEN): "resumed",
    (S.OPEN, S.RECOVERING): "consumer lost",
    (S.DRAINING, S.RECOVERING): "consumer lost",
    (S.RECOVERING, S.OPEN): "recovered, attached",
    (S.RECOVERING, S.DRAINING): "recovered, detached",
    (S.DRAINING, S.CLOSING): "drained",
    (S.RECOVERING, S.CLOSING): "recovered with nothing to run",
    (S.CLOSING, S.RECOVERING): "resumed while closing",
    (S.CLOSING, S.CLOSED): "released",
    (S.OPEN, S.CLOSED): "handed over, fenced or shut down",
    (S.DRAINING, S.CLOSED): "handed over, fenced or shut down",
    (S.RECOVERING, S.CLOSED): "handed over, fenced or shut down",
}


class InvalidTransition(RuntimeError):
    """A session was asked to take an edge that :data:`TRANSITIONS` lacks."""

    def __init__(self, current: SessionState, target: SessionState) -> None:
        super().__init__(f"session cannot go from {current} to {target}")
        self.current = current
        self.target = target
