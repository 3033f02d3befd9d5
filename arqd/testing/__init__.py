"""``arqd.testing``: run your handlers in your own tests, in memory, on demand.

``TestApp`` is an ``arqd.App`` on the memory queue and results and a test clock
(``arqd.clock.ManualClock``) that runs no job until ``await app.drain()``: no pool works in the
background, so a test submits, drains, and reads what happened, with no timing races. ``drain``
runs every ready job to its end; then, while a job of the app's queues waits for a later time (a
retry's backoff, a ``delay``), it moves the test clock to that time and runs it too: backoffs
are computed as in production and skipped, never slept (``docs/design.md``).

The app keeps a record: ``app.submitted`` (each job stored by a submit, a group or a handler) and
``app.attempts`` (how each attempt ended: job, handler, attempt, state, error type).
``app.reset()`` empties the backends and the record. ``arqd.testing.pytest_plugin`` gives the
``arqd_app`` fixture (docs/python.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from arqd.app import App
from arqd.backends.base import Enqueued, ListFilter, Outcome
from arqd.backends.memory import MemoryQueue
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.handlers import Registry
from arqd.model import GroupRecord, NewJob, State
from arqd.pool import Pool
from arqd.results.memory import MemoryResults

__all__ = ["Attempt", "RecordingQueue", "Submitted", "TestApp", "TestResults"]

ROUNDS_MAX = 10_000  # clock moves in one drain: beyond, a job keeps making jobs (a loop)
PAGE = 1000  # queued jobs read per page while looking for the next one due


@dataclass(frozen=True)
class Submitted:
    """A job spec as the core stored it (every default resolved). ``created`` is False when its
    key matched a live job: ``job_id`` is then that job's."""

    job_id: str
    handler: str
    payload: Any
    queue: str
    key: str | None
    created: bool


@dataclass(frozen=True)
class Attempt:
    """How one attempt ended. ``state`` is the job's state after it: ``succeeded``, ``failed``,
    ``cancelled``, or ``queued`` (it will be tried again)."""

    job_id: str
    handler: str
    attempt: int
    state: State
    error_type: str | None = None
    error: str | None = None


class RecordingQueue(MemoryQueue):
    """The memory queue, recording what was stored and how each attempt ended."""

    def __init__(self, *, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.submitted: list[Submitted] = []
        self.attempts: list[Attempt] = []

    async def enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None, *, connection: object = None
    ) -> list[Enqueued]:
        stored = await super().enqueue(jobs, group, connection=connection)
        self.submitted += [
            Submitted(e.job.id, new.handler, new.payload, new.queue, new.key, e.created)
            for new, e in zip(jobs, stored, strict=True)
        ]
        return stored

    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        applied = await super().finish(outcomes)
        self.attempts += [
            Attempt(
                o.job.id,
                o.job.handler,
                o.job.attempts,  # the record as leased: the lease counted this attempt
                o.state,
                o.error.type if o.error else None,
                o.error.message if o.error else None,
            )
            for o, ok in zip(outcomes, applied, strict=True)
            if ok and o.count_attempt  # not a release: that attempt is given back
        ]
        return applied

    def reset(self) -> None:
        """Forget every job, key, group, worker and mark, and the record."""
        super().reset()
        self.submitted.clear()
        self.attempts.clear()


class TestResults(MemoryResults):
    """The memory result store (``reset()`` forgets every blob)."""

    __test__ = False  # a helper, not a test class for pytest to collect


class TestApp(App):
    """An ``arqd.App`` for tests: memory backends, a test clock, jobs run only in ``drain()``.

    ``config`` gives the handlers (``[handlers]``), defaults and workers; its ``[queue]`` and
    ``[results]`` are not used. Register more handlers with ``@app.handler``. Schedules and the
    sweeper of expired results do not run."""

    __test__ = False  # a helper, not a test class for pytest to collect

    def __init__(self, config: Config | None = None, *, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock(time.time())
        self.queue = RecordingQueue(clock=self.clock)
        self.results = TestResults(clock=self.clock)
        super().__init__(config, queue=self.queue, results=self.results, clock=self.clock)
        self._entered = False

    @property
    def submitted(self) -> list[Submitted]:
        """Every job stored so far, in order."""
        return self.queue.submitted

    @property
    def attempts(self) -> list[Attempt]:
        """Every attempt ended so far, in order."""
        return self.queue.attempts

    def reset(self) -> None:
        """Empty the queue, the results and the record (the clock and handlers stay)."""
        self.queue.reset()
        self.results.reset()

    async def __aenter__(self) -> Self:
        self.core.registry = Registry.from_config(self.config, self.extra_handlers)
        await self.queue.open()
        await self.results.open()
        self._entered = True
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        if self._entered:
            self._entered = False
            await self.queue.aclose()
            await self.results.aclose()

    async def drain(self, *, advance: bool = True) -> None:
        """Run jobs until none of the app's queues (``workers.queues``) is ready. With
        ``advance`` (the default), then move the clock to the next job due and go on, until
        none is queued: retries, backoffs and delays all run, in the order they would."""
        assert self._entered, "drain() needs an open app: use it inside `async with app`"
        pool = self.pool = Pool(self.core, supervisor=self.supervisor)
        await pool.start()
        try:
            for _ in range(ROUNDS_MAX):
                await pool.drain()
                wait = await self._next_due() if advance else None
                if wait is None:
                    return
                self.clock.advance(wait)
            raise RuntimeError(f"drain: jobs still due after {ROUNDS_MAX} clock moves")
        finally:
            await pool.stop()
            self.pool = None

    async def _next_due(self) -> float | None:
        """Seconds until the next queued job of the app's queues is due, or None if none is
        queued. A ready job the pool did not take can only be one whose stored time was rounded
        below the clock: it is due a moment later."""
        now, queues = self.clock.time(), set(self.config.workers.queues)
        due: float | None = None
        cursor: str | None = None
        while True:
            jobs, cursor = await self.queue.list_jobs(ListFilter(state=State.QUEUED), PAGE, cursor)
            for job in jobs:
                at = job.ready_at.timestamp()
                if job.queue in queues and (due is None or at < due):
                    due = at
            if cursor is None:
                break
        return None if due is None else max(due - now, 0.0) + 1e-3
