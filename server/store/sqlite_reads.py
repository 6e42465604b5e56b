"""The SQLite store's helpers for reads (in the server's process, on
aiosqlite's thread): rows into records, key ranges, a user's budget usage."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from .base import RequestRecord, RequestState, UserUsage
from .sqlite_writes import one, usage_sessions


def usage(c: sqlite3.Connection, username: str, now: float) -> UserUsage:
    sessions, carried = usage_sessions(c, username, now)
    row = one(c, "SELECT pending, kv_bytes FROM user_budgets WHERE username = ?", (username,))
    pending, kv_bytes = (0, 0) if row is None else row
    return UserUsage(sessions, carried, int(pending), int(kv_bytes))


def request(row: Sequence[Any]) -> RequestRecord:
    session_id, seq, client_id, op, args, state, attempts, failed, final, created, finished = row
    return RequestRecord(
        session_id=session_id,
        seq=seq,
        client_id=client_id,
        op=op,
        args=args,
        state=RequestState(state),
        attempts=attempts,
        failed=bool(failed),
        final=final,
        created_at=created,
        finished_at=finished,
    )


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
