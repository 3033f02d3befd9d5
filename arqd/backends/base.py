"""The backend contract: storage primitives, nothing more.

A queue backend stores job records and answers conditional writes; it knows nothing of retries,
backoff, timeouts, handlers or logging, which live once in the core above this seam. Every write a
consumer makes about a leased job names the lease token and is refused (answering ``None`` or
``False``) when that token no longer holds the job: this is the fencing that makes a consumer which
lost its lease harmless.

A result store keeps result blobs by (area, job id); its writers publish atomically, so no reader
ever sees half a result.

Both are async context managers; ``aclose()`` releases their connections. Driver errors are
translated to :class:`arqd.errors.BackendError` at this seam.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.model import (
    ErrorInfo,
    GroupRecord,
    Job,
    NewJob,
    Progress,
    ResultRef,
    State,
    StepState,
)

Area = Literal["temporary", "persistent"]
AREAS: tuple[Area, ...] = ("temporary", "persistent")


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
    started_at: float | None = None


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
    queue: str | None = None
    state: State | None = None
    handler: str | None = None
    group_id: str | None = None
    owner: str | None = None


class _AsyncClosing:
    async def open(self) -> None:
        """Connect, create what is missing; called once before use."""

    async def aclose(self) -> None:
        """Release connections and threads; the object is unusable afterwards."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class QueueBackend(_AsyncClosing, abc.ABC):
    """Durable job records, leases and dedupe keys.

    ``identity`` names the storage (e.g. ``sqlite:/abs/path``), so two objects on the same storage
    in one process can share wake-ups.
    """

    name: str = "abstract"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock

    @property
    @abc.abstractmethod
    def identity(self) -> str: ...

    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Store all jobs in one atomic step. A job whose key is held by a live job is not stored:
        its entry answers that job with ``created=False``. A key is held from enqueue until an
        outcome frees it, its ``expires_at`` passes, or the job is deleted."""

    @abc.abstractmethod
    async def lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        """Lease up to ``limit`` visible jobs (queued and ready, or running with an expired lease),
        oldest ``ready_at`` first within a queue, each lease counting one attempt."""

    @abc.abstractmethod
    async def heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        """Extend each (id, token) lease still held to now + ``lease_for``."""

    @abc.abstractmethod
    async def set_progress(self, updates: Sequence[tuple[str, str, Progress]]) -> list[bool]:
        """Record progress for each (id, token) still held."""

    @abc.abstractmethod
    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Apply each outcome whose token still holds its job; answer which were applied."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> Job | None:
        """Queued → cancelled (key freed); running → ``cancel_requested``; terminal: unchanged."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]: ...

    async def versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        """The current ``version`` of each job that exists (absent ids: deleted). Long-polls
        are woken by comparing these once a second; a backend that can read versions without
        whole records should (sqlite does)."""
        jobs = await self.get_many(job_ids)
        return {job.id: job.version for job in jobs if job is not None}

    @abc.abstractmethod
    async def find_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, if any."""

    @abc.abstractmethod
    async def list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Newest first; ``cursor`` is the last id of the previous page."""

    @abc.abstractmethod
    async def stats(self) -> list[QueueStats]: ...

    @abc.abstractmethod
    async def delete(self, job_id: str) -> Job | None:
        """Delete a terminal job and free its key; answer the job as it was (not deleted when it
        is not terminal), or ``None`` if there is no such job."""

    @abc.abstractmethod
    async def redrive(self, queue: str) -> int:
        """Failed jobs of ``queue`` go back to queued, attempts reset; answers how many."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`BackendError` unless the storage answers."""

    @abc.abstractmethod
    async def save_steps(
        self, job_id: str, token: str, steps: list[StepState], checkpoint: dict[str, Any]
    ) -> bool:
        """Record a multi-step job's step states and checkpoint, if ``token`` still holds it."""

    @abc.abstractmethod
    async def save_group(self, record: GroupRecord) -> None:
        """Store a group's record (its jobs are stored first, by ``enqueue``)."""

    @abc.abstractmethod
    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group's record, if stored."""

    @abc.abstractmethod
    async def sweep_expired(self, limit: int) -> list[Job]:
        """Delete up to ``limit`` terminal jobs whose ``expires_at`` has passed (freeing their
        keys) and answer them, so the caller can delete their result blobs. Safe to run from
        many processes at once: each job is answered to exactly one of them."""

    @abc.abstractmethod
    async def drop_results(self, sticky: bool, limit: int) -> list[Job]:
        """Drop the results of up to ``limit`` succeeded jobs with this ``sticky`` flag (the
        persistent area when true, the temporary one when false): their result becomes
        ``ResultRef(area="dropped")`` and their keys are freed. Answers the jobs as they were,
        so the caller can delete their blobs; an empty answer means none are left."""

    @abc.abstractmethod
    async def register_worker(self, info: WorkerInfo) -> None:
        """Insert or refresh this worker's row."""

    @abc.abstractmethod
    async def remove_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def list_workers(self, seen_since: float) -> list[WorkerInfo]:
        """Workers whose ``last_seen`` is at or after ``seen_since``, by id."""


class ResultWriter(abc.ABC):
    """A result being written; invisible to readers until ``commit``."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> int:
        """Publish atomically; answers the size in bytes."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Drop what was written; safe to call after commit or twice."""


class ResultStore(_AsyncClosing, abc.ABC):
    name: str = "abstract"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock

    @abc.abstractmethod
    async def writer(self, area: Area, name: str) -> ResultWriter: ...

    async def put(self, area: Area, name: str, data: bytes) -> int:
        writer = await self.writer(area, name)
        try:
            await writer.write(data)
            return await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    @abc.abstractmethod
    def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` up to (excluding) ``end``; raises :class:`ResultExpired` if missing."""

    @abc.abstractmethod
    async def size(self, area: Area, name: str) -> int | None: ...

    @abc.abstractmethod
    async def delete(self, area: Area, name: str) -> None: ...

    @abc.abstractmethod
    async def purge(self, area: Area, older_than: float | None = None) -> int:
        """Delete results of ``area`` written before ``older_than`` (all when ``None``)."""

    async def ping(self) -> None:
        """Raise :class:`BackendError` unless the storage answers."""
