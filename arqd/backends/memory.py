"""The memory backends: real, contract-checked backends that keep everything in this process.

Used by unit tests and by programs that want a queue without durability. Every method runs
without awaiting anything, so each is atomic on the event loop, as a transaction would be.
Ready jobs are found through one heap per queue keyed by visibility time; entries made stale by a
later change are skipped when popped (lazy deletion), so leasing stays O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    Update,
    WorkerInfo,
    convert_all,
    droppable,
    group_record,
    storable_group,
    storable_job,
)
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.model import (
    DROPPED,
    GroupRecord,
    Job,
    NewJob,
    ResultRef,
    State,
    from_ts,
    new_token,
)

_ids = itertools.count()


@dataclass(slots=True)
class _Row:
    job: Job
    visible_at: float | None
    token: str | None = None


@dataclass(slots=True)
class _Key:
    job_id: str
    expires_at: float | None = None


@dataclass
class _Store:
    rows: dict[str, _Row] = field(default_factory=dict)
    heaps: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)


class MemoryQueue(QueueBackend):
    """Job records in a dict; see the module docstring."""

    name = "memory"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._s = _Store()
        self._identity = f"memory:{next(_ids)}"

    def reset(self) -> None:
        """Forget every job, key, group, worker and mark (for tests: ``arqd.testing``)."""
        self._s = _Store()

    @property
    def identity(self) -> str:
        return self._identity

    # --- internals --------------------------------------------------------------------------------

    def _set_visible(self, row: _Row, at: float | None) -> None:
        row.visible_at = at
        if at is not None:
            heapq.heappush(self._s.heaps.setdefault(row.job.queue, []), (at, row.job.id))

    def _key_holder(self, key: str, now: float) -> Job | None:
        entry = self._s.keys.get(key)
        if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
            return None
        row = self._s.rows.get(entry.job_id)
        return row.job if row else None

    def _free_key(self, job: Job) -> None:
        if job.key is not None:
            entry = self._s.keys.get(job.key)
            if entry is not None and entry.job_id == job.id:
                del self._s.keys[job.key]

    def _held(self, job_id: str, token: str) -> _Row | None:
        row = self._s.rows.get(job_id)
        if row is None or row.token != token or row.job.state is not State.RUNNING:
            return None
        return row

    # --- the contract -----------------------------------------------------------------------------

    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None
    ) -> list[Enqueued]:
        # Everything is converted first; from there on nothing can fail, and nothing awaits.
        records = convert_all(jobs, _convert)
        if group is not None:
            storable_group(group, jobs)
        now = self.clock.time()
        out: list[Enqueued] = []
        for new, job in zip(jobs, records, strict=True):
            holder = self._key_holder(new.key, now) if new.key is not None else None
            if holder is not None:
                out.append(Enqueued(holder, created=False))
                continue
            row = _Row(job, None)
            self._s.rows[job.id] = row
            self._set_visible(row, new.ready_at)
            if new.key is not None:
                self._s.keys[new.key] = _Key(job.id)
            out.append(Enqueued(job, created=True))
        if group is not None:
            self._s.groups[group.id] = group_record(group, [e.job.id for e in out])
        return out

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        now = self.clock.time()
        token = new_token()
        expires = now + lease_for
        out: list[Lease] = []
        for queue in queues:
            heap = self._s.heaps.get(queue)
            while heap and len(out) < limit and heap[0][0] <= now:
                at, job_id = heapq.heappop(heap)
                row = self._s.rows.get(job_id)
                if row is None or row.visible_at != at:
                    continue  # stale entry
                job = row.job
                recovered = job.state is State.RUNNING
                row.job = _replace(
                    job,
                    state=State.RUNNING,
                    attempts=job.attempts + 1,
                    started_at=from_ts(now),
                    version=job.version + 1,
                )
                row.token = token
                self._set_visible(row, expires)
                out.append(Lease(row.job, token, expires, recovered))
        return out

    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        until = self.clock.time() + lease_for
        replies = []
        for job_id, token in leases:
            row = self._held(job_id, token)
            if row is None:
                replies.append(HeartbeatReply(held=False, cancel_requested=False))
                continue
            self._set_visible(row, until)
            replies.append(HeartbeatReply(held=True, cancel_requested=row.job.cancel_requested))
        return replies

    async def _update(self, updates: Sequence[Update]) -> list[bool]:
        answers = []
        for u in updates:
            row = self._held(u.job_id, u.token)
            if row is not None:
                changes: dict[str, object] = {"version": row.job.version + 1}
                if u.progress is not None:
                    changes["progress"] = u.progress
                if u.steps is not None:
                    changes["steps"] = list(u.steps)
                    changes["checkpoint"] = dict(u.checkpoint or {})
                row.job = _replace(row.job, **changes)
            answers.append(row is not None)
        return answers

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        now = self.clock.time()
        out: list[bool] = []
        for o in outcomes:
            row = self._held(o.job.id, o.token)
            if row is None:
                out.append(False)
                continue
            job = row.job
            row.token = None
            if o.state is State.QUEUED:
                ready = o.ready_at if o.ready_at is not None else now
                row.job = _replace(
                    job,
                    state=State.QUEUED,
                    attempts=job.attempts if o.count_attempt else job.attempts - 1,
                    ready_at=from_ts(ready),
                    started_at=from_ts(o.started_at),
                    error=o.error if o.error is not None else job.error,
                    version=job.version + 1,
                )
                self._set_visible(row, ready)
            else:
                row.job = _replace(
                    job,
                    state=o.state,
                    attempts=job.attempts if o.count_attempt else job.attempts - 1,
                    started_at=from_ts(o.started_at),
                    finished_at=from_ts(now),
                    result=o.result,
                    error=o.error,
                    expires_at=from_ts(o.expires_at),
                    version=job.version + 1,
                )
                self._set_visible(row, None)
                if o.free_key:
                    self._free_key(job)
                elif job.key is not None:
                    entry = self._s.keys.get(job.key)
                    if entry is not None and entry.job_id == job.id:
                        entry.expires_at = None if o.keep_key else o.expires_at
            out.append(True)
        return out

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        row = self._s.rows.get(job_id)
        if row is None:
            return None
        job = row.job
        if job.state is State.QUEUED:
            row.job = _replace(
                job,
                state=State.CANCELLED,
                finished_at=from_ts(self.clock.time()),
                version=job.version + 1,
            )
            self._set_visible(row, None)
            if free_key:
                self._free_key(job)
        elif job.state is State.RUNNING and not job.cancel_requested:
            row.job = _replace(job, cancel_requested=True, version=job.version + 1)
        return row.job

    async def _get(self, job_id: str) -> Job | None:
        row = self._s.rows.get(job_id)
        return row.job if row else None

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return [await self._get(i) for i in job_ids]

    async def _find_by_key(self, key: str) -> Job | None:
        return self._key_holder(key, self.clock.time())

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        jobs: list[Job] = []
        for job_id in sorted(self._s.rows, reverse=True):
            if cursor is not None and job_id >= cursor:
                continue
            job = self._s.rows[job_id].job
            if where.matches(job):
                jobs.append(job)
                if len(jobs) > limit:
                    break
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (jobs[-1].id if more else None)

    async def _stats(self) -> list[QueueStats]:
        now = self.clock.time()
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        for row in self._s.rows.values():
            job = row.job
            per = counts.setdefault(job.queue, {})
            per[job.state.value] = per.get(job.state.value, 0) + 1
            if job.state is State.QUEUED and row.visible_at is not None and row.visible_at <= now:
                oldest[job.queue] = min(oldest.get(job.queue, now), row.visible_at)
        return [
            QueueStats(
                name=q,
                **per,
                oldest_queued_seconds=(now - oldest[q]) if q in oldest else None,
            )
            for q, per in sorted(counts.items())
        ]

    async def _delete(self, job_id: str) -> Job | None:
        row = self._s.rows.get(job_id)
        if row is None:
            return None
        if row.job.state.terminal:
            del self._s.rows[job_id]
            self._free_key(row.job)
        return row.job

    async def _redrive(self, plan: Redrive) -> int:
        now = self.clock.time()
        count = 0
        for row in self._s.rows.values():
            job = row.job
            if job.queue == plan.queue and job.state is State.FAILED:
                row.job = _replace(
                    job,
                    state=State.QUEUED,
                    attempts=plan.attempts,
                    ready_at=from_ts(plan.ready_at),
                    finished_at=None,
                    error=None,
                    version=job.version + 1,
                )
                self._set_visible(row, plan.ready_at)
                key = job.key if plan.take_keys else None
                if key is not None and self._key_holder(key, now) is None:
                    self._s.keys[key] = _Key(job.id)
                count += 1
        return count

    async def _ping(self) -> None:
        return None

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        return self._s.groups.get(group_id)

    async def _sweep_expired(self, limit: int) -> list[Job]:
        now = self.clock.time()
        doomed = [
            row.job
            for row in self._s.rows.values()
            if row.job.state.terminal
            and row.job.expires_at is not None
            and row.job.expires_at.timestamp() <= now
        ][:limit]
        for job in doomed:
            del self._s.rows[job.id]
            self._free_key(job)
        return doomed

    async def _drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        dropped: list[Job] = []
        for row in self._s.rows.values():
            job = row.job
            if len(dropped) >= limit:
                break
            if droppable(job, sticky, before):
                dropped.append(job)
                row.job = _replace(job, result=ResultRef(area=DROPPED), version=job.version + 1)
                if frees_key(job):
                    self._free_key(job)
        return dropped

    async def _register_worker(self, info: WorkerInfo) -> None:
        self._s.workers[info.id] = info

    async def _remove_worker(self, worker_id: str) -> None:
        self._s.workers.pop(worker_id, None)

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        return sorted(
            (w for w in self._s.workers.values() if w.last_seen >= seen_since),
            key=lambda w: w.id,
        )

    async def _advance_mark(self, name: str, value: float) -> float | None:
        previous = self._s.marks.get(name)
        if previous is None or previous < value:
            self._s.marks[name] = value
        return previous

    async def _get_mark(self, name: str) -> float | None:
        return self._s.marks.get(name)


def _convert(new: NewJob) -> Job:
    """What this backend keeps of ``new``: its record; its JSON fields are checked to encode,
    as every other backend stores them as JSON."""
    msgspec.json.encode((new.payload, new.meta, new.steps))
    return storable_job(new)


def _replace(job: Job, **changes: object) -> Job:
    return msgspec.structs.replace(job, **changes)
