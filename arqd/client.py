"""``arqd.Client``: submit and inspect jobs in-process, straight on the backends.

Same semantics as the HTTP API: the same validation, defaults, dedupe and errors, and the same
view of a job (``arqd.view``): the stored records stay with the core.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import msgspec

from arqd.api import JobsAPI, plain_spec, spec_of
from arqd.backends.base import QueueBackend
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import Config, load_config
from arqd.core import Core, parse_group, parse_spec
from arqd.groups import Group, GroupStatus, group_of, status_of
from arqd.handlers import Registry
from arqd.model import State
from arqd.resultio import JSON
from arqd.results.base import ResultStore
from arqd.stores import make_queue, make_results
from arqd.view import Job, QueueInfo, WorkerInfo, public_job


class Client:
    """In-process client. ``async with Client.from_config("config.toml") as client: ...``

    Built from backends you opened yourself (``Client(queue=..., results=...)``), it accepts any
    handler name; built from a config, it knows the registered handlers and refuses others.
    """

    def __init__(
        self,
        queue: QueueBackend | None = None,
        results: ResultStore | None = None,
        *,
        config: Config | None = None,
        registry: Registry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        _core: Core | None = None,
    ) -> None:
        self._owned = False
        if _core is not None:
            self._core = _core
            return
        config = config or Config()
        if queue is None or results is None:
            self._owned = True
        queue = queue or make_queue(config.queue, clock)
        results = results or make_results(config.results, clock)
        self._core = Core(queue, results, config, registry)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> Client:
        config = load_config(path)
        return cls(config=config, registry=Registry.from_config(config))

    @property
    def core(self) -> Core:
        return self._core

    async def __aenter__(self) -> Self:
        if self._owned:
            await self._core.queue.open()
            await self._core.results.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._owned:
            await self._core.queue.aclose()
            await self._core.results.aclose()

    # --- submitting -------------------------------------------------------------------------------

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

        ``connection``: on the postgres backend, your asyncpg connection inside an open
        transaction; the job is stored in that transaction and exists if and only if it commits
        (docs/postgres.md). Other backends refuse it (``arqd.InvalidRequest``)."""
        spec = spec_of(
            handler,
            payload,
            sticky,
            queue=queue,
            key=key,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            meta=meta,
        )
        (job,) = await self.submit_many([spec], connection=connection)
        return job

    async def submit_many(
        self, specs: Sequence[Mapping[str, Any]], *, connection: object = None
    ) -> builtins.list[Job]:
        """Submit specs (as in the JSON job spec) atomically: all are stored, or none; with
        ``connection``, in the caller's transaction (see ``submit``)."""
        parsed = [parse_spec(plain_spec(s)) for s in specs]
        stored = await self._core.submit(parsed, connection=connection)
        return [
            public_job(e.job if e.created else msgspec.structs.replace(e.job, deduplicated=True))
            for e in stored
        ]

    # --- reading ----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job; ``arqd.JobNotFound`` if unknown."""
        return public_job(await self._core.get(job_id))

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once terminal; ``TimeoutError`` if that takes longer than ``timeout``."""
        return public_job(await self._core.wait(job_id, timeout))

    async def result(self, job_id: str) -> Any:
        """The JSON value of a succeeded job, or ``bytes`` for a blob."""
        job = await self._core.get(job_id)
        ref = self._core.resultio.check(job)
        if ref.is_inline:
            return ref.inline
        data = b"".join([chunk async for chunk in self._core.resultio.read(ref)])
        return msgspec.json.decode(data) if ref.content_type == JSON else data

    async def stream_result(self, job_id: str) -> AsyncIterator[bytes]:
        """The result's bytes in chunks, never whole in memory."""
        job = await self._core.get(job_id)
        ref = self._core.resultio.check(job)
        async for chunk in self._core.resultio.read(ref):
            yield chunk

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
        asked = self._core.list_query(
            {
                "queue": queue,
                "state": state,
                "handler": handler,
                "group_id": group_id,
                "limit": limit,
                "cursor": cursor,
            }
        )
        jobs, nxt = await self._core.list_jobs(asked)
        return [public_job(j) for j in jobs], nxt

    # --- groups and the cache -------------------------------------------------------------------

    async def trigger_group(self, name: str) -> Group:
        """Submit the group ``name`` defined in config (``arqd.UnknownGroup`` if none)."""
        return group_of(await self._core.trigger_group(name))

    async def submit_group(
        self, jobs: Sequence[Mapping[str, Any]], name: str | None = None
    ) -> Group:
        """An ad-hoc group: job specs, each with an optional ``name``; all stored or none."""
        spec = parse_group({"name": name, "jobs": [plain_spec(j) for j in jobs]})
        record, _ = await self._core.submit_group(spec.name or "group", spec.jobs)
        return group_of(record)

    async def group(self, group_id: str) -> GroupStatus:
        """A group's aggregate state, counts and progress, with its jobs."""
        record, jobs = await self._core.group(group_id)
        return status_of(record, jobs)

    async def cancel_group(self, group_id: str) -> int:
        """Cancel every job of the group that is not terminal; answers how many."""
        return await self._core.cancel_group(group_id)

    async def purge(self, area: str) -> int:
        """Drop every cached result of ``area`` (``temporary`` or ``persistent``)."""
        return await self._core.purge(area)

    # --- queues and workers ---------------------------------------------------------------------

    async def queues(self) -> builtins.list[QueueInfo]:
        """Every queue holding jobs or consumed by the config, with its counts."""
        return await self._core.queues()

    async def redrive(self, queue: str) -> int:
        """Requeue the failed jobs of ``queue`` (attempts reset); answers how many."""
        return await self._core.redrive(queue)

    async def workers(self) -> builtins.list[WorkerInfo]:
        """The daemons sharing the backend, seen in the last 15 s."""
        return await self._core.workers()

    # --- changing ---------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now. Running: ``cancel_requested``, the handler is interrupted."""
        return public_job(await self._core.cancel(job_id))

    async def delete(self, job_id: str) -> None:
        """Terminal: delete the record and its result. Otherwise: cancel, as ``DELETE`` does."""
        await self._core.delete(job_id)


if TYPE_CHECKING:  # mypy holds Client to the one client interface
    _client: type[JobsAPI] = Client
