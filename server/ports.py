"""The small interfaces between a connection and the rest of the server.

A :class:`~server.connection.Connection` sees the process only through
:class:`ConnectionHost`; the session directory and the resume replay see a
connection only through :class:`Carrier`. Neither side imports the other, so
each can be read, tested and changed alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.auth import Authenticator
    from server.outbox import Outbox
    from server.revocation import LiveTokens
    from server.session import Session
    from server.settings import Settings


class Carrier(Protocol):
    """A connection that carries (or is about to carry) a session."""

    outbox: Outbox
    session: Session | None

    def close(self, code: int, reason: str) -> None:
        """Close from synchronous code: send what is queued, then close."""


class ConnectionHost(Protocol):
    """What one connection needs from the process that serves it."""

    @property
    def settings(self) -> Settings: ...

    @property
    def auth(self) -> Authenticator: ...

    @property
    def live(self) -> LiveTokens:
        """The authenticated connections that revocations close."""

    @property
    def stopping(self) -> bool:
        """True once shutdown began: submits are refused from then on."""

    def take_user_slot(self, username: str) -> bool:
        """Count one more connection of ``username``; False at the limit."""

    def free_user_slot(self, username: str) -> None: ...

    async def new_session(self, username: str) -> Session:
        """A fresh session owned by this process, started."""

    async def take_session(self, session_id: str, username: str, carrier: Carrier) -> Session:
        """The session ``carrier`` resumes, taken over if another owns it;
        raises :class:`server.errors.SessionUnavailable`."""

    async def replay(self, session: Session, carrier: Carrier, after: int) -> None:
        """Answer ``resume`` on ``carrier``; raises
        :class:`server.errors.SessionExpired` when results are gone."""
