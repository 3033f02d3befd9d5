"""The semantics above the backend seam, written once: how a spec becomes a job (defaults, dedupe
and cache keys, validation), groups, cancel and delete, the cache's sweep and purge, redrive,
listing, and waiting for a job.

``Core`` is shared by the in-process client, the consumer pool and the HTTP API. It owns the
parts it is made of, each a module of its own concept: how an attempt's end becomes an outcome
(``Core.outcomes``, arqd/outcomes.py), results in and out of the store (``Core.resultio``,
arqd/resultio.py) and the follower of other processes' changes (``Core.follow``,
arqd/follow.py). Callers use those parts directly.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from arqd.backends.base import (
    Enqueued,
    ListFilter,
    QueueBackend,
    QueueStats,
    group_record,
)
from arqd.clock import Clock
from arqd.config import Config
from arqd.errors import InvalidRequest, JobNotFound, UnknownGroup, UnknownHandler
from arqd.follow import Follower
from arqd.handlers import Registry, cache_key
from arqd.hub import hub_for
from arqd.model import (
    AHEAD_MAX,
    GROUP_MAX,
    JOB_ID_RE,
    META_MAX,
    NAME_RE,
    SCHEDULE_KEY,
    GroupMember,
    GroupMemberSpec,
    GroupRecord,
    GroupSpec,
    Job,
    JobSpec,
    ListQuery,
    NewJob,
    StepState,
    explain,
    member_names,
    new_job_id,
    owned_key,
)
from arqd.observe import NO_OBSERVER, Observer
from arqd.outcomes import Outcomes, frees_key, mark_name, parse_tick_key
from arqd.resultio import ResultIO, area_of
from arqd.results.base import ResultStore
from arqd.stepmodel import SEALED, STEPS_HANDLER
from arqd.view import QueueInfo
from arqd.view import WorkerInfo as WorkerView

# The deepest JSON nesting a job may carry (payload, meta, steps). Real documents rarely pass 20;
# past about 1,000 msgspec's decoder hits Python's recursion limit and sqlite's json() refuses
# the value, so the bound is checked here, before anything is stored, far below both.
DEPTH_MAX = 64
TOO_DEEP = f"the body nests JSON deeper than {DEPTH_MAX} levels"
SWEEP_BATCH = 500  # expired records deleted per sweep (one short write transaction)
PURGE_BATCH = 1000
WORKER_STALE = 15.0  # a worker row older than this is not listed (rows refresh every 2 s)

if TYPE_CHECKING:
    from arqd.steps import Credentials, StepSpec

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
    if not isinstance(value, dict | list | tuple):
        return  # None or a scalar: most metas and steps, checked at no cost per submit
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


class Core:
    """Job semantics over one queue backend and one result store."""

    def __init__(
        self,
        queue: QueueBackend,
        results: ResultStore,
        config: Config,
        registry: Registry | None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self.queue = queue
        self.results = results
        self.hub = hub_for(queue.identity)
        self.observer = observer  # told of submits here, of leases and attempts by the pool
        self._config, self._registry = config, registry
        self.outcomes = Outcomes(config, queue.clock)  # how an attempt's end becomes an outcome
        self.resultio = ResultIO(results, queue, config, queue.clock)  # results in and out
        self.follow = Follower(queue, self.hub)  # other processes' changes, for waits
        self._configure_observer()
        if observer is not NO_OBSERVER:  # a bare Client's core leaves the backend to an App's
            queue.observe(observer)  # backend call latencies and errors
        queue.on_jobs_ready(self.hub.jobs_ready)  # other hosts' submits (postgres: NOTIFY)
        queue.on_jobs_changed(self.hub.others_changed)  # and the jobs they ended, for waits
        self._steps_keys: tuple[Config, tuple[bytes, ...]] | None = None  # and the config read

    @property
    def clock(self) -> Clock:
        return self.queue.clock

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = self.outcomes.config = self.resultio.config = config
        self._configure_observer()

    @property
    def registry(self) -> Registry | None:
        return self._registry

    @registry.setter
    def registry(self, registry: Registry | None) -> None:
        self._registry = registry
        self._configure_observer()

    def _configure_observer(self) -> None:
        """The observer learns the queue and handler names the config gives (arqd/metrics.py
        keeps series only for those)."""
        cfg = self._config
        queues = {"default", *cfg.workers.queues}
        queues.update(h.queue for h in cfg.handler_configs().values() if h.queue)
        queues.update(s.queue for s in cfg.schedules if s.queue)
        queues.update(j.queue for g in cfg.groups.values() for j in g.jobs if j.queue)
        handlers = None if self._registry is None else {*self._registry.names(), STEPS_HANDLER}
        self.observer.configured(queues, handlers)

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
                self.observer.job_submitted(job.queue, job.handler)

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
        (``Core.follow``; started here when none runs, as for a bare ``Client``)."""
        follower = self.follow.join()
        try:
            async with asyncio.timeout(timeout):
                job = await self.read_fresh(job_id)
                while not job.state.terminal:
                    # The follower reads the job once its stored version passes this one.
                    fut = self.hub.watch(job_id, job.version)
                    try:
                        news = await fut
                    finally:
                        self.hub.unwatch(job_id, fut)
                    job = news if news is not None else await self.read_fresh(job_id)
                return job
        finally:
            self.follow.leave(follower)

    async def read_fresh(self, job_id: str, owner: str | None = None) -> Job:
        """The job as stored now, with any change made in this process while reading it (a
        wait that starts watching after its read would miss a change made during the read,
        and hear of it only at the follower's next round)."""
        while True:
            guard = self.hub.watch(job_id)  # watching during the read: no change slips past
            try:
                job = await self.get(job_id, owner)
            finally:
                self.hub.unwatch(job_id, guard)
            if not guard.done():
                return job
            news = guard.result()
            if news is not None:
                return news if news.version >= job.version else job

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
        count = await self.queue.redrive(self.outcomes.redriven(queue))
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
        job = await self.queue.cancel(job_id, free_key=frees_key(found))
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
        await self.resultio.delete(deleted.result)
        self.hub.job_changed(job_id, None)
        return None

    # --- the result cache ------------------------------------------------------------------------

    async def sweep(self, limit: int = SWEEP_BATCH) -> int:
        """Delete up to ``limit`` expired job records and their result blobs; answers how many.
        Bounded, and safe with every daemon running it (the backend hands each job to one)."""
        jobs = await self.queue.sweep_expired(limit)
        await self._retire_ticks(jobs)
        for job in jobs:
            await self.resultio.delete(job.result)
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
        drop = functools.partial(self.queue.drop_results, frees_key=frees_key)
        while batch := await drop(sticky, PURGE_BATCH, before=began):
            for job in batch:
                await self.resultio.delete(job.result)
                self.hub.job_changed(job.id, None)
            total += len(batch)
        orphans = await self.resultio.sweep_orphans(area_of(area))
        if orphans:
            log.info("cache.orphans_deleted", area=area, blobs=orphans)
        return total

    async def _retire_ticks(self, gone: Sequence[Job]) -> None:
        """Raise the mark of each schedule tick among the deleted ``gone`` to its tick: with its
        record went its key, and the mark alone now says the cluster fired it (its daemon may
        have died before raising the mark itself)."""
        for job in gone:
            tick = parse_tick_key(job.key)
            if tick is not None:
                await self.queue.advance_mark(mark_name(tick[0]), tick[1])

    # --- redrive ----------------------------------------------------------------------------------

    def unseal_steps(self, job: Job) -> tuple[list[StepSpec], Credentials | None]:
        """A multi-step job's steps and credentials, opened with this daemon's keys (sealed by
        :meth:`new_job`); :class:`CredentialsUnreadable` when no key opens them."""
        from arqd import steps as http_steps  # the HTTP machinery loads only when used

        sealed = http_steps.unseal(job.payload[SEALED], self.steps_key())
        specs = http_steps.parse_steps(sealed["steps"])
        return specs, http_steps.parse_credentials(sealed["credentials"])
