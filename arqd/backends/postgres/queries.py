"""Every SQL statement of the PostgreSQL queue backend, by name, in one place (docs/postgres.md
lists each with the index it uses): the versioned migrations, the row codec (``COLUMNS``) and
each statement. ``queue.py`` holds the Python around them; ``tests/test_postgres_plans.py``
pins the plans of the hot ones at a million rows.

Statements name tables unqualified: every connection's ``search_path`` is the configured schema.
Times are ``double precision`` Unix seconds, JSON fields ``json`` (kept as written: key order
and numbers as the client sent them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arqd.backends.base import ListFilter

# Bumped by each migration; a daemon refuses a schema newer than the last one it knows.
MIGRATIONS: list[str] = [
    # 1: the first schema
    """
CREATE TABLE jobs (
    id               text PRIMARY KEY,
    queue            text NOT NULL,
    handler          text NOT NULL,
    state            text NOT NULL,
    payload          json,
    key              text,
    sticky           boolean NOT NULL DEFAULT false,
    meta             json,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     bigint NOT NULL,
    timeout          double precision NOT NULL,
    created_at       double precision NOT NULL,
    ready_at         double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    progress         json,
    error            json,
    result           json,
    steps            json,
    group_id         text,
    cancel_requested boolean NOT NULL DEFAULT false,
    owner            text,
    version          bigint NOT NULL DEFAULT 1,
    expires_at       double precision,
    visible_at       double precision,
    lease_token      text,
    worker           text,
    name             text,
    checkpoint       json
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);
-- Ready jobs and expired leases alike: visible_at is run_at for a queued job, the lease's
-- deadline for a running one; terminal jobs leave the index.
CREATE INDEX jobs_visible ON jobs (queue, visible_at, id) WHERE state IN ('queued', 'running');
-- Only the rare states: hot transitions (queued -> running -> succeeded) never touch it.
CREATE INDEX jobs_dead ON jobs (queue, id) WHERE state IN ('failed', 'cancelled');
CREATE INDEX jobs_group ON jobs (group_id) WHERE group_id IS NOT NULL;
CREATE INDEX jobs_expires ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX jobs_done ON jobs (sticky, id) WHERE state = 'succeeded' AND result IS NOT NULL;

CREATE TABLE dedupe (
    key        text PRIMARY KEY,
    job_id     text NOT NULL,
    expires_at double precision
) WITH (fillfactor = 80);

CREATE TABLE groups (
    id         text PRIMARY KEY,
    created_at double precision NOT NULL,
    record     json NOT NULL
);

CREATE TABLE workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    started_at  double precision NOT NULL,
    last_seen   double precision NOT NULL,
    running     integer NOT NULL,
    concurrency integer NOT NULL
);

-- Per (queue, state) counts, spread over a few shards so concurrent transactions rarely wait
-- on one row; stats sums them.
CREATE TABLE queue_counts (
    queue text NOT NULL,
    state text NOT NULL,
    shard smallint NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (queue, state, shard)
);

CREATE TABLE marks (
    name  text PRIMARY KEY,
    value double precision NOT NULL
);
""",
    # 2: who finished a job, as "<lease token>:<digest of the outcome>": a finish whose answer
    # was lost is recognised when it is sent again (FINISH)
    """
ALTER TABLE jobs ADD COLUMN finished_by text;
""",
]
SCHEMA_VERSION = len(MIGRATIONS)
COUNT_SHARDS = 8

# --- migrations ------------------------------------------------------------------------------

# One lock for every daemon migrating any arqd schema on the server: held for the transaction.
MIGRATE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('arqd.migrate'))"
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
VERSION_GET = "SELECT max(version) FROM schema_version"
VERSION_SET = "INSERT INTO schema_version (version) VALUES ($1)"


def create_schema(schema: str) -> str:
    """``schema`` is checked to be a plain identifier by the settings."""
    return f'CREATE SCHEMA IF NOT EXISTS "{schema}"'


def drop_schema(schema: str) -> str:
    return f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'


# --- the row codec ------------------------------------------------------------------------------

# Rows leave PostgreSQL as one JSON object each, decoded by msgspec straight into a Job; times are
# Unix seconds, which msgspec's non-strict decoder turns into datetimes.
COLUMNS = (
    "json_build_object('id', {t}id, 'queue', {t}queue, 'handler', {t}handler, "
    "'state', {t}state, 'payload', {t}payload, 'key', {t}key, 'sticky', {t}sticky, "
    "'meta', coalesce({t}meta, '{{}}'::json), 'attempts', {t}attempts, "
    "'max_attempts', {t}max_attempts, 'timeout', {t}timeout, 'created_at', {t}created_at, "
    "'ready_at', {t}ready_at, 'started_at', {t}started_at, 'finished_at', {t}finished_at, "
    "'progress', {t}progress, 'error', {t}error, 'result', {t}result, 'steps', {t}steps, "
    "'group_id', {t}group_id, 'cancel_requested', {t}cancel_requested, 'owner', {t}owner, "
    "'version', {t}version, 'expires_at', {t}expires_at, 'name', {t}name, "
    "'checkpoint', {t}checkpoint)::text"
)
ROW = COLUMNS.format(t="")
JROW = COLUMNS.format(t="j.")

# --- submit -----------------------------------------------------------------------------------

INSERT = (
    "INSERT INTO jobs (id, queue, handler, state, payload, key, sticky, meta, max_attempts, "
    "timeout, created_at, ready_at, steps, group_id, owner, visible_at, name) "
    "VALUES ($1, $2, $3, 'queued', $4::json, $5, $6, $7::json, $8, $9, $10, $11, $12::json, "
    "$13, $14, $11, $15)"
)
# Jobs with no key, their counts ($16: the shard) and the NOTIFY of the channels of the queues
# that got a job ready now ($17), in one statement: a submit outside a transaction of the
# caller's is one round trip. One array per column of INSERT, one element per job.
INSERT_MANY = (
    "WITH added AS ("
    " INSERT INTO jobs (id, queue, handler, state, payload, key, sticky, meta, max_attempts,"
    " timeout, created_at, ready_at, steps, group_id, owner, visible_at, name)"
    " SELECT id, queue, handler, 'queued', payload::json, key, sticky, meta::json,"
    " max_attempts, timeout, created_at, ready_at, steps::json, group_id, owner, ready_at, name"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[],"
    " $7::text[], $8::bigint[], $9::float8[], $10::float8[], $11::float8[], $12::text[],"
    " $13::text[], $14::text[], $15::text[]) AS t(id, queue, handler, payload, key, sticky,"
    " meta, max_attempts, timeout, created_at, ready_at, steps, group_id, owner, name)"
    " RETURNING queue), "
    "counted AS ("
    " INSERT INTO queue_counts AS c (queue, state, shard, n)"
    " SELECT queue, 'queued', $16, count(*) FROM added GROUP BY queue ORDER BY queue"
    " ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n), "
    "told AS (SELECT pg_notify(c, '') FROM unnest($17::text[]) AS c) "
    "SELECT count(*), (SELECT count(*) FROM told) FROM added"
)
# Takes the key, or answers nothing when a live job holds it. Atomic against a concurrent
# submit of the same key: ON CONFLICT waits for the other transaction and re-checks its row.
KEY_TAKE = (
    "INSERT INTO dedupe AS d (key, job_id, expires_at) VALUES ($1, $2, NULL) "
    "ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, expires_at = NULL "
    "WHERE d.expires_at IS NOT NULL AND d.expires_at <= $3 RETURNING job_id"
)
KEY_HOLDER = "SELECT job_id FROM dedupe WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)"
KEY_FREE = "DELETE FROM dedupe WHERE key = $1 AND job_id = $2"
GROUP_INSERT = "INSERT INTO groups (id, created_at, record) VALUES ($1, $2, $3::json)"
# One channel per queue (a name PostgreSQL takes whatever the queue is called); a transaction's
# notifications of one channel are delivered once, at commit.
NOTIFY = "SELECT pg_notify(c, '') FROM unnest($1::text[]) AS c"
# Jobs that ended (finished, cancelled, deleted): one channel per schema, each payload a list of
# job ids joined by commas, so another process's waits on them wake at once (arqd/follow.py).
NOTIFY_DONE = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"
PAYLOAD_MAX = 7900  # bytes of one notification's payload (PostgreSQL's limit: 8,000)


def channel(schema: str, queue: str) -> str:
    """The LISTEN/NOTIFY channel of ``queue`` in ``schema``: short, lower-case, unquoted-safe."""
    import hashlib

    digest = hashlib.sha256(f"{schema}\0{queue}".encode()).hexdigest()[:32]
    return f"arqd_{digest}"


def done_channel(schema: str) -> str:
    """The channel naming the jobs of ``schema`` that ended."""
    return channel(schema, "\0done")  # no queue is called that: a queue name has no NUL


def payloads(job_ids: Sequence[str]) -> list[str]:
    """``job_ids`` joined by commas, split into payloads PostgreSQL takes."""
    out: list[str] = []
    part: list[str] = []
    size = 0
    for job_id in job_ids:
        if part and size + len(job_id) + 1 > PAYLOAD_MAX:
            out.append(",".join(part))
            part, size = [], 0
        part.append(job_id)
        size += len(job_id) + 1
    if part:
        out.append(",".join(part))
    return out


def listening(n: int) -> str:
    """The listening connection's query once it LISTENs to ``n`` channels (its last query, as
    ``pg_stat_activity`` shows it: a test sees a daemon is ready to be woken)."""
    return f"SELECT {int(n)} AS arqd_listening"


# --- counts -----------------------------------------------------------------------------------

COUNT = (
    "INSERT INTO queue_counts AS c (queue, state, shard, n) "
    "SELECT q, s, $4, n FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(q, s, n) "
    "ORDER BY q, s "
    "ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n"
)
STATS = "SELECT queue, state, sum(n)::bigint FROM queue_counts GROUP BY queue, state"
OLDEST = (
    "SELECT min(visible_at) FROM jobs WHERE queue = $1 AND state = 'queued' "
    "AND state IN ('queued', 'running') AND visible_at <= $2"
)

# --- leasing ----------------------------------------------------------------------------------

# One statement per batch, its own transaction (one round trip): for each queue in turn (a
# lateral join), walk jobs_visible from the oldest visible entry, skipping rows another
# transaction holds, until ``limit`` are taken; the counts move with them ($7: the shard).
LEASE = (
    "WITH picked AS ("
    " SELECT c.id, c.state AS was FROM unnest($1::text[]) WITH ORDINALITY AS q(name, pos)"
    " CROSS JOIN LATERAL ("
    "  SELECT id, state FROM jobs WHERE queue = q.name AND state IN ('queued', 'running')"
    "  AND visible_at <= $2 ORDER BY visible_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) c"
    " LIMIT $3), "
    "leased AS ("
    " UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, started_at = $2,"
    " lease_token = $4, visible_at = $5, worker = $6, version = j.version + 1"
    f" FROM picked WHERE j.id = picked.id RETURNING picked.was, j.queue, {JROW} AS job), "
    "counted AS ("
    " INSERT INTO queue_counts AS c (queue, state, shard, n)"
    " SELECT l.queue, m.state, $7, m.sign * count(*) FROM leased l"
    " CROSS JOIN (VALUES ('queued', -1), ('running', 1)) AS m(state, sign)"
    " WHERE l.was = 'queued' GROUP BY l.queue, m.state, m.sign ORDER BY 1, 2"
    " ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n) "
    "SELECT was, job FROM leased"
)
# Extends each lease still held; (id, token) pairs as two arrays.
HEARTBEAT = (
    "UPDATE jobs j SET visible_at = $3 FROM unnest($1::text[], $2::text[]) AS h(id, token) "
    "WHERE j.id = h.id AND j.lease_token = h.token AND j.state = 'running' "
    "RETURNING j.id, h.token, j.cancel_requested"
)
# A NULL leaves its column as it is.
UPDATE = (
    "UPDATE jobs j SET progress = coalesce(u.progress::json, j.progress), "
    "steps = coalesce(u.steps::json, j.steps), "
    "checkpoint = coalesce(u.checkpoint::json, j.checkpoint), version = j.version + 1 "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) "
    "AS u(id, token, progress, steps, checkpoint) "
    "WHERE j.id = u.id AND j.lease_token = u.token AND j.state = 'running' "
    "RETURNING j.id, u.token"
)
# Every outcome of a batch in one statement, its own transaction (one round trip): terminal ones
# and requeues alike (a requeue keeps its result and finish time, and becomes visible at its
# ready_at); the keys the core said to free ($11) or to let expire (unless $12, kept); the count
# changes ($13: the shard); the ids of the jobs that ended NOTIFYed on $14, 200 to a payload
# (under PostgreSQL's 8,000 bytes). Answers the applied ones, and those this very outcome was
# applied to before ($15, ``finished_by``: a finish sent again after its answer was lost; the
# statement's snapshot shows the rows it updates as they were, so a row is in one part only).
FINISH = (
    "WITH o AS ("
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::float8[],"
    " $6::text[], $7::text[], $8::float8[], $9::float8[], $11::boolean[], $12::boolean[],"
    " $15::text[]) AS o(id, token, state, give_back, started_at, result, error, expires_at,"
    " ready_at, free_key, keep_key, finished_by)), "
    "done AS ("
    " UPDATE jobs j SET state = o.state, attempts = j.attempts - o.give_back,"
    " started_at = o.started_at,"
    " finished_at = CASE WHEN o.state = 'queued' THEN j.finished_at ELSE $10 END,"
    " ready_at = CASE WHEN o.state = 'queued' THEN o.ready_at ELSE j.ready_at END,"
    " visible_at = CASE WHEN o.state = 'queued' THEN o.ready_at END,"
    " result = CASE WHEN o.state = 'queued' THEN j.result ELSE o.result::json END,"
    " error = CASE WHEN o.state = 'queued' THEN coalesce(o.error::json, j.error)"
    " ELSE o.error::json END,"
    " expires_at = CASE WHEN o.state = 'queued' THEN j.expires_at ELSE o.expires_at END,"
    " lease_token = NULL, worker = NULL, version = j.version + 1, finished_by = o.finished_by"
    " FROM o WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'"
    " RETURNING j.id, o.token, j.queue, j.key, j.state), "
    "ended AS ("
    " SELECT d.id, d.key, o.free_key, o.keep_key, o.expires_at FROM done d"
    " JOIN o ON o.id = d.id WHERE d.state <> 'queued'), "
    "freed AS ("
    " DELETE FROM dedupe k USING ended e WHERE e.free_key AND k.key = e.key"
    " AND k.job_id = e.id), "
    "expiring AS ("
    " UPDATE dedupe k SET expires_at = e.expires_at FROM ended e"
    " WHERE NOT e.free_key AND NOT e.keep_key AND k.key = e.key AND k.job_id = e.id), "
    "counted AS ("
    " INSERT INTO queue_counts AS c (queue, state, shard, n)"
    " SELECT queue, state, $13, sum(n) FROM ("
    "  SELECT queue, 'running' AS state, -1 AS n FROM done"
    "  UNION ALL SELECT queue, state, 1 FROM done) AS m"
    " GROUP BY queue, state ORDER BY queue, state"
    " ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n), "
    "told AS ("
    " SELECT pg_notify($14, string_agg(id, ',')) FROM ("
    "  SELECT id, (row_number() OVER () - 1) / 200 AS part FROM ended) AS e GROUP BY part), "
    "again AS ("
    " SELECT j.id, o.token, j.queue, j.state FROM jobs j JOIN o ON j.id = o.id"
    " WHERE j.finished_by = o.finished_by) "
    "SELECT id, token, queue, state, (SELECT count(*) FROM told) FROM done "
    "UNION ALL SELECT id, token, queue, state, 0 FROM again"
)

# The keys of jobs a sweep or a purge deleted: (key, job id) pairs as two arrays.
KEYS_FREE = (
    "DELETE FROM dedupe d USING unnest($1::text[], $2::text[]) AS k(key, job_id) "
    "WHERE d.key = k.key AND d.job_id = k.job_id"
)

# --- single jobs --------------------------------------------------------------------------------

CANCEL_QUEUED = (
    "UPDATE jobs SET state = 'cancelled', finished_at = $1, visible_at = NULL, "
    f"version = version + 1 WHERE id = $2 AND state = 'queued' RETURNING {ROW}"
)
CANCEL_RUNNING = (
    "UPDATE jobs SET cancel_requested = true, version = version + 1 "
    f"WHERE id = $1 AND state = 'running' AND NOT cancel_requested RETURNING {ROW}"
)
# The jobs a lease whose answer was lost took: its token and deadline, through jobs_visible.
LEASE_AGAIN = (
    f"SELECT {ROW} FROM jobs WHERE queue = ANY($1::text[]) AND state = 'running' "
    "AND state IN ('queued', 'running') AND visible_at = $2 AND lease_token = $3"
)
GET = f"SELECT {ROW} FROM jobs WHERE id = $1"
GET_FOR_UPDATE = f"SELECT {ROW} FROM jobs WHERE id = $1 FOR UPDATE"
GET_MANY = f"SELECT {ROW} FROM jobs WHERE id = ANY($1::text[])"
VERSIONS = "SELECT id, version FROM jobs WHERE id = ANY($1::text[])"
DELETE = "DELETE FROM jobs WHERE id = $1"
REDRIVE = (
    "UPDATE jobs SET state = 'queued', attempts = $2, ready_at = $3, visible_at = $3, "
    "finished_at = NULL, error = NULL, version = version + 1 "
    "WHERE queue = $1 AND state = 'failed' AND state IN ('failed', 'cancelled') "
    "RETURNING id, key"
)
REDRIVE_KEYS = (
    "INSERT INTO dedupe AS d (key, job_id, expires_at) "
    "SELECT DISTINCT ON (k.key) k.key, k.job_id, NULL "
    "FROM unnest($1::text[], $2::text[]) AS k(key, job_id) ORDER BY k.key, k.job_id "
    "ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, expires_at = NULL "
    "WHERE d.expires_at IS NOT NULL AND d.expires_at <= $3"
)

# --- maintenance --------------------------------------------------------------------------------

# Expired terminal jobs through jobs_expires, bounded per call; SKIP LOCKED: each to one caller.
SWEEP = (
    "WITH gone AS (SELECT id FROM jobs WHERE expires_at <= $1 "
    "AND state IN ('succeeded', 'cancelled', 'failed') ORDER BY expires_at LIMIT $2 "
    "FOR UPDATE SKIP LOCKED) "
    f"DELETE FROM jobs j USING gone WHERE j.id = gone.id RETURNING {JROW}"
)
# Droppable results, walked in id order from a cursor through jobs_done.
DROPPABLE = (
    f"SELECT {ROW} FROM jobs WHERE id > $1 AND state = 'succeeded' AND sticky = $2 "
    "AND result IS NOT NULL AND coalesce(result ->> 'area', '') <> 'dropped' "
    "AND finished_at <= $3 ORDER BY sticky, id LIMIT $4 FOR UPDATE SKIP LOCKED"
)
DROP = "UPDATE jobs SET result = $1::json, version = version + 1 WHERE id = ANY($2::text[])"

# --- the rest -----------------------------------------------------------------------------------

PING = "SELECT 1"
GROUP_GET = "SELECT record::text FROM groups WHERE id = $1"
WORKER_PUT = (
    "INSERT INTO workers (id, host, started_at, last_seen, running, concurrency) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET host = excluded.host, "
    "started_at = excluded.started_at, last_seen = excluded.last_seen, "
    "running = excluded.running, concurrency = excluded.concurrency"
)
WORKERS_FORGET = "DELETE FROM workers WHERE last_seen < $1"  # gone for a day
WORKER_REMOVE = "DELETE FROM workers WHERE id = $1"
WORKERS_SEEN = (
    "SELECT id, host, started_at, last_seen, running, concurrency FROM workers "
    "WHERE last_seen >= $1 ORDER BY id"
)
# advance_mark: the row locked (or first inserted) in one transaction, so concurrent advances
# are serialised and each answers the mark as it was before its own.
MARK_LOCK = "SELECT value FROM marks WHERE name = $1 FOR UPDATE"
MARK_INSERT = (
    "INSERT INTO marks (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING name"
)
MARK_SET = "UPDATE marks SET value = $2 WHERE name = $1"
MARK_GET = "SELECT value FROM marks WHERE name = $1"

DEAD_STATES = ("failed", "cancelled")
LIST = f"SELECT {ROW} FROM jobs"


def list_sql(where: ListFilter, limit: int, cursor: str | None) -> tuple[str, list[Any]]:
    """The listing query, newest first, one row more than ``limit`` (to know if more follow)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column in ("queue", "handler", "group_id", "owner"):
        value = getattr(where, column)
        if value is not None:
            params.append(value)
            clauses.append(f"{column} = ${len(params)}")
    if where.state is not None:
        params.append(where.state.value)
        clauses.append(f"state = ${len(params)}")
        if where.state.value in DEAD_STATES:
            clauses.append("state IN ('failed', 'cancelled')")  # lets the planner use jobs_dead
    if cursor is not None:
        params.append(cursor)
        clauses.append(f"id < ${len(params)}")
    sql = LIST
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    params.append(limit + 1)
    sql += f" ORDER BY id DESC LIMIT ${len(params)}"
    return sql, params
