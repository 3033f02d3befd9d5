"""``DELETE /v1/cache`` (``Core.purge``) against results being published, on every queue backend
and result store: a result is published (its blob written) before the outcome that names it is
recorded, and a purge must never delete a blob that a record names or will name."""

from __future__ import annotations

import pytest

from arqd.backends.base import Outcome, QueueBackend
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.core import Core
from arqd.errors import ResultExpired
from arqd.model import ResultRef, State, blob_name, new_job_id, new_token
from arqd.results.base import ResultStore

from .contract import VT, put

BLOB = b"result " * 100


async def read(core: Core, job_id: str) -> bytes:
    ref = core.resultio.check(await core.get(job_id))
    return b"".join([chunk async for chunk in core.resultio.read(ref)])


async def publish(core: Core, queue: QueueBackend, clock: ManualClock) -> tuple[Outcome, str]:
    """Lease a new job and write its result blob, as a consumer does before it records the
    outcome naming it: answers that outcome and the blob's name."""
    await put(queue, clock)
    (lease,) = await queue.lease(["default"], 1, VT, "w")
    name = blob_name(lease.job.id, lease.token)
    size = await core.results.put("temporary", name, BLOB)
    ref = ResultRef(area="temporary", name=name, size=size, content_type="application/json")
    outcome = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED, result=ref)
    return outcome, name


async def test_a_result_published_during_a_purge_is_kept_whole(
    queue: QueueBackend, results: ResultStore, clock: ManualClock
):
    """A result whose blob was written before a purge and whose record lands after it reads
    back whole: the purge's last pass keeps the blob of a job that is still running. Results
    recorded before the purge are dropped (410), and blobs no job can name are deleted."""
    core = Core(queue, results, Config(), None)
    before, before_name = await publish(core, queue, clock)
    assert await queue.finish([before]) == [True]
    during, during_name = await publish(core, queue, clock)
    orphan = blob_name(new_job_id(), new_token())  # a dead consumer's, for a deleted job
    await results.put("temporary", orphan, b"orphan")
    clock.advance(1)
    assert await core.purge("temporary") == 1
    assert await queue.finish([during]) == [True]  # the record lands after the purge
    assert await read(core, during.job.id) == BLOB
    with pytest.raises(ResultExpired, match="purged"):
        await read(core, before.job.id)
    assert await results.size("temporary", before_name) is None
    assert await results.size("temporary", orphan) is None
    assert await results.size("temporary", during_name) == len(BLOB)


async def test_a_purge_deletes_the_blobs_of_ended_jobs_that_do_not_name_them(
    queue: QueueBackend, results: ResultStore, clock: ManualClock
):
    """The last pass deletes a blob whose job ended without naming it (the consumer lost its
    lease, or crashed between writing it and learning so), and keeps the blobs of other
    areas."""
    core = Core(queue, results, Config(), None)
    lost, lost_name = await publish(core, queue, clock)
    failed = Outcome(job=lost.job, token=lost.token, state=State.FAILED)
    assert await queue.finish([failed]) == [True]
    sticky = blob_name(new_job_id(), new_token())
    await results.put("persistent", sticky, b"sticky")
    assert await core.purge("temporary") == 0
    assert await results.size("temporary", lost_name) is None
    assert await results.size("persistent", sticky) == len(b"sticky")
