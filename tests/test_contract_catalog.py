"""The catalog contract (``Catalog``: listings, counts, versions, workers, marks), run against
every backend (``conftest.QUEUE_BACKENDS``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from arqd.backends.base import ListFilter, QueueBackend, WorkerInfo
from arqd.clock import ManualClock
from arqd.model import (
    State,
    new_job_id,
)

from .contract import (
    VT,
    done,
    put,
)


async def test_stats_count_every_state(queue: QueueBackend, clock: ManualClock):
    """Queue stats count jobs per state and age the oldest ready job."""
    await put(queue, clock, 4)
    await put(queue, clock, 1, queue="other")
    clock.advance(10)
    leases = await queue.lease(["default"], 3, VT, "w")
    await queue.finish([done(leases[0].job, leases[0].token)])
    await queue.finish([done(leases[1].job, leases[1].token, State.FAILED)])
    stats = {s.name: s for s in await queue.stats()}
    d = stats["default"]
    assert (d.queued, d.running, d.succeeded, d.failed, d.cancelled) == (1, 1, 1, 1, 0)
    assert d.oldest_queued_seconds == pytest.approx(10)
    assert stats["other"].queued == 1


async def test_list_newest_first_with_cursor_and_filters(queue: QueueBackend, clock: ManualClock):
    """Listing pages newest first through a cursor and filters by queue, state and handler."""
    jobs = await put(queue, clock, 5)
    other = await put(queue, clock, 2, queue="other")
    page, cursor = await queue.list_jobs(ListFilter(queue="default"), 3, None)
    assert [j.id for j in page] == [j.id for j in reversed(jobs)][:3] and cursor
    page2, cursor2 = await queue.list_jobs(ListFilter(queue="default"), 3, cursor)
    assert [j.id for j in page2] == [j.id for j in reversed(jobs)][3:] and cursor2 is None
    everything, _ = await queue.list_jobs(ListFilter(), 100, None)
    assert len(everything) == 7 and everything[0].id == other[-1].id
    (lease,) = await queue.lease(["other"], 1, VT, "w")
    await queue.finish([done(lease.job, lease.token, State.FAILED)])
    failed, _ = await queue.list_jobs(ListFilter(state=State.FAILED), 100, None)
    assert [j.id for j in failed] == [lease.job.id]
    assert (await queue.list_jobs(ListFilter(handler="nope"), 10, None))[0] == []


async def test_ping_answers(queue: QueueBackend):
    """A healthy backend answers ping."""
    await queue.ping()


async def test_worker_registry(queue: QueueBackend, clock: ManualClock):
    """Workers register and refresh their rows; stale and removed ones are not listed."""

    now = clock.time()
    a = WorkerInfo(id="a", host="h1", started_at=now, last_seen=now, running=1, concurrency=4)
    b = WorkerInfo(id="b", host="h2", started_at=now, last_seen=now - 60, running=0, concurrency=8)
    await queue.register_worker(a)
    await queue.register_worker(b)
    assert [w.id for w in await queue.list_workers(now - 10)] == ["a"]
    assert [w.id for w in await queue.list_workers(now - 100)] == ["a", "b"]
    await queue.register_worker(
        WorkerInfo(id="a", host="h1", started_at=now, last_seen=now + 5, running=3, concurrency=4)
    )
    (fresh,) = await queue.list_workers(now + 1)
    assert fresh.running == 3
    await queue.remove_worker("a")
    assert [w.id for w in await queue.list_workers(now - 100)] == ["b"]


async def test_versions_track_changes_and_omit_missing_jobs(
    queue: QueueBackend, clock: ManualClock
):
    """versions() answers each existing job's current version (what wakes long-polls)."""
    a, b = await put(queue, clock, n=2)
    before = await queue.versions([a.id, b.id, new_job_id()])
    assert before == {a.id: a.version, b.id: b.version}
    leases = await queue.lease(["default"], 1, VT, "w")
    after = await queue.versions([a.id, b.id])
    leased = leases[0].job.id
    assert after[leased] > before[leased]
    other = b.id if leased == a.id else a.id
    assert after[other] == before[other]


async def test_a_mark_only_rises_and_answers_what_it_was(queue: QueueBackend):
    """advance_mark sets an absent or lower mark and answers the previous value (None when
    absent); a lower or equal value changes nothing and answers the mark as it stands."""
    assert await queue.get_mark("schedule:a") is None
    assert await queue.advance_mark("schedule:a", 1_800_000_060.0) is None
    assert await queue.get_mark("schedule:a") == 1_800_000_060.0
    assert await queue.advance_mark("schedule:a", 1_800_000_120.5) == 1_800_000_060.0
    assert await queue.advance_mark("schedule:a", 1_800_000_060.0) == 1_800_000_120.5
    assert await queue.advance_mark("schedule:a", 1_800_000_120.5) == 1_800_000_120.5
    assert await queue.get_mark("schedule:a") == 1_800_000_120.5
    assert await queue.get_mark("schedule:b") is None


async def test_one_of_many_racing_advances_wins(
    queue: QueueBackend, clock: ManualClock, queue_factory: Callable[[ManualClock], QueueBackend]
):
    """Processes raising one mark to the same value at once: exactly one of them sees it lower
    (it set it), every other sees the value already there; handles see each other's marks.
    Racing different values leave the highest."""
    handles = [queue_factory(clock) for _ in range(4)]
    for h in handles:
        if h is not queue:
            await h.open()
    try:
        answers = await asyncio.gather(
            *(h.advance_mark("m", 60.0) for _ in range(5) for h in handles)
        )
        seen = [await h.get_mark("m") for h in handles]
        values = [float(v) for v in range(20)]
        random.shuffle(values)
        await asyncio.gather(*(handles[i % 4].advance_mark("n", v) for i, v in enumerate(values)))
        highest = await queue.get_mark("n")
    finally:
        for h in handles:
            if h is not queue:
                await h.aclose()
    assert sorted(answers, key=lambda a: a is not None) == [None] + [60.0] * 19
    assert seen == [60.0] * 4
    assert highest == 19.0
