"""One WebSocket connection: authenticate, then pump frames into its session.

The handler parses and dispatches; the session object holds the state and the
rules. Every exit path goes through one ``finally`` that hands the session
over to draining, stops the writer and frees the user's connection slot.

Budgets (PROTOCOL.md, "Budgets across a user's connections"): the store
counts a user's sessions and the ones a connection carries, over every
process and replica, and refuses the new session of an authentication beyond
either limit; the connection then closes with 4429 ("too many sessions" or
"too many connections"). Each connection tells the store when it starts or
stops carrying a session (once per change, never per request). The
per-process count of connections is only a pre-check that spares the store
a write.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from loguru import logger
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

from protocol import (
    Auth,
    Cancel,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Login,
    Logout,
    ProtocolError,
    Refresh,
    Register,
    Resume,
    Status,
    Submit,
    encode_error,
    encode_token,
    encode_token_expiring,
    encode_welcome,
    error_from,
    parse,
)
from server import metrics
from server.addresses import client_address
from server.auth import AuthError, Identity
from server.errors import SessionUnavailable, error_frame
from server.outbox import Outbox
from server.store import BudgetExceeded, StoreError
from server.token_timers import TokenTimers

if TYPE_CHECKING:
    from server.ports import ConnectionHost
    from server.session import Session


class SQConnection(ServerConnection):
    """A ServerConnection that remembers whether each message was text or
    binary, so that invalid UTF-8 and binary frames can be answered with
    ``bad_request`` (PROTOCOL.md) instead of websockets closing with 1007."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.message_opcodes: deque[Opcode] = deque()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # creates recv_messages
        frames = self.recv_messages.frames
        put = frames.put
        opcodes = self.message_opcodes

        def put_and_note(frame: Any) -> None:
            if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
                opcodes.append(frame.opcode)
            put(frame)

        frames.put = put_and_note  # type: ignore[method-assign,assignment]

    async def receive_frame(self) -> ClientFrame:
        """Receive one message and parse it; raise ProtocolError for bad input
        (the connection stays open) and ConnectionClosed when it is gone."""
        data = await self.recv(decode=False)
        opcode = self.message_opcodes.popleft() if self.message_opcodes else Opcode.TEXT
        if opcode is Opcode.BINARY:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text"
            )
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid UTF-8 text") from None
        return parse(text)


def handshake_token(ws: ServerConnection) -> str | None:
    request = ws.request
    if request is None:
        return None
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    _, _, query = request.path.partition("?")
    if query:
        from urllib.parse import parse_qs

        tokens = parse_qs(query).get("token")
        if tokens:
            return tokens[0]
    return None


class Connection:
    """One authenticated client: the :class:`server.ports.Carrier` of a session.

    It reaches the rest of the process only through ``server``, a
    :class:`server.ports.ConnectionHost`."""

    def __init__(self, server: ConnectionHost, ws: SQConnection) -> None:
        self.server = server
        self.ws = ws
        self.settings = server.settings
        self.session: Session | None = None
        self.identity: Identity | None = None
        self.address = str(ws.remote_address[0]) if ws.remote_address else "?"
        # What the login and registration limits key on (PROTOCOL.md, "Client addresses").
        self.client_address = client_address(ws, self.address, self.settings.trusted_proxies)
        self.outbox = Outbox(
            ws,
            limit_bytes=max(4 * self.settings.max_message_bytes, 8 << 20),
            slow_timeout=self.settings.slow_client_timeout,
            on_slow=lambda: self.close(CloseCode.SLOW_CONSUMER, "client is not reading"),
        )
        self._closing: asyncio.Task[None] | None = None
        self._timers = TokenTimers(
            self.settings.token_notice, self.settings.token_ttl, self._expiring, self._expired
        )
        self.log = logger.bind(peer=self.address)

    def close(self, code: int, reason: str) -> None:
        """Close from synchronous code (timers, the outbox, a takeover)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self.close_now(code, reason))

    async def close_now(self, code: int, reason: str) -> None:
        """Send what is queued (bounded), then close with ``code``."""
        metrics.closed(code)
        session = self.session.session_id if self.session is not None else None
        self.log.info("closing the connection: {} {}", code, reason, session=session, code=code)
        await self.outbox.flush()
        await self.ws.close(code, reason)

    async def run(self) -> None:
        metrics.connections.inc()
        slot = False
        try:
            identity = await self._authenticate()
            if identity is None:
                return
            if not self.server.take_user_slot(identity.username):
                metrics.budget_hit("connections")
                await self.close_now(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
                return
            slot = True
            self.identity = identity
            self.log = self.log.bind(user=identity.username)
            if not self.server.live.add(self):
                await self.close_now(CloseCode.UNAUTHORIZED, "token revoked")
                return
            try:
                session = await self.server.new_session(identity.username)
            except BudgetExceeded as exc:
                metrics.budget_hit(exc.budget.value)
                await self.close_now(CloseCode.TOO_MANY_CONNECTIONS, f"too many {exc.budget}")
                return
            self._attach(session)
            self.outbox.push(self._welcome(identity, session.session_id))
            self._schedule_expiry(identity)
            await self._serve()
        except ConnectionClosed:
            pass
        except Exception:
            self.log.exception("connection failed")
            await self.close_now(CloseCode.INTERNAL, "internal error")
        finally:
            self._timers.cancel()
            self.server.live.discard(self)
            left = self.session
            if left is not None:
                left.detach(self.outbox)
                if left.outbox is not None:
                    left = None  # another connection carries it now
            if slot and self.identity is not None:
                self.server.free_user_slot(self.identity.username)
            await self.outbox.stop()
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)
            metrics.connections.dec()
            if left is not None:  # last: the store write must not hold up the rest
                await _carried(left)

    # -- authentication ---------------------------------------------------------
    def _welcome(self, identity: Identity, session_id: str) -> bytes:
        return encode_welcome(
            session_id, identity.username, identity.token, identity.expires_at,
            self.settings.max_pending, self.settings.max_message_bytes,
        )  # fmt: skip

    async def _authenticate(self) -> Identity | None:
        auth = self.server.auth
        failures = 0
        token = handshake_token(self.ws)
        deadline = asyncio.get_running_loop().time() + self.settings.auth_timeout
        try:
            async with asyncio.timeout_at(deadline):
                if token is not None:
                    try:
                        identity = await auth.authenticate_token(token)
                        metrics.auth_total.labels("handshake", "ok").inc()
                        return identity
                    except AuthError as exc:
                        metrics.auth_total.labels("handshake", exc.code.value).inc()
                        failures += 1
                        self._auth_error(exc)
                    except StoreError as exc:
                        self._store_error(exc)
                while True:
                    try:
                        frame = await self.ws.receive_frame()
                    except ProtocolError as exc:
                        metrics.bad_frames.inc()
                        self.outbox.push(error_from(exc))
                        continue
                    try:
                        if isinstance(frame, Auth):
                            identity = await auth.authenticate_token(frame.token)
                        elif isinstance(frame, Login):
                            identity = await auth.login(
                                frame.username, frame.password, self.client_address
                            )
                        elif isinstance(frame, Register):
                            if not self.settings.registration_open:
                                raise AuthError(ErrorCode.UNAUTHORIZED, "registration is closed")
                            identity = await auth.register(
                                frame.username, frame.password, self.client_address
                            )
                        else:
                            self.outbox.push(_unauthorized(frame))
                            continue
                    except AuthError as exc:
                        metrics.auth_total.labels(
                            type(frame).__name__.lower(), exc.code.value
                        ).inc()
                        failures += 1
                        self._auth_error(exc)
                        if failures >= self.settings.auth_tries:
                            await self.close_now(CloseCode.UNAUTHORIZED, "authentication failed")
                            return None
                        continue
                    except StoreError as exc:
                        self._store_error(exc)
                        continue
                    metrics.auth_total.labels(type(frame).__name__.lower(), "ok").inc()
                    return identity
        except TimeoutError:
            await self.close_now(CloseCode.AUTH_TIMEOUT, "authentication timed out")
            return None

    def _auth_error(self, exc: AuthError) -> None:
        self.outbox.push(error_frame(exc))

    def _store_error(self, exc: StoreError) -> None:
        """The store failed while a token or password was checked: the client
        gets ``unavailable`` and may try again. The log line names the
        store's failure only, never what the client sent."""
        self.log.warning("auth store error: {}", exc)
        self.outbox.push(error_frame(exc))

    def _schedule_expiry(self, identity: Identity) -> None:
        """``token_expiring`` before the token's expiry, then the close at it
        (server.token_timers)."""
        self._timers.start(identity.expires_at)

    def _expiring(self, expires_at: int) -> None:
        self.outbox.push(encode_token_expiring(expires_at))

    def _expired(self) -> None:
        self.outbox.push(
            encode_error(ErrorCode.TOKEN_EXPIRED, "token has expired; send a fresh auth")
        )
        self.close(CloseCode.UNAUTHORIZED, "token expired")

    # -- the session loop ----------------------------------------------------------
    def _attach(self, session: Session) -> None:
        self.session = session
        session.attach(self.outbox, self.close)

    async def _serve(self) -> None:
        ws = self.ws
        frames_in = metrics.frames_in
        while True:
            try:
                frame = await ws.receive_frame()
            except ProtocolError as exc:
                metrics.bad_frames.inc()
                self.outbox.push(error_from(exc))
                continue
            session = self.session
            assert session is not None
            if isinstance(frame, Submit):
                metrics.submits_in.inc()
                if self.server.stopping:
                    self.outbox.push(encode_error(
                        ErrorCode.UNAVAILABLE, "the server is shutting down; resume later", frame.id
                    ))  # fmt: skip
                    continue
                session.submit(frame)
            elif isinstance(frame, Cancel):
                frames_in.labels("cancel").inc()
                await session.cancel(frame.id)
            elif isinstance(frame, Status):
                frames_in.labels("status").inc()
                self.outbox.push(await session.status(frame.id))
            elif isinstance(frame, Resume):
                frames_in.labels("resume").inc()
                await self._resume(frame)
            elif isinstance(frame, Auth):
                frames_in.labels("auth").inc()
                await self._refresh(frame)
            elif isinstance(frame, Refresh):
                frames_in.labels("refresh").inc()
                await self._renew()
            elif isinstance(frame, Logout):
                frames_in.labels("logout").inc()
                if await self._logout():
                    return
            else:  # login / register on an authenticated connection
                self.outbox.push(encode_error(
                    ErrorCode.BAD_REQUEST, "already authenticated; send auth to refresh the token"
                ))  # fmt: skip

    async def _refresh(self, frame: Auth) -> None:
        assert self.identity is not None and self.session is not None
        try:
            identity = await self.server.auth.authenticate_token(frame.token)
        except AuthError as exc:
            self._auth_error(exc)
            return
        except StoreError as exc:
            self._store_error(exc)
            return
        if identity.username.lower() != self.identity.username.lower():
            self.outbox.push(encode_error(ErrorCode.INVALID_TOKEN, "token is for another user"))
            return
        if self._run_on(identity):
            self.outbox.push(self._welcome(identity, self.session.session_id))

    def _run_on(self, identity: Identity) -> bool:
        """From now on the connection runs on ``identity``'s token: its expiry,
        and the revocations that close it. False (and closing) if a
        revocation that covers the token arrived while it was being checked."""
        self.server.live.discard(self)
        self.identity = identity
        if not self.server.live.add(self):
            self.close(CloseCode.UNAUTHORIZED, "token revoked")
            return False
        self._schedule_expiry(identity)
        return True

    async def _renew(self) -> None:
        """``refresh``: a fresh token for the connection's user, checked
        against revocation like any token authentication."""
        assert self.identity is not None
        try:
            identity = await self.server.auth.refresh(self.identity)
        except AuthError as exc:
            self._auth_error(exc)
            return
        except StoreError as exc:
            self._store_error(exc)
            return
        if self._run_on(identity):
            self.outbox.push(encode_token(identity.token, identity.expires_at))

    async def _logout(self) -> bool:
        """``logout``: revoke this connection's token everywhere and close with
        1000. Returns False (the connection stays) if the store failed."""
        assert self.identity is not None
        identity = self.identity
        try:
            await self.server.auth.logout(identity)
        except StoreError as exc:
            self._store_error(exc)
            return False
        self._timers.cancel()
        self.server.live.discard(self)
        self.log.info("logged out")
        self.close(CloseCode.NORMAL, "logged out")
        # Other connections on the same token, here and in every other process.
        await self.server.live.announce(identity.username, jti=identity.jti)
        return True

    async def _resume(self, frame: Resume) -> None:
        """Answer ``resume``; a session that cannot be taken gets ``not_found``
        or ``expired``. A store that fails meanwhile closes the connection
        with 1011 (run()): the client resumes again."""
        assert self.identity is not None and self.session is not None
        try:
            previous = self.session
            if frame.session == previous.session_id:
                target = previous
            else:
                username = self.identity.username
                target = await self.server.take_session(frame.session, username, self)
            await self.server.replay(target, self, frame.after)
        except SessionUnavailable as exc:
            self.log.debug("resume of {} refused: {!r}", frame.session, exc)
            self.outbox.push(error_frame(exc))
            return
        if target is not previous:
            await _carried(target)
            if previous.outbox is None:
                await _carried(previous)


async def _carried(session: Session) -> None:
    """Tell the store whether a connection carries ``session`` now (what
    SESSIONQ_MAX_CONNECTIONS_PER_USER counts across processes). The state is
    read when the write is queued, so of two connections' writes for one
    session, the later one is right whichever order they were started in."""
    carried = session.outbox is not None
    try:
        await session.store.set_carried(session.session_id, session.epoch, carried)
    except StoreError as exc:  # the count catches up with the next change or release
        session.log.warning("could not record the session's connection: {}", exc)


def _unauthorized(frame: ClientFrame) -> bytes:
    rid = getattr(frame, "id", None)
    return encode_error(ErrorCode.UNAUTHORIZED, "authenticate first (auth, login or register)", rid)
