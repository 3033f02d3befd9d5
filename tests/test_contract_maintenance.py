"""The maintenance contract (``Maintenance``: sweeping, dropping results), run against every
backend (``conftest.QUEUE_BACKENDS``)."""

from __future__ import annotations

import msgspec

from arqd.backends.base import QueueBackend
from arqd.clock import ManualClock
from arqd.model import (
    ResultRef,
)

from .contract import (
    VT,
    done,
    free_all,
    new,
    put,
)


async def test_drop_results_walks_one_area_in_batches(queue: QueueBackend, clock: ManualClock):
    """drop_results drops the results of succeeded jobs of one stickiness, in batches, each job
    once, frees their keys, leaves the other area alone, and answers [] once none are left; a
    later purge walks again from the start."""

    async def finished(n: int, sticky: bool, ids: tuple[str, ...] = ()) -> list[str]:
        made = [new(clock, key=f"k-{sticky}-{i}-{n}", sticky=sticky) for i in range(n)]
        for i, job_id in enumerate(ids):
            made[i] = msgspec.structs.replace(made[i], id=job_id)
        stored = await queue.enqueue(made)
        leases = await queue.lease(["default"], n, VT, "w")
        area = "persistent" if sticky else "temporary"
        ref = ResultRef(area=area, name="x", size=1)
        outcomes = [done(le.job, le.token, result=ref) for le in leases]
        assert await queue.finish(outcomes) == [True] * n
        return [e.job.id for e in stored]

    temporary = await finished(7, sticky=False)
    persistent = await finished(2, sticky=True)
    dropped: list[str] = []
    while batch := await queue.drop_results(False, 3, frees_key=free_all):
        assert len(batch) <= 3
        assert all(j.result is not None and j.result.area == "temporary" for j in batch)
        dropped += [j.id for j in batch]
    assert sorted(dropped) == sorted(temporary)
    for job in await queue.get_many(temporary):
        assert job is not None and job.result == ResultRef(area="dropped")
        assert job.key is not None and await queue.find_by_key(job.key) is None
    for job in await queue.get_many(persistent):
        assert job is not None and job.result is not None and job.result.area == "persistent"
    # A new purge walks everything again, on either side of where the last one ended.
    more = await finished(2, sticky=False, ids=("0" * 31 + "1", "f" * 32))
    again = [j.id for j in await queue.drop_results(False, 10, frees_key=free_all)]
    assert (
        sorted(again) == sorted(more)
        and await queue.drop_results(False, 10, frees_key=free_all) == []
    )


async def test_drop_results_keeps_results_finished_after_the_purge_began(
    queue: QueueBackend, clock: ManualClock
):
    """drop_results(before=t) drops only results of jobs finished before t: a result published
    while a purge runs is kept."""
    await put(queue, clock, 2)
    early, late = await queue.lease(["default"], 2, VT, "w")
    ref = ResultRef(area="temporary", name="x", size=1)
    assert await queue.finish([done(early.job, early.token, result=ref)]) == [True]
    began = clock.time() + 1
    clock.advance(2)
    assert await queue.finish([done(late.job, late.token, result=ref)]) == [True]
    dropped = [j.id for j in await queue.drop_results(False, 10, before=began, frees_key=free_all)]
    assert (
        dropped == [early.job.id]
        and await queue.drop_results(False, 10, before=began, frees_key=free_all) == []
    )
    kept = await queue.get(late.job.id)
    assert kept is not None and kept.result == ref


async def test_drop_results_frees_the_keys_it_is_told_to(queue: QueueBackend, clock: ManualClock):
    """A purge drops every result it finds but frees only the keys ``frees_key`` names; the
    others stay held by their jobs."""
    await put(queue, clock, key="kept")
    await put(queue, clock, key="freed")
    leases = await queue.lease(["default"], 2, VT, "w")
    ref = ResultRef(area="temporary", name="x", size=1)
    outcomes = [done(le.job, le.token, result=ref, expires_at=clock.time() + 60) for le in leases]
    assert await queue.finish(outcomes) == [True, True]
    dropped = await queue.drop_results(False, 10, frees_key=lambda job: job.key == "freed")
    assert sorted(j.key or "" for j in dropped) == ["freed", "kept"]
    assert await queue.find_by_key("freed") is None
    holder = await queue.find_by_key("kept")
    assert holder is not None and holder.result == ResultRef(area="dropped")


async def test_a_kept_key_outlives_the_result_until_the_record_goes(
    queue: QueueBackend, clock: ManualClock
):
    """A success with keep_key holds its key past the result's expiry, until the sweep deletes
    the record; without it the key expires with the result."""
    await put(queue, clock, key="kept")
    await put(queue, clock, key="plain")
    leases = await queue.lease(["default"], 2, VT, "w")
    expires = clock.time() + 60
    outcomes = [
        done(le.job, le.token, expires_at=expires, keep_key=le.job.key == "kept") for le in leases
    ]
    assert await queue.finish(outcomes) == [True, True]
    clock.advance(61)
    assert await queue.find_by_key("plain") is None
    kept = await queue.find_by_key("kept")
    assert kept is not None
    assert not (await queue.enqueue([new(clock, key="kept")]))[0].created
    swept = await queue.sweep_expired(10)
    assert sorted(j.key or "" for j in swept) == ["kept", "plain"]
    assert await queue.find_by_key("kept") is None
    assert (await queue.enqueue([new(clock, key="kept")]))[0].created
