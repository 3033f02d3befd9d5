"""The semantics above the backend seam, written once: how a spec becomes a job (defaults, dedupe
and cache keys, validation), how a result is stored and read back, how an attempt's end becomes an
outcome (retries, backoff with jitter, final failure), and waiting for a job.

``Core`` is shared by the in-process client, the consumer pool and the HTTP API.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

import msgspec
import structlog

from arqd.backends.base import (
    Enqueued,
    ListFilter,
    Outcome,
    QueueBackend,
    QueueStats,
    Redrive,
    group_record,
)
from arqd.clock import Clock
from arqd.config import Config
from arqd.errors import (
    BackendError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    NotReady,
    ResultExpired,
    UnknownGroup,
    UnknownHandler,
)
from arqd.handlers import Registry, cache_key
from arqd.hub import Hub, hub_for
from arqd.metrics import Metrics
from arqd.model import (
    AHEAD_MAX,
    BLOB_NAME_RE,
    DROPPED,
    GROUP_MAX,
    JOB_ID_RE,
    META_MAX,
    NAME_RE,
    SCHEDULE_KEY,
    ErrorInfo,
    GroupMember,
    GroupMemberSpec,
    GroupRecord,
    GroupSpec,
    Job,
    JobSpec,
    ListQuery,
    NewJob,
    ResultRef,
    State,
    StepState,
    explain,
    member_names,
    new_job_id,
    owned_key,
)
from arqd.results.base import Area, ResultStore
from arqd.stepmodel import SEALED as SEALED  # re-exported: the pool imports them from here
from arqd.stepmodel import STEPS_HANDLER as STEPS_HANDLER
from arqd.view import QueueInfo
from arqd.view import WorkerInfo as WorkerView

# The deepest JSON nesting a job may carry (payload, meta, steps). Real documents rarely pass 20;
# past about 1,000 msgspec's decoder hits Python's recursion limit and sqlite's json() refuses
# the value, so the bound is checked here, before anything is stored, far below both.
DEPTH_MAX = 64
TOO_DEEP = f"the body nests JSON deeper than {DEPTH_MAX} levels"
SWEEP_BATCH = 500  # expired records deleted per sweep (one short write transaction)
PURGE_BATCH = 1000
ORPHAN_BATCH = 100  # blobs checked against their job records per read (a purge's last pass)
JSON = "application/json"
FOLLOW_INTERVAL = 1.0  # other processes' changes reach long-polls within this much
FOLLOW_BATCH = 250  # watched jobs read per backend call (small enough to run in place)
WORKER_STALE = 15.0  # a worker row older than this is not listed (rows refresh every 2 s)

log = structlog.get_logger("arqd.core")

_spec_decoder = msgspec.json.Decoder(JobSpec)


def parse_spec(data: Mapping[str, Any] | bytes) -> JobSpec:
    """Validate one job spec from JSON bytes or a decoded mapping; unknown fields are an error."""
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            return _spec_decoder.decode(data)
        return msgspec.convert(data, JobSpec)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc)) from None
    except RecursionError:  # nested past the interpreter's limit: far past DEPTH_MAX
        raise InvalidRequest(TOO_DEEP) from None


_group_decoder = msgspec.json.Decoder(GroupSpec)


def parse_group(data: Mapping[str, Any] | bytes) -> GroupSpec:
    """Validate an ad-hoc group (``{"name"?: str, "jobs": [spec + "name"?]}``)."""
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            return _group_decoder.decode(data)
        return msgspec.convert({k: v for k, v in data.items() if v is not None}, GroupSpec)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc)) from None
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None


def check_depth(field: str, value: Any, limit: int = DEPTH_MAX) -> None:
    """:class:`InvalidRequest` if ``value`` nests lists and objects deeper than ``limit``;
    iterative, so no depth can overflow the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            raise InvalidRequest(f"{field}: JSON nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ready_at(spec: JobSpec, now: float) -> float:
    """When the job may start: at most ``AHEAD_MAX`` ahead (``delay`` is bounded by the model).
    A past ``run_at`` is kept (the job is ready at once), down to the Unix epoch: earlier times
    are stored as the epoch, so no backend ever sees a negative time."""
    if spec.run_at is None:
        return now + (spec.delay or 0.0)
    if spec.delay is not None:
        raise InvalidRequest("run_at: give run_at or delay, not both")
    if spec.run_at.tzinfo is None:
        raise InvalidRequest("run_at: an RFC 3339 time needs a UTC offset")
    # A difference of aware datetimes cannot overflow, where .timestamp() of year 1 at +05:00
    # (year 0 in UTC) raises.
    at = (spec.run_at - _EPOCH).total_seconds()
    if at > now + AHEAD_MAX:
        raise InvalidRequest(f"run_at: at most {AHEAD_MAX / 86400:g} days ahead")
    return max(at, 0.0)


def tick_key(name: str, tick: float) -> str:
    """The dedupe key of schedule ``name``'s tick at ``tick`` (Unix seconds)."""
    return f"{SCHEDULE_KEY}{name}:{round(tick)}"


def parse_tick_key(key: str | None) -> tuple[str, float] | None:
    """The (schedule, tick) a key made by ``tick_key`` names; ``None`` for any other key."""
    if key is None or not key.startswith(SCHEDULE_KEY):
        return None
    name, _, tick = key.removeprefix(SCHEDULE_KEY).rpartition(":")
    return (name, float(tick)) if name and tick.isdigit() else None


def mark_name(name: str) -> str:
    """The backend mark holding the latest tick the cluster fired of schedule ``name``."""
    return f"{SCHEDULE_KEY}{name}"


class Core:
    """Job semantics over one queue backend and one result store."""

    def __init__(
        self,
        queue: QueueBackend,
        results: ResultStore,
        config: Config,
        registry: Registry | None,
    ) -> None:
        self.queue = queue
        self.results = results
        self.hub = hub_for(queue.identity)
        self.metrics = Metrics()
        self._config, self._registry = config, registry
        self._name_metrics()
        queue.observe(self.metrics)  # backend call latencies and errors
        queue.on_jobs_ready(self.hub.jobs_ready)  # other hosts' submits (postgres: NOTIFY)
        self._steps_keys: tuple[Config, tuple[bytes, ...]] | None = None  # and the config read

    @property
    def clock(self) -> Clock:
        return self.queue.clock

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._name_metrics()

    @property
    def registry(self) -> Registry | None:
        return self._registry

    @registry.setter
    def registry(self, registry: Registry | None) -> None:
        self._registry = registry
        self._name_metrics()

    def _name_metrics(self) -> None:
        """Series per queue and handler only for names the config gives (arqd/metrics.py)."""
        cfg = self._config
        queues = {"default", *cfg.workers.queues}
        queues.update(h.queue for h in cfg.handler_configs().values() if h.queue)
        queues.update(s.queue for s in cfg.schedules if s.queue)
        queues.update(j.queue for g in cfg.groups.values() for j in g.jobs if j.queue)
        handlers = None if self._registry is None else {*self._registry.names(), STEPS_HANDLER}
        self.metrics.name(queues, handlers)

    # --- submitting -------------------------------------------------------------------------------

    def new_job(
        self,
        spec: JobSpec,
        now: float,
        owner: str | None = None,
        group_id: str | None = None,
        internal: bool = False,
        name: str | None = None,
    ) -> NewJob:
        """Resolve every default of ``spec``; raise :class:`InvalidRequest` if it cannot run.
        ``internal`` submits (the scheduler's) may use the reserved ``schedule:`` keys."""
        if spec.key is not None and spec.key.startswith(SCHEDULE_KEY) and not internal:
            raise InvalidRequest(f"key: the {SCHEDULE_KEY!r} prefix is reserved for schedules")
        check_depth("payload", spec.payload)
        check_depth("steps", spec.steps)
        check_depth("meta", spec.meta)
        if spec.meta and len(msgspec.json.encode(spec.meta)) > META_MAX:
            raise InvalidRequest(f"meta: at most {META_MAX} bytes of JSON")
        handler, payload, steps = self._work_of(spec)
        hdef = self.registry.get(handler) if self.registry is not None else None
        defaults = self.config.defaults
        key = spec.key
        if key is None and hdef is not None and hdef.cache:
            key = cache_key(handler, spec.payload)
        if key is not None and owner is not None:
            key = owned_key(owner, key)  # tenants never share dedupe keys or cached results
        return NewJob(
            id=new_job_id(),
            queue=spec.queue or (hdef.queue if hdef and hdef.queue else "default"),
            handler=handler,
            payload=payload,
            key=key,
            sticky=spec.sticky or bool(hdef and hdef.sticky),
            meta=spec.meta or {},
            max_attempts=spec.max_attempts
            or (hdef.max_attempts if hdef and hdef.max_attempts else defaults.max_attempts),
            timeout=float(
                spec.timeout or (hdef.timeout if hdef and hdef.timeout else defaults.timeout)
            ),
            created_at=now,
            ready_at=_ready_at(spec, now),
            group_id=group_id,
            owner=owner,
            name=name,
            steps=steps,
        )

    def _work_of(self, spec: JobSpec) -> tuple[str, Any, list[StepState] | None]:
        """The handler and payload a spec runs; a multi-step job runs the built-in runner on a
        payload whose secrets (credentials, secret headers) are sealed with the steps key."""
        if spec.steps is None:
            if spec.handler is None:
                raise InvalidRequest("handler: a job needs a handler (or steps)")
            if spec.handler == STEPS_HANDLER:  # its payload must be sealed by the core
                raise InvalidRequest(
                    f"handler: {STEPS_HANDLER!r} runs multi-step jobs; submit `steps` instead"
                )
            if spec.credentials is not None:
                raise InvalidRequest("credentials: only multi-step HTTP jobs take credentials")
            if self.registry is not None and spec.handler not in self.registry:
                raise UnknownHandler(f"no handler is registered as {spec.handler!r}")
            return spec.handler, spec.payload, None
        from arqd import steps as http_steps  # the HTTP machinery loads only when used

        if spec.handler is not None:
            raise InvalidRequest("steps: a job has a handler or steps, not both")
        if spec.payload is not None:
            raise InvalidRequest("payload: a multi-step job takes none (its steps carry bodies)")
        parsed = http_steps.parse_steps(spec.steps)
        creds = http_steps.parse_credentials(spec.credentials)
        sealed = http_steps.seal(
            {"steps": spec.steps, "credentials": creds.to_dict() if creds else None},
            self.steps_key(),
        )
        payload = {"steps": http_steps.redact_steps(spec.steps), SEALED: sealed}
        return STEPS_HANDLER, payload, http_steps.Checkpoint.start(parsed).states

    def steps_key(self) -> tuple[bytes, ...]:
        """The Fernet keys sealing step secrets (the first seals, any opens; see
        :func:`arqd.steps.step_keys`), read again whenever the config changes (SIGHUP)."""
        config = self.config
        if self._steps_keys is None or self._steps_keys[0] is not config:
            from arqd import steps as http_steps

            keys = http_steps.step_keys(config, self.queue.multi_host)
            self._steps_keys = (config, keys)
        return self._steps_keys[1]

    async def submit(
        self,
        specs: Sequence[JobSpec],
        owner: str | None = None,
        group_id: str | None = None,
        internal: bool = False,
        connection: object = None,
    ) -> list[Enqueued]:
        """Store all specs atomically (all or none fail validation first); with ``connection``
        (postgres: the caller's asyncpg connection, in a transaction), in the caller's
        transaction, so they exist if and only if it commits."""
        now = self.clock.time()
        new = [self.new_job(spec, now, owner, group_id, internal) for spec in specs]
        if connection is None:
            stored = await self.queue.enqueue(new)
        else:
            stored = await self.queue.enqueue(new, connection=connection)
        self._stored(stored)
        return stored

    def _stored(self, stored: list[Enqueued]) -> None:
        created = [e.job for e in stored if e.created]
        if created:
            self.hub.jobs_ready()
            for job in created:
                self.metrics.submitted.inc(job.queue, job.handler)

    # --- groups ---------------------------------------------------------------------------------

    def group_specs(self, name: str) -> list[GroupMemberSpec]:
        """The jobs of a group defined in config; :class:`UnknownGroup` if there is none."""
        group = self.config.groups.get(name)
        if group is None:
            raise UnknownGroup(f"no group is defined as {name!r}")
        return [job.spec() for job in group.jobs]

    async def submit_group(
        self, name: str, members: Sequence[GroupMemberSpec], owner: str | None = None
    ) -> tuple[GroupRecord, list[Enqueued]]:
        """Store a group's jobs and its record in one atomic step (all or none)."""
        if not 1 <= len(members) <= GROUP_MAX:
            raise InvalidRequest(f"jobs: a group holds 1 to {GROUP_MAX} jobs")
        names = member_names([m.name for m in members])
        if len(set(names)) != len(names):
            raise InvalidRequest("jobs: job names within a group must be unique")
        now = self.clock.time()
        group_id = new_job_id()
        new = [
            self.new_job(m, now, owner, group_id, name=n)
            for m, n in zip(members, names, strict=True)
        ]
        record = GroupRecord(
            id=group_id,
            name=name,
            created_at=now,
            owner=owner,
            members=[GroupMember(n, job.id) for n, job in zip(names, new, strict=True)],
        )
        stored = await self.queue.enqueue(new, group=record)
        self._stored(stored)
        return group_record(record, [e.job.id for e in stored]), stored

    async def group(self, group_id: str, owner: str | None = None) -> tuple[GroupRecord, list[Job]]:
        record = await self.queue.get_group(group_id) if JOB_ID_RE.match(group_id) else None
        if record is None or (owner is not None and record.owner != owner):
            raise JobNotFound(f"no group {group_id}")
        found = await self.queue.get_many([m.id for m in record.members])
        return record, [j for j in found if j is not None]

    async def cancel_group(self, group_id: str, owner: str | None = None) -> int:
        """Cancel every job of the group that is not terminal; answers how many."""
        _, jobs = await self.group(group_id, owner)
        count = 0
        for job in jobs:
            if not job.state.terminal:
                await self.cancel(job.id)
                count += 1
        return count

    # --- reading ----------------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, or :class:`JobNotFound`; with ``owner``, another owner's job is not found."""
        job = await self.queue.get(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(f"no job {job_id}")
        return job

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Return the job once it is terminal; ``TimeoutError`` after ``timeout`` seconds.

        It reads the job, then once per change it is told of, never on a timer: local changes
        come through the hub at once, other processes' through the one follower of this storage
        (``follow_changes``; started here when none runs, as for a bare ``Client``)."""
        follower = self._follower()
        try:
            async with asyncio.timeout(timeout):
                job = await self._read(job_id)
                while not job.state.terminal:
                    # The follower reads the job once its stored version passes this one.
                    fut = self.hub.watch(job_id, job.version)
                    try:
                        news = await fut
                    finally:
                        self.hub.unwatch(job_id, fut)
                    job = news if news is not None else await self._read(job_id)
                return job
        finally:
            self._unfollow(follower)

    async def _read(self, job_id: str) -> Job:
        """The job as stored now, with any change made while reading it."""
        while True:
            guard = self.hub.watch(job_id)  # watching during the read: no change slips past
            try:
                job = await self.get(job_id)
            finally:
                self.hub.unwatch(job_id, guard)
            if not guard.done():
                return job
            news = guard.result()
            if news is not None:
                return news if news.version >= job.version else job

    def start_follower(self, task: asyncio.Task[None] | None = None) -> asyncio.Task[None]:
        """Run ``follow_changes`` for this storage until the task is cancelled (an ``App`` does,
        for its life, passing the supervised task that runs it); waits use it instead of
        starting their own."""
        if task is None:
            task = asyncio.create_task(self.follow_changes(), name="arqd-follow")
        _followers[self.hub] = _Follower(task, on_demand=False)
        return task

    def _follower(self) -> _Follower:
        """The follower of this storage running in this event loop, started if there is none;
        the caller uses it until ``_unfollow``."""
        follower = _followers.get(self.hub)
        loop = asyncio.get_running_loop()
        if follower is None or follower.task.done() or follower.task.get_loop() is not loop:
            task = asyncio.create_task(self.follow_changes(), name="arqd-follow-on-demand")
            follower = _followers[self.hub] = _Follower(task, on_demand=True)
        follower.users += 1
        return follower

    def _unfollow(self, follower: _Follower) -> None:
        """One user less; a follower started on demand stops with its last user."""
        follower.users -= 1
        if follower.on_demand and follower.users == 0:
            follower.task.cancel()
            if _followers.get(self.hub) is follower:
                del _followers[self.hub]

    async def follow_changes(self, interval: float = FOLLOW_INTERVAL) -> None:
        """Run forever: every ``interval`` read the jobs that long-polls and event streams wait
        on, in batches, and wake the waiters of those another process changed. One loop reads
        N watched jobs once per interval, where each waiter reading its own job cost N reads
        and N encodes per interval (10,000 open long-polls took the whole core)."""
        while True:
            await asyncio.sleep(interval)
            watched = self.hub.watched()
            # In id order: neighbouring ids share index pages (ids are time-ordered), a quarter
            # less time per read of a million-row table than ids in arrival order.
            ids = sorted(watched)
            for start in range(0, len(ids), FOLLOW_BATCH):
                chunk = ids[start : start + FOLLOW_BATCH]
                try:
                    # Versions only: decoding every watched record each second was most of
                    # the cost (10,000 long-polls: a p99 of 480 ms for other requests).
                    current = await self.queue.versions(chunk)
                    changed = [i for i in chunk if current.get(i, -1) > watched[i]]
                    gone = [i for i in chunk if i not in current]
                    jobs = await self.queue.get_many(changed) if changed else []
                except BackendError as exc:
                    log.warning("backend.follow_failed", error=str(exc), jobs=len(chunk))
                    break
                for job_id, job in zip(changed, jobs, strict=True):
                    self.hub.job_changed(job_id, job)
                for job_id in gone:
                    self.hub.job_changed(job_id, None)
                await asyncio.sleep(0)  # let requests in between batches

    def check_result(self, job: Job) -> ResultRef:
        """The result reference of a succeeded job, or the error that explains its absence."""
        if job.state is State.FAILED:
            raise JobFailed(f"job {job.id} failed: {job.error.message if job.error else ''}")
        if job.state is State.CANCELLED:
            raise JobCancelled(f"job {job.id} was cancelled")
        if job.state is not State.SUCCEEDED or job.result is None:
            raise NotReady(f"job {job.id} is {job.state.value}, it has no result yet")
        if job.expires_at is not None and job.expires_at.timestamp() <= self.clock.time():
            raise ResultExpired(f"the result of job {job.id} has expired")
        if job.result.area == DROPPED:
            raise ResultExpired(f"the result of job {job.id} was purged from the cache")
        return job.result

    async def read_result(
        self, ref: ResultRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        if ref.is_inline:
            data = msgspec.json.encode(ref.inline)[start:end]
            if data:
                yield data
            return
        assert ref.name is not None, "a blob result always has a name"
        async for chunk in self.results.read(_area(ref.area or ""), ref.name, start, end):
            yield chunk

    async def blob_size(self, ref: ResultRef) -> int | None:
        """The stored size of a blob result; ``None`` once the store dropped it."""
        if ref.name is None:
            return None
        return await self.results.size(_area(ref.area or ""), ref.name)

    @staticmethod
    def result_size(ref: ResultRef) -> int:
        return len(msgspec.json.encode(ref.inline)) if ref.is_inline else (ref.size or 0)

    # --- listing and operating: what the HTTP routes and both clients ask ------------------------

    @staticmethod
    def list_query(params: Mapping[str, Any]) -> ListQuery:
        """A listing's filters, page size and cursor, from query strings or typed values;
        :class:`InvalidRequest` names the parameter. Validated here for every caller, so a
        filter no job can match (an empty queue name) never reaches a backend (DynamoDB
        refused it as a 503)."""
        try:
            return msgspec.convert(params, ListQuery, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(explain(exc)) from None

    async def list_jobs(
        self, query: ListQuery, owner: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Up to ``query.limit`` jobs, newest first, and the cursor of the page after (``None``
        at the end); with ``owner``, only that owner's jobs."""
        where = ListFilter(
            queue=query.queue,
            state=query.state,
            handler=query.handler,
            group_id=query.group_id,
            owner=owner,
        )
        return await self.queue.list_jobs(where, query.limit, query.cursor)

    async def queue_stats(self) -> list[QueueStats]:
        """The backend's counts of each queue it holds jobs of."""
        return await self.queue.stats()

    async def queues(self) -> list[QueueInfo]:
        """Every queue the backend holds jobs of or this config consumes, by name, counted."""
        stats = {s.name: s for s in await self.queue_stats()}
        names = sorted(set(stats) | set(self.config.workers.queues))
        return [
            QueueInfo(**msgspec.structs.asdict(stats[name])) if name in stats else QueueInfo(name)
            for name in names
        ]

    async def workers(self) -> list[WorkerView]:
        """The daemons (and embedded pools) sharing the backend, seen in the last
        ``WORKER_STALE`` seconds."""
        rows = await self.queue.list_workers(self.clock.time() - WORKER_STALE)
        return [
            WorkerView(
                id=w.id,
                host=w.host,
                started_at=datetime.fromtimestamp(w.started_at, UTC),
                last_seen=datetime.fromtimestamp(w.last_seen, UTC),
                running=w.running,
                concurrency=w.concurrency,
            )
            for w in rows
        ]

    async def redrive(self, queue: str) -> int:
        """Requeue the failed jobs of ``queue``; answers how many. A name no queue can have is
        :class:`JobNotFound`, like a queue without failed jobs is 0."""
        if not NAME_RE.match(queue):
            raise JobNotFound(f"no queue {queue!r}")
        count = await self.queue.redrive(self.redriven(queue))
        if count:
            self.hub.jobs_ready()
        return count

    async def trigger_group(self, name: str, owner: str | None = None) -> GroupRecord:
        """Submit the group ``name`` of the config (:class:`UnknownGroup` if there is none)."""
        record, _ = await self.submit_group(name, self.group_specs(name), owner)
        return record

    async def ping(self) -> None:
        """Return once both backends answer; their error (or a hang) otherwise."""
        await self.queue.ping()
        await self.results.ping()

    # --- changing ---------------------------------------------------------------------------------

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        found = await self.get(job_id, owner)
        job = await self.queue.cancel(job_id, free_key=self.frees_key(found))
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        self.hub.job_changed(job_id, job)
        return job

    async def delete(self, job_id: str, owner: str | None = None) -> Job | None:
        """Terminal: delete record and result, answer ``None``. Else: cancel, answer the job."""
        job = await self.get(job_id, owner)
        if not job.state.terminal:
            return await self.cancel(job_id, owner)
        deleted = await self.queue.delete(job_id)
        if deleted is None:
            raise JobNotFound(f"no job {job_id}")
        if not deleted.state.terminal:  # it changed under us: it cannot have, but never delete live
            return deleted
        await self._retire_ticks([deleted])
        await self._delete_blob(deleted.result)
        self.hub.job_changed(job_id, None)
        return None

    # --- the result cache ------------------------------------------------------------------------

    async def sweep(self, limit: int = SWEEP_BATCH) -> int:
        """Delete up to ``limit`` expired job records and their result blobs; answers how many.
        Bounded, and safe with every daemon running it (the backend hands each job to one)."""
        jobs = await self.queue.sweep_expired(limit)
        await self._retire_ticks(jobs)
        for job in jobs:
            await self._delete_blob(job.result)
            self.hub.job_changed(job.id, None)
        return len(jobs)

    async def purge(self, area: str) -> int:
        """``DELETE /v1/cache?area=``: drop every result of the area published before the purge
        began (and its dedupe entry); their jobs stay, answering 410 ``expired`` for the result.
        A result published while the purge runs is kept, whole."""
        if area not in ("temporary", "persistent"):
            raise InvalidRequest("area: temporary or persistent")
        began = self.clock.time()
        sticky = area == "persistent"
        total = 0
        drop = functools.partial(self.queue.drop_results, frees_key=self.frees_key)
        while batch := await drop(sticky, PURGE_BATCH, before=began):
            for job in batch:
                await self._delete_blob(job.result)
                self.hub.job_changed(job.id, None)
            total += len(batch)
        orphans = await self.sweep_orphans(_area(area))
        if orphans:
            log.info("cache.orphans_deleted", area=area, blobs=orphans)
        return total

    async def sweep_orphans(self, area: Area) -> int:
        """Delete the blobs of ``area`` that no record points to, nor ever can; answers how many.

        A blob is published before the outcome that names it is written, and that wait has no
        bound (the pool retries an outcome through a backend outage, heartbeating meanwhile),
        so age cannot tell an orphan from a result about to be recorded. Its job can: a blob
        ``<job id>-<token>`` is kept while the job is not terminal (its consumer may yet record
        it) and while the job's result names it. A terminal job never comes to name another
        blob of that lease (its outcome is fenced), and a deleted job never comes back."""
        deleted = 0
        async for page in self.results.names(area):
            names = [n for n in page if BLOB_NAME_RE.match(n)]  # never touch what is not ours
            for start in range(0, len(names), ORPHAN_BATCH):
                chunk = names[start : start + ORPHAN_BATCH]
                jobs = await self.queue.get_many([n[:32] for n in chunk])
                for name, job in zip(chunk, jobs, strict=True):
                    if not _may_name(job, area, name):
                        await self.results.delete(area, name)
                        deleted += 1
        return deleted

    async def _retire_ticks(self, gone: Sequence[Job]) -> None:
        """Raise the mark of each schedule tick among the deleted ``gone`` to its tick: with its
        record went its key, and the mark alone now says the cluster fired it (its daemon may
        have died before raising the mark itself)."""
        for job in gone:
            tick = parse_tick_key(job.key)
            if tick is not None:
                await self.queue.advance_mark(mark_name(tick[0]), tick[1])

    # --- redrive ----------------------------------------------------------------------------------

    def redriven(self, queue: str) -> Redrive:
        """What a redrive makes of ``queue``'s failed jobs: queued and ready now, no attempt
        counted, each holding its key again unless another live job took it meanwhile."""
        return Redrive(queue=queue, ready_at=self.clock.time(), attempts=0, take_keys=True)

    async def _delete_blob(self, ref: ResultRef | None) -> None:
        if ref is not None and ref.name is not None and ref.area in ("temporary", "persistent"):
            await self.results.delete(_area(ref.area), ref.name)

    # --- the end of an attempt --------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        b = self.config.defaults.backoff
        delay = min(b.max, b.base * b.factor ** max(0, attempt - 1))
        return delay * random.uniform(0.5, 1.0) if b.jitter else delay

    def result_expiry(self, job: Job, now: float) -> float | None:
        return None if job.sticky else now + self.config.results.temporary_ttl

    def succeeded(
        self, job: Job, token: str, result: ResultRef, started_at: float | None
    ) -> Outcome:
        """The job succeeded: its result expires (unless sticky), and its key with it, but a
        schedule tick's key, held until its record is deleted."""
        return Outcome(
            job=job,
            token=token,
            state=State.SUCCEEDED,
            result=result,
            expires_at=self.result_expiry(job, self.clock.time()),
            keep_key=not self.frees_key(job),
            started_at=started_at,
        )

    def failed_attempt(
        self, job: Job, token: str, error: ErrorInfo, delay: float | None = None
    ) -> Outcome:
        """Retry after a backoff while attempts remain; else the job fails for good."""
        now = self.clock.time()
        if job.attempts < job.max_attempts:
            # A handler's Retry(delay=...) is bounded like a client's delay (NaN: the backoff).
            wait = self.backoff(job.attempts) if delay is None or math.isnan(delay) else delay
            wait = min(max(wait, 0.0), AHEAD_MAX)
            return Outcome(
                job=job, token=token, state=State.QUEUED, error=error, ready_at=now + wait
            )
        return self.final_failure(job, token, error)

    @staticmethod
    def frees_key(job: Job) -> bool:
        """Whether a failure, a cancel or a purge frees the job's key (docs/jobs.md): yes,
        except a schedule tick's, which is held until its record is deleted, so a late daemon
        cannot fire the tick again. The one rule for every backend (they are told, per job)."""
        return job.key is None or not job.key.startswith(SCHEDULE_KEY)

    def cancelled(self, job: Job, token: str) -> Outcome:
        return Outcome(job=job, token=token, state=State.CANCELLED, free_key=self.frees_key(job))

    def final_failure(self, job: Job, token: str, error: ErrorInfo) -> Outcome:
        """Failed for good; a lease beyond ``max_attempts`` (found expired) is not counted."""
        return Outcome(
            job=job,
            token=token,
            state=State.FAILED,
            error=error,
            free_key=self.frees_key(job),
            count_attempt=job.attempts <= job.max_attempts,
        )


@dataclass(eq=False)
class _Follower:
    """The task running ``Core.follow_changes`` for one storage in this process, and how many
    waits use it; one started on demand (for a bare ``Client``) stops when the last of them ends."""

    task: asyncio.Task[None]
    on_demand: bool
    users: int = 0


_followers: WeakKeyDictionary[Hub, _Follower] = WeakKeyDictionary()


def _may_name(job: Job | None, area: Area, name: str) -> bool:
    """Whether ``job``'s record names, or may yet come to name, the blob ``area``/``name``."""
    if job is None:
        return False
    if not job.state.terminal:
        return True
    ref = job.result
    return ref is not None and ref.area == area and ref.name == name


def _area(value: str) -> Area:
    if value == "persistent":
        return "persistent"
    return "temporary"
