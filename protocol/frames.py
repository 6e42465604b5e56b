"""Frames of the sessionq wire protocol: client frames in, server frames out.

This module is sans-I/O: text in, frame objects out (:func:`parse`), and
arguments in, bytes out (the ``encode_*`` functions). It sits on the server's hot
path, so it uses plain type checks and orjson, nothing heavier.

Parsing contract (:func:`parse`):

- The input is one received WebSocket message: ``str`` for a text frame,
  ``bytes`` for a binary frame. Binary frames are refused.
- Every refusal is a :class:`~protocol.errors.ProtocolError` with code
  ``bad_request`` and a message meant for the client's author. For ``submit``,
  ``cancel`` and ``status`` frames whose ``id`` is valid (a string of 1..128
  characters), the error carries that ``id`` even when another field is the
  faulty one, so the client can match the reply to its request.
- Types are strict: ``true`` is not a number, ``1.0`` is not an integer, and an
  optional field that is present must have its type (``null`` is not "absent").
- Unknown extra fields are ignored, so that newer clients can add fields without
  breaking older servers (forward compatibility).
- Lengths are counted in characters (Unicode code points), not bytes.
- A submit's ``args`` may nest arrays and objects at most
  :data:`MAX_ARGS_DEPTH` levels deep (``args`` itself is the first level).
  JSON text can nest deeper than the server can encode again (orjson reads
  1024 levels and writes 254), and args are stored and published as JSON.
- Credentials are only checked to be strings here; whether a username is well
  formed (:func:`valid_username`) or a password weak (:func:`weak_password`) is
  for the server to decide, as it answers with dedicated codes.

Encoding contract: every ``encode_*`` function returns UTF-8 JSON ``bytes`` (sent
as a text frame), keys in the order of PROTOCOL.md with ``type`` first, and keys
of optional fields only when they are not ``None``. Plain JSON: dict keys must be
strings. orjson's native types (dataclasses, datetimes, UUIDs, enums) are
serialised as orjson does; NaN and infinities become ``null``. A value that cannot
be serialised at all makes :func:`encode_result` / :func:`encode_progress` raise
``TypeError`` naming the request, which the server turns into ``handler_error``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import orjson

from .errors import ErrorCode, ProtocolError

__all__ = [
    "MAX_ARGS_DEPTH",
    "MAX_ID_LENGTH",
    "MAX_OP_LENGTH",
    "MAX_SESSION_LENGTH",
    "MAX_USERNAME_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "USERNAME_RE",
    "Auth",
    "Cancel",
    "ClientFrame",
    "Login",
    "Logout",
    "Refresh",
    "Register",
    "Resume",
    "Status",
    "Submit",
    "decode_json",
    "encode_accepted",
    "encode_error",
    "encode_json",
    "encode_progress",
    "encode_result",
    "encode_resumed",
    "encode_status",
    "encode_token",
    "encode_token_expiring",
    "encode_welcome",
    "error_from",
    "parse",
    "valid_username",
    "weak_password",
]

MAX_ARGS_DEPTH: Final = 64
MAX_ID_LENGTH: Final = 128
MAX_OP_LENGTH: Final = 128
MAX_SESSION_LENGTH: Final = 128
MAX_USERNAME_LENGTH: Final = 64
MIN_PASSWORD_LENGTH: Final = 8

# Anchored with \A and \Z so that match(), fullmatch() and search() all agree
# (a bare "$" would accept a trailing newline).
USERNAME_RE: Final = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


# --- client -> server frames -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    """``{"type":"auth","token":...}``: authenticate with an access token."""

    token: str


@dataclass(frozen=True, slots=True)
class Login:
    """``{"type":"login","username":...,"password":...}``."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Register:
    """``{"type":"register","username":...,"password":...}``."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Submit:
    """``{"type":"submit","id":...,"op":...,"args":{...}}``; ``args`` defaults to ``{}``."""

    id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cancel:
    """``{"type":"cancel","id":...}``."""

    id: str


@dataclass(frozen=True, slots=True)
class Status:
    """``{"type":"status"}`` for the session, or with ``"id"`` for one request."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """``{"type":"resume","session":...,"after":N}``; ``after`` defaults to 0."""

    session: str
    after: int = 0


@dataclass(frozen=True, slots=True)
class Refresh:
    """``{"type":"refresh"}``: a fresh token for the connection's user."""


@dataclass(frozen=True, slots=True)
class Logout:
    """``{"type":"logout"}``: revoke the connection's token and close."""


ClientFrame: TypeAlias = (
    Auth | Login | Register | Submit | Cancel | Status | Resume | Refresh | Logout
)


# --- parsing -----------------------------------------------------------------

_BAD: Final = ErrorCode.BAD_REQUEST
_ID_EXPECTED: Final = f"a string of 1..{MAX_ID_LENGTH} characters"
_OP_EXPECTED: Final = f"a string of 1..{MAX_OP_LENGTH} characters"
_SESSION_EXPECTED: Final = f"a string of 1..{MAX_SESSION_LENGTH} characters"
_STATUS_SESSION: Final = Status(None)  # frozen, so one instance serves every such frame
_ABSENT: Final = object()


def _describe(value: object) -> str:
    """Name a JSON value for an error message without echoing client data at length."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "a boolean"
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if value else "an empty string"
    if isinstance(value, int | float):
        return f"the number {value!r}" if len(repr(value)) <= 24 else "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__  # pragma: no cover - orjson yields JSON types only


def _field_error(
    obj: dict[str, Any], frame: str, name: str, expected: str, id: str | None = None
) -> ProtocolError:
    if name not in obj:
        message = f"{frame}: missing field '{name}'"
    else:
        message = f"{frame}: field '{name}' must be {expected}, got {_describe(obj[name])}"
    return ProtocolError(_BAD, message, id)


def _parse_auth(obj: dict[str, Any]) -> Auth:
    token = obj.get("token")
    if type(token) is not str:
        raise _field_error(obj, "auth", "token", "a string")
    return Auth(token)


def _credentials(obj: dict[str, Any], frame: str) -> tuple[str, str]:
    username = obj.get("username")
    if type(username) is not str:
        raise _field_error(obj, frame, "username", "a string")
    password = obj.get("password")
    if type(password) is not str:
        raise _field_error(obj, frame, "password", "a string")
    return username, password


def _parse_login(obj: dict[str, Any]) -> Login:
    return Login(*_credentials(obj, "login"))


def _parse_register(obj: dict[str, Any]) -> Register:
    return Register(*_credentials(obj, "register"))


def _parse_submit(obj: dict[str, Any]) -> Submit:
    id = obj.get("id")
    if type(id) is not str or not 0 < len(id) <= MAX_ID_LENGTH:
        raise _field_error(obj, "submit", "id", _ID_EXPECTED)
    op = obj.get("op")
    if type(op) is not str or not 0 < len(op) <= MAX_OP_LENGTH:
        raise _field_error(obj, "submit", "op", _OP_EXPECTED, id)
    args = obj.get("args", _ABSENT)
    if args is _ABSENT:
        args = {}
    elif type(args) is not dict:
        raise _field_error(obj, "submit", "args", "a JSON object", id)
    return Submit(id, op, args)


def _parse_cancel(obj: dict[str, Any]) -> Cancel:
    id = obj.get("id")
    if type(id) is not str or not 0 < len(id) <= MAX_ID_LENGTH:
        raise _field_error(obj, "cancel", "id", _ID_EXPECTED)
    return Cancel(id)


def _parse_status(obj: dict[str, Any]) -> Status:
    if "id" not in obj:
        return _STATUS_SESSION
    id = obj["id"]
    if type(id) is not str or not 0 < len(id) <= MAX_ID_LENGTH:
        raise _field_error(obj, "status", "id", _ID_EXPECTED)
    return Status(id)


def _parse_resume(obj: dict[str, Any]) -> Resume:
    session = obj.get("session")
    if type(session) is not str or not 0 < len(session) <= MAX_SESSION_LENGTH:
        raise _field_error(obj, "resume", "session", _SESSION_EXPECTED)
    after = obj.get("after", 0)
    if type(after) is not int or after < 0:
        raise _field_error(obj, "resume", "after", "an integer >= 0")
    return Resume(session, after)


_REFRESH: Final = Refresh()
_LOGOUT: Final = Logout()


_PARSERS: Final[dict[str, Callable[[dict[str, Any]], ClientFrame]]] = {
    "submit": _parse_submit,
    "cancel": _parse_cancel,
    "status": _parse_status,
    "auth": _parse_auth,
    "login": _parse_login,
    "register": _parse_register,
    "resume": _parse_resume,
    "refresh": lambda obj: _REFRESH,
    "logout": lambda obj: _LOGOUT,
}


def parse(data: str | bytes) -> ClientFrame:
    """Parse one received WebSocket message into a client frame.

    ``data`` is ``str`` for a text frame and ``bytes`` for a binary frame; binary
    frames are refused. Raises :class:`ProtocolError` with code ``bad_request``
    for anything that is not a well-formed client frame (see the module
    docstring for the rules). Unknown extra fields are ignored.
    """
    if not isinstance(data, str):
        raise ProtocolError(_BAD, "binary frames are not accepted; send JSON text")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if reason.startswith("str is not valid UTF-8"):
            raise ProtocolError(_BAD, "frame is not valid UTF-8 text") from exc
        raise ProtocolError(_BAD, f"frame is not valid JSON: {reason}") from exc
    if type(obj) is not dict:
        raise ProtocolError(_BAD, f"a frame must be a JSON object, got {_describe(obj)}")
    kind = obj.get("type")
    if type(kind) is not str:
        raise _field_error(obj, "frame", "type", "a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        shown = kind if len(kind) <= 32 else kind[:32] + "..."
        known = ", ".join(sorted(_PARSERS))
        raise ProtocolError(_BAD, f"unknown frame type {shown!r}; expected one of: {known}")
    frame = parser(obj)
    # Counting brackets in the text is far cheaper than walking every frame's
    # args, and nesting deeper than the limit needs more brackets than that.
    if (
        type(frame) is Submit
        and data.count("{") + data.count("[") > MAX_ARGS_DEPTH
        and _deeper_than(frame.args, MAX_ARGS_DEPTH)
    ):
        message = f"submit: field 'args' is nested deeper than {MAX_ARGS_DEPTH} levels"
        raise ProtocolError(_BAD, message, frame.id)
    return frame


def _deeper_than(value: object, limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` levels in ``value``."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        assert isinstance(children, Iterable)  # only dicts and lists are stacked
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def valid_username(name: str) -> bool:
    """True for 1..64 characters of ``[A-Za-z0-9_.-]`` (ASCII only)."""
    return USERNAME_RE.match(name) is not None


def weak_password(username: str, password: str) -> bool:
    """True when ``password`` is shorter than 8 characters or equals ``username``.

    The comparison with the username ignores case (``casefold``), like usernames
    themselves; there are no composition rules.
    """
    return len(password) < MIN_PASSWORD_LENGTH or password.casefold() == username.casefold()


# --- server -> client frames -------------------------------------------------

_dumps: Final = orjson.dumps


def encode_welcome(
    session: str,
    user: str,
    token: str,
    expires_at: int,
    max_pending: int,
    max_message_bytes: int,
) -> bytes:
    """The reply to a successful authentication."""
    return _dumps(
        {
            "type": "welcome",
            "session": session,
            "user": user,
            "token": token,
            "expires_at": expires_at,
            "limits": {"max_pending": max_pending, "max_message_bytes": max_message_bytes},
        }
    )


def encode_accepted(id: str, seq: int, ahead: int) -> bytes:
    """The request ``id`` is stored and queued as ``seq`` behind ``ahead`` others."""
    return _dumps({"type": "accepted", "id": id, "seq": seq, "ahead": ahead})


def encode_progress(id: str, seq: int, data: Any) -> bytes:
    """A progress report; raises ``TypeError`` if ``data`` is not JSON-serialisable."""
    try:
        return _dumps({"type": "progress", "id": id, "seq": seq, "data": data})
    except TypeError as exc:
        raise TypeError(
            f"progress data of request {id!r} (seq {seq}) is not JSON-serialisable: {exc}"
        ) from exc


def encode_result(id: str, seq: int, value: Any) -> bytes:
    """The final result; raises ``TypeError`` if ``value`` is not JSON-serialisable."""
    try:
        return _dumps({"type": "result", "id": id, "seq": seq, "value": value})
    except TypeError as exc:
        raise TypeError(
            f"result of request {id!r} (seq {seq}) is not JSON-serialisable: {exc}"
        ) from exc


def encode_error(
    code: ErrorCode | str,
    message: str,
    id: str | None = None,
    seq: int | None = None,
    **extra: Any,
) -> bytes:
    """An ``error`` frame: ``type``, [``id``], [``seq``], ``code``, ``message``, extras.

    ``id`` and ``seq`` appear only when not ``None``. ``extra`` keys (for example
    ``retry_after``) are appended in the order given; ``type`` cannot be one.
    """
    frame: dict[str, Any] = {"type": "error"}
    if id is not None:
        frame["id"] = id
    if seq is not None:
        frame["seq"] = seq
    frame["code"] = code
    frame["message"] = message
    if extra:
        if "type" in extra:
            raise TypeError("encode_error: an extra field cannot be named 'type'")
        frame.update(extra)
    return _dumps(frame)


def error_from(exc: ProtocolError) -> bytes:
    """The ``error`` frame answering a refused client frame."""
    return encode_error(exc.code, exc.message, exc.id)


def encode_status(
    session: str,
    pending: int,
    last_seq: int,
    last_done: int,
    id: str | None = None,
    state: str | None = None,
    ahead: int | None = None,
) -> bytes:
    """The reply to ``status``; ``id``, ``state`` and ``ahead`` only when not ``None``."""
    frame: dict[str, Any] = {
        "type": "status",
        "session": session,
        "pending": pending,
        "last_seq": last_seq,
        "last_done": last_done,
    }
    if id is not None:
        frame["id"] = id
    if state is not None:
        frame["state"] = state
    if ahead is not None:
        frame["ahead"] = ahead
    return _dumps(frame)


def encode_resumed(session: str, last_seq: int, pending: int) -> bytes:
    """The first reply to a successful ``resume``."""
    return _dumps({"type": "resumed", "session": session, "last_seq": last_seq, "pending": pending})


def encode_token(token: str, expires_at: int) -> bytes:
    """The reply to ``refresh``: the connection now runs on ``token``."""
    return _dumps({"type": "token", "token": token, "expires_at": expires_at})


def encode_token_expiring(expires_at: int) -> bytes:
    """Sent once, ``SESSIONQ_TOKEN_NOTICE`` seconds before the token expires."""
    return _dumps({"type": "token_expiring", "expires_at": expires_at})


# --- plain JSON helpers --------------------------------------------------------


def decode_json(text: str | bytes) -> Any:
    """Decode JSON text; raises ``ValueError`` (``orjson.JSONDecodeError``) if invalid."""
    return orjson.loads(text)


def encode_json(value: Any) -> bytes:
    """Encode ``value`` as UTF-8 JSON; raises ``TypeError`` if it is not serialisable."""
    return _dumps(value)
