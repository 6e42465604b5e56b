"""The PostgreSQL store's schema: tables, the batch function, and migrations.

The schema lives in the database's ``search_path`` (``public`` unless the URL
says ``?search_path=...``). ``sessionq_schema`` holds one row, the schema
version. :func:`migrate` brings a database up to :data:`VERSION` on open: it
runs, under a transaction-level advisory lock so that processes starting
together take turns, every migration above the recorded version, in order, and
records the new version in the same transaction. A database whose version is
above :data:`VERSION` (written by a newer sessionq) is refused rather than
touched. To change the schema, append a migration to :data:`MIGRATIONS`; never
edit one that has shipped.

Writes run server-side in one call per batch: ``sessionq_batch(ops, careful)``
takes a JSON array of operations (``[name, arg, ...]``), runs them in order and
returns a JSON array of outcomes, ``{"r": result}`` or ``{"e": kind, "m":
message}``. One call is one round trip and, outside an explicit transaction,
one commit. Fencing never raises: a fenced operation changes nothing and
answers ``{"e": "fenced"}``. Only a conflict (a taken seq or client id) or bad
data raises, failing the call; the caller then runs the batch again with
``careful`` true, each operation in a block of its own (a subtransaction) so
that the failing one is rolled back alone.

The load's batches hold many adds and finishes of different sessions. Such a
batch (16 operations or more, nothing else in it) runs in ``sessionq_hot`` as a
few statements for the whole batch, each operation still with its own outcome:
about half the database's CPU per request of running each operation alone
when each carries one request (~75 against ~150 us on the 2-core reference
machine), a little less at 16 requests each (~30 against ~37 us).

Fencing: every write that carries an epoch reads the session's epoch under a
row lock in the same statement as the write (``FOR SHARE`` in a CTE, or the
session row's own UPDATE), so a claim by another process waits for this
transaction, or this statement sees the claim's new epoch.
"""

from __future__ import annotations

import asyncpg

from . import postgres_budgets
from .base import StoreError

# A constant key for pg_advisory_xact_lock: migrations of one database take turns.
MIGRATION_LOCK = 0x5E55_1045

TABLES = """
CREATE TABLE IF NOT EXISTS users (
    username text NOT NULL,
    username_lower text PRIMARY KEY,
    password_hash bytea NOT NULL,
    created_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id text PRIMARY KEY,
    username text NOT NULL,
    created_at double precision NOT NULL,
    last_seq bigint NOT NULL,
    owner text,
    epoch bigint NOT NULL,
    lease_until double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at);
CREATE TABLE IF NOT EXISTS requests (
    session_id text NOT NULL,
    seq bigint NOT NULL,
    client_id text NOT NULL,
    op text NOT NULL,
    args text NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'done')),
    attempts integer NOT NULL DEFAULT 0,
    failed boolean NOT NULL DEFAULT false,
    final text,
    created_at double precision NOT NULL,
    finished_at double precision,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, client_id)
);
CREATE INDEX IF NOT EXISTS requests_unfinished ON requests (session_id, seq)
    WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS requests_purge ON requests (finished_at) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS requests_failed ON requests (finished_at) WHERE failed;
-- COLLATE "C": keys sort (and kv_list's prefix ranges compare) by code point.
CREATE TABLE IF NOT EXISTS kv (
    username text NOT NULL,
    key text COLLATE "C" NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (username, key)
);
"""

# One operation: o is [name, args...]; returns {"r": result} or {"e": kind}.
OPERATION = r"""
CREATE OR REPLACE FUNCTION sessionq_op(o jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    sid text := o->>1;
    n bigint;
    v bigint;
    seqs bigint[];
    found_seqs bigint[];
    started bigint;
BEGIN
    CASE o->>0
    WHEN 'create_user' THEN  -- name, name lowered, hash (base64), created_at
        INSERT INTO users (username, username_lower, password_hash, created_at)
        VALUES (o->>1, o->>2, decode(o->>3, 'base64'), (o->>4)::float8)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN RETURN '{"e": "user_exists"}'; END IF;
        RETURN '{"r": null}';
    WHEN 'create_session' THEN  -- sid, username, created_at, owner, lease_until
        INSERT INTO sessions (session_id, username, created_at, last_seq, owner, epoch, lease_until)
        VALUES (sid, o->>2, (o->>3)::float8, 0, o->>4, 1, (o->>5)::float8)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('e', 'conflict', 'm', 'session ' || sid || ' exists');
        END IF;
        RETURN '{"r": null}';
    WHEN 'claim' THEN  -- sid, owner, lease_until, now
        UPDATE sessions SET owner = o->>2, lease_until = (o->>3)::float8, epoch = epoch + 1
        WHERE session_id = sid
          AND (owner IS NULL OR lease_until < (o->>4)::float8 OR owner = o->>2)
        RETURNING epoch INTO v;
        RETURN jsonb_build_object('r', v);
    WHEN 'release' THEN  -- sid, epoch
        UPDATE sessions SET owner = NULL, lease_until = 0
        WHERE session_id = sid AND epoch = (o->>2)::bigint;
        RETURN jsonb_build_object('r', FOUND);
    WHEN 'renew_session' THEN  -- sid, epoch, lease_until
        UPDATE sessions SET lease_until = (o->>3)::float8
        WHERE session_id = sid AND epoch = (o->>2)::bigint;
        IF NOT FOUND THEN RETURN '{"e": "fenced"}'; END IF;
        RETURN '{"r": null}';
    WHEN 'renew_leases' THEN  -- owner, lease_until
        UPDATE sessions SET lease_until = (o->>2)::float8 WHERE owner = o->>1;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN jsonb_build_object('r', n);
    WHEN 'add' THEN  -- sid, epoch, [[seq, client id, op, args], ...], now
        -- The session row's update is the fence, and locks it until commit.
        UPDATE sessions SET last_seq = greatest(last_seq,
            (SELECT max((x->>0)::bigint) FROM jsonb_array_elements(o->3) x))
        WHERE session_id = sid AND epoch = (o->>2)::bigint;
        IF NOT FOUND THEN RETURN '{"e": "fenced"}'; END IF;
        INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at)
        SELECT sid, (x->>0)::bigint, x->>1, x->>2, x->>3, 'queued', (o->>4)::float8
        FROM jsonb_array_elements(o->3) x;
        RETURN '{"r": null}';
    WHEN 'remove' THEN  -- sid, epoch, [seq, ...]
        PERFORM 1 FROM sessions WHERE session_id = sid AND epoch = (o->>2)::bigint FOR UPDATE;
        IF NOT FOUND THEN RETURN '{"e": "fenced"}'; END IF;
        seqs := ARRAY(SELECT jsonb_array_elements_text(o->3)::bigint);
        DELETE FROM requests WHERE session_id = sid AND seq = ANY (seqs) AND state = 'queued';
        SELECT coalesce(max(seq), 0) INTO v FROM requests WHERE session_id = sid;
        UPDATE sessions
        SET last_seq = least(last_seq, greatest(v, (SELECT min(s) FROM unnest(seqs) s) - 1))
        WHERE session_id = sid;
        RETURN '{"r": null}';
    WHEN 'start' THEN  -- sid, seq, epoch
        WITH fence AS (
            SELECT 1 FROM sessions WHERE session_id = sid AND epoch = (o->>3)::bigint FOR SHARE
        )
        UPDATE requests SET state = 'running', attempts = attempts + 1
        WHERE session_id = sid AND seq = (o->>2)::bigint AND state <> 'done'
          AND EXISTS (SELECT 1 FROM fence)
        RETURNING attempts INTO v;
        IF v IS NULL AND NOT sessionq_current(sid, (o->>3)::bigint) THEN
            RETURN '{"e": "fenced"}';
        END IF;
        RETURN jsonb_build_object('r', coalesce(v, 0));
    WHEN 'finish' THEN  -- sid, seq, epoch or null, final, failed, now, start_next or null
        IF o->>3 IS NULL THEN
            UPDATE requests SET state = 'done', final = o->>4, failed = (o->>5)::boolean,
                finished_at = (o->>6)::float8
            WHERE session_id = sid AND seq = (o->>2)::bigint AND state <> 'done';
            n := CASE WHEN FOUND THEN 1 ELSE 0 END;
        ELSE
            WITH fence AS (
                SELECT 1 FROM sessions WHERE session_id = sid AND epoch = (o->>3)::bigint
                FOR SHARE
            ), done AS (
                UPDATE requests SET state = 'done', final = o->>4,
                    failed = (o->>5)::boolean, finished_at = (o->>6)::float8
                WHERE session_id = sid AND seq = (o->>2)::bigint AND state <> 'done'
                  AND EXISTS (SELECT 1 FROM fence)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM fence) INTO n, v;
            IF v = 0 THEN RETURN '{"e": "fenced"}'; END IF;
        END IF;
        IF o->>7 IS NOT NULL THEN
            UPDATE requests SET state = 'running', attempts = attempts + 1
            WHERE session_id = sid AND seq = (o->>7)::bigint AND state <> 'done'
            RETURNING attempts INTO started;
            started := coalesce(started, 0);
        END IF;
        RETURN jsonb_build_object('r', jsonb_build_array(n = 1, started));
    WHEN 'finish_many' THEN  -- sid, epoch, [[seq, final, failed], ...] (seqs unique), now
        -- seq = ANY (seqs): index lookups by the primary key. A join on seq
        -- alone made the planner scan every unfinished entry of the session.
        seqs := ARRAY(SELECT (x->>0)::bigint FROM jsonb_array_elements(o->3) x);
        WITH fence AS (
            SELECT 1 FROM sessions WHERE session_id = sid AND epoch = (o->>2)::bigint FOR SHARE
        ), done AS (
            UPDATE requests r SET state = 'done', final = x->>1, failed = (x->>2)::boolean,
                finished_at = (o->>4)::float8
            FROM jsonb_array_elements(o->3) x
            WHERE r.session_id = sid AND r.seq = ANY (seqs) AND r.seq = (x->>0)::bigint
              AND r.state <> 'done' AND EXISTS (SELECT 1 FROM fence)
            RETURNING r.seq
        )
        SELECT ARRAY(SELECT seq FROM done), (SELECT count(*) FROM fence) INTO found_seqs, v;
        IF v = 0 THEN RETURN '{"e": "fenced"}'; END IF;
        RETURN jsonb_build_object('r', to_jsonb(found_seqs));
    WHEN 'kv_put' THEN  -- username, key, value
        INSERT INTO kv (username, key, value) VALUES (o->>1, o->>2, o->>3)
        ON CONFLICT (username, key) DO UPDATE SET value = excluded.value;
        RETURN '{"r": null}';
    WHEN 'kv_delete' THEN  -- username, key
        DELETE FROM kv WHERE username = o->>1 AND key = o->>2;
        RETURN jsonb_build_object('r', FOUND);
    WHEN 'purge_requests' THEN  -- finished before, limit
        DELETE FROM requests WHERE (session_id, seq) IN (
            SELECT session_id, seq FROM requests
            WHERE state = 'done' AND finished_at < (o->>1)::float8 LIMIT (o->>2)::bigint);
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN jsonb_build_object('r', n);
    WHEN 'purge_sessions' THEN  -- created and leased before, limit
        -- A session still leased (a live owner, idle for longer than the TTL) stays.
        DELETE FROM sessions WHERE session_id IN (
            SELECT s.session_id FROM sessions s
            WHERE s.created_at < (o->>1)::float8 AND s.lease_until < (o->>1)::float8
              AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.session_id = s.session_id)
            LIMIT (o->>2)::bigint);
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN jsonb_build_object('r', n);
    ELSE
        RAISE EXCEPTION 'sessionq_op: unknown operation %', o->>0
            USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END
$$;

-- Whether the session exists at this epoch (a fenced write's second look).
CREATE OR REPLACE FUNCTION sessionq_current(sid text, e bigint) RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM sessions WHERE session_id = sid AND epoch = e)
$$;

-- The hot path's batch: adds and finish_manys only, at most one of each kind
-- per session (so their order within the batch does not matter): a few
-- statements for the whole batch rather than two or three per operation.
--
-- The statements that join the batch's JSON to a table run through EXECUTE,
-- planned afresh each time: a plan cached while the tables were small (a new
-- database) scanned a whole table per batch once they had grown, and the
-- planner cannot tell how many elements the JSON holds. The SET clauses keep
-- it from preferring a scan of a whole table to a lookup by key per element.
CREATE OR REPLACE FUNCTION sessionq_hot(ops jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
DECLARE
    added bigint[];  -- ordinals of the adds that passed their fence
    fenced_ok bigint[];  -- ordinals of the finish_manys that passed theirs
    finished jsonb;  -- {ordinal: [seq, ...]}
BEGIN
    -- Adds: the session row's update is the fence (and locks it until commit).
    EXECUTE $q$
        WITH a AS (
            SELECT t.i, t.x->>1 AS sid, (t.x->>2)::bigint AS epoch,
                (SELECT max((r->>0)::bigint) FROM jsonb_array_elements(t.x->3) r) AS top
            FROM jsonb_array_elements($1) WITH ORDINALITY AS t (x, i)
            WHERE t.x->>0 = 'add'
        ), u AS (
            UPDATE sessions s SET last_seq = greatest(s.last_seq, a.top)
            FROM a WHERE s.session_id = a.sid AND s.epoch = a.epoch
            RETURNING a.i
        )
        SELECT coalesce(array_agg(i), '{}') FROM u
    $q$ INTO added USING ops;
    INSERT INTO requests (session_id, seq, client_id, op, args, state, created_at)
    SELECT t.x->>1, (r->>0)::bigint, r->>1, r->>2, r->>3, 'queued', (t.x->>4)::float8
    FROM jsonb_array_elements(ops) WITH ORDINALITY AS t (x, i),
        jsonb_array_elements(t.x->3) r
    WHERE t.i = ANY (added);
    -- Finishes: a share lock on each session row at its epoch is the fence.
    EXECUTE $q$
        SELECT ARRAY(
            SELECT t.i FROM jsonb_array_elements($1) WITH ORDINALITY AS t (x, i)
            JOIN sessions s ON s.session_id = t.x->>1 AND s.epoch = (t.x->>2)::bigint
            WHERE t.x->>0 = 'finish_many'
            FOR SHARE OF s
        )
    $q$ INTO fenced_ok USING ops;
    EXECUTE $q$
        WITH v AS MATERIALIZED (
            SELECT t.i, t.x->>1 AS sid, (f->>0)::bigint AS seq, f->>1 AS final,
                (f->>2)::boolean AS failed, (t.x->>4)::float8 AS at
            FROM jsonb_array_elements($1) WITH ORDINALITY AS t (x, i),
                jsonb_array_elements(t.x->3) f
            WHERE t.i = ANY ($2)
        ), d AS (
            UPDATE requests r SET state = 'done', final = v.final, failed = v.failed,
                finished_at = v.at
            FROM v WHERE r.session_id = v.sid AND r.seq = v.seq AND r.state <> 'done'
            RETURNING v.i, r.seq
        ), g AS (
            SELECT i, jsonb_agg(seq) AS seqs FROM d GROUP BY i
        )
        SELECT coalesce(jsonb_object_agg(i::text, seqs), '{}') FROM g
    $q$ INTO finished USING ops, fenced_ok;
    RETURN (
        SELECT jsonb_agg(
            CASE
                WHEN t.x->>0 = 'add' AND t.i = ANY (added) THEN '{"r": null}'::jsonb
                WHEN t.x->>0 = 'finish_many' AND t.i = ANY (fenced_ok)
                    THEN jsonb_build_object('r', coalesce(finished->(t.i::text), '[]'))
                ELSE '{"e": "fenced"}'::jsonb
            END ORDER BY t.i)
        FROM jsonb_array_elements(ops) WITH ORDINALITY AS t (x, i)
    );
END
$$;

-- enable_seqscan off: every statement here finds its rows by an index; a plan
-- cached while a table was nearly empty must not keep scanning it whole.
CREATE OR REPLACE FUNCTION sessionq_batch(ops jsonb, careful boolean) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    o jsonb;
    outcome jsonb;
    outcomes jsonb[] := '{}';
BEGIN
    -- Below 16 operations, planning the hot path's statements costs
    -- more than running each operation's own.
    IF NOT careful AND jsonb_array_length(ops) >= 16 AND (
        SELECT bool_and(x->>0 IN ('add', 'finish_many'))
            AND count(DISTINCT (x->>0, x->>1)) = count(*)
        FROM jsonb_array_elements(ops) x
    ) THEN
        RETURN sessionq_hot(ops);
    END IF;
    FOR o IN SELECT x FROM jsonb_array_elements(ops) WITH ORDINALITY AS t (x, i) ORDER BY i
    LOOP
        IF careful THEN
            BEGIN
                outcome := sessionq_op(o);
            EXCEPTION
                WHEN unique_violation THEN
                    outcome := jsonb_build_object('e', 'conflict', 'm', SQLERRM);
                WHEN data_exception OR integrity_constraint_violation THEN
                    outcome := jsonb_build_object('e', 'invalid', 'm', SQLERRM);
            END;
        ELSE
            outcome := sessionq_op(o);
        END IF;
        outcomes := outcomes || outcome;
    END LOOP;
    RETURN to_jsonb(outcomes);
END
$$;
"""

# -- identity: revocation state (base.py, "identity"): a token version per user
# name, kept after the user is deleted, and the jtis revoked by logout until
# they expire.
IDENTITY_TABLES = """
CREATE TABLE IF NOT EXISTS user_tokens (
    username_lower text PRIMARY KEY,
    version bigint NOT NULL DEFAULT 0,
    disabled boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti text PRIMARY KEY,
    expires_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_tokens_expiry ON revoked_tokens (expires_at);
"""

#: Migration n (1-based) brings the schema from version n - 1 to n.
MIGRATIONS: tuple[str, ...] = (
    TABLES + OPERATION,
    IDENTITY_TABLES,
    postgres_budgets.MIGRATION + postgres_budgets.WRAPPERS,  # per-user budgets
)
VERSION = len(MIGRATIONS)


async def migrate(connection: asyncpg.Connection) -> int:
    """Bring the schema to :data:`VERSION`; return the version found before.

    Raises StoreError if the database's schema is newer than this code's.
    """
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        # Looked up first: a role that may only read and write the tables
        # (no CREATE on the schema) opens a database someone else migrated.
        if not await connection.fetchval("SELECT to_regclass('sessionq_schema') IS NOT NULL"):
            await connection.execute(
                "CREATE TABLE sessionq_schema ("
                " version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now())"
            )
        found = await connection.fetchval("SELECT max(version) FROM sessionq_schema") or 0
        if found > VERSION:
            raise StoreError(
                f"the database's sessionq schema is version {found}, newer than this"
                f" sessionq's ({VERSION}): run the newer sessionq, or restore a backup"
            )
        for version in range(found + 1, VERSION + 1):
            await connection.execute(MIGRATIONS[version - 1])
            await connection.execute("INSERT INTO sessionq_schema (version) VALUES ($1)", version)
    return int(found)
