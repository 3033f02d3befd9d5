"""Every SQL statement of the sqlite queue backend, by name, in one place (docs/design.md,
"sqlite's SQL"): the schema, the row codec (``COLUMNS``), and each statement the backend runs.
``arqd/backends/sqlite.py`` holds the Python around them (transactions, threads, conversion);
``tests/test_sqlite_plans.py`` checks the hot ones use their indexes.
"""

from __future__ import annotations

from typing import Any

from arqd.backends.base import ListFilter

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    handler          TEXT NOT NULL,
    state            TEXT NOT NULL,
    payload          TEXT,
    key              TEXT,
    sticky           INTEGER NOT NULL DEFAULT 0,
    meta             TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    timeout          REAL NOT NULL,
    created_at       REAL NOT NULL,
    ready_at         REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    progress         TEXT,
    error            TEXT,
    result           TEXT,
    steps            TEXT,
    group_id         TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    version          INTEGER NOT NULL DEFAULT 1,
    expires_at       REAL,
    visible_at       REAL,
    lease_token      TEXT,
    worker           TEXT,
    name             TEXT,
    checkpoint       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_visible ON jobs (queue, state, visible_at)
    WHERE visible_at IS NOT NULL;
-- Only the rare states: hot transitions (queued → running → succeeded) never touch it.
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (state, id) WHERE state IN ('failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_group ON jobs (group_id) WHERE group_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS dedupe (
    key        TEXT PRIMARY KEY,
    job_id     TEXT NOT NULL,
    expires_at REAL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS groups (
    id         TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    record     TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS workers (
    id          TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    started_at  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    running     INTEGER NOT NULL,
    concurrency INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS queue_counts (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;

-- Named high-water marks (advance_mark): the latest tick the cluster fired of each schedule.
CREATE TABLE IF NOT EXISTS marks (
    name  TEXT PRIMARY KEY,
    value REAL NOT NULL
) WITHOUT ROWID;

"""

# Rows leave SQLite as one JSON object each, decoded by msgspec straight into a Job (about five
# times cheaper than building it field by field in Python, which matters on the writer thread).
# JSON columns hold JSON text; timestamps are REAL Unix seconds, which msgspec's non-strict
# decoder turns into datetimes.
COLUMNS = (
    "json_object('id', id, 'queue', queue, 'handler', handler, 'state', state, "
    "'payload', json(payload), 'key', key, 'sticky', sticky, 'meta', json(coalesce(meta, '{}')), "
    "'attempts', attempts, 'max_attempts', max_attempts, 'timeout', timeout, "
    "'created_at', created_at, 'ready_at', ready_at, 'started_at', started_at, "
    "'finished_at', finished_at, 'progress', json(progress), 'error', json(error), "
    "'result', json(result), 'steps', json(steps), 'group_id', group_id, "
    "'cancel_requested', cancel_requested, 'owner', owner, 'version', version, "
    "'expires_at', expires_at, 'name', name, 'checkpoint', json(checkpoint))"
)

INSERT = (
    "INSERT INTO jobs (id, queue, handler, state, payload, key, sticky, meta, max_attempts, "
    "timeout, created_at, ready_at, steps, group_id, owner, visible_at, name) "
    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
KEY_HOLDER = "SELECT job_id FROM dedupe WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
KEY_TAKE = "INSERT OR REPLACE INTO dedupe (key, job_id, expires_at) VALUES (?, ?, NULL)"
KEY_FREE = "DELETE FROM dedupe WHERE key = ? AND job_id = ?"
KEY_EXPIRES = "UPDATE dedupe SET expires_at = ? WHERE key = ? AND job_id = ?"
GROUP_INSERT = "INSERT INTO groups (id, created_at, record) VALUES (?, ?, ?)"

# The inner SELECT walks jobs_visible from the oldest entry of one (queue, state): O(log n) to
# start, then one step per job leased. Expired leases (state 'running') and ready jobs (state
# 'queued') are leased by two statements, which also keeps the per-state counts exact.
LEASE = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = :now, "
    "lease_token = :token, visible_at = :expires, worker = :worker, version = version + 1 "
    "WHERE rowid IN (SELECT rowid FROM jobs WHERE queue = :queue AND visible_at <= :now "
    "AND state = :state ORDER BY visible_at LIMIT :limit) "
    f"RETURNING {COLUMNS}"
)
# Whether SQL_LEASE would find anything: an UPDATE that finds nothing costs ~25 us, this ~5 us,
# and most lease calls look for expired leases that are not there.
ANY_VISIBLE = (
    "SELECT 1 FROM jobs WHERE queue = ? AND state = ? AND visible_at <= ? "
    "AND visible_at IS NOT NULL LIMIT 1"
)
COUNT = (
    "INSERT INTO queue_counts (queue, state, n) VALUES (?, ?, ?) "
    "ON CONFLICT (queue, state) DO UPDATE SET n = n + excluded.n"
)
HEARTBEAT = (
    "UPDATE jobs SET visible_at = ? WHERE id = ? AND lease_token = ? AND state = 'running' "
    "RETURNING cancel_requested"
)
# One lease-fenced partial update: a NULL parameter leaves its column as it is.
UPDATE = (
    "UPDATE jobs SET progress = coalesce(?, progress), steps = coalesce(?, steps), "
    "checkpoint = coalesce(?, checkpoint), version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
REQUEUE = (
    "UPDATE jobs SET state = 'queued', attempts = attempts - ?, ready_at = ?, visible_at = ?, "
    "started_at = ?, error = coalesce(?, error), lease_token = NULL, worker = NULL, "
    "version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
END = (
    "UPDATE jobs SET state = ?, attempts = attempts - ?, started_at = ?, finished_at = ?, "
    "result = ?, error = ?, expires_at = ?, "
    "visible_at = NULL, lease_token = NULL, worker = NULL, version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
CANCEL_QUEUED = (
    "UPDATE jobs SET state = 'cancelled', finished_at = ?, visible_at = NULL, "
    f"version = version + 1 WHERE id = ? AND state = 'queued' RETURNING {COLUMNS}"
)
CANCEL_RUNNING = (
    "UPDATE jobs SET cancel_requested = 1, version = version + 1 "
    f"WHERE id = ? AND state = 'running' AND cancel_requested = 0 RETURNING {COLUMNS}"
)
GET = f"SELECT {COLUMNS} FROM jobs WHERE id = ?"
DEAD_STATES = ("failed", "cancelled")  # jobs_dead's partial index covers exactly these
DEAD_CLAUSE = "state IN ('failed', 'cancelled')"
REDRIVE = (
    "UPDATE jobs SET state = 'queued', attempts = :attempts, ready_at = :ready, "
    "visible_at = :ready, "
    "finished_at = NULL, error = NULL, version = version + 1 "
    "WHERE queue = :queue AND state = 'failed' AND state IN ('failed', 'cancelled') "
    "RETURNING id, key"  # the IN term lets SQLite use jobs_dead (see list_jobs)
)
DELETE = "DELETE FROM jobs WHERE id = ?"
# Expired terminal jobs, found through jobs_expires; bounded per call.
SWEEP = (
    "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE expires_at <= ? "
    "AND state IN ('succeeded', 'cancelled', 'failed') ORDER BY expires_at LIMIT ?) "
    f"RETURNING {COLUMNS}"
)
# A purge (DELETE /v1/cache) is an operator's rare act: it walks the succeeded jobs in batches.
# Droppable results, walked in id order from a cursor (the primary key's index), so a purge of a
# million results reads each row once, and outside the write lock.
DROPPABLE = (
    "SELECT id FROM jobs WHERE id > ? AND state = 'succeeded' AND sticky = ? "
    "AND result IS NOT NULL AND result ->> 'area' IS NOT 'dropped' AND finished_at <= ? "
    "ORDER BY id LIMIT ?"
)
DROP_TAKE = (
    f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND state = 'succeeded' "
    "AND result IS NOT NULL AND result ->> 'area' IS NOT 'dropped'"
)
DROP = "UPDATE jobs SET result = ?, version = version + 1 WHERE id = ?"
STATS = "SELECT queue, state, n FROM queue_counts WHERE n > 0"
OLDEST = "SELECT min(visible_at) FROM jobs WHERE queue = ? AND visible_at <= ? AND state = 'queued'"

PRAGMAS = (
    "PRAGMA busy_timeout = 10000",  # another process holding the write lock: wait, then fail
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",  # durable across process crashes; see docs/design.md
    # 16 MiB of page cache per connection (five of them), no mmap: a mapped file counts in the
    # daemon's RSS once touched (measured: 373 MB after a million jobs went through, against
    # 74 MB with these settings and the same throughput; benchmarks/scale.py).
    "PRAGMA cache_size = -16384",
    "PRAGMA mmap_size = 0",
    # Checkpoints run on their own thread (see SqliteQueue._checkpoint_loop); this only bounds
    # the WAL (~160 MiB) should that thread fall behind.
    "PRAGMA wal_autocheckpoint = 40000",
)

# --- the rest, one statement each ----------------------------------------------------------

BEGIN = "BEGIN IMMEDIATE"  # takes the write lock up front (see the sqlite module docstring)
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
HERE_PRAGMA = "PRAGMA busy_timeout = 0"  # a connection on the event loop never waits
CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"
PING = "SELECT 1"
GET_MANY = f"SELECT {COLUMNS} FROM jobs WHERE id IN (:marks)"  # ``in_list(GET_MANY, n)``
VERSIONS = "SELECT id, version FROM jobs WHERE id IN (:marks)"
GROUP_GET = "SELECT record FROM groups WHERE id = ?"
WORKER_PUT = (
    "INSERT OR REPLACE INTO workers (id, host, started_at, last_seen, running, concurrency) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
WORKERS_FORGET = "DELETE FROM workers WHERE last_seen < ?"  # gone for a day
WORKER_REMOVE = "DELETE FROM workers WHERE id = ?"
WORKERS_SEEN = (
    "SELECT id, host, started_at, last_seen, running, concurrency FROM workers "
    "WHERE last_seen >= ? ORDER BY id"
)
MARK_GET = "SELECT value FROM marks WHERE name = ?"
MARK_SET = "INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)"


def synchronous(mode: str) -> str:
    """The pragma setting ``synchronous`` (one of OFF, NORMAL, FULL, EXTRA: checked on open)."""
    return f"PRAGMA synchronous = {mode}"


def in_list(template: str, n: int) -> str:
    """``template`` with ``:marks`` as ``n`` parameters."""
    return template.replace(":marks", ",".join("?" * n))


LIST = f"SELECT {COLUMNS} FROM jobs"  # then list_sql's WHERE, ORDER BY and LIMIT


def list_sql(where: ListFilter, limit: int, cursor: str | None) -> tuple[str, list[Any]]:
    """The listing query, newest first, one row more than ``limit`` (to know if more follow)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column in ("queue", "handler", "group_id", "owner"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.state is not None:
        clauses.append("state = ?")
        params.append(where.state.value)
        if where.state.value in DEAD_STATES:
            # SQLite uses a partial index only when the query's own text implies its WHERE; a
            # bound parameter never does, so say it literally (jobs_dead: 0.2 ms, not a 0.7 s
            # scan of a million rows).
            clauses.append(DEAD_CLAUSE)
    if cursor is not None:
        clauses.append("id < ?")
        params.append(cursor)
    sql = LIST
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit + 1)
    return sql, params
