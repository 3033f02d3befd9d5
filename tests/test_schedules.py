"""Schedules: tick arithmetic, catch-up, the /v1/schedules view, and exactly one job per tick
with three daemons sharing one backend."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import arqd
from arqd.backends.memory import MemoryQueue, MemoryResults
from arqd.clock import ManualClock
from arqd.config import Config, ScheduleConfig
from arqd.errors import ConfigError
from arqd.schedules import Schedule, tick_key

from .daemons import Daemons, sqlite_config
from .util import eventually


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_every_ticks_at_multiples_of_the_interval():
    """every = 30s ticks at whole multiples of 30 s since the epoch."""
    s = Schedule(ScheduleConfig(name="s", handler="h", every=30))  # type: ignore[arg-type]
    assert s.next_after(ts("2026-01-01T00:00:10")) == ts("2026-01-01T00:00:30")
    assert s.next_after(ts("2026-01-01T00:00:30")) == ts("2026-01-01T00:01:00")
    assert s.last_at_or_before(ts("2026-01-01T00:00:59")) == ts("2026-01-01T00:00:30")


def test_cron_five_and_six_fields():
    """5-field cron is minute-based; 6 fields put seconds first; a timezone shifts the ticks."""
    five = Schedule(ScheduleConfig(name="a", handler="h", cron="*/5 * * * *"))
    assert five.next_after(ts("2026-01-01T00:07:03")) == ts("2026-01-01T00:10:00")
    assert five.last_at_or_before(ts("2026-01-01T00:07:03")) == ts("2026-01-01T00:05:00")
    assert five.last_at_or_before(ts("2026-01-01T00:05:00")) == ts("2026-01-01T00:05:00")
    six = Schedule(ScheduleConfig(name="b", handler="h", cron="*/15 * * * * *"))
    assert six.next_after(ts("2026-01-01T00:00:03")) == ts("2026-01-01T00:00:15")
    paris = Schedule(
        ScheduleConfig(name="c", handler="h", cron="0 9 * * *", timezone="Europe/Paris")
    )
    assert paris.next_after(ts("2026-01-01T00:00:00")) == ts("2026-01-01T08:00:00")


@pytest.mark.parametrize(
    ("schedule", "mentions"),
    [
        ({"name": "x", "handler": "echo", "cron": "every day"}, "schedules.x.cron"),
        ({"name": "x", "handler": "echo", "cron": "* * *"}, "schedules.x.cron"),
        ({"name": "x", "handler": "echo"}, "exactly one of cron or every"),
        (
            {"name": "x", "handler": "echo", "every": "1s", "timezone": "Mars/Olympus"},
            "schedules.x.timezone",
        ),
        ({"name": "x", "handler": "nope", "every": "1s"}, "unknown handler"),
    ],
)
def test_bad_schedules_are_config_errors(schedule: dict[str, str], mentions: str):
    """A schedule that cannot run is refused when the config loads, naming it."""
    with pytest.raises(ConfigError, match=mentions):
        Config.from_dict({"handlers": {"echo": "arqd.demo:echo"}, "schedules": [schedule]})


def app_with(schedules: list[dict[str, object]], clock: ManualClock) -> arqd.App:
    config = Config.from_dict(
        {
            "handlers": {"echo": "arqd.demo:echo"},
            "schedules": schedules,
            "workers": {"concurrency": 0},
        }
    )
    return arqd.App(config, queue=MemoryQueue(clock=clock), results=MemoryResults(clock=clock))


async def test_catch_up_last_fires_the_missed_tick_once():
    """On start, catch_up = "last" submits the latest missed tick (ready_at = tick time, meta
    naming the schedule) and "none" does not; starting again does not submit it twice."""
    clock = ManualClock(start=ts("2026-01-01T00:07:03"))
    schedules = [
        {"name": "last", "handler": "echo", "cron": "*/5 * * * *", "catch_up": "last"},
        {"name": "skip", "handler": "echo", "cron": "*/5 * * * *", "catch_up": "none"},
    ]
    app = app_with(schedules, clock)
    queue = app.core.queue
    async with app:
        await eventually(
            lambda: app.scheduler is not None and any(s["last_run"] for s in app.scheduler.status())
        )
        view = {s["name"]: s for s in app.scheduler.status()}
    tick = ts("2026-01-01T00:05:00")
    job = await queue.find_by_key(tick_key("last", tick))
    assert job is not None and job.ready_at.timestamp() == tick
    assert job.meta == {"schedule": "last"}
    assert await queue.find_by_key(tick_key("skip", tick)) is None
    assert view["last"]["last_run"] == datetime.fromtimestamp(tick, UTC)
    assert view["skip"]["last_run"] is None
    assert view["last"]["next_run"] == datetime.fromtimestamp(ts("2026-01-01T00:10:00"), UTC)
    async with app_with(schedules, clock) as again:
        await asyncio.sleep(0.05)
        jobs, _ = await again.client.list()
    assert len(jobs) <= 1


async def test_user_keys_cannot_impersonate_a_schedule():
    """The schedule: key prefix is reserved."""
    app = app_with([], ManualClock())
    with pytest.raises(arqd.InvalidRequest, match="reserved"):
        await app.client.submit("echo", key="schedule:x:1")


async def test_three_daemons_fire_each_tick_exactly_once(tmp_path: Path, daemons: Daemons):
    """Three daemons sharing one backend, a schedule every second: each tick makes one job;
    SIGHUP changes the schedules (GET /v1/schedules shows last and next run)."""
    schedule = '[[schedules]]\nname = "tick"\nhandler = "noop"\nevery = "1s"\n'
    config = sqlite_config(tmp_path, workers="concurrency = 4", extra=schedule)
    started = time.time()
    trio = [daemons.start(config, f"d{i}") for i in range(3)]
    await asyncio.sleep(6)
    async with arqd.HttpClient(trio[0].url) as client:
        view = (await client.request_json("GET", "/v1/schedules"))["schedules"]
        assert view[0]["name"] == "tick" and view[0]["last_run"] and view[0]["next_run"]
        jobs, _ = await client.list(limit=1000)
    ticks = collections.Counter(
        j.ready_at.timestamp() for j in jobs if j.meta == {"schedule": "tick"}
    )
    assert len(ticks) >= 5
    assert set(ticks.values()) == {1}, ticks
    assert all(t == int(t) and t >= int(started) - 1 for t in ticks)
    fired_by = {line["job_id"] for d in trio for line in d.events("schedule.fired")}
    assert len(fired_by) == len(ticks)
    for d in trio:
        d.config_path.write_text(sqlite_config(tmp_path, workers="concurrency = 4"))
        d.signal(signal.SIGHUP)
        d.wait_log("config.reloaded")
    async with arqd.HttpClient(trio[0].url) as client:
        assert (await client.request_json("GET", "/v1/schedules"))["schedules"] == []
