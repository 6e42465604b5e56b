"""The PostgreSQL store's per-user budgets (store/base.py): migration 2.

* ``sessions.carried``: a connection carries the session. ``user_budgets``
  keeps each user's unfinished requests and key-value bytes as counters,
  changed in the same statements' transaction as the rows they count, and
  derived once here from a database made before them.
* A check and the write it guards are one transaction: ``create_session`` and
  ``kv_put`` lock the user's ``user_budgets`` row first (writes of one user's
  sessions and keys take turns across processes), ``add`` takes its places
  with one conditional upsert of that row (and gives them back if its fence
  then fails).
* The hot path (``sessionq_hot``) takes the places of all its adds with one
  statement per batch and gives back those of its finishes with another. When
  some user's adds do not all fit, it gives its places back and runs the batch
  one operation at a time, where each add fits or is refused on its own.

A refused operation changes nothing and answers ``{"e": "budget", "b":
budget, "l": limit}``.
"""

from __future__ import annotations

# A user's usage of each budget (Store.usage): $1 the user, $2 now.
USAGE = (
    "SELECT count(*), count(*) FILTER (WHERE carried),"
    " coalesce((SELECT pending FROM user_budgets WHERE username = $1), 0),"
    " coalesce((SELECT kv_bytes FROM user_budgets WHERE username = $1), 0)"
    " FROM sessions WHERE username = $1 AND owner IS NOT NULL AND lease_until >= $2"
)

MIGRATION = r"""
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS carried boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (username, lease_until);
CREATE TABLE IF NOT EXISTS user_budgets (
    username text PRIMARY KEY,
    pending bigint NOT NULL DEFAULT 0,
    kv_bytes bigint NOT NULL DEFAULT 0
);
INSERT INTO user_budgets (username, pending, kv_bytes)
SELECT username, sum(pending), sum(kv_bytes) FROM (
    SELECT s.username, count(*) AS pending, 0::bigint AS kv_bytes
    FROM requests r JOIN sessions s ON s.session_id = r.session_id
    WHERE r.state <> 'done' GROUP BY s.username
    UNION ALL
    SELECT username, 0, sum(octet_length(key) + octet_length(value)) FROM kv GROUP BY username
) t GROUP BY username
ON CONFLICT (username) DO NOTHING;

-- The session's user has delta more (or fewer) unfinished requests.
CREATE OR REPLACE FUNCTION sessionq_pending(sid text, delta bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE user_budgets SET pending = greatest(0, pending + delta)
    WHERE delta <> 0 AND username = (SELECT username FROM sessions WHERE session_id = sid)
$$;

-- The user's budget row, created if missing, locked until commit.
CREATE OR REPLACE FUNCTION sessionq_lock_user(u text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_budgets (username) VALUES (u) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM user_budgets WHERE username = u FOR UPDATE;
END
$$;

CREATE OR REPLACE FUNCTION sessionq_refused(budget text, lim bigint) RETURNS jsonb
LANGUAGE sql AS $$ SELECT jsonb_build_object('e', 'budget', 'b', budget, 'l', lim) $$;
"""

# The operations as version 1 defined them stay, renamed; the new ones take
# the budgets' share of each and hand the rest to them.
WRAPPERS = r"""
ALTER FUNCTION sessionq_op(jsonb) RENAME TO sessionq_op_v1;
ALTER FUNCTION sessionq_hot(jsonb) RENAME TO sessionq_hot_v1;

CREATE FUNCTION sessionq_op(o jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    sid text := o->>1;
    u text;
    n bigint;
    v bigint;
    lim bigint;
    live bigint;
    carried_n bigint;
    result jsonb;
BEGIN
    CASE o->>0
    WHEN 'create_session' THEN
        -- sid, username, created_at, owner, lease_until, max sessions, max connections, now
        IF o->>6 IS NOT NULL OR o->>7 IS NOT NULL THEN
            PERFORM sessionq_lock_user(o->>2);  -- this user's creations take turns
            SELECT count(*), count(*) FILTER (WHERE s.carried) INTO live, carried_n
            FROM sessions s
            WHERE s.username = o->>2 AND s.owner IS NOT NULL
              AND s.lease_until >= (o->>8)::float8;
            IF live >= (o->>6)::bigint THEN
                RETURN sessionq_refused('sessions', (o->>6)::bigint);
            END IF;
            IF carried_n >= (o->>7)::bigint THEN
                RETURN sessionq_refused('connections', (o->>7)::bigint);
            END IF;
        END IF;
        result := sessionq_op_v1(o);
        IF result ? 'r' THEN
            UPDATE sessions SET carried = true WHERE session_id = sid;
        END IF;
        RETURN result;
    WHEN 'set_carried' THEN  -- sid, epoch, carried
        UPDATE sessions SET carried = (o->>3)::boolean
        WHERE session_id = sid AND epoch = (o->>2)::bigint;
        RETURN jsonb_build_object('r', FOUND);
    WHEN 'claim' THEN
        result := sessionq_op_v1(o);
        IF result->'r' <> 'null'::jsonb THEN
            UPDATE sessions SET carried = false WHERE session_id = sid;
        END IF;
        RETURN result;
    WHEN 'release' THEN
        result := sessionq_op_v1(o);
        IF result->'r' = 'true'::jsonb THEN
            UPDATE sessions SET carried = false WHERE session_id = sid;
        END IF;
        RETURN result;
    WHEN 'add' THEN  -- sid, epoch, rows, now, max pending
        n := jsonb_array_length(o->3);
        lim := (o->>5)::bigint;
        IF lim IS NOT NULL AND n > lim THEN RETURN sessionq_refused('pending', lim); END IF;
        INSERT INTO user_budgets AS b (username, pending)
        SELECT username, n FROM sessions WHERE session_id = sid AND epoch = (o->>2)::bigint
        ON CONFLICT (username) DO UPDATE SET pending = b.pending + excluded.pending
        WHERE lim IS NULL OR b.pending + excluded.pending <= lim;
        IF NOT FOUND THEN
            IF NOT sessionq_current(sid, (o->>2)::bigint) THEN RETURN '{"e": "fenced"}'; END IF;
            RETURN sessionq_refused('pending', lim);
        END IF;
        result := sessionq_op_v1(o);
        IF NOT result ? 'r' THEN PERFORM sessionq_pending(sid, -n); END IF;  -- fenced since
        RETURN result;
    WHEN 'remove' THEN  -- sid, epoch, [seq, ...]
        SELECT count(*) INTO n FROM requests
        WHERE session_id = sid AND state = 'queued'
          AND seq = ANY (ARRAY(SELECT jsonb_array_elements_text(o->3)::bigint));
        result := sessionq_op_v1(o);
        IF result ? 'r' THEN PERFORM sessionq_pending(sid, -n); END IF;
        RETURN result;
    WHEN 'finish' THEN
        result := sessionq_op_v1(o);
        IF result->'r'->0 = 'true'::jsonb THEN PERFORM sessionq_pending(sid, -1); END IF;
        RETURN result;
    WHEN 'finish_many' THEN
        result := sessionq_op_v1(o);
        IF result ? 'r' THEN
            PERFORM sessionq_pending(sid, -jsonb_array_length(result->'r'));
        END IF;
        RETURN result;
    WHEN 'kv_put' THEN  -- username, key, value, size, max bytes
        u := o->>1;
        PERFORM sessionq_lock_user(u);  -- this user's puts and deletes take turns
        SELECT octet_length(key) + octet_length(value) INTO v FROM kv
        WHERE username = u AND key = o->>2;
        n := (o->>4)::bigint - coalesce(v, 0);
        lim := (o->>5)::bigint;
        IF n > 0 AND lim IS NOT NULL
           AND (SELECT kv_bytes FROM user_budgets WHERE username = u) + n > lim THEN
            RETURN sessionq_refused('kv_bytes', lim);
        END IF;
        UPDATE user_budgets SET kv_bytes = greatest(0, kv_bytes + n) WHERE username = u;
        RETURN sessionq_op_v1(o);
    WHEN 'kv_delete' THEN  -- username, key
        DELETE FROM kv WHERE username = o->>1 AND key = o->>2
        RETURNING octet_length(key) + octet_length(value) INTO v;
        IF v IS NULL THEN RETURN '{"r": false}'; END IF;
        UPDATE user_budgets SET kv_bytes = greatest(0, kv_bytes - v) WHERE username = o->>1;
        RETURN '{"r": true}';
    ELSE
        RETURN sessionq_op_v1(o);
    END CASE;
END
$$;

-- The hot path with budgets: the places of every add, per user, in one
-- statement before the batch, and what finished (or turned out fenced) given
-- back in one statement after it. When a user has no row yet, it gets one and
-- the batch tries again; when some user's adds do not all fit, the batch runs
-- one operation at a time instead, where each add fits or is refused alone.
CREATE FUNCTION sessionq_hot(ops jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
DECLARE
    wanted bigint;
    took text[];
    result jsonb;
    o jsonb;
    outcomes jsonb[] := '{}';
BEGIN
    FOR attempt IN 1..2 LOOP
        EXECUTE $q$
            WITH t AS (
                SELECT s.username, sum(jsonb_array_length(x->3)) AS n,
                    min((x->>5)::bigint) AS lim
                FROM jsonb_array_elements($1) x JOIN sessions s ON s.session_id = x->>1
                WHERE x->>0 = 'add' GROUP BY s.username
            ), u AS (
                UPDATE user_budgets b SET pending = b.pending + t.n FROM t
                WHERE b.username = t.username AND (t.lim IS NULL OR b.pending + t.n <= t.lim)
                RETURNING b.username
            )
            SELECT (SELECT count(*) FROM t), ARRAY(SELECT username FROM u)
        $q$ INTO wanted, took USING ops;
        EXIT WHEN cardinality(took) = wanted;
        EXECUTE $q$
            UPDATE user_budgets b SET pending = b.pending - t.n
            FROM (
                SELECT s.username, sum(jsonb_array_length(x->3)) AS n
                FROM jsonb_array_elements($1) x JOIN sessions s ON s.session_id = x->>1
                WHERE x->>0 = 'add' GROUP BY s.username
            ) t
            WHERE b.username = t.username AND b.username = ANY ($2)
        $q$ USING ops, took;
        IF attempt = 2 THEN
            FOR o IN
                SELECT x FROM jsonb_array_elements(ops) WITH ORDINALITY AS t (x, i) ORDER BY i
            LOOP
                outcomes := outcomes || sessionq_op(o);
            END LOOP;
            RETURN to_jsonb(outcomes);
        END IF;
        INSERT INTO user_budgets (username)
        SELECT DISTINCT s.username FROM jsonb_array_elements(ops) x
        JOIN sessions s ON s.session_id = x->>1 WHERE x->>0 = 'add'
        ON CONFLICT DO NOTHING;
    END LOOP;
    result := sessionq_hot_v1(ops);
    EXECUTE $q$
        UPDATE user_budgets b SET pending = greatest(0, b.pending - d.n)
        FROM (
            SELECT s.username, sum(CASE WHEN t.x->>0 = 'add' THEN jsonb_array_length(t.x->3)
                                        ELSE jsonb_array_length(r.y->'r') END) AS n
            FROM jsonb_array_elements($1) WITH ORDINALITY AS t (x, i)
            JOIN jsonb_array_elements($2) WITH ORDINALITY AS r (y, j) ON r.j = t.i
            JOIN sessions s ON s.session_id = t.x->>1
            WHERE (t.x->>0 = 'add' AND NOT r.y ? 'r')
               OR (t.x->>0 = 'finish_many' AND r.y ? 'r')
            GROUP BY s.username
        ) d
        WHERE b.username = d.username AND d.n <> 0
    $q$ USING ops, result;
    RETURN result;
END
$$;
"""
