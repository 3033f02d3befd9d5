"""What clients see: the public ``arqd.Job`` and its ``arqd.ResultInfo``, and the operator's
``arqd.QueueInfo`` and ``arqd.WorkerInfo``.

A stored record (``arqd.model.Job``) holds what the core and the backends need besides: the owner,
the key inside its owner's namespace, where a result blob is stored, a multi-step job's checkpoint
and sealed secrets. ``public_job`` makes the view clients get, in one place: ``arqd.Client``
answers it, the HTTP API encodes it (``arqd.http.wire``) and ``arqd.HttpClient`` decodes it, so the
two clients cannot drift apart (``tests/test_clients.py`` holds them equal). This module imports
only the model, so ``arqd.HttpClient`` can use it without loading the core.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from arqd.model import (
    DROPPED,
    ErrorInfo,
    Progress,
    ResultRef,
    State,
    StepState,
    etag_of,
    links_of,
    public_key,
)
from arqd.model import Job as StoredJob
from arqd.stepmodel import SEALED, STEPS_HANDLER


class ResultInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """A succeeded job's result: ``inline`` JSON, or the ``size`` and ``content_type`` of the
    bytes at ``job.links["result"]``."""

    inline: Any = msgspec.UNSET
    size: int | None = None
    content_type: str | None = None

    @property
    def is_inline(self) -> bool:
        return self.inline is not msgspec.UNSET


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A job as its clients see it: the fields of the job JSON, in its order, ``state`` an
    ``arqd.State``. ``version`` is not in the JSON; it makes ``etag``. Over HTTP it comes from
    the ``ETag`` header, so a job from a list, a batch or a group (no header each) has none."""

    id: str
    queue: str
    handler: str
    state: State
    payload: Any = None
    key: str | None = None
    sticky: bool = False
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    attempts: int = 0
    max_attempts: int = 5
    timeout: float = 300.0
    created_at: datetime
    ready_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    progress: Progress | None = None
    error: ErrorInfo | None = None
    result: ResultInfo | None = None
    steps: list[StepState] | None = None
    group_id: str | None = None
    name: str | None = None  # the job's name within its group
    cancel_requested: bool = False
    deduplicated: bool = False  # the answer to a submit whose key matched a live job
    version: int | None = None

    @property
    def links(self) -> dict[str, str]:
        return links_of(self.id)

    @property
    def etag(self) -> str | None:
        """The job's ``ETag`` (for ``If-None-Match``); ``None`` when the version is unknown."""
        return None if self.version is None else etag_of(self.id, self.version)


def public_job(job: StoredJob) -> Job:
    """The view of a stored record that clients get (and the JSON shows)."""
    return Job(**public_fields(job))


def public_fields(job: StoredJob) -> dict[str, Any]:
    """``public_job``'s fields, in the JSON's order, for encoding without building the view
    (the HTTP API encodes every job it answers; this halves the cost of ``public_job``)."""
    return {
        "id": job.id,
        "queue": job.queue,
        "handler": job.handler,
        "state": job.state,
        "payload": _shown_payload(job),
        "key": public_key(job),
        "sticky": job.sticky,
        "meta": job.meta,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "timeout": job.timeout,
        "created_at": job.created_at,
        "ready_at": job.ready_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "expires_at": job.expires_at,
        "progress": job.progress,
        "error": job.error,
        "result": result_info(job.result),
        "steps": job.steps,
        "group_id": job.group_id,
        "name": job.name,
        "cancel_requested": job.cancel_requested,
        "deduplicated": job.deduplicated,
        "version": job.version,
    }


def result_info(ref: ResultRef | None) -> ResultInfo | None:
    """A result without where it is stored; a result the cache dropped is none (reading it
    answers ``ResultExpired``)."""
    if ref is None or ref.area == DROPPED:
        return None
    if ref.is_inline:
        return ResultInfo(inline=ref.inline)
    return ResultInfo(size=ref.size, content_type=ref.content_type)


def _shown_payload(job: StoredJob) -> Any:
    """A multi-step job's payload without its sealed secrets (they are encrypted anyway)."""
    if job.handler == STEPS_HANDLER and isinstance(job.payload, dict):
        return {k: v for k, v in job.payload.items() if k != SEALED}
    return job.payload


class QueueInfo(msgspec.Struct, frozen=True):
    """One queue's jobs by state (``GET /v1/queues``), and how long its oldest ready job has
    waited (``None``: none is ready)."""

    name: str
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    oldest_queued_seconds: float | None = None


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One daemon (or embedded pool) sharing the backend (``GET /v1/workers``): since when it
    runs, when its row was last refreshed, how many attempts it runs of how many it may."""

    id: str
    host: str
    started_at: datetime
    last_seen: datetime
    running: int
    concurrency: int
