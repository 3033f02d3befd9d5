"""``arqd.JobsAPI``: the methods ``arqd.Client`` (in-process) and ``arqd.HttpClient`` (over HTTP)
both have, with one signature each, and the job spec both build from a ``submit`` call.

Code written against ``JobsAPI`` runs on either client. mypy holds each class to it (the
``TYPE_CHECKING`` line at the end of ``arqd/client.py`` and ``arqd/http/client.py``), and
``tests/test_clients.py`` runs one scenario through both and compares the signatures. This module
imports only the model and the views, so the HTTP client loads no core.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from arqd.groups import Group, GroupStatus
from arqd.model import State
from arqd.view import Job, QueueInfo, WorkerInfo


class JobsAPI(Protocol):
    """Submit, read, wait on, cancel and delete jobs; groups, the cache, queues and workers.
    Errors are the ``arqd.ArqdError`` tree (docs/python.md); ``wait`` raises ``TimeoutError``."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def submit(
        self,
        handler: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        key: str | None = None,
        sticky: bool = False,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        meta: Mapping[str, Any] | None = None,
        connection: object = None,
    ) -> Job:
        """Submit one job; a dedupe hit answers the live job with ``deduplicated=True``.
        ``connection``: the in-process client on postgres stores the job in that asyncpg
        transaction (docs/postgres.md); elsewhere it is refused (``InvalidRequest``)."""
        ...

    async def submit_many(
        self, specs: Sequence[Mapping[str, Any]], *, connection: object = None
    ) -> builtins.list[Job]:
        """Submit specs (as in the JSON job spec) atomically: all are stored, or none."""
        ...

    async def get(self, job_id: str) -> Job:
        """The job; ``arqd.JobNotFound`` if unknown."""
        ...

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once terminal; ``TimeoutError`` if that takes longer than ``timeout``."""
        ...

    async def result(self, job_id: str) -> Any:
        """The JSON value of a succeeded job, or ``bytes`` for a blob."""
        ...

    def stream_result(self, job_id: str) -> AsyncIterator[bytes]:
        """The result's bytes in chunks, never whole in memory."""
        ...

    async def list(
        self,
        *,
        queue: str | None = None,
        state: State | str | None = None,
        handler: str | None = None,
        group_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        """Newest first, at most ``limit`` (≤ 1000); pass the answered cursor for the next page."""
        ...

    async def trigger_group(self, name: str) -> Group:
        """Submit the group ``name`` defined in config (``arqd.UnknownGroup`` if none)."""
        ...

    async def submit_group(
        self, jobs: Sequence[Mapping[str, Any]], name: str | None = None
    ) -> Group:
        """An ad-hoc group: job specs, each with an optional ``name``; all stored or none."""
        ...

    async def group(self, group_id: str) -> GroupStatus:
        """A group's aggregate state, counts and progress, with its jobs."""
        ...

    async def cancel_group(self, group_id: str) -> int:
        """Cancel every job of the group that is not terminal; answers how many."""
        ...

    async def purge(self, area: str) -> int:
        """Drop every cached result of ``area`` (``temporary`` or ``persistent``)."""
        ...

    async def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now. Running: ``cancel_requested``, the handler is interrupted."""
        ...

    async def delete(self, job_id: str) -> None:
        """Terminal: delete the record and its result. Otherwise: cancel, as ``DELETE`` does."""
        ...

    async def queues(self) -> builtins.list[QueueInfo]:
        """Every queue holding jobs or consumed by the config, with its counts."""
        ...

    async def redrive(self, queue: str) -> int:
        """Requeue the failed jobs of ``queue`` (attempts reset); answers how many."""
        ...

    async def workers(self) -> builtins.list[WorkerInfo]:
        """The daemons sharing the backend, seen in the last 15 s."""
        ...


def spec_of(handler: str, payload: Any, sticky: bool, **optional: Any) -> dict[str, Any]:
    """The JSON job spec of a ``submit(handler, payload, ...)`` call: both clients build it so."""
    spec: dict[str, Any] = {"handler": handler, "payload": payload, "sticky": sticky}
    for name, value in optional.items():
        if value is not None:
            spec[name] = value.isoformat() if isinstance(value, datetime) else value
    return spec


def plain_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec given to ``submit_many`` or ``submit_group`` as JSON: a ``run_at`` datetime as
    its RFC 3339 string."""
    out = dict(spec)
    if isinstance(out.get("run_at"), datetime):
        out["run_at"] = out["run_at"].isoformat()
    return out
