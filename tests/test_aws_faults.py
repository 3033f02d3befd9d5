"""The AWS backends under faults: throttling, 5xx, dropped connections and lost answers, injected
by ``tests/faultproxy.py`` between aiobotocore and moto; and a dead endpoint."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import pytest

from arqd.backends.base import Lease, ListFilter, Outcome
from arqd.backends.dynamodb import DynamoQueue
from arqd.clock import ManualClock
from arqd.errors import BackendError, BackendUnavailable
from arqd.model import NewJob, State, blob_name, new_job_id, new_token
from arqd.results.s3 import S3Results

from .conftest import dynamo_settings, free_port, s3_settings
from .contract import new
from .faultproxy import FaultProxy, Faults

T = TypeVar("T")
VT = 30.0
JOBS = 200
# Every kind of fault, one request in ten in all: each kind is met dozens of times in a run,
# while botocore's backoff (up to 1 s, 2 s, 4 s... per retry) keeps the run short enough.
ROUGH = Faults(throttle=0.03, unavailable=0.02, drop=0.02, lose=0.03)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def proxy(moto_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(moto_url, seed=4) as p:
        yield p


@pytest.fixture
async def truth(moto_url: str, proxy: FaultProxy) -> AsyncIterator[DynamoQueue]:
    """A fault-free handle on the table, to read what really happened."""
    async with DynamoQueue(dynamo_settings(moto_url)) as q:
        yield q


def through(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock, attempts: int = 8
) -> DynamoQueue:
    """A handle on ``truth``'s table through the proxy; fewer ``attempts`` make a request that
    meets nothing but faults give up sooner (botocore backs off up to 20 s between tries)."""
    settings = dynamo_settings(proxy.url, table=truth.table, max_attempts=attempts)
    return DynamoQueue(settings, clock=clock)


async def persist(call: Callable[[], Awaitable[T]]) -> T:
    """Repeat a backend call until it answers, as the consumer pool does with backend faults."""
    for _ in range(50):
        try:
            return await call()
        except BackendError:
            await asyncio.sleep(0.01)
    raise AssertionError("the backend never answered")


async def enqueue_all(q: DynamoQueue, jobs: Sequence[NewJob]) -> None:
    for i in range(0, len(jobs), 100):
        batch = jobs[i : i + 100]
        stored = await persist(lambda batch=batch: q.enqueue(batch))  # type: ignore[misc]
        assert all(e.created for e in stored)


async def work_through(q: DynamoQueue, clock: ManualClock, ids: set[str]) -> Counter[str]:
    """Lease and succeed every job; answers how many finishes were applied per job. A lease
    whose answer was lost is recovered by letting it expire (the manual clock skips ahead)."""
    applied: Counter[str] = Counter()
    while len(applied) < len(ids):
        leases = await persist(lambda: q.lease(["default"], 100, VT, "w"))
        if not leases:
            clock.advance(VT + 1)  # leases won but never answered come back
            continue
        answers = await finish_all(q, leases)
        for lease, ok in zip(leases, answers, strict=True):
            assert ok, "our own lease was refused: nothing else could have taken it"
            applied[lease.job.id] += 1
    return applied


async def finish_all(q: DynamoQueue, leases: Sequence[Lease]) -> list[bool]:
    outcomes = [Outcome(job=le.job, token=le.token, state=State.SUCCEEDED) for le in leases]
    return await persist(lambda: q.finish(outcomes))


async def test_every_job_ends_exactly_once_through_faults(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock
):
    """With throttling, 503s, dropped connections and lost answers on every kind of request,
    each of a few hundred jobs is enqueued once, finished once, and none is lost."""
    async with through(proxy, truth, clock) as q:
        proxy.faults = ROUGH
        jobs = [new(clock) for _ in range(JOBS)]
        await enqueue_all(q, jobs)
        ids = {j.id for j in jobs}
        applied = await work_through(q, clock, ids)
        proxy.faults = Faults()
    assert set(applied) == ids and set(applied.values()) == {1}
    final = await truth.get_many(sorted(ids))
    assert all(j is not None and j.state is State.SUCCEEDED for j in final)
    everything, more = await truth.list_jobs(ListFilter(), 1000, None)
    assert more is None and {j.id for j in everything} == ids  # nothing extra was stored
    assert set(proxy.injected) == {"throttle", "unavailable", "drop", "lose"}
    assert min(proxy.injected.values()) >= 5, proxy.injected


async def test_a_lost_finish_answer_is_not_taken_for_a_lost_lease(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock
):
    """When a finish was applied but its answer never came, the retry answers True (so the pool
    keeps the result), and a different outcome for the same lease is still refused."""
    async with through(proxy, truth, clock, attempts=2) as q:
        await q.enqueue([new(clock)])
        (lease,) = await q.lease(["default"], 1, VT, "w")
        proxy.faults = Faults(lose=1.0)
        done = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
        with pytest.raises(BackendUnavailable):
            await q.finish([done])
        proxy.faults = Faults()
        assert await q.finish([done]) == [True]
        failed = Outcome(job=lease.job, token=lease.token, state=State.FAILED)
        assert await q.finish([failed]) == [False]
    job = await truth.get(lease.job.id)
    assert job is not None and job.state is State.SUCCEEDED and job.attempts == 1


async def test_a_lease_whose_answer_was_lost_is_still_handed_out(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock
):
    """When the lease write lands but its answer is lost, botocore's retry finds the job leased
    under its own token and hands it out: no attempt is burned waiting for the lease to expire."""
    async with through(proxy, truth, clock) as q:
        (job,) = [e.job for e in await q.enqueue([new(clock)])]
        proxy.faults = Faults(lose=1.0, only=frozenset({"UpdateItem"}), budget=1)
        (lease,) = await q.lease(["default"], 1, VT, "w")
        assert proxy.injected["lose"] == 1
        assert lease.job.id == job.id and lease.job.attempts == 1
        done = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
        assert await q.finish([done]) == [True]


async def test_throttling_is_retried_then_translated(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock
):
    """Throttling is absorbed by botocore's retries while attempts remain; throttling that
    outlasts them ends as BackendUnavailable, with the botocore error only as its cause."""
    async with through(proxy, truth, clock, attempts=3) as q:
        (job,) = [e.job for e in await q.enqueue([new(clock)])]
        gets = frozenset({"GetItem"})  # not the counters' background writes
        proxy.faults = Faults(throttle=1.0, only=gets, budget=2)  # 2 throttles, then an answer
        assert await q.get(job.id) == job
        assert proxy.injected["throttle"] == 2
        proxy.faults = Faults(throttle=1.0, only=gets)
        with pytest.raises(BackendUnavailable) as caught:
            await q.get(job.id)
        proxy.faults = Faults()
    assert proxy.injected["throttle"] == 5  # the failed call made its three tries
    assert type(caught.value.__cause__).__module__.startswith("botocore")
    assert "Throttl" in str(caught.value) or "ProvisionedThroughput" in str(caught.value)


@pytest.mark.parametrize("backend", ["dynamodb", "s3"])
async def test_ping_against_a_dead_endpoint_fails_fast(backend: str):
    """ping() against an endpoint where nothing listens raises BackendUnavailable within a few
    seconds, however many retries the data requests are allowed."""
    dead = f"http://127.0.0.1:{free_port()}"
    store: DynamoQueue | S3Results
    if backend == "dynamodb":
        store = DynamoQueue(dynamo_settings(dead, create_missing=False, max_attempts=10))
    else:
        store = S3Results(s3_settings(dead, create_missing=False, max_attempts=10))
    async with store:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await store.ping()
        assert time.monotonic() - started < 3.0


async def test_ping_through_a_proxy_that_hangs_up(proxy: FaultProxy, truth: DynamoQueue):
    """A reachable endpoint that drops every connection fails ping() at once; once it answers,
    ping() passes again."""
    async with DynamoQueue(dynamo_settings(proxy.url, table=truth.table)) as q:
        proxy.faults = Faults(drop=1.0)
        with pytest.raises(BackendUnavailable):
            await q.ping()
        proxy.faults = Faults()
        await q.ping()


async def test_s3_writes_survive_faults(moto_url: str, proxy: FaultProxy):
    """Results written and read through throttling and dropped connections come back intact."""
    settings = s3_settings(proxy.url)
    async with S3Results(settings) as store:
        proxy.faults = Faults(throttle=0.1, unavailable=0.1, drop=0.1)
        blobs = {blob_name(new_job_id(), new_token()): bytes([i]) * 1000 for i in range(20)}
        for name, data in blobs.items():
            await persist(lambda n=name, d=data: store.put("temporary", n, d))  # type: ignore[misc]
        for name, data in blobs.items():
            read = await persist(lambda n=name: _read(store, n))  # type: ignore[misc]
            assert read == data
        proxy.faults = Faults()
    assert sum(proxy.injected.values()) >= 5


async def _read(store: S3Results, name: str) -> bytes:
    return b"".join([c async for c in store.read("temporary", name)])
