"""What the queue contract suites share: building jobs and outcomes as the core would."""

from __future__ import annotations

from typing import Any

import msgspec

from arqd.backends.base import Lease, ListFilter, Outcome, QueueBackend, Redrive, Update
from arqd.clock import ManualClock
from arqd.model import (
    GroupMember,
    GroupRecord,
    Job,
    NewJob,
    Progress,
    State,
    new_job_id,
)

VT = 30.0


def new(
    clock: ManualClock,
    *,
    queue: str = "default",
    key: str | None = None,
    delay: float = 0.0,
    **extra: Any,
) -> NewJob:
    now = clock.time()
    fields: dict[str, Any] = {
        "id": new_job_id(),
        "queue": queue,
        "handler": "h",
        "payload": {"n": 1},
        "key": key,
        "sticky": False,
        "meta": {},
        "max_attempts": 3,
        "timeout": 10.0,
        "created_at": now,
        "ready_at": now + delay,
    }
    fields.update(extra)
    return NewJob(**fields)


async def put(backend: QueueBackend, clock: ManualClock, n: int = 1, **kw: Any) -> list[Job]:
    stored = await backend.enqueue([new(clock, **kw) for _ in range(n)])
    return [e.job for e in stored]


def done(lease_job: Job, token: str, state: State = State.SUCCEEDED, **kw: Any) -> Outcome:
    return Outcome(job=lease_job, token=token, state=state, **kw)


def progress(lease: Lease, value: Progress) -> Update:
    """The progress update a consumer holding ``lease`` writes."""
    return Update(job_id=lease.job.id, token=lease.token, progress=value)


def free_all(job: Job) -> bool:
    """The ``frees_key`` of a purge freeing every key it drops (the core's, for plain keys)."""
    return True


def redrive_now(clock: ManualClock, queue: str = "default") -> Redrive:
    """A redrive as the core makes it: ready now, attempts reset, keys taken back."""
    return Redrive(queue=queue, ready_at=clock.time(), attempts=0, take_keys=True)


def nested(depth: int) -> Any:
    """A JSON value nested ``depth`` levels deep (deeper than any encoder recurses)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# Values no backend can store: each breaks the conversion of a job into what the store keeps
# (a datetime, JSON text, a DynamoDB item), so each must be refused before anything is written.

UNSTORABLE: dict[str, dict[str, Any]] = {
    "a time out of range": {"ready_at": 1e308},
    "a time that is not a number": {"created_at": float("nan")},
    "a payload that is not JSON": {"payload": {"x": object()}},
    "a payload nested too deep": {"payload": nested(100_000)},
}


async def assert_only(queue: QueueBackend, ids: list[str], ended: int = 0) -> None:
    """The backend holds exactly the jobs ``ids`` (all queued but ``ended`` of them), and its
    counts agree."""
    listed, _ = await queue.list_jobs(ListFilter(), 1000, None)
    assert sorted(j.id for j in listed) == sorted(ids)
    queued = sum(s.queued for s in await queue.stats())
    assert queued == len(ids) - ended


def group_of(clock: ManualClock, *keys: str | None, created_at: float | None = None) -> Any:
    """Jobs of one group (member ``m<i>`` keyed ``keys[i]``) and the record the core makes."""
    gid = new_job_id()
    jobs = [new(clock, key=k, group_id=gid, name=f"m{i}") for i, k in enumerate(keys)]
    record = GroupRecord(
        id=gid,
        name="g",
        created_at=clock.time() if created_at is None else created_at,
        members=[GroupMember(j.name or "", j.id) for j in jobs],
    )
    return jobs, record


def stored_group(stored: GroupRecord, record: GroupRecord) -> bool:
    """The stored record is the core's, but for the member ids."""
    return msgspec.structs.replace(stored, members=record.members) == record
