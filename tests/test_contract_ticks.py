"""A schedule tick is fired once per cluster: its dedupe key is never freed by a cancel, a purge
or a failure, and once its record is gone the cluster's mark covers it. Run through the core on
every queue backend (``conftest.QUEUE_BACKENDS``), with a real pool where a job must run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import arqd
from arqd.backends.base import ListFilter, QueueBackend
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.core import Core
from arqd.handlers import Registry
from arqd.model import JobSpec, State
from arqd.results.memory import MemoryResults
from arqd.schedules import Scheduler, mark_name, tick_key

HOUR = 3600.0
TTL = 60.0  # results.temporary_ttl of these tests

SCHEDULE: dict[str, object] = {"name": "t", "handler": "echo", "every": "1h", "catch_up": "last"}


def config(schedules: bool = True, **workers: object) -> Config:
    return Config.from_dict(
        {
            "handlers": {"echo": "arqd.demo:echo"},
            "schedules": [SCHEDULE] if schedules else [],
            "results": {"temporary_ttl": f"{TTL:g}s"},
            "workers": {"concurrency": 1, "poll_max": "20ms", **workers},
        }
    )


def tick_spec(tick: float) -> JobSpec:
    """The spec a daemon fires for tick ``tick`` of schedule ``t`` (as ``Scheduler._fire``)."""
    return JobSpec(
        handler="echo",
        payload={"n": 1},
        key=tick_key("t", tick),
        run_at=datetime.fromtimestamp(tick, UTC),
        meta={"schedule": "t"},
    )


async def tick_jobs(queue: QueueBackend, tick: float) -> list[str]:
    jobs, _ = await queue.list_jobs(ListFilter(), 100, None)
    return [j.id for j in jobs if j.key == tick_key("t", tick)]


async def run_to_success(queue: QueueBackend, clock: ManualClock, job_id: str) -> None:
    """Run the queued tick through a real consumer pool (the outcome a daemon writes); this
    app's scheduler does not know the schedule, so it leaves the mark alone."""
    app = arqd.App(config(schedules=False), queue=queue, results=MemoryResults(clock=clock))
    async with app:
        await app.drain()
    job = await queue.get(job_id)
    assert job is not None and job.state is State.SUCCEEDED


@pytest.mark.parametrize("how", ["cancel", "purge", "expire"])
async def test_a_tick_cannot_be_fired_again(queue: QueueBackend, clock: ManualClock, how: str):
    """A fired tick whose queued job was cancelled, whose result was purged, or whose result
    expired keeps its key: firing the same tick again answers the first job and stores none.
    Once its record is swept, a daemon starting late with catch_up = "last" (the first daemon
    having died between its submit and its mark) does not fire the tick either."""
    cfg = config(concurrency=0)
    core = Core(queue, MemoryResults(clock=clock), cfg, Registry.from_config(cfg))
    tick = (clock.time() // HOUR) * HOUR
    # The cluster knew the schedule before this tick; the daemon that fired it died before
    # raising the mark.
    await queue.advance_mark(mark_name("t"), tick - HOUR)
    (first,) = await core.submit([tick_spec(tick)], internal=True)
    assert first.created
    job_id = first.job.id
    if how == "cancel":
        cancelled = await core.cancel(job_id)
        assert cancelled.state is State.CANCELLED
    else:
        await run_to_success(queue, clock, job_id)
        if how == "purge":
            assert await core.purge("temporary") == 1
        else:
            clock.advance(TTL + 1)  # the result expired; its record is not swept yet
    (again,) = await core.submit([tick_spec(tick)], internal=True)
    assert not again.created and again.job.id == job_id
    assert await tick_jobs(queue, tick) == [job_id]
    if how == "expire":
        assert await core.sweep() == 1
        assert await queue.get(job_id) is None
        late = Scheduler(core, cfg)
        await late.fire_due()
        assert await tick_jobs(queue, tick) == []
        assert (await queue.get_mark(mark_name("t")) or 0.0) >= tick
