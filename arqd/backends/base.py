"""The backend contract: storage primitives, nothing more.

A queue backend stores job records and answers conditional writes; it knows nothing of retries,
backoff, timeouts, handlers or logging, which live once in the core above this seam, and it never
decides: whether a key is freed, what a redriven job becomes, when a result expires arrive as
data from the core. The contract has three parts, each small: ``JobStore`` (jobs and leases),
``Catalog`` (listings, counts, versions, groups, workers, marks, ping) and ``Maintenance``
(sweeping expired records, dropping results); ``QueueBackend`` is all three. Their public
methods live here (argument checks, timing for a ``BackendObserver``) and call a backend's hooks.

Every write a consumer makes about a leased job names the lease token and is refused (answering
``None`` or ``False``) when that token no longer holds the job: this is the fencing that makes a
consumer which lost its lease harmless.

A batch is stored whole or not at all: a backend converts every job of it (and the group record)
into what it stores *before* its first write, so a value it cannot hold is refused with
:class:`arqd.errors.Unstorable` and nothing is written (``convert_all``).

A backend is an async context manager; ``aclose()`` releases its connections. Driver errors are
translated to :class:`arqd.errors.BackendError` at this seam.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.closing import AsyncClosing
from arqd.errors import BackendError, InvalidRequest, Unstorable
from arqd.model import (
    DROPPED,
    ErrorInfo,
    GroupMember,
    GroupRecord,
    Job,
    NewJob,
    Progress,
    ResultRef,
    State,
    StepState,
)

T = TypeVar("T")
R = TypeVar("R")

# What a conversion raises on a value it cannot hold: datetime on a time out of range or NaN,
# msgspec on an object that is not JSON (TypeError) or nested past its recursion limit.
CONVERSION_ERRORS = (ValueError, OverflowError, OSError, TypeError, RecursionError)


class Lease(msgspec.Struct, frozen=True):
    """A job handed to one consumer until ``expires`` (unless extended); ``token`` fences writes."""

    job: Job
    token: str
    expires: float
    recovered: bool = False  # the job's previous lease expired (its consumer died or stalled)


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """The end of one attempt, written conditionally on the lease token.

    ``state`` QUEUED means the job goes back to the queue: a retry (``ready_at`` set, the attempt
    counted) or a release on shutdown (``count_attempt=False``: the attempt is given back).
    ``started_at`` is when the handler really began (a lease may wait in a consumer's buffer
    first); the backend writes it over the lease's time, ``None`` when no handler ran.

    The core decides the key (``arqd.outcomes.frees_key``): a terminal outcome with ``free_key``
    lets the key go now; else the key is held until ``expires_at`` passes, or, with ``keep_key``,
    until the record is deleted (a schedule tick's: it must never be fired again).
    """

    job: Job  # the record as leased: names the job, its queue and its key
    token: str
    state: State
    result: ResultRef | None = None
    error: ErrorInfo | None = None
    ready_at: float | None = None
    count_attempt: bool = True
    expires_at: float | None = None
    free_key: bool = False
    keep_key: bool = False
    started_at: float | None = None


class Update(msgspec.Struct, frozen=True, kw_only=True):
    """A partial change to a leased job, fenced by ``token``: its progress, or a multi-step
    job's step states with their checkpoint (together), or both; ``None`` leaves a field."""

    job_id: str
    token: str
    progress: Progress | None = None
    steps: list[StepState] | None = None
    checkpoint: dict[str, Any] | None = None


class HeartbeatReply(msgspec.Struct, frozen=True):
    held: bool
    cancel_requested: bool


class QueueStats(msgspec.Struct, frozen=True):
    name: str
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    oldest_queued_seconds: float | None = None


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One live daemon (or embedded pool) sharing the backend; refreshed every few seconds."""

    id: str
    host: str
    started_at: float
    last_seen: float
    running: int
    concurrency: int


class Enqueued(msgspec.Struct, frozen=True):
    job: Job
    created: bool  # False: a live job already held the key, and ``job`` is that job


class ListFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which jobs ``list_jobs`` answers: every field given must match (validated by the core)."""

    queue: str | None = None
    state: State | None = None
    handler: str | None = None
    group_id: str | None = None
    owner: str | None = None

    def matches(self, job: Job) -> bool:
        """Whether ``job`` passes the filter (for backends that filter records themselves)."""
        return (
            (self.queue is None or job.queue == self.queue)
            and (self.state is None or job.state is self.state)
            and (self.handler is None or job.handler == self.handler)
            and (self.group_id is None or job.group_id == self.group_id)
            and (self.owner is None or job.owner == self.owner)
        )


class Redrive(msgspec.Struct, frozen=True, kw_only=True):
    """What ``redrive`` makes of each failed job of ``queue``, decided by the core: queued
    again, ready at ``ready_at`` with ``attempts`` counted, its error and finish time cleared,
    and, with ``take_keys``, holding its key again unless another live job took it."""

    queue: str
    ready_at: float
    attempts: int
    take_keys: bool


# --- rules every backend applies alike ---------------------------------------------------------


def droppable(job: Job, sticky: bool, before: float | None) -> bool:
    """Whether a purge of the ``sticky`` area that began at ``before`` (``None``: all) drops
    ``job``'s result: succeeded, in that area, not dropped yet, finished by then."""
    if job.state is not State.SUCCEEDED or job.sticky is not sticky:
        return False
    if job.result is None or job.result.area == DROPPED:
        return False
    if before is None:
        return True
    return job.finished_at is not None and job.finished_at.timestamp() <= before


def fifo(job: Job) -> tuple[datetime, str]:
    """The order leases come out in within a queue: ``ready_at``, then id (submit order)."""
    return job.ready_at, job.id


class StateCounts(dict[tuple[str, str], int]):
    """Changes to per-(queue, state) job counts, collected by one call (or, on DynamoDB, by
    this process between flushes) and written once."""

    def add(self, queue: str, state: str, n: int = 1) -> None:
        self[queue, state] = self.get((queue, state), 0) + n

    def move(self, queue: str, old: str, new: str, n: int = 1) -> None:
        self.add(queue, old, -n)
        self.add(queue, new, n)

    def rows(self) -> list[tuple[str, str, int]]:
        """The non-zero changes, as (queue, state, n)."""
        return [(q, st, n) for (q, st), n in self.items() if n]

    def by_queue(self) -> dict[str, dict[str, int]]:
        """The non-zero changes per queue, then per state."""
        out: dict[str, dict[str, int]] = {}
        for queue, state, n in self.rows():
            out.setdefault(queue, {})[state] = n
        return out


# --- converting before writing ----------------------------------------------------------------


def convert_all(items: Sequence[T], convert: Callable[[T], R], what: str = "jobs") -> list[R]:
    """Convert every item of a batch before the first write, so a value the store cannot hold
    refuses the whole batch (:class:`Unstorable`, naming the item) and stores nothing."""
    out: list[R] = []
    for i, item in enumerate(items):
        try:
            out.append(convert(item))
        except Unstorable as exc:
            raise Unstorable(f"{what}[{i}]: {exc}") from None
        except CONVERSION_ERRORS as exc:
            raise Unstorable(f"{what}[{i}]: cannot be stored: {exc}") from None
    return out


# The Unix times a datetime holds in UTC, 0001-01-01 to the last whole second of 9999 (a float
# closer to 10000-01-01 may round up to it). Compared as numbers: building a datetime per
# check cost a fifth of a submit.
TIME_MIN = datetime(1, 1, 1, tzinfo=UTC).timestamp()
TIME_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def storable_time(value: float, what: str) -> float:
    """``value`` if it is a Unix time every backend can hold (finite, years 1 to 9999: a record
    is read back as a datetime); else :class:`Unstorable`."""
    if not math.isfinite(value):
        raise Unstorable(f"{what}: {value!r} is not a time")
    if not TIME_MIN <= value <= TIME_MAX:
        raise Unstorable(f"{what}: {value!r} is out of range (years 1 to 9999)")
    return value


def storable_job(new: NewJob) -> Job:
    """The first record of ``new``, checking the values every backend converts alike: its times
    and timeout. (Each backend encodes the JSON fields itself, inside ``convert_all``.)"""
    storable_time(new.created_at, "created_at")
    storable_time(new.ready_at, "ready_at")
    if not math.isfinite(new.timeout):
        raise Unstorable(f"timeout: {new.timeout!r} is not a number of seconds")
    return new.to_job()


def storable_group(record: GroupRecord, jobs: Sequence[NewJob]) -> bytes:
    """The group record as JSON, checked before the first write of its group: its time, and one
    member per job, in order (a contract error of the caller otherwise)."""
    if [m.id for m in record.members] != [j.id for j in jobs]:
        raise ValueError("a group record names its jobs, one member per job, in order")
    try:
        storable_time(record.created_at, "created_at")
        return msgspec.json.encode(record)
    except Unstorable as exc:
        raise Unstorable(f"group: {exc}") from None
    except CONVERSION_ERRORS as exc:
        raise Unstorable(f"group: cannot be stored: {exc}") from None


def group_record(record: GroupRecord, answering: Sequence[str]) -> GroupRecord:
    """``record`` with each member naming the job that answers for it (``answering[i]``: the
    live job holding member ``i``'s key, or its own new job)."""
    pairs = zip(record.members, answering, strict=True)
    members = [GroupMember(m.name, job_id) for m, job_id in pairs]
    return msgspec.structs.replace(record, members=members)


class BackendObserver(Protocol):
    """What a queue backend reports: each call of its contract, by name, how long it took and
    whether it failed (a :class:`BackendError` or ``OSError``). ``arqd.metrics.Metrics``
    implements it; the base calls it, so no backend times itself and nothing wraps a method."""

    def backend_call(self, op: str, seconds: float, failed: bool) -> None: ...


class _Backend(AsyncClosing):
    """What the three queue contracts share: the clock, the identity and the observer.

    Public methods live in the contracts below: each checks its arguments, times the call for
    the observer and calls the backend's hook of the same name with a leading underscore
    (``lease`` → ``_lease``), which a backend implements. Hooks answer what the method answers.
    """

    name: str = "abstract"
    multi_host: ClassVar[bool] = False

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.observer: BackendObserver | None = None

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """Names the storage (e.g. ``sqlite:/abs/path``): two objects on the same storage in one
        process share wake-ups."""

    def on_jobs_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when another process (or host) stores jobs that are ready now, for
        a backend that hears of it (postgres: LISTEN/NOTIFY). Others never call it: the pool's
        polling finds those jobs."""

    def on_jobs_changed(self, callback: Callable[[Sequence[str] | None], None]) -> None:
        """Call ``callback`` with the ids of jobs another process (or host) finished, cancelled
        or deleted (``None``: some jobs, unnamed, e.g. after a lost connection), for a backend
        that hears of it (postgres: LISTEN/NOTIFY). Others never call it: the follower's rounds
        find those changes."""

    def observe(self, observer: BackendObserver) -> None:
        """Report every call to ``observer``, unless one already listens (several cores sharing
        one backend: the first one's)."""
        if self.observer is None:
            self.observer = observer

    async def _timed(self, op: str, call: Coroutine[Any, Any, T]) -> T:
        observer = self.observer
        if observer is None:
            return await call
        start = time.perf_counter()
        failed = False
        try:
            return await call
        except (BackendError, OSError):
            failed = True
            raise
        finally:
            observer.backend_call(op, time.perf_counter() - start, failed)


class JobStore(_Backend, abc.ABC):
    """Jobs and their leases: the primitives a consumer and a submit need.

    A backend stores and answers conditional writes; it never decides. Whether a key is freed,
    what a redriven job looks like, when a result expires: the core says so in the arguments
    (``Outcome``, ``free_key``, ``Redrive``), and the backend applies it atomically. Every write
    about a leased job names its token and is refused (``False``) once that token no longer
    holds the job (fencing).

    A dedupe key is held from enqueue until an outcome frees it, its ``expires_at`` passes
    (unless the outcome kept it), or its record is deleted."""

    async def enqueue(
        self,
        jobs: Sequence[NewJob],
        group: GroupRecord | None = None,
        *,
        connection: object = None,
    ) -> list[Enqueued]:
        """Store all jobs (and ``group``'s record) in one atomic step, or nothing.

        Every job and the record are converted before the first write (``convert_all``): a value
        the storage cannot hold raises :class:`Unstorable` with nothing stored. A job whose key is
        held by a live job is not stored: its entry answers that job with ``created=False``
        (a key repeated in the batch answers its first job).

        ``group.members[i]`` names ``jobs[i]``; the record is stored with each member naming the
        job that answers for it (``group_record``). The core makes the record (names, limits);
        the backend only stores it with the jobs. DynamoDB holds this for up to 100 items per
        call; beyond, see ``docs/dynamodb.md``.

        ``connection``: a caller's own database connection, in its own transaction, to store the
        jobs in (transactional submit); only a backend that can (postgres) takes one, others
        refuse it with :class:`InvalidRequest`."""
        if connection is not None:
            raise InvalidRequest(
                f"connection: the {self.name} backend cannot submit inside a caller's"
                " transaction (postgres can)"
            )
        return await self._timed("enqueue", self._enqueue(jobs, group))

    async def lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        """Lease up to ``limit`` visible jobs (queued and ready, or running with an expired lease),
        oldest ``ready_at`` first within a queue (``fifo``), each lease counting one attempt."""
        return await self._timed("lease", self._lease(queues, limit, lease_for, worker))

    async def heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        """Extend each (id, token) lease still held to now + ``lease_for``; heartbeats do not
        change the version."""
        return await self._timed("heartbeat", self._heartbeat(leases, lease_for))

    async def update(self, updates: Sequence[Update]) -> list[bool]:
        """Apply each partial update (progress; steps and checkpoint) whose token still holds
        its job, one version step each; answer which were applied."""
        for u in updates:
            if u.progress is None and u.steps is None:
                raise ValueError(f"update of job {u.job_id} changes nothing")
            if (u.steps is None) is not (u.checkpoint is None):
                raise ValueError("steps and checkpoint are saved together")
        return await self._timed("update", self._update(updates))

    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Apply each outcome whose token still holds its job; answer which were applied."""
        return await self._timed("finish", self._finish(outcomes))

    async def cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        """Queued → cancelled (its key freed if ``free_key``); running → ``cancel_requested``;
        terminal: unchanged. Answers the job as it is then, ``None`` if there is none."""
        return await self._timed("cancel", self._cancel(job_id, free_key=free_key))

    async def get(self, job_id: str) -> Job | None:
        return await self._timed("get", self._get(job_id))

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """The jobs in the order asked, ``None`` where there is none."""
        return await self._timed("get_many", self._get_many(job_ids))

    async def find_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, if any."""
        return await self._timed("find_by_key", self._find_by_key(key))

    async def delete(self, job_id: str) -> Job | None:
        """Delete a terminal job and free its key; answer the job as it was (not deleted when it
        is not terminal), or ``None`` if there is no such job."""
        return await self._timed("delete", self._delete(job_id))

    async def redrive(self, plan: Redrive) -> int:
        """Every failed job of ``plan.queue`` becomes what ``plan`` says; answers how many."""
        return await self._timed("redrive", self._redrive(plan))

    @abc.abstractmethod
    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None
    ) -> list[Enqueued]: ...

    @abc.abstractmethod
    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]: ...

    @abc.abstractmethod
    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]: ...

    @abc.abstractmethod
    async def _update(self, updates: Sequence[Update]) -> list[bool]: ...

    @abc.abstractmethod
    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]: ...

    @abc.abstractmethod
    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None: ...

    @abc.abstractmethod
    async def _get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]: ...

    @abc.abstractmethod
    async def _find_by_key(self, key: str) -> Job | None: ...

    @abc.abstractmethod
    async def _delete(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def _redrive(self, plan: Redrive) -> int: ...


class Catalog(_Backend, abc.ABC):
    """What the API lists and the cluster shares: listings, counts, versions, group records,
    the worker registry, named marks, and a ping. Reads, but for the registry and marks."""

    async def list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Up to ``limit`` jobs passing ``where``, newest first, and the cursor of the next page
        (the last id answered; ``None`` at the end). A backend may answer a short page with a
        cursor (DynamoDB's read budget)."""
        if limit < 1:
            raise ValueError("list_jobs needs a limit of at least 1")
        return await self._timed("list_jobs", self._list_jobs(where, limit, cursor))

    async def stats(self) -> list[QueueStats]:
        """Per-queue counts by state, by queue name, without scanning the jobs."""
        return await self._timed("stats", self._stats())

    async def versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        """The current ``version`` of each job that exists (absent ids: deleted). Long-polls
        are woken by comparing these once a second."""
        return await self._timed("versions", self._versions(job_ids))

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group's record, if stored."""
        return await self._timed("get_group", self._get_group(group_id))

    async def register_worker(self, info: WorkerInfo) -> None:
        """Insert or refresh this worker's row."""
        await self._timed("register_worker", self._register_worker(info))

    async def remove_worker(self, worker_id: str) -> None:
        await self._timed("remove_worker", self._remove_worker(worker_id))

    async def list_workers(self, seen_since: float) -> list[WorkerInfo]:
        """Workers whose ``last_seen`` is at or after ``seen_since``, by id."""
        return await self._timed("list_workers", self._list_workers(seen_since))

    async def advance_mark(self, name: str, value: float) -> float | None:
        """Set the mark ``name`` to ``value`` if it is absent or lower, atomically for every
        process sharing the storage, and answer the mark as it was before (``None``: absent).
        A mark only ever rises; the scheduler keeps in one the latest tick the cluster fired
        of each schedule."""
        return await self._timed("advance_mark", self._advance_mark(name, value))

    async def get_mark(self, name: str) -> float | None:
        """The mark ``name``, or ``None`` if it was never set."""
        return await self._timed("get_mark", self._get_mark(name))

    async def ping(self) -> None:
        """Raise :class:`BackendError` unless the storage answers."""
        await self._timed("ping", self._ping())

    @abc.abstractmethod
    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]: ...

    @abc.abstractmethod
    async def _stats(self) -> list[QueueStats]: ...

    @abc.abstractmethod
    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]: ...

    @abc.abstractmethod
    async def _get_group(self, group_id: str) -> GroupRecord | None: ...

    @abc.abstractmethod
    async def _register_worker(self, info: WorkerInfo) -> None: ...

    @abc.abstractmethod
    async def _remove_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    async def _advance_mark(self, name: str, value: float) -> float | None: ...

    @abc.abstractmethod
    async def _get_mark(self, name: str) -> float | None: ...

    @abc.abstractmethod
    async def _ping(self) -> None: ...


class Maintenance(_Backend, abc.ABC):
    """Bounded clean-up, safe to run from every process at once: each job is answered to exactly
    one caller, which then deletes its result blob."""

    async def sweep_expired(self, limit: int) -> list[Job]:
        """Delete up to ``limit`` terminal jobs whose ``expires_at`` has passed (their keys go
        with their records) and answer them."""
        return await self._timed("sweep_expired", self._sweep_expired(limit))

    async def drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        """Drop the results of up to ``limit`` jobs ``droppable(job, sticky, before)``: each
        result becomes ``ResultRef(area="dropped")`` and, where ``frees_key(job)`` (the core's
        rule), its key is freed in the same write. Answers the jobs as they were; an empty
        answer means none are left. Successive calls walk on from where the last one stopped."""
        call = self._drop_results(sticky, limit, before, frees_key=frees_key)
        return await self._timed("drop_results", call)

    @abc.abstractmethod
    async def _sweep_expired(self, limit: int) -> list[Job]: ...

    @abc.abstractmethod
    async def _drop_results(
        self, sticky: bool, limit: int, before: float | None, *, frees_key: Callable[[Job], bool]
    ) -> list[Job]: ...


class QueueBackend(JobStore, Catalog, Maintenance):
    """The three contracts in one object, as every shipped backend implements them and as the
    core holds its queue. ``multi_host`` declares that daemons on several hosts may share the
    storage (the core then needs settings every host agrees on, such as the steps key)."""

    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        """From whole records; a backend that can read versions alone should (sqlite does)."""
        jobs = await self._get_many(job_ids)
        return {job.id: job.version for job in jobs if job is not None}
