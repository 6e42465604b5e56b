"""The SQLite store's schema and per-connection settings, shared by the
server's reader connection (:mod:`.sqlite`) and the writer process
(:mod:`.sqlite_writer`).

* WAL lets readers go on while another process writes, and shows them only
  committed data.
* synchronous=NORMAL: in WAL mode a commit survives a crash of the process;
  only an OS crash or power cut can lose the last commits (DESIGN.md's choice).
  Checkpoints are kept small (``AUTOCHECKPOINT_PAGES``): the commit that runs
  one holds up every write behind it.
"""

from __future__ import annotations

import sqlite3
import time

# The commit that crosses this many WAL pages copies them into the database and
# fsyncs both while every write queued behind it waits. Smaller, more frequent
# checkpoints keep those stalls short: at 1,000 sessions offered ~1k requests/s
# (open loop), p99 submit->result was ~35-70 ms at SQLite's default of 1,000
# pages, ~155 ms at 10,000, and ~20-35 ms at 400, at no cost in throughput.
# A PASSIVE checkpoint on a second connection's thread did worse (~50-75 ms):
# its fsyncs stall the writer's own writes anyway.
AUTOCHECKPOINT_PAGES = 400

SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS users (
    username TEXT NOT NULL,
    username_lower TEXT NOT NULL UNIQUE,
    password_hash BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seq INTEGER NOT NULL,
    owner TEXT,
    epoch INTEGER NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at);
-- The primary key serves get_request, finals_after and session_counts' max(seq).
CREATE TABLE IF NOT EXISTS requests (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    op TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    final TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, client_id)
);
CREATE INDEX IF NOT EXISTS requests_unfinished ON requests (session_id, seq)
    WHERE state != 'done';
CREATE INDEX IF NOT EXISTS requests_purge ON requests (finished_at) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS requests_failed ON requests (finished_at) WHERE failed = 1;
CREATE TABLE IF NOT EXISTS kv (
    username TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (username, key)
);
COMMIT;
"""

REQUEST_COLUMNS = (
    "session_id, seq, client_id, op, args, state, attempts, failed, final, created_at, finished_at"
)
SESSION_COLUMNS = "session_id, username, created_at, last_seq, owner, epoch, lease_until"

# Per-user budgets (store/base.py). ``sessions.carried``: a connection carries
# the session. ``user_budgets`` keeps each user's unfinished requests and kv
# bytes as counters, changed in the same transactions as the rows they count,
# so a conditional UPDATE of one row checks a budget. A store made before
# budgets existed gets them here once, derived from its rows.
MIGRATE_BUDGETS = """
ALTER TABLE sessions ADD COLUMN carried INTEGER NOT NULL DEFAULT 0;
CREATE TABLE user_budgets (
    username TEXT PRIMARY KEY,
    pending INTEGER NOT NULL DEFAULT 0,
    kv_bytes INTEGER NOT NULL DEFAULT 0
);
INSERT INTO user_budgets (username, pending, kv_bytes)
SELECT username, sum(pending), sum(kv_bytes) FROM (
    SELECT s.username AS username, count(*) AS pending, 0 AS kv_bytes
    FROM requests r JOIN sessions s ON s.session_id = r.session_id
    WHERE r.state != 'done' GROUP BY s.username
    UNION ALL
    SELECT username, 0, sum(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)))
    FROM kv GROUP BY username
) GROUP BY username;
"""
BUDGET_INDEXES = "CREATE INDEX IF NOT EXISTS sessions_user ON sessions (username, lease_until)"


def configure(c: sqlite3.Connection) -> None:
    """Per-connection settings (the writer's; WAL mode is the file's, set once)."""
    c.execute("PRAGMA synchronous = NORMAL")
    c.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")


def setup(c: sqlite3.Connection) -> None:
    # Switching a file to WAL can fail with "database is locked" without
    # waiting for busy_timeout while another process opens the same new file
    # (``--workers N`` all start at once): only switch when needed, and retry.
    for delay in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 0):
        try:
            if c.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                c.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or not delay:
                raise
            time.sleep(delay)  # on aiosqlite's thread, at start-up
    configure(c)
    c.executescript(SCHEMA)
    c.executescript(IDENTITY_SCHEMA)
    migrate(c)


def migrate(c: sqlite3.Connection) -> None:
    """Add what later versions need to a store made by an earlier one, once
    (``--workers N`` may all try at once: the write lock serializes them)."""
    c.execute("BEGIN IMMEDIATE")
    try:
        if not c.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'user_budgets'"
        ).fetchall():
            for statement in MIGRATE_BUDGETS.split(";"):
                if statement.strip():
                    c.execute(statement)
        c.execute(BUDGET_INDEXES)
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise


# -- identity ----------------------------------------------------------------------
# Revocation state (base.py, "identity"): a token version per user name, kept
# after the user is deleted, and the jtis revoked by logout until they expire.
IDENTITY_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS user_tokens (
    username_lower TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_tokens_expiry ON revoked_tokens (expires_at);
COMMIT;
"""
