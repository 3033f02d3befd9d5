"""The pool's lifecycle: start, the fetch loop and its prefetch, the consumers, the deadline
sweep, the worker row, resize, drain, and stop (release on shutdown)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import msgspec
import structlog

from arqd.backends.base import Lease, WorkerInfo
from arqd.core import Core
from arqd.errors import BackendError
from arqd.model import Job, new_token
from arqd.observe import Observer
from arqd.pool.attempt import Attempt, ProgressWriter, Runner
from arqd.pool.completer import BACKEND_RETRY_MAX, Completer
from arqd.pool.leases import Held, Leases
from arqd.supervise import LoopWatch, Supervisor

log = structlog.get_logger("arqd.pool")

POLL_MIN = 0.005  # first idle poll after activity: other processes' submits are seen within ms
REGISTER_INTERVAL = 2.0  # the worker row is refreshed this often (GET /v1/workers: seen in 15 s)
DEADLINE_TICK = 0.05  # attempt timeouts are enforced within this much (one sweep, not a timer each)
# Prefetch: a buffered lease shows its job as running although no handler runs it yet, so the
# buffer holds only about this much work at the recent pace of attempts (a job waits in it about
# this long at most): no-op jobs keep whole batches, 4 s jobs at concurrency 4 have 4 leases.
TARGET_WAIT = 0.010
ATTEMPT_WEIGHT = 0.1  # weight of the newest attempt in the moving average of their durations


class Pool:
    """``concurrency`` consumers over the core's backends; ``start()``, ``stop()``, ``drain()``."""

    def __init__(
        self,
        core: Core,
        worker_id: str | None = None,
        supervisor: Supervisor | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.core = core
        self.supervisor = supervisor or Supervisor()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{new_token()[:6]}"
        self.observer = core.observer if observer is None else observer
        cfg = core.config.workers
        self.concurrency = cfg.concurrency
        self.queues = list(cfg.queues)
        self._room = asyncio.Event()  # set when a lease is let go, on resize, drain and stop
        self._leases = Leases(core, self.observer, self._room)
        self._progress = ProgressWriter(core, self._leases)
        self._completer = Completer(core, self.observer, self._leases)
        self._runner = Runner(core, self.observer, self._leases, self._progress, self.worker_id)
        self._buffer: asyncio.Queue[Held] = asyncio.Queue()  # leased, waiting for a consumer
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
            spawn("arqd-complete", self._completer.run),
            spawn("arqd-heartbeat", self._leases.heartbeat_loop),
            spawn("arqd-progress", self._progress.run),
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
            self._release(self._buffer.get_nowait())
        for task in list(self._waiting):
            task.cancel()
        busy = {t for t in self._consumers if t not in self._waiting}
        if busy:
            late = await self._grace(busy, grace)
            if late:
                attempts = self._leases.attempts()
                log.warning("pool.interrupting", running=len(attempts), grace_s=grace)
                for a in attempts:
                    a.interrupt("shutdown")
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

    async def _flush_outcomes(self, limit: float) -> None:
        """Wait until every held lease's outcome is written, at most ``limit`` seconds."""

        async def flushed() -> None:
            while self._leases:
                self._completer.wake()
                self._room.clear()
                await self._room.wait()

        try:
            await asyncio.wait_for(flushed(), limit)
        except TimeoutError:
            log.error("pool.outcomes_unwritten", jobs=len(self._leases))

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
        return self._leases.running

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            started_at=self.started_at or 0.0,
            last_seen=self.core.clock.time(),
            running=self._leases.running,
            concurrency=self.concurrency,
        )

    async def _register_loop(self) -> None:
        while True:
            try:
                await self.core.queue.register_worker(self.info())
            except BackendError as exc:
                log.warning("backend.register_failed", error=str(exc))
            await asyncio.sleep(REGISTER_INTERVAL)

    # --- fetching ---------------------------------------------------------------------------------

    def _room_for(self) -> int:
        """How many jobs to lease now: none while the buffer holds work and less than half the
        prefetch is free, so a pool of short jobs leases in batches as they finish instead of
        one write per finished job (measured: a third of the throughput on sqlite). Up to one
        batch of leases whose outcomes are being written does not count: the next lease
        overlaps that write instead of waiting for it (postgres, no-op jobs: 7,500 → N/s)."""
        batch = self.core.config.workers.batch
        prefetch = self._prefetch()
        held = len(self._leases) - min(self._leases.ending, batch)
        room = min(self.concurrency + prefetch - held, batch)
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
                if not self.queues and not self._leases:  # nothing to consume: idle for drain()
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
                    self._release(self._leases.add(lease))
                break
            if leases:
                self._buffered(leases)
                poll = POLL_MIN
                if len(leases) == room:
                    continue
                # Fewer than asked for: the queue was drained a moment ago. Leasing again at
                # once would cost a write that finds nothing; a local submit wakes us anyway.
            elif not self._leases:
                await self._mark_idle(seq)
            await self.core.hub.wait_ready(poll, since=ready_seq)
            if not leases:
                poll = min(poll * 2, cfg.poll_max)

    def _buffered(self, leases: list[Lease]) -> None:
        held, put = self._leases.add, self._buffer.put_nowait
        for lease in leases:
            put(held(lease))
            if lease.recovered:
                self.observer.lease_recovered(lease.job.queue)

    def _release(self, held: Held) -> None:
        """Give a lease back unused: queued again, its attempt not counted."""
        lease = held.lease
        self._completer.complete(held, self.core.outcomes.released(lease.job, lease.token))

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
                held = await self._buffer.get()
            finally:
                self._waiting.discard(me)
            try:
                await self._take(held, me)
            except Exception:
                # A fault of the pool itself (a handler's exceptions are outcomes): stop holding
                # the lease, so it expires and the job runs again, and let the supervisor log
                # and restart this consumer.
                self._leases.forget(held)
                raise
        self._consumers.discard(me)

    async def _take(self, held: Held, me: asyncio.Task[None]) -> None:
        if held.dropped:  # a heartbeat found it lost while it waited in the buffer
            self._leases.forget(held)
            return
        if not await self._leases.still_held(held):
            # It expired while buffered (the process stalled, or heartbeats failed): another
            # worker may have run the job already. Never start a handler on such a lease.
            log.warning("job.lease_lost", job_id=held.lease.job.id, where="buffer")
            self.observer.lease_lost("buffer")
            self._leases.forget(held)
            return
        await self._run(held, me)

    async def _run(self, held: Held, task: asyncio.Task[None]) -> None:
        a = Attempt(held)
        self._leases.begin(held, a)
        try:
            outcome = await self._runner.run(a, task)
        finally:
            self._leases.end(held)
            self._progress.discard(a)
        if a.started is not None:
            self._timed(asyncio.get_running_loop().time() - a.began)
            if outcome is not None and outcome.started_at is None:
                outcome = msgspec.structs.replace(outcome, started_at=a.started)
        if outcome is None:
            self._leases.forget(held)
        else:
            self._completer.complete(held, outcome)

    # --- interruptions ----------------------------------------------------------------------------

    async def _deadline_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(DEADLINE_TICK)
            now = loop.time()
            for a in self._leases.attempts():
                if a.task is not None and now >= a.deadline:
                    a.interrupt("timeout")

    def _on_change(self, job_id: str, job: Job | None) -> None:
        """A local cancel reaches a running handler at once, without waiting for a heartbeat."""
        if job is None or not job.cancel_requested:
            return
        held = self._leases.get(job_id)
        if held is not None and held.attempt is not None:
            held.attempt.interrupt("cancelled")
