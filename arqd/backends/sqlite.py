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

from arqd.backends import sqlite_queries as queries
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
        for pragma in queries.PRAGMAS:
            conn.execute(pragma)
        conn.execute(queries.synchronous(self._synchronous))
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
        conn.execute(queries.HERE_PRAGMA)
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
            conn.executescript(queries.SCHEMA)

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
                    lambda conn: conn.execute(queries.CHECKPOINT).fetchone()
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

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[Enqueued]:
            out: list[Enqueued] = []
            plain: list[tuple[Any, ...]] = []
            for new, (params, job) in zip(jobs, rows, strict=True):
                if new.key is not None:
                    holder = conn.execute(queries.KEY_HOLDER, (new.key, now)).fetchone()
                    if holder is not None:
                        row = conn.execute(queries.GET, (holder[0],)).fetchone()
                        if row is not None:
                            out.append(Enqueued(_row_to_job(row), created=False))
                            continue
                    conn.execute(queries.KEY_TAKE, (new.key, new.id))
                    conn.execute(queries.INSERT, params)
                else:
                    plain.append(params)
                counts.add(new.queue, "queued", 1)
                out.append(Enqueued(job, created=True))
            if plain:
                conn.executemany(queries.INSERT, plain)
            if group is not None and checked is not None:
                record = checked
                if any(not e.created for e in out):  # name the jobs that answer instead
                    record = _enc(group_record(group, [e.job.id for e in out]))
                conn.execute(queries.GROUP_INSERT, (group.id, group.created_at, record))
            return out

        return await self._write(body, here=len(jobs) <= HERE_MAX_ROWS)

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        now = self.clock.time()
        token = new_token()
        expires = now + lease_for

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[Lease]:
            leases: list[Lease] = []
            params = {"now": now, "token": token, "expires": expires, "worker": worker}
            for queue in queues:
                # Expired leases first (their jobs are the oldest), then ready jobs.
                for state in ("running", "queued"):
                    if len(leases) >= limit:
                        return leases
                    if conn.execute(queries.ANY_VISIBLE, (queue, state, now)).fetchone() is None:
                        continue
                    params.update(queue=queue, state=state, limit=limit - len(leases))
                    rows = conn.execute(queries.LEASE, params).fetchall()
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

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[HeartbeatReply]:
            replies = []
            for job_id, token in leases:
                row = conn.execute(queries.HEARTBEAT, (until, job_id, token)).fetchone()
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

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[bool]:
            return [conn.execute(queries.UPDATE, p).rowcount == 1 for p in params]

        return await self._write(body, here=len(updates) <= HERE_MAX_ROWS)

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        now = self.clock.time()

        def one(conn: sqlite3.Connection, counts: StateCounts, o: Outcome) -> bool:
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
                applied = conn.execute(queries.REQUEUE, params).rowcount == 1
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
                applied = conn.execute(queries.END, params).rowcount == 1
                if applied and job.key is not None:
                    if o.free_key:
                        conn.execute(queries.KEY_FREE, (job.key, job.id))
                    elif not o.keep_key:
                        conn.execute(queries.KEY_EXPIRES, (o.expires_at, job.key, job.id))
            if applied:
                counts.add(job.queue, "running", -1)
                counts.add(job.queue, o.state.value, 1)
            return applied

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[bool]:
            return [one(conn, counts, o) for o in outcomes]

        return await self._write(body, here=len(outcomes) <= HERE_MAX_ROWS)

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        now = self.clock.time()

        def body(conn: sqlite3.Connection, counts: StateCounts) -> Job | None:
            row = conn.execute(queries.CANCEL_QUEUED, (now, job_id)).fetchone()
            if row is not None:
                job = _row_to_job(row)
                counts.add(job.queue, "queued", -1)
                counts.add(job.queue, "cancelled", 1)
                if free_key and job.key is not None:
                    conn.execute(queries.KEY_FREE, (job.key, job.id))
                return job
            row = conn.execute(queries.CANCEL_RUNNING, (job_id,)).fetchone()
            if row is None:
                row = conn.execute(queries.GET, (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._write(body)

    async def _delete(self, job_id: str) -> Job | None:
        def body(conn: sqlite3.Connection, counts: StateCounts) -> Job | None:
            row = conn.execute(queries.GET, (job_id,)).fetchone()
            if row is None:
                return None
            job = _row_to_job(row)
            if job.state.terminal:
                conn.execute(queries.DELETE, (job_id,))
                counts.add(job.queue, job.state.value, -1)
                if job.key is not None:
                    conn.execute(queries.KEY_FREE, (job.key, job.id))
            return job

        return await self._write(body)

    async def _redrive(self, plan: Redrive) -> int:
        now = self.clock.time()
        params = {"ready": plan.ready_at, "attempts": plan.attempts, "queue": plan.queue}

        def body(conn: sqlite3.Connection, counts: StateCounts) -> int:
            rows = conn.execute(queries.REDRIVE, params).fetchall()
            for job_id, key in rows if plan.take_keys else ():
                if key is not None and not conn.execute(queries.KEY_HOLDER, (key, now)).fetchone():
                    conn.execute(queries.KEY_TAKE, (key, job_id))
            counts.move(plan.queue, "failed", "queued", len(rows))
            return len(rows)

        return await self._write(body, here=False)  # every failed job of a queue

    async def _write(
        self, body: Callable[[sqlite3.Connection, StateCounts], T], *, here: bool = True
    ) -> T:
        """Run ``body`` in one write transaction, with the count changes it made."""

        def work(conn: sqlite3.Connection) -> T:
            conn.execute(queries.BEGIN)
            try:
                counts = StateCounts()
                out = body(conn, counts)
                if counts:
                    conn.executemany(queries.COUNT, counts.rows())
            except BaseException:
                conn.execute(queries.ROLLBACK)
                raise
            conn.execute(queries.COMMIT)
            return out

        return await self._writer.run(work, here=here)

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        def work(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(queries.GET, (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._reader.run(work)

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        def work(conn: sqlite3.Connection) -> list[Job | None]:
            found: dict[str, Job] = {}
            ids = list(job_ids)
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                sql = queries.in_list(queries.GET_MANY, len(chunk))
                for row in conn.execute(sql, chunk):
                    job = _row_to_job(row)
                    found[job.id] = job
            return [found.get(i) for i in ids]

        return await self._reader.run(work, here=len(job_ids) <= HERE_MAX_ROWS)

    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        def work(conn: sqlite3.Connection) -> dict[str, int]:
            sql = queries.in_list(queries.VERSIONS, len(job_ids))
            return dict(conn.execute(sql, list(job_ids)).fetchall())

        # Always on the reader's thread: the follower asks for thousands a second, in the
        # background, and sqlite lets the event loop run meanwhile (250 lookups in a million
        # rows: ~2.5 ms that long-polls and status polls then do not wait behind).
        return await self._reader.run(work, here=False)

    async def _find_by_key(self, key: str) -> Job | None:
        now = self.clock.time()

        def work(conn: sqlite3.Connection) -> Job | None:
            holder = conn.execute(queries.KEY_HOLDER, (key, now)).fetchone()
            if holder is None:
                return None
            row = conn.execute(queries.GET, (holder[0],)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._reader.run(work)

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        sql, params = queries.list_sql(where, limit, cursor)

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
            for queue, state, n in conn.execute(queries.STATS):
                counts.setdefault(queue, {})[state] = n
            out = []
            for queue, per in sorted(counts.items()):
                oldest = None
                if per.get("queued"):
                    (first,) = conn.execute(queries.OLDEST, (queue, now)).fetchone()
                    oldest = None if first is None else now - first
                out.append(QueueStats(name=queue, **per, oldest_queued_seconds=oldest))
            return out

        return await self._reader.run(work)

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        def work(conn: sqlite3.Connection) -> GroupRecord | None:
            row = conn.execute(queries.GROUP_GET, (group_id,)).fetchone()
            return None if row is None else _decode_group(row[0])

        return await self._reader.run(work)

    async def _sweep_expired(self, limit: int) -> list[Job]:
        now = self.clock.time()

        def body(conn: sqlite3.Connection, counts: StateCounts) -> list[Job]:
            jobs = [_row_to_job(r) for r in conn.execute(queries.SWEEP, (now, limit))]
            for job in jobs:
                counts.add(job.queue, job.state.value, -1)
                if job.key is not None:
                    conn.execute(queries.KEY_FREE, (job.key, job.id))
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
                return [r[0] for r in conn.execute(queries.DROPPABLE, p)]

            ids = await self._reader.run(find, here=False)
            if not ids:
                self._drop_cursor.pop(sticky, None)
                return []
            self._drop_cursor[sticky] = ids[-1]

            def body(
                conn: sqlite3.Connection, counts: StateCounts, ids: list[str] = ids
            ) -> list[Job]:
                jobs = []
                for job_id in ids:
                    row = conn.execute(queries.DROP_TAKE, (job_id,)).fetchone()
                    if row is None:
                        continue  # dropped or deleted meanwhile
                    job = _row_to_job(row)
                    conn.execute(queries.DROP, (dropped, job.id))
                    if job.key is not None and frees_key(job):
                        conn.execute(queries.KEY_FREE, (job.key, job.id))
                    jobs.append(job)
                return jobs

            jobs = await self._write(body)
            if jobs:
                return jobs

    async def _register_worker(self, info: WorkerInfo) -> None:
        row = (info.id, info.host, info.started_at, info.last_seen, info.running, info.concurrency)

        def body(conn: sqlite3.Connection, counts: StateCounts) -> None:
            conn.execute(queries.WORKER_PUT, row)
            # Rows of workers gone for a day are dropped by whoever registers next.
            conn.execute(queries.WORKERS_FORGET, (info.last_seen - 86400,))

        await self._write(body)

    async def _remove_worker(self, worker_id: str) -> None:
        def body(conn: sqlite3.Connection, counts: StateCounts) -> None:
            conn.execute(queries.WORKER_REMOVE, (worker_id,))

        await self._write(body)

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        def work(conn: sqlite3.Connection) -> list[WorkerInfo]:
            rows = conn.execute(queries.WORKERS_SEEN, (seen_since,))
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
        await self._reader.run(lambda conn: conn.execute(queries.PING).fetchone())

    async def _advance_mark(self, name: str, value: float) -> float | None:
        def body(conn: sqlite3.Connection, counts: StateCounts) -> float | None:
            row = conn.execute(queries.MARK_GET, (name,)).fetchone()
            if row is None or row[0] < value:
                conn.execute(queries.MARK_SET, (name, value))
            return None if row is None else float(row[0])

        return await self._write(body)

    async def _get_mark(self, name: str) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(queries.MARK_GET, (name,)).fetchone()
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
