"""The sqlite backend runs small calls on the event loop's thread, but never waits for a lock
there: when another connection (another process) holds the write lock, the call moves to the
backend's thread and waits there, and the event loop keeps running meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from arqd.backends.sqlite import SqliteQueue
from arqd.clock import ManualClock
from arqd.model import State
from tests.contract import new, put


async def test_a_held_write_lock_moves_the_call_off_the_loop(tmp_path: Path):
    clock = ManualClock()
    queue = SqliteQueue(str(tmp_path / "q.sqlite3"), clock=clock)
    async with queue:
        await put(queue, clock)  # schema made, connections warm
        other = sqlite3.connect(queue.path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # "another process" holds the write lock
        try:
            job = new(clock)
            submit = asyncio.create_task(queue.enqueue([job]))
            ticks = 0
            # The loop goes on running while the enqueue waits for the lock on its thread.
            while ticks < 20:
                await asyncio.sleep(0.005)
                ticks += 1
            assert not submit.done()
            # Reads are not blocked by a writer (WAL) and are answered meanwhile.
            assert (await queue.stats())[0].queued == 1
        finally:
            threading.Thread(target=other.execute, args=("COMMIT",)).start()
        (stored,) = await asyncio.wait_for(submit, 10)
        assert stored.created and stored.job.id == job.id
        got = await queue.get(job.id)
        assert got is not None and got.state is State.QUEUED
        other.close()


async def test_calls_in_place_and_on_the_thread_see_each_other(tmp_path: Path):
    """A batch too big for the loop's thread and small calls in place share one database."""
    clock = ManualClock()
    queue = SqliteQueue(str(tmp_path / "q.sqlite3"), clock=clock)
    async with queue:
        big = await put(queue, clock, n=1200)  # above HERE_MAX_ROWS: the thread's connection
        small = await put(queue, clock, n=3)  # in place
        leases = await queue.lease(["default"], 2000, 30.0, "w")
        assert {lease.job.id for lease in leases} == {j.id for j in big + small}
        assert (await queue.stats())[0].running == 1203
