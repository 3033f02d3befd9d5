"""The SQLite queue backend: the embedded default, durable, shared by several processes on one host.

Design
- WAL journal, so readers never block the writer; every write is one ``BEGIN IMMEDIATE``
  transaction, which takes SQLite's single write lock up front: two processes leasing at the same
  moment are serialised by SQLite itself, and each sees the other's leases. That is the whole of
  the cross-process safety argument, and it needs no advisory locks.
- A job is visible (leasable) while ``visible_at <= now``: for a queued job that is its
  ``ready_at``, for a running job its lease expiry; terminal jobs have no ``visible_at``. One
  partial index on ``(queue, state, visible_at)`` therefore finds both ready jobs and expired
  leases in O(log n), however many jobs wait.
- Per-queue, per-state counts are kept in ``queue_counts``, updated in the same transaction as
  the jobs they count (one statement per queue and state per batch, cheaper than triggers), so
  stats never scan.
- Dedupe keys live in their own table; a key row is held until an outcome frees it, its
  ``expires_at`` passes, or the job is deleted.
- Small calls run on the event loop's thread on connections that never wait for a lock
  (``busy_timeout = 0``); a call that would wait, or touches many rows, takes one hop to a
  dedicated thread (one writer connection, one reader connection) and waits there. See
  ``_Thread`` for why: the hop cost more than the SQL.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from arqd.backends.base import (
    Enqueued,
    HeartbeatReply,
    Lease,
    ListFilter,
    Outcome,
    QueueBackend,
    QueueStats,
    Redrive,
    StateCounts,
    Update,
    WorkerInfo,
    convert_all,
    fifo,
    group_record,
    storable_group,
    storable_job,
)
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, BackendUnavailable
from arqd.model import (
    DROPPED,
    GroupRecord,
    Job,
    NewJob,
    ResultRef,
    State,
    new_token,
)

T = TypeVar("T")

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

SQL_INSERT = (
    "INSERT INTO jobs (id, queue, handler, state, payload, key, sticky, meta, max_attempts, "
    "timeout, created_at, ready_at, steps, group_id, owner, visible_at, name) "
    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SQL_KEY_HOLDER = (
    "SELECT job_id FROM dedupe WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
SQL_KEY_TAKE = "INSERT OR REPLACE INTO dedupe (key, job_id, expires_at) VALUES (?, ?, NULL)"
SQL_KEY_FREE = "DELETE FROM dedupe WHERE key = ? AND job_id = ?"
SQL_KEY_EXPIRES = "UPDATE dedupe SET expires_at = ? WHERE key = ? AND job_id = ?"
SQL_GROUP_INSERT = "INSERT INTO groups (id, created_at, record) VALUES (?, ?, ?)"

# The inner SELECT walks jobs_visible from the oldest entry of one (queue, state): O(log n) to
# start, then one step per job leased. Expired leases (state 'running') and ready jobs (state
# 'queued') are leased by two statements, which also keeps the per-state counts exact.
SQL_LEASE = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = :now, "
    "lease_token = :token, visible_at = :expires, worker = :worker, version = version + 1 "
    "WHERE rowid IN (SELECT rowid FROM jobs WHERE queue = :queue AND visible_at <= :now "
    "AND state = :state ORDER BY visible_at LIMIT :limit) "
    f"RETURNING {COLUMNS}"
)
# Whether SQL_LEASE would find anything: an UPDATE that finds nothing costs ~25 us, this ~5 us,
# and most lease calls look for expired leases that are not there.
SQL_ANY_VISIBLE = (
    "SELECT 1 FROM jobs WHERE queue = ? AND state = ? AND visible_at <= ? "
    "AND visible_at IS NOT NULL LIMIT 1"
)
SQL_COUNT = (
    "INSERT INTO queue_counts (queue, state, n) VALUES (?, ?, ?) "
    "ON CONFLICT (queue, state) DO UPDATE SET n = n + excluded.n"
)
SQL_HEARTBEAT = (
    "UPDATE jobs SET visible_at = ? WHERE id = ? AND lease_token = ? AND state = 'running' "
    "RETURNING cancel_requested"
)
# One lease-fenced partial update: a NULL parameter leaves its column as it is.
SQL_UPDATE = (
    "UPDATE jobs SET progress = coalesce(?, progress), steps = coalesce(?, steps), "
    "checkpoint = coalesce(?, checkpoint), version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
SQL_REQUEUE = (
    "UPDATE jobs SET state = 'queued', attempts = attempts - ?, ready_at = ?, visible_at = ?, "
    "started_at = ?, error = coalesce(?, error), lease_token = NULL, worker = NULL, "
    "version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
SQL_END = (
    "UPDATE jobs SET state = ?, attempts = attempts - ?, started_at = ?, finished_at = ?, "
    "result = ?, error = ?, expires_at = ?, "
    "visible_at = NULL, lease_token = NULL, worker = NULL, version = version + 1 "
    "WHERE id = ? AND lease_token = ? AND state = 'running'"
)
SQL_CANCEL_QUEUED = (
    "UPDATE jobs SET state = 'cancelled', finished_at = ?, visible_at = NULL, "
    f"version = version + 1 WHERE id = ? AND state = 'queued' RETURNING {COLUMNS}"
)
SQL_CANCEL_RUNNING = (
    "UPDATE jobs SET cancel_requested = 1, version = version + 1 "
    f"WHERE id = ? AND state = 'running' AND cancel_requested = 0 RETURNING {COLUMNS}"
)
SQL_GET = f"SELECT {COLUMNS} FROM jobs WHERE id = ?"
DEAD_STATES = ("failed", "cancelled")  # jobs_dead's partial index covers exactly these
DEAD_CLAUSE = "state IN ('failed', 'cancelled')"
SQL_REDRIVE = (
    "UPDATE jobs SET state = 'queued', attempts = :attempts, ready_at = :ready, "
    "visible_at = :ready, "
    "finished_at = NULL, error = NULL, version = version + 1 "
    "WHERE queue = :queue AND state = 'failed' AND state IN ('failed', 'cancelled') "
    "RETURNING id, key"  # the IN term lets SQLite use jobs_dead (see list_jobs)
)
SQL_DELETE = "DELETE FROM jobs WHERE id = ?"
# Expired terminal jobs, found through jobs_expires; bounded per call.
SQL_SWEEP = (
    "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE expires_at <= ? "
    "AND state IN ('succeeded', 'cancelled', 'failed') ORDER BY expires_at LIMIT ?) "
    f"RETURNING {COLUMNS}"
)
# A purge (DELETE /v1/cache) is an operator's rare act: it walks the succeeded jobs in batches.
# Droppable results, walked in id order from a cursor (the primary key's index), so a purge of a
# million results reads each row once, and outside the write lock.
SQL_DROPPABLE = (
    "SELECT id FROM jobs WHERE id > ? AND state = 'succeeded' AND sticky = ? "
    "AND result IS NOT NULL AND result ->> 'area' IS NOT 'dropped' AND finished_at <= ? "
    "ORDER BY id LIMIT ?"
)
SQL_DROP_TAKE = (
    f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND state = 'succeeded' "
    "AND result IS NOT NULL AND result ->> 'area' IS NOT 'dropped'"
)
SQL_DROP = "UPDATE jobs SET result = ?, version = version + 1 WHERE id = ?"
SQL_STATS = "SELECT queue, state, n FROM queue_counts WHERE n > 0"
SQL_OLDEST = (
    "SELECT min(visible_at) FROM jobs WHERE queue = ? AND visible_at <= ? AND state = 'queued'"
)

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
CHECKPOINT_INTERVAL = 1.0  # seconds between passive checkpoints
# Calls touching more rows than this take the hop to the connection's thread even when the lock
# is free: a 1,000-job insert would hold the event loop for ~25 ms.
HERE_MAX_ROWS = 256


_decode_job = msgspec.json.Decoder(Job, strict=False).decode
_decode_group = msgspec.json.Decoder(GroupRecord).decode


def _enc(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _opt(value: Any) -> str | None:
    return None if value is None else _enc(value)


def _row_to_job(row: Sequence[Any]) -> Job:
    return _decode_job(row[0])


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
    sql = f"SELECT {COLUMNS} FROM jobs"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit + 1)
    return sql, params


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _Thread:
    """One connection owned by one thread (every call one hop to it and back), plus, for small
    calls, a second connection used on the event loop's own thread that never waits for a lock.

    A hop costs 100-300 µs of wake-ups, ten times the SQL of a small call; a small call made in
    place answers in tens of µs. In place is only tried with ``busy_timeout = 0``: if another
    connection (another process, or this thread's) holds the lock, SQLite says so at once,
    before anything ran, and the call takes the hop instead, where waiting is harmless. WAL
    readers never wait for writers, and checkpoints run elsewhere, so in place never blocks.
    """

    def __init__(self, path: str, name: str, synchronous: str = "NORMAL") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._path = path
        self._synchronous = synchronous
        self._closed = False
        self.conn: sqlite3.Connection | None = None
        self._here: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        for pragma in PRAGMAS:
            conn.execute(pragma)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, here: bool = True) -> T:
        try:
            if here and not self._closed:
                try:
                    return fn(self._here or self._open_here())
                except sqlite3.OperationalError as exc:
                    if not _busy(exc):
                        raise
                    # Held elsewhere: take the hop and wait there.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._call, fn)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise BackendUnavailable(f"sqlite is busy: {exc}") from exc
            raise BackendError(f"sqlite failed: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise BackendError(f"sqlite failed: {exc}") from exc

    def _open_here(self) -> sqlite3.Connection:
        conn = self._here = self._open()
        conn.execute("PRAGMA busy_timeout = 0")
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.conn is None:
            self.conn = self._open()
        return fn(self.conn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)
        if self._here is not None:
            self._here.close()
            self._here = None


# Changes to ``queue_counts`` made by one transaction, written once at its end.
_Counts = StateCounts


class SqliteQueue(QueueBackend):
    """See the module docstring."""

    name = "sqlite"

    def __init__(
        self, path: str, *, clock: Clock = SYSTEM_CLOCK, synchronous: str = "NORMAL"
    ) -> None:
        super().__init__(clock=clock)
        self.path = os.path.abspath(path)
        self._synchronous = synchronous.upper()
        sync = self._synchronous
        self._writer = _Thread(self.path, "arqd-sqlite-w", sync)
        self._reader = _Thread(self.path, "arqd-sqlite-r", sync)
        self._checkpointer = _Thread(self.path, "arqd-sqlite-c", sync)
        self._checkpoints: asyncio.Task[None] | None = None
        self._drop_cursor: dict[bool, str] = {}  # drop_results' walk, per area

    @property
    def identity(self) -> str:
        return f"sqlite:{self.path}"

    async def open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        sync = self._synchronous
        if sync not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise BackendError(f"unknown sqlite synchronous mode {sync!r}")

        def setup(conn: sqlite3.Connection) -> None:
            conn.executescript(SCHEMA)

        await self._writer.run(setup, here=False)
        self._checkpoints = asyncio.create_task(self._checkpoint_loop(), name="arqd-checkpoint")

    async def aclose(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
        for thread in (self._writer, self._reader, self._checkpointer):
            await asyncio.to_thread(thread.close)

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database off the writer's path, so no lease or finish pays for
        a checkpoint (one took 20+ ms inline). PASSIVE never blocks readers or writers."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await self._checkpointer.run(
                    lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                )
            except BackendError:
                continue

    # --- writes -----------------------------------------------------------------------------------

    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None
    ) -> list[Enqueued]:
        # Every row (and the record) is converted before the transaction begins; inside it, a
        # failure rolls everything back.
        rows = convert_all(jobs, _convert)
        checked = storable_group(group, jobs).decode() if group is not None else None
        now = self.clock.time()

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[Enqueued]:
            out: list[Enqueued] = []
            plain: list[tuple[Any, ...]] = []
            for new, (params, job) in zip(jobs, rows, strict=True):
                if new.key is not None:
                    holder = conn.execute(SQL_KEY_HOLDER, (new.key, now)).fetchone()
                    if holder is not None:
                        row = conn.execute(SQL_GET, (holder[0],)).fetchone()
                        if row is not None:
                            out.append(Enqueued(_row_to_job(row), created=False))
                            continue
                    conn.execute(SQL_KEY_TAKE, (new.key, new.id))
                    conn.execute(SQL_INSERT, params)
                else:
                    plain.append(params)
                counts.add(new.queue, "queued", 1)
                out.append(Enqueued(job, created=True))
            if plain:
                conn.executemany(SQL_INSERT, plain)
            if group is not None and checked is not None:
                record = checked
                if any(not e.created for e in out):  # name the jobs that answer instead
                    record = _enc(group_record(group, [e.job.id for e in out]))
                conn.execute(SQL_GROUP_INSERT, (group.id, group.created_at, record))
            return out

        return await self._write(body, here=len(jobs) <= HERE_MAX_ROWS)

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        now = self.clock.time()
        token = new_token()
        expires = now + lease_for

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[Lease]:
            leases: list[Lease] = []
            params = {"now": now, "token": token, "expires": expires, "worker": worker}
            for queue in queues:
                # Expired leases first (their jobs are the oldest), then ready jobs.
                for state in ("running", "queued"):
                    if len(leases) >= limit:
                        return leases
                    if conn.execute(SQL_ANY_VISIBLE, (queue, state, now)).fetchone() is None:
                        continue
                    params.update(queue=queue, state=state, limit=limit - len(leases))
                    rows = conn.execute(SQL_LEASE, params).fetchall()
                    jobs = sorted(map(_row_to_job, rows), key=fifo)
                    recovered = state == "running"
                    leases.extend(Lease(job, token, expires, recovered) for job in jobs)
                    if state == "queued" and rows:
                        counts.add(queue, "queued", -len(rows))
                        counts.add(queue, "running", len(rows))
            return leases

        return await self._write(body, here=limit <= HERE_MAX_ROWS)

    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        until = self.clock.time() + lease_for

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[HeartbeatReply]:
            replies = []
            for job_id, token in leases:
                row = conn.execute(SQL_HEARTBEAT, (until, job_id, token)).fetchone()
                replies.append(
                    HeartbeatReply(held=row is not None, cancel_requested=bool(row and row[0]))
                )
            return replies

        return await self._write(body, here=len(leases) <= HERE_MAX_ROWS)

    async def _update(self, updates: Sequence[Update]) -> list[bool]:
        params = [
            (
                _opt(u.progress),
                _opt(u.steps),
                _opt(u.checkpoint if u.steps is not None else None),
                u.job_id,
                u.token,
            )
            for u in updates
        ]

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[bool]:
            return [conn.execute(SQL_UPDATE, p).rowcount == 1 for p in params]

        return await self._write(body, here=len(updates) <= HERE_MAX_ROWS)

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        now = self.clock.time()

        def one(conn: sqlite3.Connection, counts: _Counts, o: Outcome) -> bool:
            job = o.job
            if o.state is State.QUEUED:
                ready = o.ready_at if o.ready_at is not None else now
                params: tuple[Any, ...] = (
                    0 if o.count_attempt else 1,
                    ready,
                    ready,
                    o.started_at,
                    _opt(o.error),
                    job.id,
                    o.token,
                )
                applied = conn.execute(SQL_REQUEUE, params).rowcount == 1
            else:
                params = (
                    o.state.value,
                    0 if o.count_attempt else 1,
                    o.started_at,
                    now,
                    _opt(o.result),
                    _opt(o.error),
                    o.expires_at,
                    job.id,
                    o.token,
                )
                applied = conn.execute(SQL_END, params).rowcount == 1
                if applied and job.key is not None:
                    if o.free_key:
                        conn.execute(SQL_KEY_FREE, (job.key, job.id))
                    elif not o.keep_key:
                        conn.execute(SQL_KEY_EXPIRES, (o.expires_at, job.key, job.id))
            if applied:
                counts.add(job.queue, "running", -1)
                counts.add(job.queue, o.state.value, 1)
            return applied

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[bool]:
            return [one(conn, counts, o) for o in outcomes]

        return await self._write(body, here=len(outcomes) <= HERE_MAX_ROWS)

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        now = self.clock.time()

        def body(conn: sqlite3.Connection, counts: _Counts) -> Job | None:
            row = conn.execute(SQL_CANCEL_QUEUED, (now, job_id)).fetchone()
            if row is not None:
                job = _row_to_job(row)
                counts.add(job.queue, "queued", -1)
                counts.add(job.queue, "cancelled", 1)
                if free_key and job.key is not None:
                    conn.execute(SQL_KEY_FREE, (job.key, job.id))
                return job
            row = conn.execute(SQL_CANCEL_RUNNING, (job_id,)).fetchone()
            if row is None:
                row = conn.execute(SQL_GET, (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._write(body)

    async def _delete(self, job_id: str) -> Job | None:
        def body(conn: sqlite3.Connection, counts: _Counts) -> Job | None:
            row = conn.execute(SQL_GET, (job_id,)).fetchone()
            if row is None:
                return None
            job = _row_to_job(row)
            if job.state.terminal:
                conn.execute(SQL_DELETE, (job_id,))
                counts.add(job.queue, job.state.value, -1)
                if job.key is not None:
                    conn.execute(SQL_KEY_FREE, (job.key, job.id))
            return job

        return await self._write(body)

    async def _redrive(self, plan: Redrive) -> int:
        now = self.clock.time()
        params = {"ready": plan.ready_at, "attempts": plan.attempts, "queue": plan.queue}

        def body(conn: sqlite3.Connection, counts: _Counts) -> int:
            rows = conn.execute(SQL_REDRIVE, params).fetchall()
            for job_id, key in rows if plan.take_keys else ():
                if key is not None and not conn.execute(SQL_KEY_HOLDER, (key, now)).fetchone():
                    conn.execute(SQL_KEY_TAKE, (key, job_id))
            counts.move(plan.queue, "failed", "queued", len(rows))
            return len(rows)

        return await self._write(body, here=False)  # every failed job of a queue

    async def _write(
        self, body: Callable[[sqlite3.Connection, _Counts], T], *, here: bool = True
    ) -> T:
        """Run ``body`` in one write transaction, with the count changes it made."""

        def work(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                counts = _Counts()
                out = body(conn, counts)
                if counts:
                    conn.executemany(SQL_COUNT, counts.rows())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

        return await self._writer.run(work, here=here)

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        def work(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(SQL_GET, (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._reader.run(work)

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        def work(conn: sqlite3.Connection) -> list[Job | None]:
            found: dict[str, Job] = {}
            ids = list(job_ids)
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {COLUMNS} FROM jobs WHERE id IN ({marks})"
                for row in conn.execute(sql, chunk):
                    job = _row_to_job(row)
                    found[job.id] = job
            return [found.get(i) for i in ids]

        return await self._reader.run(work, here=len(job_ids) <= HERE_MAX_ROWS)

    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        def work(conn: sqlite3.Connection) -> dict[str, int]:
            marks = ",".join("?" * len(job_ids))
            sql = f"SELECT id, version FROM jobs WHERE id IN ({marks})"
            return dict(conn.execute(sql, list(job_ids)).fetchall())

        # Always on the reader's thread: the follower asks for thousands a second, in the
        # background, and sqlite lets the event loop run meanwhile (250 lookups in a million
        # rows: ~2.5 ms that long-polls and status polls then do not wait behind).
        return await self._reader.run(work, here=False)

    async def _find_by_key(self, key: str) -> Job | None:
        now = self.clock.time()

        def work(conn: sqlite3.Connection) -> Job | None:
            holder = conn.execute(SQL_KEY_HOLDER, (key, now)).fetchone()
            if holder is None:
                return None
            row = conn.execute(SQL_GET, (holder[0],)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._reader.run(work)

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        sql, params = list_sql(where, limit, cursor)

        def work(conn: sqlite3.Connection) -> tuple[list[Job], str | None]:
            jobs = [_row_to_job(r) for r in conn.execute(sql, params)]
            more = len(jobs) > limit
            jobs = jobs[:limit]
            return jobs, (jobs[-1].id if more else None)

        # A filter on a rare value can walk many rows before it finds ``limit``.
        return await self._reader.run(work, here=False)

    async def _stats(self) -> list[QueueStats]:
        now = self.clock.time()

        def work(conn: sqlite3.Connection) -> list[QueueStats]:
            counts: dict[str, dict[str, int]] = {}
            for queue, state, n in conn.execute(SQL_STATS):
                counts.setdefault(queue, {})[state] = n
            out = []
            for queue, per in sorted(counts.items()):
                oldest = None
                if per.get("queued"):
                    (first,) = conn.execute(SQL_OLDEST, (queue, now)).fetchone()
                    oldest = None if first is None else now - first
                out.append(QueueStats(name=queue, **per, oldest_queued_seconds=oldest))
            return out

        return await self._reader.run(work)

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        def work(conn: sqlite3.Connection) -> GroupRecord | None:
            row = conn.execute("SELECT record FROM groups WHERE id = ?", (group_id,)).fetchone()
            return None if row is None else _decode_group(row[0])

        return await self._reader.run(work)

    async def _sweep_expired(self, limit: int) -> list[Job]:
        now = self.clock.time()

        def body(conn: sqlite3.Connection, counts: _Counts) -> list[Job]:
            jobs = [_row_to_job(r) for r in conn.execute(SQL_SWEEP, (now, limit))]
            for job in jobs:
                counts.add(job.queue, job.state.value, -1)
                if job.key is not None:
                    conn.execute(SQL_KEY_FREE, (job.key, job.id))
            return jobs

        return await self._write(body)

    async def _drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        """Walk the droppable results from where the previous call stopped (an empty answer
        ends the walk and resets it), finding them on the reader, then drop each one in a short
        write transaction that checks it is still droppable."""
        dropped = _enc(ResultRef(area=DROPPED))
        until = math.inf if before is None else before
        while True:
            params = (self._drop_cursor.get(sticky, ""), int(sticky), until, limit)

            def find(conn: sqlite3.Connection, p: tuple[Any, ...] = params) -> list[str]:
                return [r[0] for r in conn.execute(SQL_DROPPABLE, p)]

            ids = await self._reader.run(find, here=False)
            if not ids:
                self._drop_cursor.pop(sticky, None)
                return []
            self._drop_cursor[sticky] = ids[-1]

            def body(conn: sqlite3.Connection, counts: _Counts, ids: list[str] = ids) -> list[Job]:
                jobs = []
                for job_id in ids:
                    row = conn.execute(SQL_DROP_TAKE, (job_id,)).fetchone()
                    if row is None:
                        continue  # dropped or deleted meanwhile
                    job = _row_to_job(row)
                    conn.execute(SQL_DROP, (dropped, job.id))
                    if job.key is not None and frees_key(job):
                        conn.execute(SQL_KEY_FREE, (job.key, job.id))
                    jobs.append(job)
                return jobs

            jobs = await self._write(body)
            if jobs:
                return jobs

    async def _register_worker(self, info: WorkerInfo) -> None:
        row = (info.id, info.host, info.started_at, info.last_seen, info.running, info.concurrency)

        def body(conn: sqlite3.Connection, counts: _Counts) -> None:
            conn.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?)", row)
            # Rows of workers gone for a day are dropped by whoever registers next.
            conn.execute("DELETE FROM workers WHERE last_seen < ?", (info.last_seen - 86400,))

        await self._write(body)

    async def _remove_worker(self, worker_id: str) -> None:
        def body(conn: sqlite3.Connection, counts: _Counts) -> None:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

        await self._write(body)

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        def work(conn: sqlite3.Connection) -> list[WorkerInfo]:
            rows = conn.execute(
                "SELECT id, host, started_at, last_seen, running, concurrency FROM workers "
                "WHERE last_seen >= ? ORDER BY id",
                (seen_since,),
            )
            return [
                WorkerInfo(
                    id=r[0],
                    host=r[1],
                    started_at=r[2],
                    last_seen=r[3],
                    running=r[4],
                    concurrency=r[5],
                )
                for r in rows
            ]

        return await self._reader.run(work)

    async def _ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _advance_mark(self, name: str, value: float) -> float | None:
        def body(conn: sqlite3.Connection, counts: _Counts) -> float | None:
            row = conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
            if row is None or row[0] < value:
                conn.execute(
                    "INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (name, value)
                )
            return None if row is None else float(row[0])

        return await self._write(body)

    async def _get_mark(self, name: str) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
            return None if row is None else float(row[0])

        return await self._reader.run(work)


def _convert(new: NewJob) -> tuple[tuple[Any, ...], Job]:
    """The row of ``new`` and its first record, each value converted and checked."""
    return _insert_params(new), storable_job(new)


def _insert_params(new: NewJob) -> tuple[Any, ...]:
    return (
        new.id,
        new.queue,
        new.handler,
        _enc(new.payload),
        new.key,
        int(new.sticky),
        _enc(new.meta) if new.meta else None,
        new.max_attempts,
        new.timeout,
        new.created_at,
        new.ready_at,
        _opt(new.steps),
        new.group_id,
        new.owner,
        new.ready_at,
        new.name,
    )
