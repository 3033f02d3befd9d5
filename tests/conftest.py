"""Fixtures shared by the suites: an injectable clock and every backend, parametrized.

Adding a backend here puts it under the whole contract suite (``test_contract_*.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from arqd.backends.base import QueueBackend, ResultStore
from arqd.backends.files import FileResults
from arqd.backends.memory import MemoryQueue, MemoryResults
from arqd.backends.sqlite import SqliteQueue
from arqd.clock import ManualClock

from .daemons import Daemons

QueueFactory = Callable[[ManualClock], QueueBackend]


def _queue_factories(tmp_path: Path) -> dict[str, QueueFactory]:
    return {
        "memory": lambda clock: MemoryQueue(clock=clock),
        "sqlite": lambda clock: SqliteQueue(str(tmp_path / "q.sqlite3"), clock=clock),
    }


QUEUE_BACKENDS = ["memory", "sqlite"]
RESULT_STORES = ["memory", "files"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=QUEUE_BACKENDS)
async def queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[QueueBackend]:
    backend = _queue_factories(tmp_path)[request.param](clock)
    async with backend:
        yield backend


@pytest.fixture
def queue_factory(tmp_path: Path, queue: QueueBackend) -> Callable[[ManualClock], QueueBackend]:
    """Another handle on the same storage as ``queue`` (for sqlite: a second connection set)."""

    def make(clock: ManualClock) -> QueueBackend:
        if isinstance(queue, SqliteQueue):
            return SqliteQueue(queue.path, clock=clock)
        return queue

    return make


@pytest.fixture(params=RESULT_STORES)
async def results(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[ResultStore]:
    store: ResultStore
    if request.param == "memory":
        store = MemoryResults(clock=clock)
    else:
        store = FileResults(str(tmp_path / "results"), clock=clock)
    async with store:
        yield store


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("ARQD_TEST", "1")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Start ``arqd serve`` processes; every one still running is killed after the test."""
    pool = Daemons(tmp_path)
    yield pool
    pool.stop_all()
