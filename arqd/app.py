"""``arqd.App``: embed the consumer pool in another asyncio program.

app = arqd.App.from_config("config.toml")

@app.handler("thumbnail", timeout=60)
async def thumbnail(ctx, payload): ...

async with app:                 # opens the backends, runs the pool in the background
    job = await app.client.submit("thumbnail", {"url": ...})
    await app.drain()           # returns once no job is ready or running
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import TracebackType
from typing import Self

import msgspec
import structlog

from arqd.backends.base import QueueBackend
from arqd.client import Client
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import Config, load_config
from arqd.core import SWEEP_BATCH, Core
from arqd.errors import ArqdError
from arqd.handlers import Handler, HandlerDef, Registry
from arqd.metrics import Metrics
from arqd.pool import Pool
from arqd.results.base import ResultStore
from arqd.schedules import Scheduler
from arqd.stores import make_queue, make_results
from arqd.supervise import Supervisor

log = structlog.get_logger("arqd.app")

SWEEP_INTERVAL = 10.0  # seconds between sweeps of expired results (more often while behind)
# Seconds between sweeps of the partial results dead writers left (and one at start): a kill -9
# mid-stream leaves a partial as large as the result, so it goes within a minute.
PARTIALS_INTERVAL = 60.0


class App:
    """Backends + handler registry + consumer pool, run for the length of an ``async with``."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        queue: QueueBackend | None = None,
        results: ResultStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config or Config()
        self._extra: dict[str, HandlerDef] = {}
        self._queue = queue or make_queue(self.config.queue, clock)
        self._results = results or make_results(self.config.results, clock)
        self._owned = (queue is None, results is None)
        # What the core and the pool report, served at GET /metrics.
        self.metrics = Metrics()
        self.core = Core(self._queue, self._results, self.config, Registry(), self.metrics)
        self.pool: Pool | None = None
        self.client = Client(_core=self.core)
        # Runs every background loop; ``supervisor.failed`` is set when one keeps crashing.
        self.supervisor = Supervisor()
        self._open = False
        self._tasks: list[asyncio.Task[None]] = []
        self.scheduler: Scheduler | None = None
        self.reloads = 0
        self.reload_failures = 0

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> App:
        return cls(load_config(path))

    def handler(
        self,
        name: str,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        cache: bool = False,
        sticky: bool = False,
        queue: str | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``fn`` under ``name``; config-registered handlers of the same name lose."""

        def register(fn: Handler) -> Handler:
            self._extra[name] = HandlerDef(name, fn, timeout, max_attempts, cache, sticky, queue)
            self.core.registry = Registry.from_config(self.config, self._extra)
            return fn

        return register

    @property
    def extra_handlers(self) -> dict[str, HandlerDef]:
        """Handlers registered with ``@app.handler`` (they survive config reloads)."""
        return dict(self._extra)

    def reconfigure(self, config: Config, registry: Registry | None = None) -> None:
        """Apply a new config to a running app: handlers, workers, defaults (not backends)."""
        registry = registry or Registry.from_config(config, self._extra)
        self.config = config
        self.core.config = config
        self.core.registry = registry
        if self.pool is not None:
            self.pool.queues = list(config.workers.queues)
            self.pool.resize(config.workers.concurrency)
        if self.scheduler is not None:
            self.scheduler.update(config)

    async def __aenter__(self) -> Self:
        self.core.registry = Registry.from_config(self.config, self._extra)
        self._open = True  # from here stop() closes whatever opened, even if the rest fails
        if self._owned[0]:
            await self._queue.open()
        if self._owned[1]:
            await self._results.open()
        await self._sweep_partials()  # before this pool writes any
        self.pool = Pool(self.core, supervisor=self.supervisor)
        await self.pool.start()
        self.scheduler = Scheduler(self.core, self.config)
        spawn = self.supervisor.spawn
        self._tasks = [
            spawn("arqd-scheduler", self.scheduler.run),
            spawn("arqd-sweeper", self._sweep_loop),
            self.core.follow.start(spawn("arqd-follow", self.core.follow.run)),
        ]
        return self

    async def _sweep_loop(self) -> None:
        """Expired results and records go, a bounded batch at a time, in every daemon; so do
        the partial results of dead writers, every ``PARTIALS_INTERVAL``."""
        loop = asyncio.get_running_loop()
        partials_due = loop.time() + PARTIALS_INTERVAL
        while True:
            if loop.time() >= partials_due:
                await self._sweep_partials()
                partials_due = loop.time() + PARTIALS_INTERVAL
            try:
                swept = await self.core.sweep()
            except ArqdError as exc:
                log.warning("cache.sweep_failed", error=str(exc))
                swept = 0
            if swept:
                log.info("cache.swept", jobs=swept)
            await asyncio.sleep(0.1 if swept >= SWEEP_BATCH else SWEEP_INTERVAL)

    async def _sweep_partials(self) -> None:
        try:
            files, size = await self._results.sweep_partials()
        except (ArqdError, OSError) as exc:  # shipped stores translate; a plugged one may not
            log.warning("results.partials_sweep_failed", error=str(exc))
            return
        if files:
            log.info("results.partials_swept", files=files, bytes=size)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: stop leasing, finish or release running jobs, close what this app opened."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.pool is not None:
            await self.pool.stop(grace)
            self.pool = None
        if self._open:
            self._open = False
            if self._owned[0]:
                await self._queue.aclose()
            if self._owned[1]:
                await self._results.aclose()

    async def drain(self) -> None:
        """Return once no job is ready or running."""
        assert self.pool is not None, "drain() needs a running app: use it inside `async with app`"
        await self.pool.drain()

    def with_workers(self, **changes: object) -> None:
        """Change ``[workers]`` settings before starting (tests and scripts)."""
        workers = msgspec.structs.replace(self.config.workers, **changes)
        self.reconfigure(msgspec.structs.replace(self.config, workers=workers))
