"""How an attempt's end becomes the ``Outcome`` a backend applies, decided once for every backend:
retries and their backoff with jitter, final failure, a result's expiry, refusals, cancels,
releases, redrives, and which keys a failure, a cancel or a purge frees (a schedule tick's never).

:class:`Outcomes` holds what the rules read (the config, which a reload replaces, and the
backend's clock); the core owns one (``Core.outcomes``) and the pool asks it directly, once per
job. The schedule keys the key rule tells apart are named here too (``tick_key``, ``mark_name``).
"""

from __future__ import annotations

import math
import random

import structlog

from arqd.backends.base import Outcome, Redrive
from arqd.clock import Clock
from arqd.config import Config
from arqd.errors import CredentialsUnreadable, Fail, Retry, StepFailed
from arqd.model import AHEAD_MAX, SCHEDULE_KEY, ErrorInfo, Job, ResultRef, State

ERROR_MESSAGE_MAX = 2000  # characters of an exception's message kept in a job's error

log = structlog.get_logger("arqd.outcomes")


def tick_key(name: str, tick: float) -> str:
    """The dedupe key of schedule ``name``'s tick at ``tick`` (Unix seconds): whole seconds as
    integers, a fractional tick (``every = "1.5s"``) to the microsecond, so the key names the
    tick exactly and ``parse_tick_key`` gives it back for the schedule's mark."""
    return f"{SCHEDULE_KEY}{name}:{f'{tick:.6f}'.rstrip('0').rstrip('.')}"


def parse_tick_key(key: str | None) -> tuple[str, float] | None:
    """The (schedule, tick) a key made by ``tick_key`` names; ``None`` for any other key."""
    if key is None or not key.startswith(SCHEDULE_KEY):
        return None
    name, _, tick = key.removeprefix(SCHEDULE_KEY).rpartition(":")
    whole, _, fraction = tick.partition(".")
    exact = whole.isdigit() and (not fraction or fraction.isdigit())
    return (name, float(tick)) if name and exact else None


def mark_name(name: str) -> str:
    """The backend mark holding the latest tick the cluster fired of schedule ``name``."""
    return f"{SCHEDULE_KEY}{name}"


def frees_key(job: Job) -> bool:
    """Whether a failure, a cancel or a purge frees the job's key (docs/jobs.md): yes, except a
    schedule tick's, which is held until its record is deleted, so a late daemon cannot fire
    the tick again. The one rule for every backend (they are told, per job)."""
    return job.key is None or not job.key.startswith(SCHEDULE_KEY)


class Outcomes:
    """The rules that end an attempt, over the current config and the backend's clock."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config  # replaced on reload (``Core.config``)
        self.clock = clock

    def backoff(self, attempt: int) -> float:
        b = self.config.defaults.backoff
        delay = min(b.max, b.base * b.factor ** max(0, attempt - 1))
        return delay * random.uniform(0.5, 1.0) if b.jitter else delay

    def result_expiry(self, job: Job, now: float) -> float | None:
        return None if job.sticky else now + self.config.results.temporary_ttl

    def succeeded(
        self, job: Job, token: str, result: ResultRef, started_at: float | None
    ) -> Outcome:
        """The job succeeded: its result expires (unless sticky), and its key with it, but a
        schedule tick's key, held until its record is deleted."""
        return Outcome(
            job=job,
            token=token,
            state=State.SUCCEEDED,
            result=result,
            expires_at=self.result_expiry(job, self.clock.time()),
            keep_key=not frees_key(job),
            started_at=started_at,
        )

    def failed_attempt(
        self, job: Job, token: str, error: ErrorInfo, delay: float | None = None
    ) -> Outcome:
        """Retry after a backoff while attempts remain; else the job fails for good."""
        now = self.clock.time()
        if job.attempts < job.max_attempts:
            # A handler's Retry(delay=...) is bounded like a client's delay (NaN: the backoff).
            wait = self.backoff(job.attempts) if delay is None or math.isnan(delay) else delay
            wait = min(max(wait, 0.0), AHEAD_MAX)
            return Outcome(
                job=job, token=token, state=State.QUEUED, error=error, ready_at=now + wait
            )
        return self.final_failure(job, token, error)

    @staticmethod
    def released(job: Job, token: str) -> Outcome:
        """A lease given back unused or interrupted by shutdown: queued again, attempt uncounted."""
        return Outcome(job=job, token=token, state=State.QUEUED, count_attempt=False)

    @staticmethod
    def cancelled(job: Job, token: str) -> Outcome:
        return Outcome(job=job, token=token, state=State.CANCELLED, free_key=frees_key(job))

    @staticmethod
    def final_failure(job: Job, token: str, error: ErrorInfo) -> Outcome:
        """Failed for good; a lease beyond ``max_attempts`` (found expired) is not counted."""
        return Outcome(
            job=job,
            token=token,
            state=State.FAILED,
            error=error,
            free_key=frees_key(job),
            count_attempt=job.attempts <= job.max_attempts,
        )

    # --- running an attempt: the pool asks, these decide ----------------------------------------

    def refuse(self, job: Job, token: str, known: bool, worker: str) -> Outcome | None:
        """The outcome of a leased job that must not run, reached without calling a handler:
        its cancel was requested; its attempts were used up by leases that expired (a lease
        beyond ``max_attempts``); or no handler of its name is registered in this process
        (``known`` false; a failed attempt, as another worker may have it). ``None``: run it."""
        if job.cancel_requested:
            return self.cancelled(job, token)
        if job.attempts > job.max_attempts:
            return self.final_failure(job, token, _lease_expired(job))
        if not known:
            message = f"no handler is registered as {job.handler!r} on {worker}"
            return self.failed_attempt(job, token, _error("UnknownHandler", message, job))
        return None

    def failure(self, job: Job, token: str, exc: Exception) -> Outcome:
        """The outcome of an attempt that raised ``exc``: ``Fail`` ends the job, ``Retry`` asks
        for a delay, a step's failure and sealed data no key opens end it too (another attempt
        would fail alike); anything else is a failed attempt, retried while attempts remain."""
        if isinstance(exc, Fail):
            return self.final_failure(job, token, _error("Fail", str(exc), job))
        if isinstance(exc, Retry):
            return self.failed_attempt(job, token, _error("Retry", str(exc), job), exc.delay)
        if isinstance(exc, StepFailed):  # the job is poisoned at this step
            error = ErrorInfo(
                type=exc.type,
                message=str(exc)[:ERROR_MESSAGE_MAX],
                attempt=job.attempts,
                step=exc.step,
                status=exc.response_status,
            )
            return self.final_failure(job, token, error)
        if isinstance(exc, CredentialsUnreadable):
            error = _error("CredentialsUnreadable", str(exc), job)
            return self.final_failure(job, token, error)
        error = _error(type(exc).__name__, str(exc) or repr(exc), job)
        log.warning(
            "job.attempt_failed",
            job_id=job.id,
            handler=job.handler,
            attempt=job.attempts,
            error_type=error.type,
            error=error.message,
        )
        return self.failed_attempt(job, token, error)

    def timed_out(self, job: Job, token: str) -> Outcome:
        """The outcome of an attempt interrupted at its timeout: a failed attempt."""
        message = f"attempt {job.attempts} exceeded its timeout of {job.timeout:g}s"
        return self.failure(job, token, TimeoutError(message))

    def redriven(self, queue: str) -> Redrive:
        """What a redrive makes of ``queue``'s failed jobs: queued and ready now, no attempt
        counted, each holding its key again unless another live job took it meanwhile."""
        return Redrive(queue=queue, ready_at=self.clock.time(), attempts=0, take_keys=True)


def _error(kind: str, message: str, job: Job) -> ErrorInfo:
    return ErrorInfo(type=kind, message=message[:ERROR_MESSAGE_MAX], attempt=job.attempts)


def _lease_expired(job: Job) -> ErrorInfo:
    return ErrorInfo(
        type="LeaseExpired",
        message=f"the lease of the last attempt ({job.max_attempts}) expired: its worker "
        "stopped or stalled",
        attempt=job.max_attempts,
    )
