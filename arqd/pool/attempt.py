"""The attempt: one job run by one consumer (its context, its deadline, its interruption, its
result kept), and the progress it reports, written coalesced.

An attempt has no timer of its own (a timer per job cost a fifth of the pool's time, an
``asyncio.timeout`` scope per job a tenth): the pool's deadline sweep interrupts attempts past
their timeout, and cancels, lost leases and shutdown interrupt the same way: record why, then
cancel the consumer's task once; the attempt takes that cancellation back (``uncancel``) and turns
it into its outcome, exactly as ``asyncio.timeout`` does, so a cancellation from anyone else still
propagates. What the outcome is (retry, failure, refusal, inline or blob) the core decides.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from arqd.backends.base import Outcome, Update
from arqd.core import Core
from arqd.errors import BackendError
from arqd.handlers import Handler, JobContext
from arqd.model import Progress
from arqd.observe import Observer
from arqd.pool.leases import Held, Leases
from arqd.stepmodel import STEPS_HANDLER

log = structlog.get_logger("arqd.pool")

Reason = Literal["cancelled", "lost", "shutdown", "timeout"]

PROGRESS_INTERVAL = 0.25  # at most four progress writes per second per job


@dataclass(slots=True, eq=False)
class Attempt:
    """The state of one running attempt."""

    held: Held
    ctx: JobContext | None = None
    deadline: float = 0.0  # on the loop's clock; the deadline sweep interrupts past it
    task: asyncio.Task[None] | None = None  # the consumer, while the handler may be interrupted
    cancelled: bool = False  # whether we cancelled ``task`` to interrupt it
    reason: Reason | None = None
    progress: Progress | None = None  # the latest report, not yet written
    started: float | None = None  # when the handler was called (clock time), if it was
    began: float = 0.0  # the same, on the loop's monotonic clock

    @property
    def interrupted(self) -> bool:
        return self.reason is not None

    def interrupt(self, reason: Reason) -> None:
        """Stop the handler (once, for the first reason): it ends at its next ``await``."""
        if self.reason is not None:
            return
        self.reason = reason
        if reason == "cancelled" and self.ctx is not None:
            self.ctx.request_cancel()
        if self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()


class Runner:
    """Runs attempts for one pool: finds the handler, asks the core for refusals, failures and
    where the result goes, and turns interruptions into outcomes."""

    def __init__(
        self,
        core: Core,
        observer: Observer,
        leases: Leases,
        progress: ProgressWriter,
        worker_id: str,
    ) -> None:
        self.core = core
        self.outcomes = core.outcomes  # the rules each attempt's end is decided by
        self.resultio = core.resultio
        self.observer = observer
        self.leases = leases
        self.progress = progress
        self.worker_id = worker_id

    async def run(self, a: Attempt, task: asyncio.Task[None]) -> Outcome | None:
        """Run ``a`` on the consumer ``task``; its outcome, ``None`` if its lease was lost."""
        lease = a.held.lease  # a local of this frame: tests/chaos finds the lease on the stack
        job, token = lease.job, lease.token
        core, outcomes = self.core, self.outcomes
        fn = self._handler_for(a)
        early = outcomes.refuse(job, token, fn is not None, self.worker_id)
        if early is not None or fn is None:
            return early
        if a.interrupted:  # before it began
            return self._interrupted(a)
        progress = self.progress
        ctx = a.ctx = JobContext(job, lambda p: progress.report(a, p))
        a.began = asyncio.get_running_loop().time()
        a.deadline = a.began + job.timeout
        a.started = started = core.clock.time()
        self.observer.attempt_started(job.queue, max(0.0, started - job.ready_at.timestamp()))
        cancelling = task.cancelling()
        a.task = task
        try:
            value = fn(ctx, job.payload)
            if inspect.isawaitable(value):  # an async generator handler is not awaited
                value = await value
            ref = await self.resultio.store(job, token, value)
        except asyncio.CancelledError:
            if not a.cancelled or task.uncancel() > cancelling:
                raise  # not (only) ours: someone cancels the consumer itself
            return self._interrupted(a)
        except Exception as exc:
            if a.cancelled:  # the handler turned our cancellation into an error of its own
                task.uncancel()
            return outcomes.failure(job, token, exc)
        finally:
            a.task = None
        if a.cancelled:  # the handler swallowed our cancellation and returned
            task.uncancel()
        if a.reason == "lost":
            return None
        return outcomes.succeeded(job, token, ref, started)

    def _handler_for(self, a: Attempt) -> Handler | None:
        handler = a.held.lease.job.handler
        if handler == STEPS_HANDLER:
            return functools.partial(self._run_steps, a)
        registry = self.core.registry
        hdef = registry.get(handler) if registry is not None else None
        return None if hdef is None else hdef.fn

    def _interrupted(self, a: Attempt) -> Outcome | None:
        job, token = a.held.lease.job, a.held.lease.token
        if a.reason == "timeout":
            return self.outcomes.timed_out(job, token)
        if a.reason == "cancelled":
            return self.outcomes.cancelled(job, token)
        if a.reason == "shutdown":
            return self.outcomes.released(job, token)
        return None  # lost: another consumer owns the job now; write nothing

    async def _run_steps(self, a: Attempt, ctx: JobContext, payload: Any) -> Any:
        """The built-in handler of multi-step HTTP jobs: open the sealed steps, resume from the
        checkpoint, and save each step's outcome with a write fenced by this lease."""
        from arqd import steps as http_steps  # the HTTP machinery loads only when used

        core, leases, held = self.core, self.leases, a.held
        job, token = held.lease.job, held.lease.token
        specs, creds = core.unseal_steps(job)
        checkpoint = http_steps.Checkpoint(dict(job.checkpoint or {}), list(job.steps or []))

        async def save(cp: http_steps.Checkpoint) -> None:
            saved = Update(job_id=job.id, token=token, steps=cp.states, checkpoint=cp.outcomes)
            if (await core.queue.update([saved]))[0]:
                core.hub.job_changed(job.id)
            else:
                leases.lost(held)

        async def before() -> None:
            """No request on a lease that expired meanwhile (a stalled process resuming)."""
            if not await leases.still_held(held):
                leases.lost(held)
                await asyncio.sleep(0)  # the interruption lands here

        allow = core.config.http_steps.allow_hosts
        return await http_steps.run_steps(specs, creds, allow, checkpoint, save, before=before)


class ProgressWriter:
    """Writes the progress running attempts report, coalesced: the latest report of each, in one
    backend call at most every ``PROGRESS_INTERVAL``."""

    def __init__(self, core: Core, leases: Leases) -> None:
        self.core = core
        self.leases = leases
        self._dirty: set[Attempt] = set()
        self._event = asyncio.Event()

    def report(self, a: Attempt, progress: Progress) -> None:
        a.progress = progress
        self._dirty.add(a)
        self._event.set()

    def discard(self, a: Attempt) -> None:
        """``a`` ended: its last report is not written (its outcome says more)."""
        self._dirty.discard(a)

    async def run(self) -> None:
        core = self.core
        while True:
            await self._event.wait()
            self._event.clear()
            dirty, batch = [], []
            for a in self._dirty:
                if a.progress is not None:
                    dirty.append(a)
                    lease = a.held.lease
                    batch.append(
                        Update(job_id=lease.job.id, token=lease.token, progress=a.progress)
                    )
            self._dirty.clear()
            if batch:
                try:
                    answers = await core.queue.update(batch)
                except BackendError as exc:
                    log.warning("backend.progress_failed", error=str(exc))
                else:
                    for a, ok in zip(dirty, answers, strict=True):
                        if ok:
                            core.hub.job_changed(a.held.lease.job.id)
                        else:
                            self.leases.lost(a.held)
            await asyncio.sleep(PROGRESS_INTERVAL)
