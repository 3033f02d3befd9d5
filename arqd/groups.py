"""A group's aggregate view (docs/jobs.md, Groups), shared by the HTTP API and both clients."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from arqd.model import GroupRecord, State
from arqd.model import Job as StoredJob
from arqd.view import Job, public_job


class GroupJob(msgspec.Struct, frozen=True):
    id: str
    name: str
    status_url: str


class Group(msgspec.Struct, frozen=True, kw_only=True):
    """What triggering a group answers: its id, name and jobs."""

    id: str
    name: str
    jobs: list[GroupJob]


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A group's state: ``running`` until every job is terminal, then ``succeeded`` if all
    succeeded, else ``failed``; ``progress`` is the mean of its jobs' (a finished job counts 1)."""

    id: str
    name: str
    state: str
    counts: dict[str, int]
    progress: float
    jobs: list[Job]


def group_of(record: GroupRecord) -> Group:
    return Group(
        id=record.id,
        name=record.name,
        jobs=[GroupJob(m.id, m.name, f"/v1/jobs/{m.id}") for m in record.members],
    )


def status_of(record: GroupRecord, jobs: Sequence[StoredJob]) -> GroupStatus:
    counts = {s.value: 0 for s in State}
    progress = 0.0
    for job in jobs:
        counts[job.state.value] += 1
        if job.state.terminal:
            progress += 1.0
        elif job.progress is not None and job.progress.fraction is not None:
            progress += job.progress.fraction
    if any(not j.state.terminal for j in jobs):
        state = "running"
    else:
        state = "succeeded" if all(j.state is State.SUCCEEDED for j in jobs) else "failed"
    return GroupStatus(
        id=record.id,
        name=record.name,
        state=state,
        counts=counts,
        progress=round(progress / len(jobs), 4) if jobs else 1.0,
        jobs=[public_job(j) for j in jobs],
    )
