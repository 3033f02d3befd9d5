"""What the DynamoDB queue adds to the contract: a stale index, clock skew between hosts, shard
counts that differ between hosts, counters shared by processes, cheap heartbeats, racing dedupe
keys, and ``init-aws``. Runs against the session's moto server."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from arqd.backends.base import Outcome, Update
from arqd.backends.dynamodb import GSIS, DynamoQueue, _Grant
from arqd.backends.dynamodb.codec import _job_key, _key_key
from arqd.clock import ManualClock
from arqd.config import QueueConfig, ResultsConfig
from arqd.errors import BackendError
from arqd.model import (
    DROPPED,
    GroupMember,
    GroupRecord,
    ResultRef,
    State,
    StepState,
    new_job_id,
    new_token,
)
from arqd.results.s3 import S3Results
from arqd.stores import init_aws, make_queue, make_results

from .conftest import AWS_FAKE_KEY, AWS_REGION, dynamo_settings
from .contract import new

VT = 30.0


@pytest.fixture
async def table(moto_url: str) -> AsyncIterator[DynamoQueue]:
    async with DynamoQueue(dynamo_settings(moto_url), clock=ManualClock()) as q:
        yield q


def handle(q: DynamoQueue, clock: ManualClock, **overrides: Any) -> DynamoQueue:
    """Another process's view of ``q``'s table."""
    settings = dynamo_settings(q.settings.endpoint_url or "", table=q.table, **overrides)
    return DynamoQueue(settings, clock=clock)


def count_job_writes(q: DynamoQueue) -> Counter[str]:
    """Requests that write job items, by operation, from now on (counter flushes excluded)."""
    seen: Counter[str] = Counter()

    def hook(params: dict[str, Any], model: Any, **_: Any) -> None:
        if params.get("Key", {}).get("pk", {}).get("S", "").startswith("J#"):
            seen[model.name] += 1

    q.client.meta.events.register("provide-client-params.dynamodb", hook)
    return seen


async def test_a_stale_index_entry_costs_a_refused_write_not_a_second_lease(table: DynamoQueue):
    """The ``vis`` index is eventually consistent: a consumer may see a job after another leased
    it. Its lease write re-checks the item and is refused. (Moto's index is never stale, so the
    stale view is taken before the other lease, through the backend's own read.)"""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    await table.enqueue([new(clock)])
    grant = _Grant(new_token(), clock.time(), clock.time() + VT, "late")
    (stale,) = await table._candidates("default", list(range(table.settings.shards)), 1, grant)
    (first,) = await table.lease(["default"], 1, VT, "first")
    assert await table._lease_one(stale, grant) is None
    clock.advance(VT + 1)  # even once the first lease expired, the old entry no longer matches
    assert await table._lease_one(stale, grant) is None
    (again,) = await table.lease(["default"], 1, VT, "w")
    assert again.job.id == first.job.id and again.job.attempts == 2


async def test_a_stale_entry_of_an_expired_lease_cannot_steal_it_once_renewed(table: DynamoQueue):
    """An expired lease shows in the index as visible; if its holder renews it before a consumer
    acts on that (stale) view, the consumer's lease write is refused: the state alone is still
    ``running``, so the write must also re-check the visibility time it saw."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    await table.enqueue([new(clock)])
    (held,) = await table.lease(["default"], 1, VT, "slow")
    clock.advance(VT + 1)
    grant = _Grant(new_token(), clock.time(), clock.time() + VT, "thief")
    (stale,) = await table._candidates("default", list(range(table.settings.shards)), 1, grant)
    assert stale.state == State.RUNNING.value
    (beat,) = await table.heartbeat([(held.job.id, held.token)], VT)
    assert beat.held
    assert await table._lease_one(stale, grant) is None
    done = Outcome(job=held.job, token=held.token, state=State.SUCCEEDED)
    assert await table.finish([done]) == [True]


async def test_clock_skew_can_only_cause_an_early_release_that_fencing_discards(
    table: DynamoQueue,
):
    """A host whose clock runs ahead by more than the visibility timeout re-leases a job that is
    still running elsewhere: the first holder's heartbeat and finish are then refused, and the
    job ends once, by the second holder."""
    slow = table.clock
    assert isinstance(slow, ManualClock)
    fast = ManualClock(slow.time() + VT + 5)
    async with handle(table, fast) as ahead:
        await table.enqueue([new(slow)])
        (a,) = await table.lease(["default"], 1, VT, "slow-host")
        (b,) = await ahead.lease(["default"], 1, VT, "fast-host")
        assert b.job.id == a.job.id and b.token != a.token
        (beat,) = await table.heartbeat([(a.job.id, a.token)], VT)
        assert not beat.held
        done_a = Outcome(job=a.job, token=a.token, state=State.SUCCEEDED)
        done_b = Outcome(job=b.job, token=b.token, state=State.FAILED, free_key=True)
        assert await table.finish([done_a]) == [False]
        assert await ahead.finish([done_b]) == [True]
    job = await table.get(a.job.id)
    assert job is not None and job.state is State.FAILED and job.attempts == 2


async def test_a_host_with_fewer_shards_still_finds_every_job(table: DynamoQueue):
    """Jobs written over 8 shards are leased by a host configured with 1: every host reads as
    many shards as any host ever wrote to (recorded per queue)."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    stored = await table.enqueue([new(clock) for _ in range(24)])
    async with handle(table, clock, shards=1) as narrow:
        leases = await narrow.lease(["default"], 100, VT, "w")
    assert {le.job.id for le in leases} == {e.job.id for e in stored}


async def test_counts_written_by_one_process_are_seen_by_another(table: DynamoQueue):
    """Per-state counts are shared through the table: what one handle did shows in another's
    stats once written (on close at the latest), and stats never goes below zero."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    async with handle(table, clock) as other:
        await other.enqueue([new(clock) for _ in range(3)])
        (lease,) = await other.lease(["default"], 1, VT, "w")
        await other.finish([Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)])
    (stats,) = await table.stats()
    assert (stats.queued, stats.running, stats.succeeded) == (2, 0, 1)


async def test_a_fresh_lease_is_not_rewritten_by_every_heartbeat(table: DynamoQueue):
    """Heartbeats within the first quarter of a lease read instead of writing (a read unit
    instead of a write to the table and its index), and still carry a cancel request; a later
    heartbeat extends the lease."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    await table.enqueue([new(clock)])
    (lease,) = await table.lease(["default"], 1, VT, "w")
    seen = count_job_writes(table)
    clock.advance(2)
    (beat,) = await table.heartbeat([(lease.job.id, lease.token)], VT)
    assert beat.held and not beat.cancel_requested
    assert seen["UpdateItem"] == 0
    await table.cancel(
        lease.job.id, free_key=True
    )  # tries queued → cancelled, then sets cancel_requested
    (beat,) = await table.heartbeat([(lease.job.id, lease.token)], VT)
    assert beat.held and beat.cancel_requested
    assert seen["UpdateItem"] == 2
    clock.advance(VT * 0.3)
    (beat,) = await table.heartbeat([(lease.job.id, lease.token)], VT)
    assert beat.held and seen["UpdateItem"] == 3
    clock.advance(VT * 0.8)  # beyond the first lease's end, inside the extended one
    assert await table.lease(["default"], 1, VT, "thief") == []


async def test_racing_submits_of_one_key_store_one_job(table: DynamoQueue):
    """Submits of the same dedupe key from several processes at once store exactly one job;
    every other submit answers it."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    handles = [handle(table, clock) for _ in range(3)]
    for h in handles:
        await h.open()
    try:
        answers = await asyncio.gather(
            *(h.enqueue([new(clock, key="same")]) for h in handles for _ in range(4))
        )
    finally:
        for h in handles:
            await h.aclose()
    entries = [e for batch in answers for e in batch]
    assert sum(e.created for e in entries) == 1
    assert len({e.job.id for e in entries}) == 1


async def test_init_aws_creates_what_is_missing_and_is_idempotent(moto_url: str):
    """init_aws creates an on-demand table with every index and TTL, and the bucket; run again
    it changes nothing. make_queue/make_results pick the AWS backends by name."""
    table = dynamo_settings(moto_url).table
    queue_cfg = QueueConfig(
        backend="dynamodb", table=table, region=AWS_REGION, endpoint_url=moto_url
    )
    results_cfg = ResultsConfig(
        backend="s3", bucket=f"b-{table}", region=AWS_REGION, endpoint_url=moto_url
    )
    with pytest.MonkeyPatch.context() as env:  # config carries no credentials: use the env
        env.setenv("AWS_ACCESS_KEY_ID", AWS_FAKE_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", AWS_FAKE_KEY)
        first = await init_aws(queue_cfg, results_cfg)
        assert any(f"created table {table}" in line for line in first)
        assert any("TTL" in line for line in first)
        assert any("created bucket" in line for line in first)
        again = await init_aws(queue_cfg, results_cfg)
        assert all("nothing to do" in line for line in again) and len(again) == 2
        queue, results = make_queue(queue_cfg), make_results(results_cfg)
        assert isinstance(queue, DynamoQueue) and isinstance(results, S3Results)
        async with queue, results:
            desc = (await queue.client.describe_table(TableName=table))["Table"]
            ttl = await queue.client.describe_time_to_live(TableName=table)
            await queue.ping()
            await results.ping()
    assert desc["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert {g["IndexName"] for g in desc["GlobalSecondaryIndexes"]} == {
        g["IndexName"] for g in GSIS
    }
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "ttl"


async def test_a_missing_table_is_named_with_the_request_and_the_fix(moto_url: str):
    """A table that does not exist (and is not created on open) fails each request with a
    BackendError naming the request and ``arqd init-aws``, not DynamoDB's bare error code."""
    settings = dynamo_settings(moto_url, create_missing=False)
    async with DynamoQueue(settings) as q:
        with pytest.raises(BackendError) as caught:
            await q.get(new_job_id())
    assert type(caught.value) is BackendError
    assert str(caught.value) == (
        "dynamodb get_item: the table does not exist (run `arqd init-aws`)"
    )


async def finished(q: DynamoQueue, clock: ManualClock, n: int, **outcome: Any) -> list[str]:
    """``n`` jobs run and ended with ``outcome``; answers their ids."""
    stored = await q.enqueue([new(clock, key=f"k{i}-{uuid.uuid4().hex}") for i in range(n)])
    leases = await q.lease(["default"], n, VT, "w")
    assert len(leases) == n
    done = [Outcome(job=le.job, token=le.token, **outcome) for le in leases]
    assert await q.finish(done) == [True] * n
    return [e.job.id for e in stored]


async def test_sweepers_racing_each_get_their_own_expired_jobs(table: DynamoQueue):
    """Two processes sweeping at once delete every expired job exactly once between them (and
    free its key); jobs not yet expired, or never expiring, stay."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    ref = ResultRef(inline=1)
    soon = await finished(
        table, clock, 12, state=State.SUCCEEDED, result=ref, expires_at=clock.time() + 10
    )
    late = await finished(
        table, clock, 3, state=State.SUCCEEDED, result=ref, expires_at=clock.time() + 99
    )
    never = await finished(table, clock, 3, state=State.SUCCEEDED, result=ref)
    clock.advance(11)
    async with handle(table, clock) as other:
        a, b = await asyncio.gather(table.sweep_expired(5), other.sweep_expired(100))
        rest = await table.sweep_expired(100)
    swept = [j.id for j in a + b + rest]
    assert sorted(swept) == sorted(soon) and len(a) <= 5
    assert await table.sweep_expired(100) == []
    left = await table.get_many(soon + late + never)
    assert [j is not None for j in left] == [False] * 12 + [True] * 6
    job = a[0] if a else b[0]
    assert job.key is not None and await table.find_by_key(job.key) is None
    (stats,) = await table.stats()
    assert stats.succeeded == 6


async def test_drop_results_walks_one_area_and_frees_keys(table: DynamoQueue):
    """drop_results drops the results of succeeded jobs of one stickiness, in batches, answers
    each job once, frees their keys, and answers [] once none are left."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    ref = ResultRef(area="temporary", name="x", size=1)
    temporary = await finished(
        table, clock, 7, state=State.SUCCEEDED, result=ref, expires_at=clock.time() + 99
    )
    dropped: list[str] = []
    while batch := await table.drop_results(False, 3, frees_key=lambda job: True):
        assert len(batch) <= 3
        dropped += [j.id for j in batch]
    assert sorted(dropped) == sorted(temporary)
    assert await table.drop_results(True, 10, frees_key=lambda job: True) == []
    jobs = await table.get_many(temporary)
    assert all(j is not None and j.result == ResultRef(area=DROPPED) for j in jobs)
    for job in jobs:
        assert job is not None and job.key is not None
        assert await table.find_by_key(job.key) is None


async def test_steps_groups_and_recovered_leases(table: DynamoQueue):
    """A steps update is fenced by the lease; a group record round-trips; a lease taken over from an
    expired one says so."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    (job,) = [e.job for e in await table.enqueue([new(clock, name="first")])]
    (first,) = await table.lease(["default"], 1, VT, "w1")
    assert not first.recovered and first.job.name == "first"
    steps = [StepState(name="reserve", state="succeeded", status=201, attempts=1)]
    cp = {"reserve": {"status": 201}}
    saved = Update(job_id=job.id, token=first.token, steps=steps, checkpoint=cp)
    assert await table.update([saved]) == [True]
    clock.advance(VT + 1)
    (second,) = await table.lease(["default"], 1, VT, "w2")
    assert second.recovered and second.job.steps == steps
    assert second.job.checkpoint == {"reserve": {"status": 201}}
    late = Update(job_id=job.id, token=first.token, steps=[], checkpoint={})
    assert await table.update([late]) == [False]
    gid = new_job_id()
    member = new(clock, group_id=gid, name="a")
    record = GroupRecord(
        id=gid, name="g", created_at=clock.time(), members=[GroupMember("a", member.id)]
    )
    await table.enqueue([member], group=record)
    assert await table.get_group(record.id) == record
    assert await table.get_group(new_job_id()) is None


async def test_a_kept_key_and_its_record_carry_no_ttl(table: DynamoQueue):
    """A succeeded outcome with ``keep_key`` (a schedule tick's) leaves neither the key item nor
    the job item a TTL: DynamoDB's TTL deleting either would let the tick be submitted again or
    skip the sweep that raises the schedule's mark. An ordinary success keeps both TTLs."""
    clock = table.clock
    assert isinstance(clock, ManualClock)
    (kept, plain) = [
        e.job
        for e in await table.enqueue(
            [new(clock, key="schedule:nightly:1800000000"), new(clock, key="report:7")]
        )
    ]
    leases = {lease.job.id: lease for lease in await table.lease(["default"], 2, VT, "w")}
    expiry = clock.time() + 3600
    outcomes = [
        Outcome(
            job=leases[job.id].job,
            token=leases[job.id].token,
            state=State.SUCCEEDED,
            expires_at=expiry,
            keep_key=job.id == kept.id,
        )
        for job in (kept, plain)
    ]
    assert await table.finish(outcomes) == [True, True]

    async def item(key: dict[str, Any]) -> dict[str, Any]:
        answer = await table.client.get_item(TableName=table.table, Key=key, ConsistentRead=True)
        return dict(answer["Item"])

    assert "ttl" not in await item(_key_key("schedule:nightly:1800000000"))
    assert "ttl" not in await item(_job_key(kept.id))
    assert "ttl" in await item(_key_key("report:7"))
    assert "ttl" in await item(_job_key(plain.id))
