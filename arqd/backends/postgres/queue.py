"""The PostgreSQL queue backend: many daemons on many hosts sharing one database (docs/postgres.md).

Design
- One ``jobs`` table. ``visible_at`` is a queued job's ``ready_at`` and a running job's lease
  deadline, so one partial index ``(queue, visible_at, id) WHERE state IN ('queued','running')``
  finds ready jobs and expired leases alike: no sweeper is needed to find a dead consumer's job.
- A lease batch is one statement: ``FOR UPDATE SKIP LOCKED`` down that index, queue by queue;
  every later write about a leased job names its lease token (fencing, as on sqlite). A batch of
  outcomes, of heartbeats or of updates is one statement too (arrays, ``unnest``).
- Keys live in ``dedupe``; ``INSERT .. ON CONFLICT`` takes one atomically against a concurrent
  submit. Per-(queue, state) counts live in ``queue_counts`` (a few shards), written in the same
  transaction as the jobs they count, so stats never scan.
- Wake-ups cross hosts with LISTEN/NOTIFY: a submit notifies its queue's channel in its own
  transaction (PostgreSQL delivers it once, at commit); one dedicated connection per backend
  listens to the queues it leases from and wakes the local consumers. Polling stays the fallback.
- Faults that a retry can outlive (connection lost, server restarting, statement timeout,
  deadlock, serialization) are :class:`BackendUnavailable`; others :class:`BackendError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
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
    group_record,
    storable_group,
    storable_job,
)
from arqd.backends.network import Heard, LeaseFailed, Lost, LostLeases
from arqd.backends.postgres import queries as q
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import PG_SCHEMA, redact_dsn
from arqd.errors import BackendError, BackendUnavailable, InvalidRequest, Unstorable
from arqd.model import DROPPED, GroupRecord, Job, NewJob, ResultRef, State, new_token

T = TypeVar("T")
log = logging.getLogger("arqd.postgres")

SCHEMA_RE = re.compile(PG_SCHEMA)
LISTEN_RETRY_MAX = 5.0  # seconds between attempts to reconnect the listening connection
LISTEN_KEEPALIVE = 5.0  # seconds between keep-alives of the listening connection

_decode_job = msgspec.json.Decoder(Job, strict=False).decode
_decode_group = msgspec.json.Decoder(GroupRecord).decode

# What a retry can outlive: the connection, the server's state, a timeout, a lost race.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection the server killed while a statement ran can leave asyncpg's protocol mid-
    # error ("cannot switch to state 11; another operation (2) is in progress"): seen under load
    # in test_a_dropped_connection_is_unavailable_then_recovers; the next connection works.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, starting up, statement timeout
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    OSError,
    TimeoutError,
)


def _enc(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _opt(value: Any) -> str | None:
    return None if value is None else _enc(value)


def _fetching(sql: str, *args: Any) -> Callable[[asyncpg.Connection], Awaitable[list[Any]]]:
    """A body for ``_call``: ``sql`` fetched with ``args``."""

    async def fetch(conn: asyncpg.Connection) -> list[Any]:
        rows: list[Any] = await conn.fetch(sql, *args)
        return rows

    return fetch


def _finish_columns(outcomes: Sequence[Outcome], now: float) -> list[Any]:
    """FINISH's first parameters: one array per column, one element per outcome, then the
    finish time, then the key rules (free now, keep forever)."""
    cols: list[list[Any]] = [[] for _ in range(9)]
    for o in outcomes:
        ready = None
        if o.state is State.QUEUED:
            ready = o.ready_at if o.ready_at is not None else now
        values = (
            o.job.id,
            o.token,
            o.state.value,
            0 if o.count_attempt else 1,
            o.started_at,
            _opt(o.result),
            _opt(o.error),
            o.expires_at,
            ready,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    return [
        *cols,
        now,
        [o.free_key for o in outcomes],
        [o.keep_key for o in outcomes],
        [_finished_by(o) for o in outcomes],
    ]


def _finished_by(o: Outcome) -> str:
    """``<token>:<digest of the outcome>``: a retry of this very outcome (its answer lost)
    matches it; another outcome of the same lease does not."""
    what = (o.job.id, o.state.value, o.count_attempt, o.started_at, o.expires_at, o.ready_at)
    text = repr((what, _opt(o.result), _opt(o.error)))
    return f"{o.token}:{hashlib.blake2b(text.encode(), digest_size=12).hexdigest()}"


def _job(text: str) -> Job:
    return _decode_job(text)


class PostgresQueue(QueueBackend):
    """See the module docstring. ``connection=`` on enqueue: docs/postgres.md."""

    name = "postgres"
    multi_host = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "arqd",
        pool_size: int = 10,
        statement_timeout: float = 10.0,
        migrate: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(clock=clock)
        if not SCHEMA_RE.match(schema):
            raise BackendError(f"postgres schema {schema!r}: lower-case letters, digits and _")
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self.migrate = migrate
        self._pool: asyncpg.Pool | None = None
        self._heard = Heard()  # the cores' wake-up callbacks
        self._lost = LostLeases()  # lease calls whose answer was lost
        self._done_channel = q.done_channel(schema)
        self._channels: dict[str, str] = {}  # queue -> channel, for the queues leased from
        self._listen_changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while the listening connection is up
        self.listened: set[str] = set()  # the channels it LISTENs to
        self._drop_cursor: dict[bool, str] = {}

    def __repr__(self) -> str:
        return f"PostgresQueue({redact_dsn(self.dsn)!r}, schema={self.schema!r})"

    @property
    def identity(self) -> str:
        return f"postgres:{redact_dsn(self.dsn)}#{self.schema}"

    # --- connections ------------------------------------------------------------------------------

    def _settings(self, application: str = "arqd") -> dict[str, str]:
        return {
            "search_path": self.schema,
            "statement_timeout": str(max(1, int(self.statement_timeout * 1000))),
            "application_name": application,
        }

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                server_settings=self._settings(),
                timeout=self.statement_timeout,
                command_timeout=self.statement_timeout + 1,
                reset=_keep_session,
            )
        except Exception as exc:
            raise _translate(exc) from None
        try:
            if self.migrate:
                await migrate(self._pool, self.schema)
            else:
                await self._call(_check_version)
        except BaseException:
            pool, self._pool = self._pool, None
            pool.terminate()  # a refused open leaves no connection behind
            raise
        self._listener = asyncio.create_task(self._listen_loop(), name="arqd-pg-listen")

    async def init_db(self) -> list[str]:
        """Create or migrate the schema on one connection, then close it (``arqd init-db``)."""
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=1, timeout=self.statement_timeout
            )
        except Exception as exc:
            raise _translate(exc) from None
        try:
            return await migrate(pool, self.schema)
        finally:
            pool.terminate()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # a pool that cannot close cleanly is cut
                pool.terminate()

    async def _call(self, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``body`` on a pooled connection, its faults translated."""
        if self._pool is None:
            raise BackendUnavailable("the postgres backend is not open")
        try:
            async with self._pool.acquire(timeout=self.statement_timeout) as conn:
                return await body(conn)
        except (BackendError, InvalidRequest):
            raise
        except Exception as exc:
            raise _translate(exc) from None

    async def _write(
        self,
        body: Callable[[asyncpg.Connection, StateCounts], Awaitable[T]],
        connection: Any = None,
    ) -> T:
        """``body`` in one transaction with the count changes it made (on ``connection``, the
        caller's own, inside its transaction, when given)."""

        async def work(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                counts = StateCounts()
                out = await body(conn, counts)
                await _write_counts(conn, counts)
                return out

        if connection is None:
            return await self._call(work)
        return await self._in_callers(connection, work)

    async def _in_callers(self, conn: Any, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if not isinstance(conn, asyncpg.Connection):
            raise InvalidRequest("connection: an asyncpg connection is needed")
        if not conn.is_in_transaction():
            raise InvalidRequest(
                "connection: open a transaction first (the job exists if and only if it commits)"
            )
        try:
            old = await conn.fetchval("SELECT current_setting('search_path')")
            await conn.execute("SELECT set_config('search_path', $1, true)", self.schema)
            try:
                return await work(conn)
            finally:
                await conn.execute("SELECT set_config('search_path', $1, true)", old)
        except (BackendError, InvalidRequest):
            raise
        except Exception as exc:
            raise _translate(exc) from None

    # --- wake-ups -------------------------------------------------------------------------------

    def on_jobs_ready(self, callback: Callable[[], None]) -> None:
        self._heard.add_ready(callback)

    def on_jobs_changed(self, callback: Callable[[Sequence[str] | None], None]) -> None:
        if self._heard.add_changed(callback):
            self._listen_changed.set()

    def _ended(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._heard.jobs_changed(payload.split(",") if payload else None)

    def _listen_to(self, queues: Sequence[str]) -> None:
        for queue in queues:
            if queue not in self._channels:
                self._channels[queue] = q.channel(self.schema, queue)
                self._listen_changed.set()

    async def _listen_loop(self) -> None:
        """Keep one connection LISTENing to the channels of the queues leased from; on a lost
        connection, reconnect (backing off) and wake the consumers, who may have missed a
        notification meanwhile. A keep-alive every few seconds notices a silent server."""
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    server_settings=self._settings("arqd-listen"),
                    timeout=self.statement_timeout,
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await self._listen_more(conn)  # before the wake: nothing slips in between
                self.listening.set()
                self._heard.jobs_ready()  # anything submitted while nobody listened
                self._heard.jobs_changed(None)  # and anything that ended meanwhile
                delay = 0.1
                while not lost.is_set():
                    await self._listen_more(conn)
                    await _first(lost.wait(), self._listen_changed.wait(), timeout=LISTEN_KEEPALIVE)
                    if not lost.is_set() and not self._listen_changed.is_set():
                        await conn.fetchval(q.PING, timeout=self.statement_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("postgres listener lost: %s", type(exc).__name__)
            finally:
                self.listening.clear()
                self.listened.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    async def _listen_more(self, conn: asyncpg.Connection) -> None:
        """LISTEN to the channels not listened to yet; then say how many in the session's last
        query (``pg_stat_activity`` shows a test that this connection is ready)."""
        self._listen_changed.clear()
        added = False
        for ch in sorted(set(self._channels.values()) - self.listened):
            await conn.add_listener(ch, self._heard.jobs_ready)
            self.listened.add(ch)
            added = True
        if self._heard.changed and self._done_channel not in self.listened:
            await conn.add_listener(self._done_channel, self._ended)
            self.listened.add(self._done_channel)
            added = True
        if added:
            await conn.fetchval(q.listening(len(self.listened)), timeout=self.statement_timeout)

    # --- writes -----------------------------------------------------------------------------------

    async def enqueue(
        self,
        jobs: Sequence[NewJob],
        group: GroupRecord | None = None,
        *,
        connection: Any = None,
    ) -> list[Enqueued]:
        """As the contract says; with ``connection`` (an asyncpg connection in a transaction),
        the jobs are stored in the caller's transaction: they exist if and only if it commits."""
        if connection is None:
            return await super().enqueue(jobs, group)
        return await self._timed("enqueue", self._enqueue(jobs, group, connection))

    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None, connection: Any = None
    ) -> list[Enqueued]:
        rows = convert_all(jobs, _convert)
        if not rows and group is None:
            return []
        if group is None and all(new.key is None for new in jobs):
            await self._insert_plain(jobs, rows, connection)
            return [Enqueued(job, created=True) for _, job in rows]
        checked = storable_group(group, jobs).decode() if group is not None else None
        _check_text(group.id if group is not None else "", "group")
        now = self.clock.time()

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> list[Enqueued]:
            out: list[Enqueued] = []
            plain: list[tuple[Any, ...]] = []
            for new, (params, job) in zip(jobs, rows, strict=True):
                if new.key is not None:
                    took = await conn.fetchval(q.KEY_TAKE, new.key, new.id, now)
                    if took is None:
                        holder = await conn.fetchval(q.KEY_HOLDER, new.key, now)
                        text = None if holder is None else await conn.fetchval(q.GET, holder)
                        if text is not None:
                            out.append(Enqueued(_job(text), created=False))
                            continue
                        raise BackendUnavailable(f"key {new.key!r} changed hands; try again")
                    await conn.execute(q.INSERT, *params)
                else:
                    plain.append(params)
                counts.add(new.queue, "queued", 1)
                out.append(Enqueued(job, created=True))
            if plain:
                await conn.executemany(q.INSERT, plain)
            if group is not None and checked is not None:
                record = checked
                if any(not e.created for e in out):
                    record = _enc(group_record(group, [e.job.id for e in out]))
                await conn.execute(q.GROUP_INSERT, group.id, group.created_at, record)
            ready = {e.job.queue for e in out if e.created and e.job.ready_at.timestamp() <= now}
            await self._notify(conn, ready)
            return out

        return await self._write(body, connection)

    async def _insert_plain(
        self, jobs: Sequence[NewJob], rows: list[tuple[tuple[Any, ...], Job]], connection: Any
    ) -> None:
        """Jobs with no key and no group: one statement (rows, counts, NOTIFY)."""
        now = self.clock.time()
        ready = {new.queue for new in jobs if new.ready_at <= now}
        channels = sorted(q.channel(self.schema, name) for name in ready)
        cols = [list(col) for col in zip(*(params for params, _ in rows), strict=True)]
        shard = random.randrange(q.COUNT_SHARDS)

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.fetchrow(q.INSERT_MANY, *cols, shard, channels)

        if connection is None:
            await self._call(insert)
        else:
            await self._in_callers(connection, insert)

    async def _notify(self, conn: asyncpg.Connection, queues: set[str]) -> None:
        if queues:
            await conn.execute(q.NOTIFY, sorted(q.channel(self.schema, n) for n in queues))

    async def _notify_ended(self, conn: asyncpg.Connection, job_ids: Sequence[str]) -> None:
        if job_ids:
            await conn.execute(q.NOTIFY_DONE, self._done_channel, q.payloads(job_ids))

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        self._listen_to(queues)
        now = self.clock.time()

        async def lease_new(n: int) -> list[Lease]:
            lost = Lost(list(queues), new_token(), now + lease_for)
            shard = random.randrange(q.COUNT_SHARDS)
            args = (lost.queues, now, n, lost.token, lost.expires, worker, shard)
            try:
                rows = await self._call(lambda conn: conn.fetch(q.LEASE, *args))
            except BackendUnavailable as exc:  # perhaps applied, its answer lost
                raise LeaseFailed(exc, lost) from None
            token, expires = lost.token, lost.expires
            return [Lease(_job(text), token, expires, was == "running") for was, text in rows]

        return await self._lost.lease(queues, limit, now, self._look_up, lease_new)

    async def _look_up(self, lost: Lost) -> list[Lease]:
        """The jobs a lease call whose answer was lost took, still held under its token."""
        texts = await self._call(_fetching(q.LEASE_AGAIN, lost.queues, lost.expires, lost.token))
        return [Lease(_job(text), lost.token, lost.expires, False) for (text,) in texts]

    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        until = self.clock.time() + lease_for
        ids = [job_id for job_id, _ in leases]
        tokens = [token for _, token in leases]

        async def body(conn: asyncpg.Connection) -> list[HeartbeatReply]:
            rows = await conn.fetch(q.HEARTBEAT, ids, tokens, until)
            # By (id, token): a pool may hold a stale lease and a new one of the same job.
            held = {(r[0], r[1]): bool(r[2]) for r in rows}
            return [
                HeartbeatReply(held=lease in held, cancel_requested=held.get(lease, False))
                for lease in zip(ids, tokens, strict=True)
            ]

        return await self._call(body)

    async def _update(self, updates: Sequence[Update]) -> list[bool]:
        cols: list[list[Any]] = [[], [], [], [], []]
        for u in updates:
            checkpoint = u.checkpoint if u.steps is not None else None
            values = (u.job_id, u.token, _opt(u.progress), _opt(u.steps), _opt(checkpoint))
            for col, value in zip(cols, values, strict=True):
                col.append(value)

        async def body(conn: asyncpg.Connection) -> list[bool]:
            done = {(r[0], r[1]) for r in await conn.fetch(q.UPDATE, *cols)}
            return [(u.job_id, u.token) in done for u in updates]

        return await self._call(body)

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        now = self.clock.time()
        cols = _finish_columns(outcomes, now)
        shard = random.randrange(q.COUNT_SHARDS)
        # By (id, token): one batch may end a stale lease and a new one of the same job, and
        # only the one that holds the job applies (answering by id said both did).
        by_lease = {(o.job.id, o.token): o for o in outcomes}

        async def body(conn: asyncpg.Connection) -> list[bool]:
            rows = await conn.fetch(q.FINISH, *cols[:12], shard, self._done_channel, cols[12])
            ready = {
                queue
                for job_id, token, queue, state, _ in rows
                if state == "queued" and (by_lease[job_id, token].ready_at or now) <= now
            }
            await self._notify(conn, ready)  # after the commit: a requeue ready now (rare)
            applied = {(r[0], r[1]) for r in rows}
            return [(o.job.id, o.token) in applied for o in outcomes]

        return await self._call(body)

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        now = self.clock.time()

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> Job | None:
            text = await conn.fetchval(q.CANCEL_QUEUED, now, job_id)
            if text is not None:
                job = _job(text)
                counts.move(job.queue, "queued", "cancelled")
                if free_key and job.key is not None:
                    await conn.execute(q.KEY_FREE, job.key, job.id)
                await self._notify_ended(conn, [job.id])
                return job
            text = await conn.fetchval(q.CANCEL_RUNNING, job_id)
            if text is None:
                text = await conn.fetchval(q.GET, job_id)
            return None if text is None else _job(text)

        return await self._write(body)

    async def _delete(self, job_id: str) -> Job | None:
        async def body(conn: asyncpg.Connection, counts: StateCounts) -> Job | None:
            text = await conn.fetchval(q.GET_FOR_UPDATE, job_id)
            if text is None:
                return None
            job = _job(text)
            if job.state.terminal:
                await conn.execute(q.DELETE, job_id)
                counts.add(job.queue, job.state.value, -1)
                if job.key is not None:
                    await conn.execute(q.KEY_FREE, job.key, job.id)
                await self._notify_ended(conn, [job_id])
            return job

        return await self._write(body)

    async def _redrive(self, plan: Redrive) -> int:
        now = self.clock.time()

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> int:
            rows = await conn.fetch(q.REDRIVE, plan.queue, plan.attempts, plan.ready_at)
            keyed = [(key, job_id) for job_id, key in rows if key is not None]
            if plan.take_keys and keyed:
                keys, ids = (list(c) for c in zip(*keyed, strict=True))
                await conn.execute(q.REDRIVE_KEYS, keys, ids, now)
            counts.move(plan.queue, "failed", "queued", len(rows))
            if rows and plan.ready_at <= now:
                await self._notify(conn, {plan.queue})
            return len(rows)

        return await self._write(body)

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        text = await self._call(lambda conn: conn.fetchval(q.GET, job_id))
        return None if text is None else _job(text)

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        ids = list(job_ids)
        rows = await self._call(lambda conn: conn.fetch(q.GET_MANY, ids))
        found = {job.id: job for job in (_job(r[0]) for r in rows)}
        return [found.get(i) for i in ids]

    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        ids = list(job_ids)
        rows = await self._call(lambda conn: conn.fetch(q.VERSIONS, ids))
        return {r[0]: int(r[1]) for r in rows}

    async def _find_by_key(self, key: str) -> Job | None:
        now = self.clock.time()

        async def body(conn: asyncpg.Connection) -> Job | None:
            holder = await conn.fetchval(q.KEY_HOLDER, key, now)
            text = None if holder is None else await conn.fetchval(q.GET, holder)
            return None if text is None else _job(text)

        return await self._call(body)

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        sql, params = q.list_sql(where, limit, cursor)
        rows = await self._call(lambda conn: conn.fetch(sql, *params))
        jobs = [_job(r[0]) for r in rows]
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (jobs[-1].id if more else None)

    async def _stats(self) -> list[QueueStats]:
        now = self.clock.time()

        async def body(conn: asyncpg.Connection) -> list[QueueStats]:
            counts: dict[str, dict[str, int]] = {}
            for queue, state, n in await conn.fetch(q.STATS):
                if n > 0:
                    counts.setdefault(queue, {})[state] = int(n)
            out = []
            for queue, per in sorted(counts.items()):
                oldest = None
                if per.get("queued"):
                    first = await conn.fetchval(q.OLDEST, queue, now)
                    oldest = None if first is None else now - first
                out.append(QueueStats(name=queue, **per, oldest_queued_seconds=oldest))
            return out

        return await self._call(body)

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        text = await self._call(lambda conn: conn.fetchval(q.GROUP_GET, group_id))
        return None if text is None else _decode_group(text)

    # --- maintenance ------------------------------------------------------------------------------

    async def _sweep_expired(self, limit: int) -> list[Job]:
        now = self.clock.time()

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> list[Job]:
            jobs = [_job(r[0]) for r in await conn.fetch(q.SWEEP, now, limit)]
            keyed = [(j.key, j.id) for j in jobs if j.key is not None]
            for job in jobs:
                counts.add(job.queue, job.state.value, -1)
            if keyed:
                await conn.execute(q.KEYS_FREE, *map(list, zip(*keyed, strict=True)))
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
        ends the walk and resets it), each batch found and dropped in one transaction."""
        dropped = _enc(ResultRef(area=DROPPED))
        until = math.inf if before is None else before
        cursor = self._drop_cursor.get(sticky, "")

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> list[Job]:
            rows = await conn.fetch(q.DROPPABLE, cursor, sticky, until, limit)
            jobs = [_job(r[0]) for r in rows]
            if jobs:
                await conn.execute(q.DROP, dropped, [j.id for j in jobs])
                keyed = [(j.key, j.id) for j in jobs if j.key is not None and frees_key(j)]
                if keyed:
                    await conn.execute(q.KEYS_FREE, *map(list, zip(*keyed, strict=True)))
            return jobs

        jobs = await self._write(body)
        if jobs:
            self._drop_cursor[sticky] = jobs[-1].id
        else:
            self._drop_cursor.pop(sticky, None)
        return jobs

    # --- the registry, marks, ping --------------------------------------------------------------

    async def _register_worker(self, info: WorkerInfo) -> None:
        row = (info.id, info.host, info.started_at, info.last_seen, info.running, info.concurrency)

        async def body(conn: asyncpg.Connection, counts: StateCounts) -> None:
            await conn.execute(q.WORKER_PUT, *row)
            await conn.execute(q.WORKERS_FORGET, info.last_seen - 86400)

        await self._write(body)

    async def _remove_worker(self, worker_id: str) -> None:
        await self._call(lambda conn: conn.execute(q.WORKER_REMOVE, worker_id))

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = await self._call(lambda conn: conn.fetch(q.WORKERS_SEEN, seen_since))
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

    async def _advance_mark(self, name: str, value: float) -> float | None:
        async def body(conn: asyncpg.Connection, counts: StateCounts) -> float | None:
            while True:
                old = await conn.fetchval(q.MARK_LOCK, name)
                if old is None:
                    if await conn.fetchval(q.MARK_INSERT, name, value) is not None:
                        return None
                    continue  # inserted by another transaction meanwhile: lock that row
                if old < value:
                    await conn.execute(q.MARK_SET, name, value)
                return float(old)

        return await self._write(body)

    async def _get_mark(self, name: str) -> float | None:
        value = await self._call(lambda conn: conn.fetchval(q.MARK_GET, name))
        return None if value is None else float(value)

    async def _ping(self) -> None:
        await self._call(lambda conn: conn.fetchval(q.PING))


# --- helpers --------------------------------------------------------------------------------------


async def _first(*aws: Awaitable[Any], timeout: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _translate(exc: BaseException) -> BackendError:
    """A driver's fault as the seam's error, its message never holding the DSN's password."""
    text = redact_dsn(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, UNAVAILABLE):
        return BackendUnavailable(f"postgres unavailable: {text}")
    return BackendError(f"postgres failed: {text}")


async def _write_counts(conn: asyncpg.Connection, counts: StateCounts) -> None:
    rows = sorted(counts.rows())
    if rows:
        queues, states, ns = (list(c) for c in zip(*rows, strict=True))
        await conn.execute(q.COUNT, queues, states, ns, random.randrange(q.COUNT_SHARDS))


async def _check_version(conn: asyncpg.Connection) -> None:
    found = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    version = await conn.fetchval(q.VERSION_GET) if found else 0
    if (version or 0) != q.SCHEMA_VERSION:
        raise BackendError(
            f"postgres schema is at version {version or 0}, this arqd needs"
            f" {q.SCHEMA_VERSION}: run `arqd init-db`"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back to the pool as it is (asyncpg has rolled back any open
    transaction): its session holds nothing to reset, as no statement of this backend sets a
    session setting, LISTENs (the listener has a connection of its own), opens a cursor or
    takes a session-level advisory lock (migrations take a transaction-level one). asyncpg's
    default reset cost one more round trip per call: a quarter of a submit's latency."""


async def migrate(pool: asyncpg.Pool, schema: str) -> list[str]:
    """Create or migrate ``schema`` to this arqd's version, under an advisory lock (daemons
    starting together migrate once); refuse a schema newer than this arqd knows. Answers one
    line per migration applied."""
    done: list[str] = []
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(q.MIGRATE_LOCK)
            await conn.execute(q.create_schema(schema))
            await conn.execute(q.VERSION_TABLE)
            version = (await conn.fetchval(q.VERSION_GET)) or 0
            if version > q.SCHEMA_VERSION:
                raise BackendError(
                    f"postgres schema {schema!r} is at version {version}, newer than this arqd"
                    f" knows ({q.SCHEMA_VERSION}): upgrade arqd"
                )
            for number in range(version + 1, q.SCHEMA_VERSION + 1):
                await conn.execute(q.MIGRATIONS[number - 1])
                await conn.execute(q.VERSION_SET, number)
                done.append(f"postgres schema {schema!r}: migrated to version {number}")
    except BackendError:
        raise
    except Exception as exc:
        raise _translate(exc) from None
    return done


def _check_text(value: str, what: str) -> None:
    if "\x00" in value:
        raise Unstorable(f"{what}: PostgreSQL text cannot hold the character U+0000")


def _convert(new: NewJob) -> tuple[tuple[Any, ...], Job]:
    """The row of ``new`` and its first record, each value converted and checked."""
    for what in ("id", "queue", "handler", "key", "group_id", "owner", "name"):
        _check_text(getattr(new, what) or "", what)
    job = storable_job(new)
    params = (
        new.id,
        new.queue,
        new.handler,
        _enc(new.payload),
        new.key,
        bool(new.sticky),
        _enc(new.meta) if new.meta else None,
        new.max_attempts,
        float(new.timeout),
        float(new.created_at),
        float(new.ready_at),
        _opt(new.steps),
        new.group_id,
        new.owner,
        new.name,
    )
    return params, job
