"""The completer: writes attempts' outcomes in batches (one backend call for all the outcomes that
piled up while the previous call ran, so throughput grows with load instead of collapsing),
retrying through backend faults; reports each outcome that landed, drops each one refused."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import structlog

from arqd import logs
from arqd.backends.base import Lease, Outcome
from arqd.core import Core
from arqd.errors import BackendError
from arqd.model import State
from arqd.observe import Ended, Observer
from arqd.pool.leases import Held, Leases

log = structlog.get_logger("arqd.pool")

BACKEND_RETRY_MAX = 5.0  # longest pause between retries of a failing backend call
_ENDED: dict[State, Ended] = {
    State.SUCCEEDED: "succeeded",
    State.FAILED: "failed",
    State.CANCELLED: "cancelled",
}


class Completer:
    """Outcomes waiting to be written, and the loop writing them."""

    def __init__(self, core: Core, observer: Observer, leases: Leases) -> None:
        self.core = core
        self.observer = observer
        self.leases = leases
        self._pending: list[tuple[Held, Outcome]] = []
        self._event = asyncio.Event()

    def complete(self, held: Held, outcome: Outcome) -> None:
        """Queue ``outcome`` for writing; ``held`` stays held (and heartbeated) until it lands."""
        self.leases.ending_now(held)
        self._pending.append((held, outcome))
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    async def run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            batch, self._pending = self._pending, []
            if batch:
                applied = await self._finish(batch)
                for (held, outcome), ok in zip(batch, applied, strict=True):
                    if ok:
                        self._landed(held, outcome)
                    else:
                        await self._refused(held, outcome)

    async def _finish(self, batch: list[tuple[Held, Outcome]]) -> list[bool]:
        """Write outcomes, retrying through backend faults: an outcome is never dropped (the
        leases stay held and heartbeated meanwhile; fencing refuses it if they expire)."""
        failures = 0
        while True:
            try:
                return await self.core.queue.finish([o for _, o in batch])
            except BackendError as exc:
                failures += 1
                log.warning(
                    "backend.finish_failed", error=str(exc), jobs=len(batch), failures=failures
                )
                await asyncio.sleep(min(BACKEND_RETRY_MAX, 0.05 * 2**failures))

    def _landed(self, held: Held, outcome: Outcome) -> None:
        self.leases.forget(held)
        lease, core = held.lease, self.core
        now = core.clock.time()
        self._observe(lease, outcome, now)
        core.hub.job_changed(lease.job.id)
        _canonical(lease, outcome, now)

    async def _refused(self, held: Held, outcome: Outcome) -> None:
        """The outcome's write was fenced: another worker holds the job now. Drop our result."""
        self.leases.forget(held)
        self.observer.lease_lost("finish")
        job = held.lease.job
        log.warning(
            "job.lease_lost",
            job_id=job.id,
            handler=job.handler,
            attempt=job.attempts,
            outcome=outcome.state.value,
        )
        await self.core.resultio.delete(outcome.result)

    def _observe(self, lease: Lease, outcome: Outcome, now: float) -> None:
        job = lease.job
        ended = _ENDED.get(outcome.state) or ("retry" if outcome.count_attempt else "released")
        seconds = None
        if outcome.count_attempt:
            started = _started(lease, outcome)
            if started is not None:
                seconds = max(0.0, now - started)
        self.observer.attempt_ended(job.queue, job.handler, ended, seconds)


def _canonical(lease: Lease, outcome: Outcome, now: float) -> None:
    """One rich log line per attempt that ended, with its timings."""
    if not _info_enabled():
        return
    job = lease.job
    if outcome.state is State.QUEUED:
        event = "job.released" if not outcome.count_attempt else "job.retrying"
    else:
        event = "job." + outcome.state.value
    started = _started(lease, outcome)
    started = now if started is None else started
    log.info(
        event,
        job_id=job.id,
        handler=job.handler,
        queue=job.queue,
        attempt=job.attempts,
        state=outcome.state.value,
        queued_ms=round((started - job.ready_at.timestamp()) * 1000, 3),
        run_ms=round((now - started) * 1000, 3),
        error_type=outcome.error.type if outcome.error else None,
    )


def _started(lease: Lease, outcome: Outcome) -> float | None:
    """When the attempt's handler began; the lease's time when no handler ran."""
    if outcome.started_at is not None:
        return outcome.started_at
    started = lease.job.started_at
    return None if started is None else started.timestamp()


def _info_enabled() -> bool:
    """Whether info lines are wanted; asked of the logging setup once per second at most."""
    now = time.monotonic()
    if now >= _level_cache[1]:
        _level_cache[:] = [logs.enabled(logging.INFO), now + 1.0]
    return bool(_level_cache[0])


_level_cache: list[Any] = [True, 0.0]
