"""DynamoDB batches and groups are all or nothing when a write fails, not only when a value is
refused before the first write (that part is the contract suite's): the failure is a network
fault on the very request that carries one item, dealt by ``tests/faultproxy.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from arqd.backends.base import ListFilter
from arqd.backends.dynamodb import DynamoQueue
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.core import Core
from arqd.errors import BackendError, Unstorable
from arqd.model import GroupMemberSpec
from arqd.results.memory import MemoryResults

from .conftest import dynamo_settings
from .contract import new
from .faultproxy import FaultProxy, Faults

pytestmark = pytest.mark.timeout(180)
ALWAYS = 1.0  # a fault on every request it applies to, retries included
BIG = 150  # jobs: more than one transaction holds (100 items)


@pytest.fixture
async def proxy(moto_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(moto_url, seed=12) as p:
        yield p


@pytest.fixture
async def truth(moto_url: str, clock: ManualClock) -> AsyncIterator[DynamoQueue]:
    """A fault-free handle on a fresh table, to read what really happened."""
    async with DynamoQueue(dynamo_settings(moto_url), clock=clock) as q:
        yield q
        await q.client.delete_table(TableName=q.table)


@pytest.fixture
async def faulty(
    proxy: FaultProxy, truth: DynamoQueue, clock: ManualClock
) -> AsyncIterator[DynamoQueue]:
    """The same table through the proxy; two tries per request, so faults end calls quickly."""
    settings = dynamo_settings(proxy.url, table=truth.table, max_attempts=2)
    async with DynamoQueue(settings, clock=clock) as q:
        yield q


async def stored_ids(truth: DynamoQueue) -> list[str]:
    jobs, _ = await truth.list_jobs(ListFilter(), 1000, None)
    return [j.id for j in jobs]


@pytest.mark.parametrize("size", [3, BIG])
async def test_a_group_whose_record_write_fails_leaves_no_job(
    proxy: FaultProxy, faulty: DynamoQueue, truth: DynamoQueue, size: int
):
    """When the request carrying a group's record fails, submit_group raises and none of the
    group's jobs (nor its keys) remain: in one transaction with the jobs (up to 100 items), or
    removed again after the fact (beyond)."""
    core = Core(faulty, MemoryResults(), Config(), None)
    members = [GroupMemberSpec(handler="h", name=f"m{i}", key=f"k{i}") for i in range(size)]
    proxy.faults = Faults(unavailable=ALWAYS, carrying=b"G#")
    with pytest.raises(BackendError):
        await core.submit_group("g", members)
    assert proxy.injected["unavailable"] >= 1
    proxy.faults = Faults()
    assert await stored_ids(truth) == []
    assert await truth.find_by_key("k0") is None and await truth.find_by_key(f"k{size - 1}") is None
    assert sum(s.queued for s in await faulty.stats()) == 0  # counted, then uncounted


async def test_a_batch_whose_later_transaction_fails_leaves_nothing(
    proxy: FaultProxy, faulty: DynamoQueue, truth: DynamoQueue, clock: ManualClock
):
    """A batch too large for one transaction whose second transaction fails is removed again:
    the jobs and keys the first one stored are deleted before the error is raised."""
    batch = [new(clock, key=f"k{i}" if i % 2 else None) for i in range(BIG)]
    proxy.faults = Faults(unavailable=ALWAYS, carrying=batch[-1].id.encode())
    with pytest.raises(BackendError):
        await faulty.enqueue(batch)
    assert proxy.injected["unavailable"] >= 1
    proxy.faults = Faults()
    assert await stored_ids(truth) == []
    assert await truth.find_by_key("k1") is None


async def test_a_transaction_whose_answer_was_lost_is_not_stored_twice(
    proxy: FaultProxy, faulty: DynamoQueue, truth: DynamoQueue, clock: ManualClock
):
    """A batch transaction that landed but whose answer was lost is retried, finds its own
    items, and answers every job as created, once."""
    batch = [new(clock, key="k"), new(clock), new(clock, key="other")]
    proxy.faults = Faults(lose=ALWAYS, only=frozenset({"TransactWriteItems"}), budget=1)
    out = await faulty.enqueue(batch)
    assert proxy.injected["lose"] == 1
    assert [(e.created, e.job.id) for e in out] == [(True, j.id) for j in batch]
    assert sorted(await stored_ids(truth)) == sorted(j.id for j in batch)
    holder = await truth.find_by_key("k")
    assert holder is not None and holder.id == batch[0].id
    assert sum(s.queued for s in await faulty.stats()) == 3


@pytest.mark.parametrize("size", [1, 4])
async def test_an_item_too_large_for_dynamodb_is_refused_before_any_write(
    truth: DynamoQueue, clock: ManualClock, size: int
):
    """A job whose item would pass DynamoDB's 400 KB is refused as the client's error
    (Unstorable, a 422), alone or last of a batch, and nothing of the batch is stored."""
    batch = [new(clock, key=f"k{i}") for i in range(size - 1)]
    batch.append(new(clock, payload="x" * 410_000))
    with pytest.raises(Unstorable, match="400 KB"):
        await truth.enqueue(batch)
    assert await stored_ids(truth) == []
    assert await truth.find_by_key("k0") is None


async def test_a_number_dynamodb_cannot_hold_is_refused_before_any_write(
    truth: DynamoQueue, clock: ManualClock
):
    """A timeout beyond DynamoDB's number range (1E+126) is refused before the first write."""
    batch = [new(clock, key="k"), new(clock, timeout=1e200)]
    with pytest.raises(Unstorable, match="DynamoDB"):
        await truth.enqueue(batch)
    assert await stored_ids(truth) == []
