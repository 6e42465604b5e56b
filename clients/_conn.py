"""What ``sessionq client`` and ``sessionq bench`` share: flags, credentials, and
opening an authenticated connection.

Exception tree::

    Exception
    └── ClientError            a connection could not be opened or authenticated
        ├── ConnectFailed      no WebSocket (refused, timeout, HTTP error, closed
        │                      before ``welcome``); ``close_code`` when known
        └── AuthFailed         the server answered with an ``error`` frame;
                               ``code`` is its wire code (``invalid_credentials``...)

Nothing here prints a password or a whole token: :func:`mask` shows a token's
first characters only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from protocol import ErrorCode

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
MAX_FRAME = 64 << 20  # what we accept from the server; the server bounds its own side


class ClientError(Exception):
    """A connection could not be opened or authenticated."""


class ConnectFailed(ClientError):
    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class AuthFailed(ClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Credentials:
    """How to authenticate: a token, or a username and password (``register``
    first creates the user, falling back to login when it exists)."""

    username: str | None = None
    password: str | None = None
    token: str | None = None
    register: bool = False

    def __repr__(self) -> str:  # never show secrets in a traceback or log
        return (
            f"Credentials(username={self.username!r}, password={'***' if self.password else None},"
            f" token={mask(self.token)!r}, register={self.register})"
        )


def mask(token: str | None) -> str | None:
    """A token shortened so it can be shown: its first 8 characters."""
    if not token:
        return None
    return token[:8] + "..."


def normalize_url(url: str) -> str:
    """``ws://host:port`` without a path means the server's ``/ws``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"URL must start with ws:// or wss://, got {url!r}")
    if "token=" in parts.query:
        # A URL ends up in proxy logs and shell history; the token goes in a header.
        raise ValueError("put the token in --token or SESSIONQ_TOKEN, not in the URL")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/ws")
    return urlunsplit(parts)


def is_loopback(url: str) -> bool:
    """True when every address the URL's host resolves to is a loopback one."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def add_connection_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--url --username --password --token --register``; with ``suppress``
    the flags keep what an outer parser already set unless given again."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=default(None),
        help=f"server WebSocket URL (env SESSIONQ_URL, default {DEFAULT_URL})",
    )
    group.add_argument("--username", "-u", default=default(None), help="log in as this user")
    group.add_argument(
        "--password",
        default=default(None),
        help="password (prefer env SESSIONQ_PASSWORD; otherwise prompted on a terminal)",
    )
    group.add_argument(
        "--token", default=default(None), help="an access token instead (env SESSIONQ_TOKEN)"
    )
    group.add_argument(
        "--register",
        action="store_true",
        default=default(False),
        help="create the user first (logs in if it already exists)",
    )


def resolve_url(args: argparse.Namespace) -> str:
    return normalize_url(args.url or os.environ.get("SESSIONQ_URL") or DEFAULT_URL)


async def open_connection(
    url: str,
    token: str | None = None,
    *,
    open_timeout: float = 10.0,
    ping_interval: float | None = 20.0,
    proxy: str | Literal[True] | None = True,
) -> ClientConnection:
    """A WebSocket to ``url``; with ``token``, authenticated in the handshake
    (``Authorization: Bearer``), so the server's first frame is ``welcome``.
    ``proxy``: as websockets' (True: from the environment, None: direct)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=MAX_FRAME,
            open_timeout=open_timeout,
            close_timeout=2,
            ping_interval=ping_interval,
            proxy=proxy,
        )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc or type(exc).__name__}") from exc


async def recv_json(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(ws.recv(decode=False), timeout)
    except TimeoutError:
        raise ConnectFailed(f"no answer within {timeout:g} s") from None
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        code = rcvd.code if rcvd else None
        why = f"{rcvd.code} {rcvd.reason}".strip() if rcvd else "no close frame"
        raise ConnectFailed(f"connection closed ({why})", code) from exc
    frame: dict[str, Any] = orjson.loads(raw)
    return frame


async def authenticate(
    ws: ClientConnection, creds: Credentials, *, timeout: float = 10.0, token_sent: bool = False
) -> dict[str, Any]:
    """Authenticate an open connection and return the ``welcome`` frame.

    With ``token_sent`` the token went in the handshake; if the server refuses
    it (``invalid_token``, ``token_expired``) and a password is known, log in
    instead. Raises :class:`AuthFailed` or :class:`ConnectFailed`.
    """
    if creds.token and not token_sent:
        await _send(ws, {"type": "auth", "token": creds.token})
        token_sent = True
    elif not creds.token:
        await _send_login(ws, creds, creds.register)
    registering = creds.register and not creds.token
    while True:
        frame = await recv_json(ws, timeout)
        kind = frame.get("type")
        if kind == "welcome":
            return frame
        if kind != "error":
            continue  # nothing else is sent before welcome; be lenient
        code = str(frame.get("code"))
        message = str(frame.get("message", ""))
        if token_sent and code in (ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED):
            token_sent = False
            if creds.username and creds.password:
                await _send_login(ws, creds, False)
                continue
        if registering and code == ErrorCode.USER_EXISTS:
            registering = False
            await _send_login(ws, creds, False)
            continue
        raise AuthFailed(code, message)


async def _send_login(ws: ClientConnection, creds: Credentials, register: bool) -> None:
    if not creds.username or creds.password is None:
        raise AuthFailed(ErrorCode.INVALID_CREDENTIALS, "no username and password to log in with")
    kind = "register" if register else "login"
    await _send(ws, {"type": kind, "username": creds.username, "password": creds.password})


async def _send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    try:
        await ws.send(orjson.dumps(frame).decode())
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        raise ConnectFailed("connection closed during authentication", code) from exc


async def open_session(
    url: str,
    creds: Credentials,
    *,
    timeout: float = 10.0,
    ping_interval: float | None = 20.0,
) -> tuple[ClientConnection, dict[str, Any], float]:
    """Connect and authenticate; return the connection, the ``welcome`` frame
    and the seconds it took (handshake + auth + welcome)."""
    start = time.perf_counter()
    ws = await open_connection(url, creds.token, open_timeout=timeout, ping_interval=ping_interval)
    try:
        welcome = await authenticate(ws, creds, timeout=timeout, token_sent=bool(creds.token))
    except BaseException:
        await ws.close()
        raise
    return ws, welcome, time.perf_counter() - start
