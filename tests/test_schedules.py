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
from arqd.backends.base import ListFilter, Outcome, QueueBackend
from arqd.backends.memory import MemoryQueue
from arqd.clock import ManualClock
from arqd.config import Config, ScheduleConfig
from arqd.core import Core
from arqd.errors import ConfigError
from arqd.handlers import Registry
from arqd.model import ResultRef, State
from arqd.outcomes import frees_key, parse_tick_key
from arqd.results.memory import MemoryResults
from arqd.schedules import Schedule, Scheduler, mark_name, tick_key

from .daemons import Daemons, sqlite_config


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_every_ticks_at_multiples_of_the_interval():
    """every = 30s ticks at whole multiples of 30 s since the epoch."""
    s = Schedule(ScheduleConfig(name="s", handler="h", every=30))  # type: ignore[arg-type]
    assert s.next_after(ts("2026-01-01T00:00:10")) == ts("2026-01-01T00:00:30")
    assert s.next_after(ts("2026-01-01T00:00:30")) == ts("2026-01-01T00:01:00")
    assert s.last_at_or_before(ts("2026-01-01T00:00:59")) == ts("2026-01-01T00:00:30")


def test_cron_five_and_six_fields():
    """5-field cron is minute-based; 6 fields are read as cron_seconds says (seconds first or
    last); a timezone shifts the ticks."""
    five = Schedule(ScheduleConfig(name="a", handler="h", cron="*/5 * * * *"))
    assert five.next_after(ts("2026-01-01T00:07:03")) == ts("2026-01-01T00:10:00")
    assert five.last_at_or_before(ts("2026-01-01T00:07:03")) == ts("2026-01-01T00:05:00")
    assert five.last_at_or_before(ts("2026-01-01T00:05:00")) == ts("2026-01-01T00:05:00")
    first = Schedule(
        ScheduleConfig(name="b", handler="h", cron="*/15 * * * * *", cron_seconds="first")
    )
    assert first.next_after(ts("2026-01-01T00:00:03")) == ts("2026-01-01T00:00:15")
    last = Schedule(
        ScheduleConfig(name="c", handler="h", cron="* * * * * */3", cron_seconds="last")
    )
    assert last.next_after(ts("2026-01-01T00:00:04")) == ts("2026-01-01T00:00:06")
    paris = Schedule(
        ScheduleConfig(name="d", handler="h", cron="0 9 * * *", timezone="Europe/Paris")
    )
    assert paris.next_after(ts("2026-01-01T00:00:00")) == ts("2026-01-01T08:00:00")


def test_six_fields_need_to_say_where_the_seconds_are():
    """A 6-field cron without cron_seconds is refused with both readings spelled out (Quartz
    puts seconds first, croniter last: "* * * * * */3" is every 3 s, or every second on three
    weekdays); cron_seconds on a 5-field cron is refused too."""
    base = {"handlers": {"echo": "arqd.demo:echo"}}
    six = {"name": "x", "handler": "echo", "cron": "* * * * * */3"}
    with pytest.raises(ConfigError) as info:
        Config.from_dict({**base, "schedules": [six]})
    message = str(info.value)
    assert "schedules.x.cron: " in message and 'cron_seconds = "first" or "last"' in message
    assert "weekday=*/3" in message and "second=*/3" in message
    five = {"name": "y", "handler": "echo", "cron": "0 3 * * *", "cron_seconds": "last"}
    with pytest.raises(ConfigError, match=r"schedules\.y\.cron_seconds: only a 6-field cron"):
        Config.from_dict({**base, "schedules": [five]})
    cfg = Config.from_dict({**base, "schedules": [{**six, "cron_seconds": "last"}]})
    assert cfg.schedules[0].cron_seconds == "last"


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
        ({"name": "x", "handler": "echo", "cron": "0 0 31 2 *"}, "never fires"),
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


def daemon(queue: QueueBackend, schedules: list[dict[str, object]]) -> Scheduler:
    """One daemon's scheduler on ``queue``, driven by the test through ``fire_due()``."""
    config = Config.from_dict({"handlers": {"echo": "arqd.demo:echo"}, "schedules": schedules})
    results = MemoryResults(clock=queue.clock)
    return Scheduler(Core(queue, results, config, Registry.from_config(config)), config)


async def test_a_schedule_never_fires_a_past_tick_on_its_first_start():
    """A daemon starting for the first time at 07:21 does not fire a "0 3 * * *" schedule's
    03:00 tick, whatever its catch_up: the cluster never knew the schedule then. It notes the
    schedule (its mark), and fires the next tick when it comes."""
    clock = ManualClock(start=ts("2026-01-01T07:21:00"))
    queue = MemoryQueue(clock=clock)
    scheduler = daemon(
        queue,
        [
            {"name": "nightly", "handler": "echo", "cron": "0 3 * * *"},
            {"name": "eager", "handler": "echo", "cron": "0 3 * * *", "catch_up": "last"},
        ],
    )
    await scheduler.fire_due()
    jobs, _ = await queue.list_jobs(ListFilter(), 10, None)
    assert jobs == []
    assert await queue.get_mark(mark_name("nightly")) == ts("2026-01-01T03:00")
    assert [s["last_run"] for s in scheduler.status()] == [None, None]
    clock.advance(ts("2026-01-02T03:00:01") - clock.time())
    await scheduler.fire_due()
    jobs, _ = await queue.list_jobs(ListFilter(), 10, None)
    assert sorted(j.key or "" for j in jobs) == [
        tick_key("eager", ts("2026-01-02T03:00")),
        tick_key("nightly", ts("2026-01-02T03:00")),
    ]


async def test_catch_up_last_fires_the_latest_missed_tick_once():
    """A schedule the cluster knew before its latest tick: on start, catch_up = "last" submits
    that missed tick (ready_at = tick time, meta naming the schedule) and "none" (the default)
    skips it; starting again does not submit it twice."""
    clock = ManualClock(start=ts("2026-01-01T00:03:03"))
    queue = MemoryQueue(clock=clock)
    schedules: list[dict[str, object]] = [
        {"name": "last", "handler": "echo", "cron": "*/5 * * * *", "catch_up": "last"},
        {"name": "skip", "handler": "echo", "cron": "*/5 * * * *"},
    ]
    await daemon(queue, schedules).fire_due()  # the cluster sees both schedules at 00:03
    clock.advance(ts("2026-01-01T00:07:03") - clock.time())  # no daemon runs at the 00:05 tick
    tick = ts("2026-01-01T00:05:00")
    again = daemon(queue, schedules)
    await again.fire_due()
    job = await queue.find_by_key(tick_key("last", tick))
    assert job is not None and job.ready_at.timestamp() == tick
    assert job.meta == {"schedule": "last"}
    assert await queue.find_by_key(tick_key("skip", tick)) is None
    view = {s["name"]: s for s in again.status()}
    assert view["last"]["last_run"] == datetime.fromtimestamp(tick, UTC)
    assert view["skip"]["last_run"] is None
    assert view["last"]["next_run"] == datetime.fromtimestamp(ts("2026-01-01T00:10:00"), UTC)
    await daemon(queue, schedules).fire_due()
    jobs, _ = await queue.list_jobs(ListFilter(), 100, None)
    assert [j.id for j in jobs] == [job.id]


async def finish(queue: QueueBackend, clock: ManualClock) -> None:
    """Run the one queued job to success, as a consumer would (result kept for 10 s)."""
    (lease,) = await queue.lease(["default"], 1, 30.0, "test")
    done = Outcome(
        job=lease.job,
        token=lease.token,
        state=State.SUCCEEDED,
        result=ResultRef(inline=None),
        expires_at=clock.time() + 10,
        keep_key=not frees_key(lease.job),  # as Outcomes.succeeded decides
    )
    assert await queue.finish([done]) == [True]


@pytest.mark.parametrize("free", ["cancel", "purge", "expire"])
async def test_a_tick_is_never_fired_twice_once_its_key_is_free(
    queue: QueueBackend, clock: ManualClock, free: str
):
    """A fired tick whose job was cancelled, its result purged, or expired and swept is not
    fired again by another daemon starting with catch_up = "last" within the same tick period,
    on every backend: its key stays held (cancel, purge), and the cluster's mark remembers it
    once the record is gone."""
    schedule: list[dict[str, object]] = [
        {"name": "tick", "handler": "echo", "every": "1m", "catch_up": "last"}
    ]
    tick = clock.time() + 60  # the clock starts on a whole minute
    first = daemon(queue, schedule)
    clock.advance(59.9)
    await first.fire_due()
    clock.advance(0.6)
    await first.fire_due()
    job = await queue.find_by_key(tick_key("tick", tick))
    assert job is not None
    core = first.core
    if free == "cancel":
        await core.cancel(job.id)
    else:
        await finish(queue, clock)
    if free == "purge":
        assert await core.purge("temporary") == 1
    clock.advance(29.5)  # 30 s past the tick, 20 s past the result's expiry
    if free == "expire":
        assert await core.sweep() == 1
    # A cancel or a purge leaves the tick's key held; a swept record took its key with it.
    holder = await queue.find_by_key(tick_key("tick", tick))
    assert (holder is None) is (free == "expire")
    second = daemon(queue, schedule)  # another daemon, or the same one restarted
    await second.fire_due()
    clock.advance(30)
    await second.fire_due()
    assert await queue.find_by_key(tick_key("tick", tick + 60)) is not None
    jobs, _ = await queue.list_jobs(ListFilter(), 100, None)
    assert [j.id for j in jobs if j.ready_at.timestamp() == tick and j.id != job.id] == []


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


@pytest.mark.parametrize("tick", [1800000000.0, 1800000004.5, 1800000001.25, 0.0])
def test_a_tick_key_names_its_tick_exactly(tick: float):
    """The key of a tick gives back the tick itself, also a fractional one (``every = "1.5s"``),
    so the mark a sweep raises from a key is never below the tick it stood for; whole-second
    keys keep their integer form."""
    assert parse_tick_key(tick_key("s", tick)) == ("s", tick)
    if tick.is_integer():
        assert tick_key("s", tick) == f"schedule:s:{int(tick)}"
    assert parse_tick_key("schedule:s:12x") is None and parse_tick_key("report:1") is None
