"""The jobs-and-leases contract (``JobStore``), run against every backend
(``conftest.QUEUE_BACKENDS``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest

from arqd.backends.base import Lease, QueueBackend, QueueStats, Redrive, Update
from arqd.backends.memory import MemoryQueue
from arqd.clock import ManualClock
from arqd.errors import BackendUnavailable, InvalidRequest
from arqd.model import (
    ErrorInfo,
    Progress,
    ResultRef,
    State,
    StepState,
    new_job_id,
)

from .contract import (
    UNSTORABLE,
    VT,
    assert_only,
    done,
    group_of,
    new,
    progress,
    put,
    redrive_now,
    stored_group,
)


async def test_enqueue_then_get_round_trips_the_record(queue: QueueBackend, clock: ManualClock):
    """A stored job reads back with every field as submitted, queued, no attempt yet."""
    (job,) = await put(queue, clock, meta={"a": "b"}, group_id="g1", owner="web")
    got = await queue.get(job.id)
    assert got == job
    assert got is not None and got.state is State.QUEUED and got.attempts == 0
    assert got.meta == {"a": "b"} and got.payload == {"n": 1} and got.owner == "web"


async def test_get_unknown_is_none(queue: QueueBackend):
    """An unknown id answers None, not an error."""
    assert await queue.get(new_job_id()) is None


async def test_lease_is_fifo_within_a_queue(queue: QueueBackend, clock: ManualClock):
    """Jobs come out in the order they became ready."""
    jobs = []
    for _ in range(5):
        jobs += await put(queue, clock)
        clock.advance(0.001)
    leases = await queue.lease(["default"], 10, VT, "w")
    assert [lease.job.id for lease in leases] == [j.id for j in jobs]


async def test_lease_respects_limit_and_counts_an_attempt(queue: QueueBackend, clock: ManualClock):
    """A batch lease hands out at most ``limit`` jobs, each running with attempts = 1."""
    await put(queue, clock, 7)
    first = await queue.lease(["default"], 5, VT, "w")
    rest = await queue.lease(["default"], 5, VT, "w")
    assert len(first) == 5 and len(rest) == 2
    assert all(lease.job.state is State.RUNNING and lease.job.attempts == 1 for lease in first)
    assert await queue.lease(["default"], 5, VT, "w") == []


async def test_lease_only_from_named_queues(queue: QueueBackend, clock: ManualClock):
    """A consumer of queue A never gets jobs of queue B."""
    await put(queue, clock, queue="a")
    (b,) = await put(queue, clock, queue="b")
    leases = await queue.lease(["b"], 10, VT, "w")
    assert [lease.job.id for lease in leases] == [b.id]


async def test_delayed_job_waits_for_its_time(queue: QueueBackend, clock: ManualClock):
    """A job with a delay is invisible until ready_at, then leasable."""
    (job,) = await put(queue, clock, delay=10)
    assert await queue.lease(["default"], 10, VT, "w") == []
    clock.advance(10)
    assert [lease.job.id for lease in await queue.lease(["default"], 10, VT, "w")] == [job.id]


async def test_concurrent_consumers_never_share_a_job(
    queue: QueueBackend, clock: ManualClock, queue_factory: Callable[[ManualClock], QueueBackend]
):
    """Many lease calls at once (on separate connections where the backend has them) hand each
    job to exactly one of them."""
    await put(queue, clock, 200)
    handles = [queue_factory(clock) for _ in range(4)]
    for h in handles:
        if h is not queue:
            await h.open()
    try:
        batches = await asyncio.gather(
            *(h.lease(["default"], 7, VT, f"w{i}") for i in range(10) for h in handles)
        )
    finally:
        for h in handles:
            if h is not queue:
                await h.aclose()
    ids = [lease.job.id for batch in batches for lease in batch]
    assert len(ids) == len(set(ids)) == 200


async def test_expired_lease_makes_job_leasable_again(queue: QueueBackend, clock: ManualClock):
    """A lease not extended past its visibility timeout lets another consumer take the job, and
    that lease counts as a new attempt."""
    await put(queue, clock)
    (first,) = await queue.lease(["default"], 1, VT, "w1")
    clock.advance(VT - 1)
    assert await queue.lease(["default"], 1, VT, "w2") == []
    clock.advance(2)
    (second,) = await queue.lease(["default"], 1, VT, "w2")
    assert second.job.id == first.job.id
    assert second.job.attempts == 2 and second.token != first.token


async def test_late_finish_after_expiry_is_refused(queue: QueueBackend, clock: ManualClock):
    """A consumer whose lease expired and was taken over cannot complete the job (fencing)."""
    await put(queue, clock)
    (first,) = await queue.lease(["default"], 1, VT, "w1")
    clock.advance(VT + 1)
    (second,) = await queue.lease(["default"], 1, VT, "w2")
    assert await queue.finish([done(first.job, first.token)]) == [False]
    assert await queue.update([progress(first, Progress(0.5))]) == [False]
    replies = await queue.heartbeat([(first.job.id, first.token)], VT)
    assert replies[0].held is False
    assert await queue.finish([done(second.job, second.token)]) == [True]
    job = await queue.get(first.job.id)
    assert job is not None and job.state is State.SUCCEEDED and job.attempts == 2


async def test_finish_twice_is_refused(queue: QueueBackend, clock: ManualClock):
    """Completion is exactly-once: the second outcome for one lease is refused."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    assert await queue.finish([done(lease.job, lease.token)]) == [True]
    assert await queue.finish([done(lease.job, lease.token, State.FAILED)]) == [False]
    job = await queue.get(lease.job.id)
    assert job is not None and job.state is State.SUCCEEDED


async def test_a_stale_lease_and_the_new_one_are_answered_each_for_itself(
    queue: QueueBackend, clock: ManualClock
):
    """One pool may hold a lease that expired and the new lease of the same job (it leased the
    job again): in one batch, heartbeats, progress and finishes are answered by (job, token),
    so only the new lease's hold. Answering by job id told the stale one it held the job (its
    handler ran on) and that its outcome landed (two "succeeded" lines for one job)."""
    await put(queue, clock)
    (stale,) = await queue.lease(["default"], 1, VT, "w")
    clock.advance(VT + 1)
    (fresh,) = await queue.lease(["default"], 1, VT, "w")
    assert fresh.job.id == stale.job.id and fresh.token != stale.token
    replies = await queue.heartbeat([(stale.job.id, stale.token), (fresh.job.id, fresh.token)], VT)
    assert [r.held for r in replies] == [False, True]
    both = [progress(stale, Progress(0.1)), progress(fresh, Progress(0.2))]
    assert await queue.update(both) == [False, True]
    ended = [done(stale.job, stale.token), done(fresh.job, fresh.token, State.FAILED)]
    assert await queue.finish(ended) == [False, True]
    job = await queue.get(fresh.job.id)
    assert job is not None and job.state is State.FAILED


async def test_heartbeat_keeps_a_long_job(queue: QueueBackend, clock: ManualClock):
    """A lease extended by heartbeats outlives many visibility timeouts."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    for _ in range(5):
        clock.advance(VT * 0.6)
        (reply,) = await queue.heartbeat([(lease.job.id, lease.token)], VT)
        assert reply.held and not reply.cancel_requested
        assert await queue.lease(["default"], 1, VT, "thief") == []
    assert await queue.finish([done(lease.job, lease.token)]) == [True]


async def test_success_records_result_and_expiry(queue: QueueBackend, clock: ManualClock):
    """A succeeded job keeps its result reference, finish time and result expiry."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    ref = ResultRef(inline={"ok": True})
    expires = clock.time() + 100
    await queue.finish([done(lease.job, lease.token, result=ref, expires_at=expires)])
    job = await queue.get(lease.job.id)
    assert job is not None and job.result == ref and job.finished_at is not None
    assert job.expires_at is not None and job.expires_at.timestamp() == pytest.approx(expires)
    assert job.version > lease.job.version


async def test_retry_requeues_after_backoff(queue: QueueBackend, clock: ManualClock):
    """A failed attempt with attempts left goes back to queued, invisible until its ready_at,
    keeping its error; the next lease is attempt 2."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    err = ErrorInfo(type="RuntimeError", message="boom", attempt=1)
    outcome = done(lease.job, lease.token, State.QUEUED, error=err, ready_at=clock.time() + 5)
    assert await queue.finish([outcome]) == [True]
    job = await queue.get(lease.job.id)
    assert job is not None and job.state is State.QUEUED and job.error == err
    assert await queue.lease(["default"], 1, VT, "w") == []
    clock.advance(5)
    (again,) = await queue.lease(["default"], 1, VT, "w")
    assert again.job.attempts == 2


async def test_release_gives_the_attempt_back(queue: QueueBackend, clock: ManualClock):
    """A lease released on shutdown does not count as an attempt and is leasable at once."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    outcome = done(lease.job, lease.token, State.QUEUED, count_attempt=False)
    assert await queue.finish([outcome]) == [True]
    (again,) = await queue.lease(["default"], 1, VT, "w2")
    assert again.job.attempts == 1


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.FAILED, State.QUEUED])
async def test_finish_writes_the_handlers_real_start(
    queue: QueueBackend, clock: ManualClock, state: State
):
    """An outcome's started_at (the handler's real start, after a wait in a consumer's buffer)
    replaces the lease's time, for a terminal outcome and a retry alike; an outcome without
    one (no handler ran, e.g. a release) clears it."""
    await put(queue, clock, 2)
    first, second = await queue.lease(["default"], 2, VT, "w")
    assert first.job.started_at is not None
    assert first.job.started_at.timestamp() == pytest.approx(clock.time())
    clock.advance(2.5)
    started = clock.time() - 1.25
    clock.advance(0.5)
    ran = done(first.job, first.token, state, started_at=started, ready_at=clock.time() + 60)
    gave_back = done(second.job, second.token, State.QUEUED, count_attempt=False)
    assert await queue.finish([ran, gave_back]) == [True, True]
    job = await queue.get(first.job.id)
    assert job is not None and job.state is state and job.started_at is not None
    assert job.started_at.timestamp() == pytest.approx(started, abs=1e-5)
    released = await queue.get(second.job.id)
    assert released is not None and released.started_at is None


async def test_final_failure_is_terminal(queue: QueueBackend, clock: ManualClock):
    """A failed job is terminal: never leased again, error kept."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    err = ErrorInfo(type="Fail", message="no", attempt=1)
    await queue.finish([done(lease.job, lease.token, State.FAILED, error=err, free_key=True)])
    clock.advance(VT * 10)
    assert await queue.lease(["default"], 1, VT, "w") == []
    job = await queue.get(lease.job.id)
    assert job is not None and job.state is State.FAILED and job.error == err


async def test_cancel_queued_job(queue: QueueBackend, clock: ManualClock):
    """Cancelling a queued job makes it cancelled at once and never leased."""
    (job,) = await put(queue, clock)
    cancelled = await queue.cancel(job.id, free_key=True)
    assert cancelled is not None and cancelled.state is State.CANCELLED
    assert await queue.lease(["default"], 1, VT, "w") == []


async def test_cancel_running_job_is_requested_through_heartbeat(
    queue: QueueBackend, clock: ManualClock
):
    """Cancelling a running job sets cancel_requested; the holder learns it from its heartbeat
    and may then finish the job as cancelled."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    job = await queue.cancel(lease.job.id, free_key=True)
    assert job is not None and job.state is State.RUNNING and job.cancel_requested
    (reply,) = await queue.heartbeat([(lease.job.id, lease.token)], VT)
    assert reply.held and reply.cancel_requested
    await queue.finish([done(lease.job, lease.token, State.CANCELLED, free_key=True)])
    final = await queue.get(lease.job.id)
    assert final is not None and final.state is State.CANCELLED


async def test_cancel_terminal_job_changes_nothing(queue: QueueBackend, clock: ManualClock):
    """Cancelling a finished job answers it unchanged."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    await queue.finish([done(lease.job, lease.token)])
    before = await queue.get(lease.job.id)
    assert await queue.cancel(lease.job.id, free_key=True) == before
    assert await queue.cancel(new_job_id(), free_key=True) is None


async def test_progress_is_conditional_and_bumps_version(queue: QueueBackend, clock: ManualClock):
    """Progress from the lease holder is stored and changes the version (and so the ETag)."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    assert await queue.update([progress(lease, Progress(0.5, "half"))]) == [True]
    job = await queue.get(lease.job.id)
    assert job is not None and job.progress == Progress(0.5, "half")
    assert job.version > lease.job.version
    stolen = Lease(lease.job, "not-the-token", lease.expires)
    assert await queue.update([progress(stolen, Progress(1.0))]) == [False]


async def test_dedupe_key_returns_the_live_job(queue: QueueBackend, clock: ManualClock):
    """While a job holding a key is queued, running or succeeded-unexpired, the same key answers
    that job instead of storing a new one."""
    (first,) = await put(queue, clock, key="k")
    again = await queue.enqueue([new(clock, key="k")])
    assert again[0].created is False and again[0].job.id == first.id
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    assert (await queue.enqueue([new(clock, key="k")]))[0].job.id == first.id
    await queue.finish([done(lease.job, lease.token, expires_at=clock.time() + 60)])
    assert (await queue.enqueue([new(clock, key="k")]))[0].created is False
    found = await queue.find_by_key("k")
    assert found is not None and found.id == first.id
    clock.advance(61)  # the result expired: the key is free again
    assert await queue.find_by_key("k") is None
    fresh = await queue.enqueue([new(clock, key="k")])
    assert fresh[0].created is True and fresh[0].job.id != first.id


async def test_failed_or_cancelled_job_frees_its_key(queue: QueueBackend, clock: ManualClock):
    """A failed or cancelled job no longer holds its key."""
    (job,) = await put(queue, clock, key="k1")
    await queue.cancel(job.id, free_key=True)
    assert (await queue.enqueue([new(clock, key="k1")]))[0].created is True
    await put(queue, clock, key="k2", queue="other")
    (lease,) = await queue.lease(["other"], 1, VT, "w")
    await queue.finish([done(lease.job, lease.token, State.FAILED, free_key=True)])
    assert (await queue.enqueue([new(clock, key="k2")]))[0].created is True


async def test_same_key_twice_in_one_batch(queue: QueueBackend, clock: ManualClock):
    """Within one batch, a repeated key answers the job stored for its first occurrence."""
    out = await queue.enqueue([new(clock, key="dup"), new(clock, key="dup")])
    assert out[0].created and not out[1].created and out[1].job.id == out[0].job.id


async def test_delete_only_terminal_jobs(queue: QueueBackend, clock: ManualClock):
    """Delete removes a terminal job (and frees its key) but never a live one."""
    (live,) = await put(queue, clock)
    assert await queue.delete(live.id) == live
    assert await queue.get(live.id) is not None
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    await queue.finish([done(lease.job, lease.token)])
    assert await queue.delete(live.id) is not None
    assert await queue.get(live.id) is None
    assert await queue.delete(live.id) is None
    assert {s.name: s.succeeded for s in await queue.stats()}.get("default", 0) == 0


async def test_redrive_requeues_failed_jobs(queue: QueueBackend, clock: ManualClock):
    """Redrive moves a queue's failed jobs back to queued with attempts reset."""
    await put(queue, clock, 2)
    leases = await queue.lease(["default"], 2, VT, "w")
    for lease in leases:
        await queue.finish([done(lease.job, lease.token, State.FAILED)])
    assert await queue.redrive(redrive_now(clock)) == 2
    assert await queue.redrive(redrive_now(clock)) == 0
    again = await queue.lease(["default"], 5, VT, "w")
    assert len(again) == 2 and all(lease.job.attempts == 1 for lease in again)


async def test_get_many_keeps_order_and_gaps(queue: QueueBackend, clock: ManualClock):
    """get_many answers in the order asked, None for unknown ids."""
    a, b = await put(queue, clock, 2)
    missing = new_job_id()
    got = await queue.get_many([b.id, missing, a.id])
    assert [j.id if j else None for j in got] == [b.id, None, a.id]


@pytest.mark.parametrize("size", [4, 150])
@pytest.mark.parametrize("bad", sorted(UNSTORABLE))
async def test_a_batch_whose_last_job_cannot_be_stored_leaves_nothing(
    queue: QueueBackend, clock: ManualClock, bad: str, size: int
):
    """A batch whose last job holds a value the store cannot hold is refused whole with a 4xx
    error (InvalidRequest): no job of it is stored, and no key it carries is taken."""
    (live,) = await put(queue, clock, key="held")
    batch = [new(clock, key=f"fresh-{i}") for i in range(size - 3)]
    batch += [new(clock, key="held"), new(clock), new(clock, **UNSTORABLE[bad])]
    with pytest.raises(InvalidRequest):
        await queue.enqueue(batch)
    assert await queue.get_many([j.id for j in batch]) == [None] * size
    assert await queue.find_by_key("fresh-0") is None
    holder = await queue.find_by_key("held")
    assert holder is not None and holder.id == live.id
    await assert_only(queue, [live.id])


async def test_a_group_whose_record_cannot_be_stored_leaves_no_job(
    queue: QueueBackend, clock: ManualClock
):
    """A group whose record holds a value the store cannot hold is refused whole: none of its
    jobs is stored, its keys stay free, and there is no record."""
    jobs, record = group_of(clock, "g-key", None, created_at=1e308)
    with pytest.raises(InvalidRequest):
        await queue.enqueue(jobs, group=record)
    assert await queue.get_many([j.id for j in jobs]) == [None, None]
    assert await queue.find_by_key("g-key") is None
    assert await queue.get_group(record.id) is None
    await assert_only(queue, [])


async def test_a_group_whose_last_job_cannot_be_stored_leaves_nothing(
    queue: QueueBackend, clock: ManualClock
):
    """A group whose last job cannot be stored stores neither its other jobs nor its record."""
    jobs, record = group_of(clock, "g-key", None, None)
    jobs[-1] = msgspec.structs.replace(jobs[-1], ready_at=float("inf"))
    with pytest.raises(InvalidRequest):
        await queue.enqueue(jobs, group=record)
    assert await queue.get_group(record.id) is None
    await assert_only(queue, [])


@pytest.mark.parametrize("size", [5, 150])
async def test_a_batch_mixing_live_and_new_keys_answers_each_job(
    queue: QueueBackend, clock: ManualClock, size: int
):
    """In one batch, a key held by a live job answers that job, a key whose holder let it go
    and a new key store new jobs, and a key repeated in the batch answers its first job."""
    (live,) = await put(queue, clock, key="live")
    (gone,) = await put(queue, clock, key="gone")
    await queue.cancel(gone.id, free_key=True)  # frees "gone"
    filler = [new(clock) for _ in range(size - 5)]
    batch = [*filler, new(clock, key="live"), new(clock, key="gone"), new(clock, key="new")]
    batch += [new(clock, key="new"), new(clock, key="live")]
    out = await queue.enqueue(batch)
    assert [e.created for e in out[-5:]] == [False, True, True, False, False]
    expected = [j.id for j in filler] + [live.id, batch[-4].id, batch[-3].id]
    expected += [batch[-3].id, live.id]
    assert [e.job.id for e in out] == expected
    for key, job_id in (("live", live.id), ("gone", batch[-4].id), ("new", batch[-3].id)):
        holder = await queue.find_by_key(key)
        assert holder is not None and holder.id == job_id
    stored = [j.id for j in filler] + [batch[-4].id, batch[-3].id]
    await assert_only(queue, [live.id, gone.id, *stored], ended=1)


@pytest.mark.parametrize("size", [3, 150])
async def test_a_group_is_stored_with_its_record_naming_each_members_job(
    queue: QueueBackend, clock: ManualClock, size: int
):
    """A group's jobs and record are stored by one enqueue; the record names, for each member,
    the job that answers for it: the live job holding its key, or its own new job."""
    (live,) = await put(queue, clock, key="live")
    jobs, record = group_of(clock, "live", "new", *([None] * (size - 2)))
    out = await queue.enqueue(jobs, group=record)
    assert [e.created for e in out] == [False] + [True] * (size - 1)
    answering = [live.id] + [j.id for j in jobs[1:]]
    assert [e.job.id for e in out] == answering
    stored = await queue.get_group(record.id)
    assert stored is not None and [m.id for m in stored.members] == answering
    assert [m.name for m in stored.members] == [m.name for m in record.members]
    assert stored_group(stored, record)
    await assert_only(queue, [live.id] + [j.id for j in jobs[1:]])


async def test_a_group_of_only_live_keys_still_stores_its_record(
    queue: QueueBackend, clock: ManualClock
):
    """A group whose every member matched a live job stores no job, only its record."""
    (live,) = await put(queue, clock, key="live")
    jobs, record = group_of(clock, "live")
    out = await queue.enqueue(jobs, group=record)
    assert [(e.created, e.job.id) for e in out] == [(False, live.id)]
    stored = await queue.get_group(record.id)
    assert stored is not None and [m.id for m in stored.members] == [live.id]
    await assert_only(queue, [live.id])


async def test_cancel_frees_the_key_only_when_told(queue: QueueBackend, clock: ManualClock):
    """Cancelling a queued job frees its key with free_key=True; with free_key=False (a schedule
    tick's) the cancelled job keeps holding it and answers a new job with the same key."""
    (kept,) = await put(queue, clock, key="kept")
    (freed,) = await put(queue, clock, key="freed")
    await queue.cancel(kept.id, free_key=False)
    await queue.cancel(freed.id, free_key=True)
    again = await queue.enqueue([new(clock, key="kept"), new(clock, key="freed")])
    assert [(e.created, e.job.id == kept.id) for e in again] == [(False, True), (True, False)]
    holder = await queue.find_by_key("kept")
    assert holder is not None and holder.id == kept.id and holder.state is State.CANCELLED


async def test_redrive_applies_the_plan_it_is_given(queue: QueueBackend, clock: ManualClock):
    """Redrive makes each failed job of the queue what the plan says: queued, visible from its
    ready_at, with its attempts; take_keys=False leaves a freed key free."""
    await put(queue, clock, key="k")
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    await queue.finish([done(lease.job, lease.token, State.FAILED, free_key=True)])
    plan = Redrive(queue="default", ready_at=clock.time() + 5, attempts=1, take_keys=False)
    assert await queue.redrive(plan) == 1
    job = await queue.get(lease.job.id)
    assert job is not None and job.state is State.QUEUED and job.attempts == 1
    assert job.ready_at.timestamp() == pytest.approx(clock.time() + 5)
    assert job.error is None and job.finished_at is None
    assert await queue.find_by_key("k") is None
    assert await queue.lease(["default"], 1, VT, "w") == []
    clock.advance(5)
    (again,) = await queue.lease(["default"], 1, VT, "w")
    assert again.job.id == job.id and again.job.attempts == 2


async def test_update_saves_steps_and_progress_fenced(queue: QueueBackend, clock: ManualClock):
    """One partial update writes a multi-step job's steps with their checkpoint, or progress, or
    both, leaving the other fields as they were, one version step each; a token that no longer
    holds the job writes nothing."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    steps = [StepState(name="reserve", state="succeeded", attempts=1)]
    saved = Update(
        job_id=lease.job.id, token=lease.token, steps=steps, checkpoint={"reserve": {"s": 201}}
    )
    assert await queue.update([saved]) == [True]
    assert await queue.update([progress(lease, Progress(0.5))]) == [True]
    job = await queue.get(lease.job.id)
    assert job is not None and job.steps == steps and job.checkpoint == {"reserve": {"s": 201}}
    assert job.progress == Progress(0.5) and job.version == lease.job.version + 2
    clock.advance(VT + 1)
    (taken,) = await queue.lease(["default"], 1, VT, "thief")
    late = Update(job_id=lease.job.id, token=lease.token, steps=[], checkpoint={})
    assert await queue.update([late, progress(lease, Progress(0.9))]) == [False, False]
    after = await queue.get(lease.job.id)
    assert after is not None and after.steps == steps and after.version == taken.job.version


async def test_an_update_that_changes_nothing_is_refused(queue: QueueBackend):
    """An update naming no field, or steps without their checkpoint, is the caller's error."""
    with pytest.raises(ValueError, match="changes nothing"):
        await queue.update([Update(job_id=new_job_id(), token="t")])
    with pytest.raises(ValueError, match="together"):
        await queue.update([Update(job_id=new_job_id(), token="t", steps=[])])


class Seen:
    """A ``BackendObserver`` keeping what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def backend_call(self, op: str, seconds: float, failed: bool) -> None:
        assert seconds >= 0
        self.calls.append((op, failed))


async def test_every_call_is_reported_to_the_observer(queue: QueueBackend, clock: ManualClock):
    """The base reports each public call of the contract to the backend's observer, by name,
    once (a backend calling its own hooks is not reported again); the first observer stays."""
    seen = Seen()
    queue.observe(seen)
    queue.observe(Seen())  # a second core on the same backend: the first observer stays
    await put(queue, clock, 2)
    await queue.lease(["default"], 2, VT, "w")
    await queue.get_many([new_job_id()])
    await queue.stats()
    await queue.sweep_expired(10)
    ops = [op for op, _ in seen.calls]
    assert ops == ["enqueue", "lease", "get_many", "stats", "sweep_expired"]
    assert not any(failed for _, failed in seen.calls)


async def test_a_failed_call_is_reported_as_failed(clock: ManualClock):
    """A call whose hook raises a BackendError reaches the observer as failed, and the error
    reaches the caller unchanged."""

    class Broken(MemoryQueue):
        async def _stats(self) -> list[QueueStats]:
            raise BackendUnavailable("down")

    queue = Broken(clock=clock)
    seen = Seen()
    queue.observe(seen)
    with pytest.raises(BackendUnavailable, match="down"):
        await queue.stats()
    assert seen.calls == [("stats", True)]
