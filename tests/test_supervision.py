"""The daemon keeps its own machinery alive: a handler that breaks the event loop's timers
cannot stop heartbeats and timeouts, and a background task that crashes is logged and restarted
(or, crashing again and again, makes the daemon exit non-zero)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import arqd
from arqd.backends.base import Lease
from arqd.backends.memory import MemoryQueue
from arqd.supervise import CRASH_LIMIT, Supervisor

from .daemons import Daemons, sqlite_config
from .test_pool import make_config
from .util import eventually

pytestmark = pytest.mark.timeout(120)

MISBEHAVING = """
[handlers.nan_sleep]
call = "tests.procs:nan_sleep"
timeout = "3s"
max_attempts = 1

[handlers.block_loop]
call = "tests.procs:block_loop"
max_attempts = 1
"""


async def test_nan_timer_does_not_stop_heartbeats_or_timeouts(tmp_path: Path, daemons: Daemons):
    """A handler sleeping NaN seconds breaks the event loop's timer heap; the watchdog logs it
    and repairs the heap, so another job's heartbeats keep its 2 s lease (it runs once, no
    lease is lost) and a third job's timeout still fires."""
    runs = tmp_path / "runs.log"
    config = sqlite_config(tmp_path, workers='visibility_timeout = "2s"', extra=MISBEHAVING)
    d = daemons.start(config)
    async with arqd.HttpClient(d.url) as client:
        long = await client.submit("record", {"log": str(runs), "sleep": 4})
        slow = await client.submit("sleep", {"seconds": 60}, timeout=1.5, max_attempts=1)

        async def both_running() -> bool:
            states = {(await client.get(j.id)).state for j in (long, slow)}
            return states == {"running"}

        await eventually(both_running)
        nan = await client.submit("nan_sleep", {"count": 32})
        done = await client.wait(long.id, timeout=60)
        timed_out = await client.wait(slow.id, timeout=60)
        hung = await client.wait(nan.id, timeout=60)
    assert done.state == "succeeded" and done.attempts == 1
    starts = collections.Counter(line.split()[0] for line in runs.read_text().splitlines()[::2])
    assert starts == {long.id: 1}
    assert timed_out.state == "failed" and timed_out.error is not None
    assert timed_out.error.type == "TimeoutError"
    assert timed_out.finished_at and done.finished_at
    assert timed_out.finished_at < done.finished_at  # a 1.5 s timeout ends before a 4 s run
    # The NaN timers were dropped: the handler waited until its own timeout ended it.
    assert hung.state == "failed" and hung.error is not None
    assert hung.error.type == "TimeoutError"
    assert d.events("job.lease_lost") == []
    # The watchdog may find the 32 NaN timers over several passes on a loaded machine, and the
    # attempt's timeout may cancel the last ones before a pass finds them: at least one pass
    # dropped some, none more than there were, each logged as an error.
    d.wait_log("loop.timers_repaired")
    repairs = d.events("loop.timers_repaired")
    assert 1 <= sum(e["dropped"] for e in repairs) <= 32
    assert {e["level"] for e in repairs} == {"error"}


async def test_a_blocked_event_loop_is_reported_with_how_late(tmp_path: Path, daemons: Daemons):
    """A handler that blocks the event loop for 2 s makes the watchdog thread log an error line
    saying how late the loop's timers are, then a line when they are on time again."""
    d = daemons.start(sqlite_config(tmp_path, extra=MISBEHAVING))
    async with arqd.HttpClient(d.url) as client:
        job = await client.submit("block_loop", {"seconds": 2})
        assert (await client.wait(job.id, timeout=30)).state == "succeeded"
    late = d.wait_log("loop.timers_late")
    assert late["level"] == "error" and late["late_s"] >= 1.0
    assert d.wait_log("loop.timers_recovered")["worst_late_s"] >= late["late_s"]


async def test_a_crashed_fetch_loop_is_logged_and_restarted(tmp_path: Path):
    """A lease call that raises something other than BackendError (a bug, not a backend fault)
    crashes the fetch loop once: the crash is logged with its traceback, the loop runs again,
    and jobs still run."""

    class BuggyOnce(MemoryQueue):
        bugs = 1

        async def lease(
            self, queues: Sequence[str], limit: int, lease_for: float, worker: str
        ) -> list[Lease]:
            if self.bugs:
                self.bugs -= 1
                raise ZeroDivisionError("a bug, not a backend fault")
            return await super().lease(queues, limit, lease_for, worker)

    app = arqd.App(make_config("memory", tmp_path), queue=BuggyOnce())
    with capture_logs() as logs:
        async with app:
            job = await app.client.submit("echo", 1)
            done = await app.client.wait(job.id, timeout=20)
    assert done.state == "succeeded"
    crashed = [e for e in logs if e["event"] == "task.crashed"]
    assert [(e["task"], e["log_level"]) for e in crashed] == [("arqd-fetch", "error")]
    assert crashed[0]["exc_info"] is True  # rendered as the traceback by the log setup
    assert not app.supervisor.failed.is_set()


async def test_an_emptied_queue_list_idles_and_recovers(tmp_path: Path):
    """A pool left with no queue to consume idles (drain returns, nothing crashes) and
    consumes again once queues are given back."""
    app = arqd.App(make_config("memory", tmp_path))
    with capture_logs() as logs:
        async with app:
            assert app.pool is not None
            app.pool.queues = []  # what reloading ``workers.queues = []`` did (now refused)
            job = await app.client.submit("echo", 1)
            await asyncio.wait_for(app.drain(), 10)
            assert (await app.client.get(job.id)).state == "queued"
            app.with_workers(queues=["default"])
            done = await app.client.wait(job.id, timeout=20)
    assert done.state == "succeeded"
    assert [e for e in logs if e["event"] == "task.crashed"] == []


async def test_every_background_task_is_supervised(tmp_path: Path):
    """Every task an app starts (pool loops, consumers, scheduler, sweeper, follower) runs
    under the supervisor, so none can die silently."""
    app = arqd.App(make_config("memory", tmp_path))
    async with app:
        await app.drain()
        ours = [t for t in asyncio.all_tasks() if t.get_name().startswith("arqd-")]
        names = {t.get_name() for t in ours}
        assert {"arqd-fetch", "arqd-consumer", "arqd-scheduler", "arqd-follow"} <= names
        unsupervised = [t for t in ours if t.get_coro().__qualname__ != "Supervisor.run"]
        assert unsupervised == []


async def test_a_loop_that_keeps_crashing_is_given_up():
    """A loop crashing CRASH_LIMIT times within the window is not restarted again: the
    supervisor logs task.gave_up and sets ``failed``."""
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("always")

    supervisor = Supervisor()
    with capture_logs() as logs:
        await asyncio.wait_for(supervisor.spawn("arqd-broken", broken), 30)
    assert runs == CRASH_LIMIT and supervisor.failed.is_set()
    assert supervisor.failure == "arqd-broken"
    assert [e["event"] for e in logs].count("task.crashed") == CRASH_LIMIT
    assert logs[-1]["event"] == "task.gave_up" and logs[-1]["log_level"] == "critical"


async def test_daemon_exits_non_zero_when_a_task_keeps_crashing(tmp_path: Path, daemons: Daemons):
    """A daemon whose background task crashes again and again logs each crash with its
    traceback, gives up, releases what it runs and exits 1, so systemd restarts it."""
    extra = '[handlers.sabotage]\ncall = "tests.sabotage:noop"\n'
    d = daemons.start(sqlite_config(tmp_path, extra=extra))
    assert d.wait_exit(30) == 1
    crashed = d.events("task.crashed")
    assert len(crashed) == CRASH_LIMIT and {e["task"] for e in crashed} == {"arqd-register"}
    assert "RuntimeError: sabotaged" in crashed[0]["exception"]
    assert d.events("task.gave_up")[0]["level"] == "critical"
    assert d.events("daemon.stopped")[0]["exit_code"] == 1
