"""Where config picks concrete backends by name; the only core module that imports them."""

from __future__ import annotations

from arqd.backends.base import QueueBackend, ResultStore
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import QueueConfig, ResultsConfig
from arqd.errors import ConfigError


def make_queue(cfg: QueueConfig, clock: Clock = SYSTEM_CLOCK) -> QueueBackend:
    if cfg.backend == "memory":
        from arqd.backends.memory import MemoryQueue

        return MemoryQueue(clock=clock)
    if cfg.backend == "sqlite":
        from arqd.backends.sqlite import SqliteQueue

        return SqliteQueue(cfg.path, clock=clock, synchronous=cfg.synchronous)
    raise ConfigError(f"queue.backend: {cfg.backend!r} is not available in this build")


def make_results(cfg: ResultsConfig, clock: Clock = SYSTEM_CLOCK) -> ResultStore:
    if cfg.backend == "memory":
        from arqd.backends.memory import MemoryResults

        return MemoryResults(clock=clock)
    if cfg.backend == "files":
        from arqd.backends.files import FileResults

        return FileResults(cfg.path, clock=clock)
    raise ConfigError(f"results.backend: {cfg.backend!r} is not available in this build")
