"""The consumer pool: lease jobs, run their handlers, store results, report outcomes.

Moving parts, each one small loop (run under a :class:`~arqd.supervise.Supervisor`: a loop that
crashes is logged and restarted):
- the **fetcher** leases batches while the pool has room (a job for every free consumer, plus a
  prefetch sized so a buffered job waits about ``TARGET_WAIT`` at the recent pace of attempts:
  none while attempts are long or not yet timed, at most ``min(batch, concurrency)``), into a
  local buffer; when nothing is ready it sleeps until a local submit wakes it or an adaptive poll
  interval passes;
- **consumers** (``concurrency`` coroutines) take leases from the buffer and run one attempt each;
- the **completer** writes outcomes in batches (one backend call for all outcomes that piled up
  while the previous call ran), so throughput grows with load instead of collapsing;
- the **heartbeat** extends every held lease in one call, and learns of lost leases (the handler is
  interrupted, its output discarded) and of cancel requests from other processes;
- the **progress** loop writes coalesced progress at most a few times per second per job.

An attempt has no timer of its own (a timer per job cost a fifth of the pool's time, an
``asyncio.timeout`` scope per job a tenth): the **deadline** sweep interrupts attempts past their
timeout, and cancels, lost leases and shutdown interrupt the same way: record why, then cancel
the consumer's task once; the attempt takes that cancellation back (``uncancel``) and turns it
into its outcome, exactly as ``asyncio.timeout`` does, so a cancellation from anyone else still
propagates.

A :class:`~arqd.supervise.LoopWatch` thread reports the event loop's timers running late and
repairs the timer heap when a handler broke it (``asyncio.sleep(nan)``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import structlog

from arqd import logs
from arqd.backends.base import Lease, Outcome, Update, WorkerInfo
from arqd.core import JSON, SEALED, STEPS_HANDLER, Core
from arqd.errors import BackendError, CredentialsUnreadable, Fail, Retry, StepFailed
from arqd.handlers import Handler, JobContext
from arqd.model import ErrorInfo, Job, Progress, ResultRef, State, blob_name, new_token
from arqd.results.base import Area
from arqd.supervise import LoopWatch, Supervisor

log = structlog.get_logger("arqd.worker")

Reason = Literal["cancelled", "lost", "shutdown", "timeout"]

POLL_MIN = 0.005  # first idle poll after activity: other processes' submits are seen within ms
PROGRESS_INTERVAL = 0.25  # at most four progress writes per second per job
REGISTER_INTERVAL = 2.0  # the worker row is refreshed this often (GET /v1/workers: seen in 15 s)
DEADLINE_TICK = 0.05  # attempt timeouts are enforced within this much (one sweep, not a timer each)
BACKEND_RETRY_MAX = 5.0  # longest pause between retries of a failing backend call
ERROR_MESSAGE_MAX = 2000
# Prefetch: a buffered lease shows its job as running although no handler runs it yet, so the
# buffer holds only about this much work at the recent pace of attempts (a job waits in it about
# this long at most): no-op jobs keep whole batches, 4 s jobs at concurrency 4 have 4 leases.
TARGET_WAIT = 0.010
ATTEMPT_WEIGHT = 0.1  # weight of the newest attempt in the moving average of their durations
OCTETS = "application/octet-stream"

_SCALARS = (int, float, bool, type(None))  # always small enough to keep inline


@dataclass(slots=True, eq=False)
class _Running:
    lease: Lease
    ctx: JobContext | None = None
    deadline: float = 0.0
    task: asyncio.Task[None] | None = None  # the consumer, while the handler may be interrupted
    cancelled: bool = False  # whether we cancelled ``task`` to interrupt it
    reason: Reason | None = None
    progress: Progress | None = None
    started: float | None = None  # when the handler was called (clock time), if it was
    began: float = 0.0  # the same, on the loop's monotonic clock

    @property
    def interrupted(self) -> bool:
        return self.reason is not None


class Pool:
    """``concurrency`` consumers over the core's backends; ``start()``, ``stop()``, ``drain()``."""

    def __init__(
        self, core: Core, worker_id: str | None = None, supervisor: Supervisor | None = None
    ) -> None:
        self.core = core
        self.supervisor = supervisor or Supervisor()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{new_token()[:6]}"
        cfg = core.config.workers
        self.concurrency = cfg.concurrency
        self.queues = list(cfg.queues)
        self._buffer: asyncio.Queue[Lease] = asyncio.Queue()
        self._held: dict[str, Lease] = {}  # every lease this pool holds, until its outcome lands
        self._valid: dict[str, float] = {}  # held job -> when its lease expires, as last known
        self._running: dict[str, _Running] = {}
        self._dropped: set[tuple[str, str]] = set()  # buffered leases found lost
        self._pending: list[tuple[Lease, Outcome]] = []
        self._ending: set[str] = set()  # held leases whose outcome is being written
        self._pending_event = asyncio.Event()
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Condition()
        self._lease_seq = 0
        self._idle_seq = -1
        self._consumers: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[None]] = set()  # consumers blocked on an empty buffer
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._hurry = asyncio.Event()
        self._started = False
        self._watch: LoopWatch | None = None
        self._mean_attempt: float | None = None  # moving average of attempt durations (s)
        self.started_at: float | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.started_at = self.core.clock.time()
        self.core.hub.add_listener(self._on_change)
        spawn = self.supervisor.spawn
        self._loops = [
            spawn("arqd-fetch", self._fetch_loop),
            spawn("arqd-complete", self._complete_loop),
            spawn("arqd-heartbeat", self._heartbeat_loop),
            spawn("arqd-progress", self._progress_loop),
            spawn("arqd-deadlines", self._deadline_loop),
            spawn("arqd-register", self._register_loop),
        ]
        self._watch = LoopWatch(asyncio.get_running_loop())
        self._watch.start()
        self.resize(self.concurrency)

    async def stop(self, grace: float | None = None) -> None:
        """Stop leasing; let running jobs finish for ``grace`` seconds; interrupt and release the
        rest (their attempt is given back); write every outcome; then return."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        grace = self.core.config.workers.shutdown_grace if grace is None else grace
        self._room.set()
        self.core.hub.jobs_ready()
        fetcher = self._loops[0]
        await asyncio.wait([fetcher], timeout=30)
        while not self._buffer.empty():
            lease = self._buffer.get_nowait()
            self._complete(lease, self._release(lease))
        for task in list(self._waiting):
            task.cancel()
        busy = {t for t in self._consumers if t not in self._waiting}
        if busy:
            late = await self._grace(busy, grace)
            if late:
                log.warning("pool.interrupting", running=len(self._running), grace_s=grace)
                for r in list(self._running.values()):
                    self._interrupt(r, "shutdown")
                await asyncio.wait(
                    late, timeout=max(5.0, self.core.config.workers.heartbeat_interval)
                )
        for task in self._consumers:
            task.cancel()
        await self._flush_outcomes(self.core.config.workers.visibility_timeout)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, *self._consumers, return_exceptions=True)
        try:
            await self.core.queue.remove_worker(self.worker_id)
        except BackendError as exc:
            log.warning("backend.unregister_failed", error=str(exc))
        self.core.hub.remove_listener(self._on_change)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._started = False

    def hurry(self) -> None:
        """Cut a running ``stop()``'s grace period short (a second SIGTERM)."""
        self._hurry.set()

    async def _grace(self, busy: set[asyncio.Task[None]], grace: float) -> set[asyncio.Task[None]]:
        """Wait for ``busy`` consumers to finish their jobs, at most ``grace`` seconds or until
        ``hurry()``; answer those still busy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        pending: set[asyncio.Future[Any]] = set(busy)
        try:
            while pending and not self._hurry.is_set() and (left := deadline - loop.time()) > 0:
                _, pending = await asyncio.wait(
                    pending | {hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(hurry)
        finally:
            hurry.cancel()
        return {t for t in busy if t in pending}

    def resize(self, concurrency: int) -> None:
        """Grow at once; shrink by letting idle consumers go and busy ones leave after their job."""
        self.concurrency = concurrency
        if self._stopping:
            return
        while len(self._consumers) < concurrency:
            task = self.supervisor.spawn("arqd-consumer", self._consume)
            self._consumers.add(task)
            task.add_done_callback(self._consumers.discard)
        excess = len(self._consumers) - concurrency
        for task in list(self._waiting)[: max(0, excess)]:
            task.cancel()
        self._room.set()

    async def drain(self) -> None:
        """Return once no job is ready, running or waiting for its outcome to be written."""
        async with self._idle:
            seq = self._lease_seq
            self.core.hub.jobs_ready()
            self._room.set()
            await self._idle.wait_for(lambda: self._idle_seq > seq)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running(self) -> int:
        return len(self._running)

    # --- fetching ---------------------------------------------------------------------------------

    def _room_for(self) -> int:
        """How many jobs to lease now: none while the buffer holds work and less than half the
        prefetch is free, so a pool of short jobs leases in batches as they finish instead of
        one write per finished job (measured: a third of the throughput on sqlite)."""
        prefetch = self._prefetch()
        room = min(self.concurrency + prefetch - len(self._held), self.core.config.workers.batch)
        if room < prefetch // 2 and not self._buffer.empty():
            return 0
        return room

    def _prefetch(self) -> int:
        """How many leases may wait for a consumer: enough that consumers never wait for a lease
        write while attempts are short, few enough that a buffered job waits about
        ``TARGET_WAIT``: the buffer drains at ``concurrency / mean`` jobs per second. None
        before an attempt was timed."""
        mean = self._mean_attempt
        if mean is None:
            return 0
        most = min(self.core.config.workers.batch, self.concurrency)
        if mean <= 0.0:
            return most
        return min(most, int(self.concurrency * TARGET_WAIT / mean))

    def _timed(self, seconds: float) -> None:
        mean = self._mean_attempt
        self._mean_attempt = seconds if mean is None else mean + ATTEMPT_WEIGHT * (seconds - mean)

    async def _fetch_loop(self) -> None:
        poll = POLL_MIN
        failures = 0
        while not self._stopping:
            room = self._room_for()
            if room <= 0 or self.concurrency == 0 or not self.queues:
                self._room.clear()
                if not self.queues and not self._held:  # nothing to consume: idle for drain()
                    self._lease_seq += 1
                    await self._mark_idle(self._lease_seq)
                await self._room.wait()  # a finished job, resize() or reconfigure() sets it
                continue
            self._lease_seq += 1
            seq = self._lease_seq
            ready_seq = self.core.hub.ready_seq
            queues = self.queues[seq % len(self.queues) :] + self.queues[: seq % len(self.queues)]
            cfg = self.core.config.workers  # read each time: a reload applies to the next lease
            try:
                leases = await self.core.queue.lease(
                    queues, room, cfg.visibility_timeout, self.worker_id
                )
                failures = 0
            except BackendError as exc:
                failures += 1
                log.warning("backend.lease_failed", error=str(exc), failures=failures)
                await asyncio.sleep(min(BACKEND_RETRY_MAX, 0.05 * 2**failures))
                continue
            if self.stopping:  # leased while stopping: give them straight back
                for lease in leases:
                    self._held[lease.job.id] = lease
                    self._complete(lease, self._release(lease))
                break
            if leases:
                for lease in leases:
                    self._held[lease.job.id] = lease
                    self._buffer.put_nowait(lease)
                self._observe_leases(leases)
                poll = POLL_MIN
                if len(leases) == room:
                    continue
                # Fewer than asked for: the queue was drained a moment ago. Leasing again at
                # once would cost a write that finds nothing; a local submit wakes us anyway.
            elif not self._held:
                await self._mark_idle(seq)
            await self.core.hub.wait_ready(poll, since=ready_seq)
            if not leases:
                poll = min(poll * 2, cfg.poll_max)

    def _observe_leases(self, leases: list[Lease]) -> None:
        m = self.core.metrics
        for lease in leases:
            if lease.recovered:
                m.lease_expiries.labels(lease.job.queue).inc()

    async def _mark_idle(self, seq: int) -> None:
        async with self._idle:
            self._idle_seq = seq
            self._idle.notify_all()

    # --- consuming --------------------------------------------------------------------------------

    async def _consume(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping and len(self._consumers) <= self.concurrency:
            self._waiting.add(me)
            try:
                lease = await self._buffer.get()
            finally:
                self._waiting.discard(me)
            try:
                await self._take(lease, me)
            except Exception:
                # A fault of the pool itself (a handler's exceptions are outcomes): stop holding
                # the lease, so it expires and the job runs again, and let the supervisor log
                # and restart this consumer.
                self._forget(lease)
                raise
        self._consumers.discard(me)

    async def _take(self, lease: Lease, me: asyncio.Task[None]) -> None:
        if (lease.job.id, lease.token) in self._dropped:
            self._dropped.discard((lease.job.id, lease.token))
            self._forget(lease)
            return
        if not await self._still_held(lease):
            # It expired while buffered (the process stalled, or heartbeats failed): another
            # worker may have run the job already. Never start a handler on such a lease.
            log.warning("job.lease_lost", job_id=lease.job.id, where="buffer")
            self.core.metrics.lease_conflicts.labels("buffer").inc()
            self._forget(lease)
            return
        await self._run(lease, me)

    async def _run(self, lease: Lease, task: asyncio.Task[None]) -> None:
        r = _Running(lease)
        self._running[lease.job.id] = r
        try:
            outcome = await self._attempt(r, task)
        finally:
            del self._running[lease.job.id]
            self._dirty.discard(lease.job.id)
        if r.started is not None:
            self._timed(asyncio.get_running_loop().time() - r.began)
            if outcome is not None and outcome.started_at is None:
                outcome = msgspec.structs.replace(outcome, started_at=r.started)
        if outcome is None:
            self._forget(lease)
        else:
            self._complete(lease, outcome)

    async def _attempt(self, r: _Running, task: asyncio.Task[None]) -> Outcome | None:
        job, token = r.lease.job, r.lease.token
        core = self.core
        fn = self._handler_for(r)
        early = self._refuse(job, token, fn is None)
        if early is not None or fn is None:
            return early
        if r.interrupted:  # before it began
            return self._interrupted(r)
        ctx = r.ctx = JobContext(job, lambda p: self._report(r, p))
        r.began = asyncio.get_running_loop().time()
        r.deadline = r.began + job.timeout
        r.started = core.clock.time()
        core.metrics.queue_wait.observe(max(0.0, r.started - job.ready_at.timestamp()), job.queue)
        cancelling = task.cancelling()
        r.task = task
        try:
            value = fn(ctx, job.payload)
            if inspect.isawaitable(value):  # an async generator handler is not awaited
                value = await value
            ref = await self._store(job, token, value)
        except asyncio.CancelledError:
            if not r.cancelled or task.uncancel() > cancelling:
                raise  # not (only) ours: someone cancels the consumer itself
            return self._interrupted(r)
        except Exception as exc:
            if r.cancelled:  # the handler turned our cancellation into an error of its own
                task.uncancel()
            return self._failure(job, token, exc)
        finally:
            r.task = None
        if r.cancelled:  # the handler swallowed our cancellation and returned
            task.uncancel()
        if r.reason == "lost":
            return None
        return core.succeeded(job, token, ref, r.started)

    def _handler_for(self, r: _Running) -> Handler | None:
        if r.lease.job.handler == STEPS_HANDLER:
            return functools.partial(self._run_steps, r)
        registry = self.core.registry
        hdef = registry.get(r.lease.job.handler) if registry is not None else None
        return None if hdef is None else hdef.fn

    async def _run_steps(self, r: _Running, ctx: JobContext, payload: Any) -> Any:
        """The built-in handler of multi-step HTTP jobs: unseal the steps, resume from the
        checkpoint, and save each step's outcome with a write fenced by this lease."""
        from arqd import steps as http_steps  # the HTTP machinery loads only when used

        job, token = r.lease.job, r.lease.token
        sealed = http_steps.unseal(payload[SEALED], self.core.steps_key())
        specs = http_steps.parse_steps(sealed["steps"])
        creds = http_steps.parse_credentials(sealed["credentials"])
        checkpoint = http_steps.Checkpoint(dict(job.checkpoint or {}), list(job.steps or []))

        async def save(cp: http_steps.Checkpoint) -> None:
            saved = Update(job_id=job.id, token=token, steps=cp.states, checkpoint=cp.outcomes)
            if (await self.core.queue.update([saved]))[0]:
                self.core.hub.job_changed(job.id)
            else:
                self._lost(job.id, token)

        async def before() -> None:
            """No request on a lease that expired meanwhile (a stalled process resuming)."""
            if not await self._still_held(r.lease):
                self._lost(job.id, token)
                await asyncio.sleep(0)  # the interruption lands here

        allow = self.core.config.http_steps.allow_hosts
        return await http_steps.run_steps(specs, creds, allow, checkpoint, save, before=before)

    def _refuse(self, job: Job, token: str, unknown: bool) -> Outcome | None:
        """An outcome reached without running the handler, if any."""
        if job.cancel_requested:
            return self.core.cancelled(job, token)
        if job.attempts > job.max_attempts:
            return self.core.final_failure(job, token, _lease_expired(job))
        if unknown:
            message = f"no handler is registered as {job.handler!r} on {self.worker_id}"
            return self.core.failed_attempt(job, token, _error("UnknownHandler", message, job))
        return None

    def _failure(self, job: Job, token: str, exc: Exception) -> Outcome:
        """``Fail`` ends the job, ``Retry`` asks for a delay, anything else is a failed attempt."""
        if isinstance(exc, Fail):
            return self.core.final_failure(job, token, _error("Fail", str(exc), job))
        if isinstance(exc, Retry):
            error = _error("Retry", str(exc), job)
            return self.core.failed_attempt(job, token, error, exc.delay)
        if isinstance(exc, StepFailed):  # the job is poisoned at this step
            error = ErrorInfo(
                type=exc.type,
                message=str(exc)[:2000],
                attempt=job.attempts,
                step=exc.step,
                status=exc.response_status,
            )
            return self.core.final_failure(job, token, error)
        if isinstance(exc, CredentialsUnreadable):
            return self.core.final_failure(
                job, token, _error("CredentialsUnreadable", str(exc), job)
            )
        error = _error(type(exc).__name__, str(exc) or repr(exc), job)
        log.warning(
            "job.attempt_failed",
            job_id=job.id,
            handler=job.handler,
            attempt=job.attempts,
            error_type=error.type,
            error=error.message,
        )
        return self.core.failed_attempt(job, token, error)

    def _interrupted(self, r: _Running) -> Outcome | None:
        job, token = r.lease.job, r.lease.token
        if r.reason == "timeout":
            message = f"attempt {job.attempts} exceeded its timeout of {job.timeout:g}s"
            return self._failure(job, token, TimeoutError(message))
        if r.reason == "cancelled":
            return self.core.cancelled(job, token)
        if r.reason == "shutdown":
            return self._release(r.lease)
        return None  # lost: another consumer owns the job now; write nothing

    def _release(self, lease: Lease) -> Outcome:
        return Outcome(job=lease.job, token=lease.token, state=State.QUEUED, count_attempt=False)

    def _interrupt(self, r: _Running, reason: Reason) -> None:
        if r.reason is not None:
            return
        r.reason = reason
        if reason == "cancelled" and r.ctx is not None:
            r.ctx.request_cancel()
        if r.task is not None and not r.cancelled:
            r.cancelled = True
            r.task.cancel()

    def _on_change(self, job_id: str, job: Job | None) -> None:
        """A local cancel reaches a running handler at once, without waiting for a heartbeat."""
        r = self._running.get(job_id)
        if r is not None and job is not None and job.cancel_requested:
            self._interrupt(r, "cancelled")

    # --- results ----------------------------------------------------------------------------------

    async def _store(self, job: Job, token: str, value: Any) -> ResultRef:
        if value is None or type(value) in _SCALARS:
            return ResultRef(inline=value)
        core = self.core
        area: Area = "persistent" if job.sticky else "temporary"
        name = blob_name(job.id, token)
        if isinstance(value, bytes | bytearray | memoryview):
            size = await core.results.put(area, name, bytes(value))
            return ResultRef(
                size=size, content_type="application/octet-stream", area=area, name=name
            )
        if hasattr(value, "__aiter__"):
            size = await _stream(core, area, name, value)
            return ResultRef(
                size=size, content_type="application/octet-stream", area=area, name=name
            )
        encoded = msgspec.json.encode(value)
        if len(encoded) <= core.config.results.inline_max:
            return ResultRef(inline=msgspec.json.decode(encoded))
        size = await core.results.put(area, name, encoded)
        return ResultRef(size=size, content_type=JSON, area=area, name=name)

    # --- outcomes ---------------------------------------------------------------------------------

    def _complete(self, lease: Lease, outcome: Outcome) -> None:
        self._ending.add(lease.job.id)
        self._pending.append((lease, outcome))
        self._pending_event.set()

    async def _still_held(self, lease: Lease) -> bool:
        """Whether ``lease`` is still ours: by our own clock while it has not expired (each
        heartbeat pushes the expiry on), else by asking the backend, which extends it if so."""
        job_id = lease.job.id
        if self.core.clock.time() < self._valid.get(job_id, lease.expires):
            return True
        vt = self.core.config.workers.visibility_timeout
        sent = self.core.clock.time()
        try:
            (reply,) = await self.core.queue.heartbeat([(job_id, lease.token)], vt)
        except BackendError:
            return True  # unknown: run it; its outcome is fenced by the token anyway
        if reply.held:
            self._valid[job_id] = sent + vt
        return reply.held

    def _forget(self, lease: Lease) -> None:
        if self._held.get(lease.job.id) is lease:
            del self._held[lease.job.id]
            self._valid.pop(lease.job.id, None)
            self._ending.discard(lease.job.id)
        self._room.set()

    async def _complete_loop(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            batch, self._pending = self._pending, []
            if batch:
                applied = await self._finish(batch)
                for (lease, outcome), ok in zip(batch, applied, strict=True):
                    if ok:
                        self._landed(lease, outcome)
                    else:
                        await self._refused(lease, outcome)

    async def _finish(self, batch: list[tuple[Lease, Outcome]]) -> list[bool]:
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

    def _landed(self, lease: Lease, outcome: Outcome) -> None:
        self._forget(lease)
        self._observe_outcome(lease, outcome)
        self.core.hub.job_changed(lease.job.id)
        _canonical(lease, outcome, self.core.clock.time())

    async def _refused(self, lease: Lease, outcome: Outcome) -> None:
        """The outcome's write was fenced: another worker holds the job now. Drop our result."""
        self._forget(lease)
        self.core.metrics.lease_conflicts.labels("finish").inc()
        log.warning(
            "job.lease_lost",
            job_id=lease.job.id,
            handler=lease.job.handler,
            attempt=lease.job.attempts,
            outcome=outcome.state.value,
        )
        ref = outcome.result
        if ref is not None and ref.name is not None and ref.area is not None:
            await self.core.results.delete(ref.area, ref.name)  # type: ignore[arg-type]

    def _observe_outcome(self, lease: Lease, outcome: Outcome) -> None:
        m, job = self.core.metrics, lease.job
        if outcome.state.terminal:
            m.finished.inc(job.queue, job.handler, outcome.state.value)
        elif outcome.count_attempt:
            m.retries.inc(job.queue, job.handler)
        started = _started(lease, outcome)
        if started is not None and outcome.count_attempt:
            ran = self.core.clock.time() - started
            label = outcome.state.value if outcome.state.terminal else "retry"
            m.handler_seconds.observe(max(0.0, ran), job.handler, label)

    async def _flush_outcomes(self, limit: float) -> None:
        async def flushed() -> None:
            while self._held:
                self._pending_event.set()
                self._room.clear()
                await self._room.wait()

        try:
            await asyncio.wait_for(flushed(), limit)
        except TimeoutError:
            log.error("pool.outcomes_unwritten", jobs=len(self._held))

    # --- heartbeats and progress ------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.core.config.workers.heartbeat_interval)
            leases = [(i, lease.token) for i, lease in self._held.items()]
            if not leases:
                continue
            sent = self.core.clock.time()
            try:
                replies = await self.core.queue.heartbeat(
                    leases, self.core.config.workers.visibility_timeout
                )
            except BackendError as exc:
                log.warning("backend.heartbeat_failed", error=str(exc), leases=len(leases))
                continue
            until = sent + self.core.config.workers.visibility_timeout
            for (job_id, token), reply in zip(leases, replies, strict=True):
                if not reply.held:
                    self._lost(job_id, token)
                    continue
                held = self._held.get(job_id)
                if held is not None and held.token == token:
                    self._valid[job_id] = until
                if reply.cancel_requested and job_id in self._running:
                    self._interrupt(self._running[job_id], "cancelled")

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            started_at=self.started_at or 0.0,
            last_seen=self.core.clock.time(),
            running=len(self._running),
            concurrency=self.concurrency,
        )

    async def _register_loop(self) -> None:
        while True:
            try:
                await self.core.queue.register_worker(self.info())
            except BackendError as exc:
                log.warning("backend.register_failed", error=str(exc))
            await asyncio.sleep(REGISTER_INTERVAL)

    async def _deadline_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(DEADLINE_TICK)
            now = loop.time()
            for r in list(self._running.values()):
                if r.task is not None and now >= r.deadline:
                    self._interrupt(r, "timeout")

    def _lost(self, job_id: str, token: str) -> None:
        held = self._held.get(job_id)
        if held is None or held.token != token or job_id in self._ending:
            return  # already ended by us: the heartbeat raced the outcome's write
        log.warning("job.lease_lost", job_id=job_id, where="heartbeat")
        self.core.metrics.lease_conflicts.labels("heartbeat").inc()
        r = self._running.get(job_id)
        if r is not None and r.lease.token == token:
            self._interrupt(r, "lost")
        else:
            self._dropped.add((job_id, token))

    def _report(self, r: _Running, progress: Progress) -> None:
        r.progress = progress
        self._dirty.add(r.lease.job.id)
        self._dirty_event.set()

    async def _progress_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            batch = []
            for job_id in self._dirty:
                r = self._running.get(job_id)
                if r is not None and r.progress is not None:
                    batch.append(Update(job_id=job_id, token=r.lease.token, progress=r.progress))
            self._dirty.clear()
            if batch:
                try:
                    answers = await self.core.queue.update(batch)
                except BackendError as exc:
                    log.warning("backend.progress_failed", error=str(exc))
                else:
                    for u, ok in zip(batch, answers, strict=True):
                        if ok:
                            self.core.hub.job_changed(u.job_id)
                        else:
                            self._lost(u.job_id, u.token)
            await asyncio.sleep(PROGRESS_INTERVAL)


async def _stream(core: Core, area: Area, name: str, chunks: AsyncIterator[Any]) -> int:
    writer = await core.results.writer(area, name)
    try:
        async for chunk in chunks:
            if chunk:
                await writer.write(bytes(chunk))
        return await writer.commit()
    except BaseException:
        await writer.abort()
        raise


def _error(kind: str, message: str, job: Job) -> ErrorInfo:
    return ErrorInfo(type=kind, message=message[:ERROR_MESSAGE_MAX], attempt=job.attempts)


def _lease_expired(job: Job) -> ErrorInfo:
    return ErrorInfo(
        type="LeaseExpired",
        message=f"the lease of the last attempt ({job.max_attempts}) expired: its worker "
        "stopped or stalled",
        attempt=job.max_attempts,
    )


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
