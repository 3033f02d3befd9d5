"""The consumer pool and the in-process client, on every queue backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

import arqd
from arqd.backends.base import Outcome, Update
from arqd.backends.memory import MemoryQueue
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.core import Core
from arqd.errors import CredentialsUnreadable, HostNotAllowed
from arqd.handlers import Registry
from arqd.model import Job, State, blob_name, new_job_id, new_token
from arqd.results.memory import MemoryResults

from .util import eventually

POOL_BACKENDS = [
    "memory",
    "sqlite",
]  # dynamodb: covered by tests/test_aws_*.py and the contract suite


def make_config(backend: str, tmp_path: Path, **workers: Any) -> Config:
    workers = {"concurrency": 4, "heartbeat": "50ms", "poll_max": "50ms", **workers}
    return Config.from_dict(
        {
            "queue": {"backend": backend, "path": str(tmp_path / "q.sqlite3")},
            "results": {
                "backend": "files",
                "path": str(tmp_path / "results"),
                "inline_max": "1KiB",
            },
            "workers": workers,
            "defaults": {"max_attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}},
            "handlers": {"echo": "arqd.demo:echo", "blob": "arqd.demo:blob"},
        }
    )


@pytest.fixture(params=POOL_BACKENDS)
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[arqd.App]:
    application = arqd.App(make_config(request.param, tmp_path))
    register_test_handlers(application)
    async with application:
        yield application


CALLS: dict[str, int] = {}


def register_test_handlers(app: arqd.App) -> None:
    @app.handler("boom")
    async def boom(ctx: arqd.JobContext, payload: Any) -> None:
        raise RuntimeError(f"boom on attempt {ctx.attempt}")

    @app.handler("refuse")
    async def refuse(ctx: arqd.JobContext, payload: Any) -> None:
        raise arqd.Fail("will never work")

    @app.handler("again")
    async def again(ctx: arqd.JobContext, payload: Any) -> int:
        if ctx.attempt == 1:
            raise arqd.Retry("not yet", delay=0.01)
        return ctx.attempt

    @app.handler("slow", timeout=0.05)
    async def slow(ctx: arqd.JobContext, payload: Any) -> None:
        await asyncio.sleep(10)

    @app.handler("block")
    async def block(ctx: arqd.JobContext, payload: Any) -> str:
        CALLS["block"] = CALLS.get("block", 0) + 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            CALLS["block_cancelled"] = CALLS.get("block_cancelled", 0) + 1
            raise
        return "never"

    @app.handler("counted", cache=True)
    async def counted(ctx: arqd.JobContext, payload: Any) -> Any:
        CALLS["counted"] = CALLS.get("counted", 0) + 1
        await asyncio.sleep(0.05)
        return payload

    @app.handler("bigjson")
    async def bigjson(ctx: arqd.JobContext, payload: Any) -> list[int]:
        return list(range(5000))

    @app.handler("chatty")
    async def chatty(ctx: arqd.JobContext, payload: Any) -> None:
        for i in range(2000):
            await ctx.progress(i / 2000, "working")
        await asyncio.sleep(0.3)


async def wait_state(client: arqd.Client, job_id: str, *states: str) -> arqd.Job:
    """Poll with a deadline until the job is in one of ``states``."""
    async with asyncio.timeout(10):
        while True:
            job = await client.get(job_id)
            if job.state in states or (job.cancel_requested and "cancel_requested" in states):
                return job
            await asyncio.sleep(0.01)


async def test_json_result_is_inline(app: arqd.App):
    """A handler's small JSON result is stored inline and read back as the value."""
    job = await app.client.submit("echo", {"hello": ["world", 1]})
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "succeeded" and done.attempts == 1
    assert done.result is not None and done.result.inline == {"hello": ["world", 1]}
    assert await app.client.result(job.id) == {"hello": ["world", 1]}


async def test_large_json_result_becomes_a_blob(app: arqd.App):
    """A JSON result above inline_max is stored in the result store and still reads as JSON."""
    job = await app.client.submit("bigjson")
    done = await app.client.wait(job.id, timeout=10)
    assert done.result is not None and not done.result.is_inline
    assert done.result.content_type == "application/json"
    assert await app.client.result(job.id) == list(range(5000))


async def test_streamed_result(app: arqd.App):
    """An async-iterator result is streamed to the store and streamed back."""
    job = await app.client.submit("blob", {"size": 3_000_000})
    done = await app.client.wait(job.id, timeout=10)
    assert done.result is not None and done.result.size == 3_000_000
    total = 0
    async for chunk in app.client.stream_result(job.id):
        assert len(chunk) <= 1024 * 1024
        total += len(chunk)
    assert total == 3_000_000


async def test_fail_ends_the_job_without_retry(app: arqd.App):
    """``arqd.Fail`` fails the job on its first attempt."""
    job = await app.client.submit("refuse")
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed" and done.attempts == 1
    assert done.error is not None and done.error.type == "Fail"
    with pytest.raises(arqd.JobFailed):
        await app.client.result(job.id)


async def test_exceptions_retry_until_max_attempts(app: arqd.App):
    """Any other exception is a failed attempt, retried with backoff up to max_attempts."""
    job = await app.client.submit("boom")
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed" and done.attempts == 3
    assert done.error is not None and done.error.type == "RuntimeError"
    assert done.error.attempt == 3 and "attempt 3" in done.error.message


async def test_retry_asks_for_another_attempt(app: arqd.App):
    """``arqd.Retry`` ends the attempt and the next one runs."""
    job = await app.client.submit("again")
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "succeeded" and await app.client.result(job.id) == 2


async def test_timeout_fails_the_attempt(app: arqd.App):
    """An attempt over its timeout fails with TimeoutError."""
    job = await app.client.submit("slow", max_attempts=1)
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed"
    assert done.error is not None and done.error.type == "TimeoutError"
    assert "timeout" in done.error.message


async def test_interrupt_a_handler_absorbs_leaves_the_consumer_clean(tmp_path: Path):
    """A handler that catches its interruption (here: its timeout) and raises an error of its
    own fails the attempt with that error; the consumer it ran on is not left cancelling, so
    the next job on it runs normally."""
    app = arqd.App(make_config("memory", tmp_path, concurrency=1))

    @app.handler("stubborn", timeout=0.05)
    async def stubborn(ctx: arqd.JobContext, payload: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ValueError("interrupted, said differently") from None

    @app.handler("cancelling")
    async def cancelling(ctx: arqd.JobContext, payload: Any) -> int:
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    async with app:
        first = await app.client.submit("stubborn", max_attempts=1)
        done = await app.client.wait(first.id, timeout=10)
        assert done.state == "failed" and done.error is not None
        assert done.error.type == "ValueError"
        second = await app.client.submit("cancelling")
        assert (await app.client.wait(second.id, timeout=10)).state == "succeeded"
        assert await app.client.result(second.id) == 0


async def test_cancel_running_job_interrupts_handler(app: arqd.App):
    """Cancelling a running job interrupts its handler; the job ends cancelled."""
    CALLS.clear()
    job = await app.client.submit("block")
    await wait_state(app.client, job.id, "running")
    requested = await app.client.cancel(job.id)
    assert requested.cancel_requested or requested.state == "cancelled"
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "cancelled" and CALLS["block_cancelled"] == 1
    with pytest.raises(arqd.JobCancelled):
        await app.client.result(job.id)


async def test_cancel_queued_job(tmp_path: Path):
    """A queued job cancelled before any consumer sees it never runs."""
    async with arqd.Client(config=make_config("memory", tmp_path)) as client:
        job = await client.submit("echo", 1, delay=60)
        cancelled = await client.cancel(job.id)
        assert cancelled.state == "cancelled"


async def test_drain_returns_once_idle(app: arqd.App):
    """drain() returns after every ready job is done."""
    jobs = await app.client.submit_many([{"handler": "echo", "payload": i} for i in range(200)])
    await app.drain()
    states = {(await app.client.get(j.id)).state for j in jobs}
    assert states == {"succeeded"}


async def test_dedupe_key_answers_the_live_job(app: arqd.App):
    """Submitting a key held by a live job answers that job, marked deduplicated."""
    first = await app.client.submit("echo", 1, key="report-7")
    second = await app.client.submit("echo", 2, key="report-7")
    assert second.id == first.id and second.deduplicated and not first.deduplicated


async def test_cached_handler_runs_once_for_identical_requests(app: arqd.App):
    """Two clients asking the same question of a cache=true handler share one run."""
    CALLS.clear()
    a, b = await asyncio.gather(
        app.client.submit("counted", {"q": 1, "r": [1, 2]}),
        app.client.submit("counted", {"r": [1, 2], "q": 1}),
    )
    assert a.id == b.id
    await app.client.wait(a.id, timeout=10)
    c = await app.client.submit("counted", {"q": 1, "r": [1, 2]})
    assert c.id == a.id and c.deduplicated
    assert CALLS["counted"] == 1


async def test_progress_writes_are_coalesced(tmp_path: Path):
    """Thousands of progress reports become a handful of backend writes."""
    writes: list[int] = []

    class CountingQueue(MemoryQueue):
        async def _update(self, updates: Sequence[Update]) -> list[bool]:
            writes.append(len(updates))
            return await super()._update(updates)

    app = arqd.App(make_config("memory", tmp_path), queue=CountingQueue())
    register_test_handlers(app)
    async with app:
        job = await app.client.submit("chatty")
        done = await app.client.wait(job.id, timeout=10)
    assert done.state == "succeeded"
    assert 1 <= len(writes) <= 5


async def test_local_submit_wakes_an_idle_consumer(tmp_path: Path):
    """A submit in the same process starts the job at once, not at the next poll (60 s here)."""
    app = arqd.App(make_config("sqlite", tmp_path, poll_max="60s"))
    async with app:
        await app.drain()
        await asyncio.sleep(0.2)  # let the idle poll interval grow
        job = await app.client.submit("echo", 1)
        done = await app.client.wait(job.id, timeout=5)
        assert done.state == "succeeded"


async def test_lost_lease_interrupts_and_discards(tmp_path: Path):
    """When another consumer takes over an expired lease, the first handler is interrupted and
    its outcome discarded; only the new holder's outcome lands."""
    clock = ManualClock()
    queue = MemoryQueue(clock=clock)
    app = arqd.App(make_config("memory", tmp_path), queue=queue, results=MemoryResults())
    register_test_handlers(app)
    CALLS.clear()
    async with app:
        job = await app.client.submit("block")
        await wait_state(app.client, job.id, "running")
        clock.advance(60)  # past the visibility timeout, as if heartbeats had stopped
        (stolen,) = await queue.lease(["default"], 1, 30, "thief")
        await eventually(lambda: CALLS.get("block_cancelled", 0) == 1)
        outcome = Outcome(job=stolen.job, token=stolen.token, state=arqd.State.SUCCEEDED)
        assert await queue.finish([outcome]) == [True]
        final = await app.client.get(job.id)
    assert final.state == "succeeded" and final.attempts == 2


async def test_a_job_leased_again_by_the_same_pool_stays_under_its_control(tmp_path: Path):
    """A pool that loses a lease while its handler ignores the interruption, and then leases the
    same job again, keeps control of the new attempt when the old one finally ends: a cancel
    still interrupts it (the bookkeeping is per lease, not per job id)."""
    clock = ManualClock()
    queue = MemoryQueue(clock=clock)
    app = arqd.App(make_config("memory", tmp_path), queue=queue, results=MemoryResults())
    first_may_end = asyncio.Event()
    seen: list[int] = []
    interrupted: list[int] = []

    @app.handler("stubborn")
    async def stubborn(ctx: arqd.JobContext, payload: Any) -> None:
        seen.append(ctx.attempt)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            interrupted.append(ctx.attempt)
            if ctx.attempt == 1:  # ignores its interruption until told to end
                await first_may_end.wait()
                seen.append(-1)  # the pool is done with attempt 1 in this same step
                return
            raise

    async with app:
        job = await app.client.submit("stubborn", max_attempts=5)
        await eventually(lambda: seen == [1])
        clock.advance(60)  # past the visibility timeout, as if heartbeats had stopped
        await queue.lease(["default"], 1, 30, "thief")  # attempt 2, never finished
        await eventually(lambda: interrupted == [1])  # the heartbeat found attempt 1 lost
        clock.advance(60)  # the thief's lease expires: the same pool leases attempt 3
        await eventually(lambda: seen == [1, 3])
        first_may_end.set()  # attempt 1 ends at last, long after its lease was lost
        await eventually(lambda: seen == [1, 3, -1])
        await app.client.cancel(job.id)
        done = await app.client.wait(job.id, timeout=10)
    assert done.state == "cancelled" and interrupted == [1, 3]


async def test_a_pool_that_leases_its_own_expired_job_again_stops_the_old_attempt(
    tmp_path: Path,
):
    """A pool whose lease expired (a stall: its heartbeats never ran) and that leases the same
    job again itself stops the older attempt at once: nothing else would tell it (it is no
    longer heartbeated), and it ran on beside the new one (found by the chaos suite)."""
    clock = ManualClock()
    queue = MemoryQueue(clock=clock)
    app = arqd.App(make_config("memory", tmp_path), queue=queue, results=MemoryResults())
    seen: list[int] = []
    interrupted: list[int] = []

    @app.handler("long")
    async def long(ctx: arqd.JobContext, payload: Any) -> None:
        seen.append(ctx.attempt)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            interrupted.append(ctx.attempt)
            raise

    async with app:
        job = await app.client.submit("long", max_attempts=5)
        await eventually(lambda: seen == [1])
        clock.advance(60)  # past the visibility timeout: the pool itself leases it again
        app.core.hub.jobs_ready()
        await eventually(lambda: seen == [1, 2])
        await eventually(lambda: interrupted == [1])
        await app.client.cancel(job.id)
        done = await app.client.wait(job.id, timeout=10)
    assert done.state == "cancelled" and done.attempts == 2


async def test_an_exception_with_a_step_attribute_is_an_ordinary_failure(app: arqd.App):
    """A handler's own exception that happens to carry ``step``, ``type`` or ``code``
    attributes is a failed attempt, retried, like any other: only arqd's StepFailed and
    CredentialsUnreadable end a job at once."""

    class StageError(Exception):
        step = "resize"
        type = "NotAStepFailure"
        code = "credentials_unreadable"

    @app.handler("staged")
    async def staged(ctx: arqd.JobContext, payload: Any) -> None:
        raise StageError(f"stage failed on attempt {ctx.attempt}")

    job = await app.client.submit("staged")
    done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed" and done.attempts == 3
    assert done.error is not None and done.error.type == "StageError"
    assert done.error.step is None and "attempt 3" in done.error.message


async def test_shutdown_releases_without_counting_the_attempt(tmp_path: Path):
    """Leaving ``async with app`` with a job still running releases it: queued, attempt given
    back, leasable at once by the next worker."""
    config = make_config("sqlite", tmp_path, shutdown_grace="0s")
    app = arqd.App(config)
    register_test_handlers(app)
    async with app:
        job = await app.client.submit("block")
        await wait_state(app.client, job.id, "running")
    async with arqd.Client(config=config) as client:
        after = await client.get(job.id)
    assert after.state == "queued" and after.attempts == 0


async def test_shutdown_grace_lets_running_jobs_finish(tmp_path: Path):
    """Jobs that finish within the grace period finish normally on shutdown."""
    config = make_config("memory", tmp_path, shutdown_grace="5s")
    app = arqd.App(config)
    register_test_handlers(app)

    @app.handler("short")
    async def short(ctx: arqd.JobContext, payload: Any) -> str:
        await asyncio.sleep(0.2)
        return "finished"

    async with app:
        job = await app.client.submit("short")
        await wait_state(app.client, job.id, "running")
    assert (await app.client.get(job.id)).state == "succeeded"


async def test_expired_last_attempt_fails_the_job(tmp_path: Path):
    """A job whose last allowed attempt was lost to an expired lease fails with LeaseExpired
    instead of running beyond max_attempts."""
    clock = ManualClock()
    queue = MemoryQueue(clock=clock)
    app = arqd.App(make_config("memory", tmp_path), queue=queue, results=MemoryResults())
    register_test_handlers(app)
    job = await app.client.submit("echo", 1, max_attempts=1)
    await queue.lease(["default"], 1, 30, "a-worker-that-dies")
    clock.advance(31)
    async with app:
        done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed" and done.attempts == 1
    assert done.error is not None and done.error.type == "LeaseExpired"


async def test_unknown_handler_in_a_stored_job_fails_its_attempts(tmp_path: Path):
    """A job naming a handler this worker lacks fails its attempts (another worker may have it)
    and ends failed, not stuck."""
    config = make_config("memory", tmp_path)
    queue, results = MemoryQueue(), MemoryResults()
    async with arqd.Client(queue, results, config=config) as client:
        job = await client.submit("not-registered-here", max_attempts=2)
    app = arqd.App(config, queue=queue, results=results)
    async with app:
        done = await app.client.wait(job.id, timeout=10)
    assert done.state == "failed" and done.error is not None
    assert done.error.type == "UnknownHandler"


async def test_resize_changes_parallelism(tmp_path: Path):
    """Growing concurrency lets more jobs run at once."""
    app = arqd.App(make_config("memory", tmp_path, concurrency=1))
    register_test_handlers(app)
    async with app:
        jobs = [await app.client.submit("block") for _ in range(3)]
        await wait_state(app.client, jobs[0].id, "running")
        assert app.pool is not None and app.pool.running == 1
        app.with_workers(concurrency=3)
        for j in jobs:
            await wait_state(app.client, j.id, "running")
        assert app.pool.running == 3
        for j in jobs:
            await app.client.cancel(j.id)


# --- the client's errors and validation -----------------------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[arqd.Client]:
    config = make_config("memory", tmp_path)
    async with arqd.Client(config=config, registry=Registry.from_config(config)) as c:
        yield c


async def test_unknown_job_is_not_found(client: arqd.Client):
    """get() of an unknown or malformed id raises JobNotFound."""
    with pytest.raises(arqd.JobNotFound):
        await client.get("0" * 32)
    with pytest.raises(arqd.JobNotFound):
        await client.get("../../etc")


async def test_result_before_success_is_not_ready(client: arqd.Client):
    """result() of a queued job raises NotReady."""
    job = await client.submit("echo", 1)
    with pytest.raises(arqd.NotReady):
        await client.result(job.id)


@pytest.mark.parametrize(
    ("spec", "error", "mentions"),
    [
        ({"handler": "echo", "colour": "red"}, arqd.InvalidRequest, "colour"),
        ({"handler": "nope"}, arqd.UnknownHandler, "nope"),
        ({"handler": "echo", "queue": "bad queue!"}, arqd.InvalidRequest, "queue"),
        ({"handler": "echo", "max_attempts": 0}, arqd.InvalidRequest, "max_attempts"),
        ({"handler": "echo", "delay": -1}, arqd.InvalidRequest, "delay"),
        ({"handler": "echo", "timeout": 0}, arqd.InvalidRequest, "timeout"),
        ({"handler": "echo", "key": "k" * 257}, arqd.InvalidRequest, "key"),
        ({"handler": "echo", "meta": {"x": "y" * 5000}}, arqd.InvalidRequest, "meta"),
        (
            {"handler": "echo", "delay": 1, "run_at": "2030-01-01T00:00:00Z"},
            arqd.InvalidRequest,
            "run_at",
        ),
        ({"payload": 1}, arqd.InvalidRequest, "handler"),
    ],
)
async def test_invalid_specs_are_refused(
    client: arqd.Client, spec: dict[str, Any], error: type[Exception], mentions: str
):
    """Each invalid spec is refused with an error naming the field, and nothing is stored."""
    with pytest.raises(error, match=mentions):
        await client.submit_many([{"handler": "echo"}, spec])
    jobs, _ = await client.list()
    assert jobs == []


async def test_run_at_schedules_the_job(client: arqd.Client):
    """run_at sets ready_at."""
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(days=300)
    job = await client.submit("echo", run_at=at)
    assert job.ready_at == at


async def test_wait_times_out(client: arqd.Client):
    """wait() raises TimeoutError when the job does not finish in time."""
    job = await client.submit("echo", 1)
    with pytest.raises(TimeoutError):
        await client.wait(job.id, timeout=0.05)


async def test_delete_cancels_live_and_removes_finished(app: arqd.App):
    """delete() cancels a live job, and removes a finished one with its stored result."""
    job = await app.client.submit("blob", {"size": 10_000})
    await app.client.wait(job.id, timeout=10)
    await app.client.delete(job.id)
    with pytest.raises(arqd.JobNotFound):
        await app.client.get(job.id)
    live = await app.client.submit("echo", 1, delay=60)
    await app.client.delete(live.id)
    assert (await app.client.get(live.id)).state == "cancelled"


async def test_list_pages_through_jobs(client: arqd.Client):
    """list() pages newest first and validates its arguments."""
    for i in range(5):
        await client.submit("echo", i)
    page, cursor = await client.list(limit=2)
    assert [j.payload for j in page] == [4, 3] and cursor is not None
    rest, end = await client.list(limit=10, cursor=cursor)
    assert [j.payload for j in rest] == [2, 1, 0] and end is None
    with pytest.raises(arqd.InvalidRequest):
        await client.list(limit=5000)
    with pytest.raises(arqd.InvalidRequest):
        await client.list(state="sleeping")


def test_job_is_immutable_and_state_is_a_str():
    """arqd.Job is frozen and its state compares equal to plain strings."""
    job = msgspec.convert(
        {
            "id": "0" * 32,
            "queue": "q",
            "handler": "h",
            "state": "queued",
            "created_at": "2026-01-01T00:00:00Z",
            "ready_at": "2026-01-01T00:00:00Z",
        },
        arqd.Job,
    )
    assert job.state == "queued" and isinstance(job.state, str)
    with pytest.raises(AttributeError):
        job.state = arqd.State.FAILED  # type: ignore[misc]


# --- prefetch and the real start of an attempt ----------------------------------------------------


def register_nap(app: arqd.App, runs: dict[str, tuple[float, float]]) -> None:
    @app.handler("nap")
    async def nap(ctx: arqd.JobContext, payload: Any) -> None:
        start = time.time()
        await asyncio.sleep(payload)
        runs[ctx.job.id] = (start, time.time())


async def test_long_jobs_are_not_leased_ahead_of_a_free_consumer(app: arqd.App):
    """8 one-second jobs at concurrency 4: never more than 4 show as running (no job sits
    leased in a prefetch buffer), and each job's started_at..finished_at is its real run."""
    runs: dict[str, tuple[float, float]] = {}
    register_nap(app, runs)
    jobs = await app.client.submit_many([{"handler": "nap", "payload": 1.0}] * 8)
    most = 0
    async with asyncio.timeout(30):
        while True:
            running, _ = await app.client.list(state="running")
            most = max(most, len(running))
            if len(runs) == 8 and not running:
                break
            await asyncio.sleep(0.02)
    assert most == 4
    for job in jobs:
        done = await app.client.get(job.id)
        assert done.state == "succeeded" and done.started_at and done.finished_at
        start, end = runs[job.id]
        assert abs(done.started_at.timestamp() - start) < 0.25
        assert abs(done.finished_at.timestamp() - end) < 0.25


async def test_started_at_is_the_handlers_start_after_a_buffer_wait(app: arqd.App):
    """After a run of short jobs the pool prefetches; jobs that then wait in its buffer behind
    slower ones record the handler's real start, and their canonical line's run_ms its real
    run, not the time since they were leased."""
    runs: dict[str, tuple[float, float]] = {}
    register_nap(app, runs)
    await app.client.submit_many([{"handler": "echo", "payload": i} for i in range(40)])
    await app.drain()
    with capture_logs() as logs:
        jobs = await app.client.submit_many([{"handler": "nap", "payload": 0.5}] * 8)
        for job in jobs:
            await app.client.wait(job.id, timeout=30)
    for job in jobs:
        done = await app.client.get(job.id)
        assert done.started_at is not None
        assert abs(done.started_at.timestamp() - runs[job.id][0]) < 0.2
    lines = {e["job_id"]: e for e in logs if e["event"] == "job.succeeded"}
    assert {j.id for j in jobs} <= set(lines)
    assert all(300 < lines[j.id]["run_ms"] < 800 for j in jobs)


async def test_a_reload_applies_the_visibility_timeout_to_the_next_lease(tmp_path: Path):
    """After `reconfigure` with a new `visibility_timeout`, the next lease is taken for that
    long (the fetch loop reads the setting each time, not once at start)."""
    queue = MemoryQueue()
    seen: list[float] = []
    lease = queue.lease

    async def spy(queues: Sequence[str], limit: int, lease_for: float, worker: str) -> Any:
        seen.append(lease_for)
        return await lease(queues, limit, lease_for, worker)

    queue.lease = spy  # type: ignore[method-assign]
    app = arqd.App(make_config("memory", tmp_path), queue=queue, results=MemoryResults())
    async with app:
        job = await app.client.submit("echo", 1)
        await app.client.wait(job.id, timeout=10)
        app.with_workers(visibility_timeout=7.0)
        job = await app.client.submit("echo", 2)
        await app.client.wait(job.id, timeout=10)
    assert seen[0] == 30.0 and seen[-1] == 7.0


# --- the core decides what an attempt's end means; the pool only asks ---------------------------


@pytest.fixture
def core(tmp_path: Path) -> Core:
    config = make_config("memory", tmp_path)
    return Core(MemoryQueue(), MemoryResults(), config, Registry.from_config(config))


def leased(**changes: Any) -> Job:
    """A job as a consumer holds it: running its first of three attempts."""
    now = datetime.now(UTC)
    job = Job(
        id=new_job_id(),
        queue="default",
        handler="echo",
        state=State.RUNNING,
        attempts=1,
        max_attempts=3,
        created_at=now,
        ready_at=now,
    )
    return msgspec.structs.replace(job, **changes)


def test_the_core_refuses_jobs_that_must_not_run(core: Core):
    """A requested cancel, attempts used up by expired leases and an unknown handler end an
    attempt without running it: cancelled, failed for good (uncounted), a retried failure."""
    assert core.outcomes.refuse(leased(), "t", True, "w1") is None
    cancel = core.outcomes.refuse(leased(cancel_requested=True), "t", True, "w1")
    assert cancel is not None and cancel.state is State.CANCELLED
    expired = core.outcomes.refuse(leased(attempts=4), "t", True, "w1")
    assert expired is not None and expired.state is State.FAILED
    assert not expired.count_attempt and expired.error is not None
    assert expired.error.type == "LeaseExpired"
    unknown = core.outcomes.refuse(leased(handler="elsewhere"), "t", False, "w1")
    assert unknown is not None and unknown.state is State.QUEUED and unknown.count_attempt
    assert unknown.error is not None and unknown.error.type == "UnknownHandler"
    assert "'elsewhere'" in unknown.error.message and "w1" in unknown.error.message


def test_the_core_shapes_failures_by_their_type(core: Core):
    """Fail and step failures end the job with their details; Retry waits as asked; a
    schedule tick's failure keeps its key; anything else retries until the last attempt."""
    step = core.outcomes.failure(
        leased(), "t", HostNotAllowed("charge", "api.example is not allowed", response_status=403)
    )
    assert step.state is State.FAILED and step.error is not None
    assert (step.error.type, step.error.step, step.error.status) == (
        "HostNotAllowed",
        "charge",
        403,
    )
    unreadable = core.outcomes.failure(leased(), "t", CredentialsUnreadable("no key opens it"))
    assert unreadable.state is State.FAILED and unreadable.error is not None
    assert unreadable.error.type == "CredentialsUnreadable"
    fail = core.outcomes.failure(leased(), "t", arqd.Fail("never"))
    assert fail.state is State.FAILED and fail.free_key
    tick = core.outcomes.failure(leased(key="schedule:nightly:1"), "t", arqd.Fail("never"))
    assert tick.state is State.FAILED and not tick.free_key
    before = core.clock.time()
    retry = core.outcomes.failure(leased(), "t", arqd.Retry("later", delay=7))
    assert retry.state is State.QUEUED and retry.ready_at is not None
    assert before + 7 <= retry.ready_at <= core.clock.time() + 7
    other = core.outcomes.failure(leased(), "t", ValueError("x" * 5000))
    assert other.state is State.QUEUED and other.error is not None
    assert other.error.type == "ValueError" and len(other.error.message) == 2000
    last = core.outcomes.failure(leased(attempts=3), "t", ValueError("again"))
    assert last.state is State.FAILED
    timed = core.outcomes.timed_out(leased(timeout=1.5), "t")
    assert timed.error is not None and timed.error.type == "TimeoutError"
    assert "1.5s" in timed.error.message
    released = core.outcomes.released(leased(), "t")
    assert released.state is State.QUEUED and not released.count_attempt


async def test_the_core_keeps_small_results_inline_and_large_ones_as_blobs(core: Core):
    """Scalars and JSON up to inline_max stay in the record; bytes, larger JSON and streams
    become blobs named after the lease, in the area the job's stickiness gives."""
    job = leased()
    assert (await core.resultio.store(job, "t", 3)).inline == 3
    assert (await core.resultio.store(job, "t", {"a": [1]})).inline == {"a": [1]}
    token = new_token()
    big = await core.resultio.store(job, token, list(range(1000)))
    assert not big.is_inline and big.content_type == "application/json"
    assert big.area == "temporary" and big.name == blob_name(job.id, token)
    raw = await core.resultio.store(leased(sticky=True), new_token(), b"\x00\x01")
    assert raw.area == "persistent" and raw.content_type == "application/octet-stream"
    assert raw.size == 2

    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cd"

    streamed = await core.resultio.store(job, new_token(), chunks())
    assert streamed.size == 4
    assert b"".join([c async for c in core.resultio.read(streamed)]) == b"abcd"
