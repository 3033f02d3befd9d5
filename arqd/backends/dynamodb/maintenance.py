"""The maintenance contract on DynamoDB: sweeping expired jobs from the ``exp`` index, one
conditional delete per job, and dropping results by a walk of the succeeded jobs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from arqd.backends.base import ListFilter, droppable
from arqd.backends.dynamodb.codec import (
    DROP_IF,
    DROP_SET,
    FREE_KEY_SET,
    ONE,
    SWEEP_IF,
    TRUE,
    _decode_job,
    _expr,
    _j,
    _job_key,
    _n,
    _s,
)
from arqd.backends.dynamodb.refusals import _ConditionFailed
from arqd.backends.dynamodb.schema import EXPIRY_INDEX
from arqd.backends.dynamodb.settings import LEASE_FANOUT
from arqd.backends.dynamodb.table import _Table
from arqd.model import DROPPED, Job, ResultRef, State


class _Maintenance(_Table):
    """The hooks of :class:`~arqd.backends.base.Maintenance`."""

    async def _sweep_expired(self, limit: int) -> list[Job]:
        """Expired ended jobs (from ``exp``), each deleted by a conditional DeleteItem: of many
        sweepers racing for a job, one deletes it and answers it. Each call visits the
        partitions in random order, ``LEASE_FANOUT`` at a time, until it has ``limit``
        candidates, so the sweepers of many daemons spread out instead of all colliding on the
        soonest expiries. DynamoDB's own TTL (``ttl``) deletes whatever no sweeper reached,
        later and for free."""
        now = self.clock.time()
        parts = [p for q in await self._queues() for p in await self._partitions(q)]
        random.shuffle(parts)
        found: list[str] = []
        for first in range(0, len(parts), LEASE_FANOUT):
            wave = parts[first : first + LEASE_FANOUT]
            pages = await self._all(self._expired(p, now, limit - len(found)) for p in wave)
            found += [job_id for page in pages for job_id in page][: limit - len(found)]
            if len(found) >= limit:
                break
        swept = await self._all(self._sweep_one(job_id, now) for job_id in found)
        return [job for job in swept if job is not None]

    async def _expired(self, partition: str, now: float, limit: int) -> list[str]:
        out = await self._call(
            "query",
            TableName=self.table,
            IndexName=EXPIRY_INDEX,
            Limit=limit,
            KeyConditionExpression="#xp = :xp AND #x <= :now",
            ExpressionAttributeNames={"#xp": "xp", "#x": "x"},
            ExpressionAttributeValues={":xp": _s(partition), ":now": _n(now)},
        )
        return [item["pk"]["S"][2:] for item in out.get("Items", [])]

    async def _sweep_one(self, job_id: str, now: float) -> Job | None:
        try:
            out = await self._call(
                "delete_item",
                TableName=self.table,
                Key=_job_key(job_id),
                ReturnValues="ALL_OLD",
                **_expr(None, SWEEP_IF, now=_n(now)),
            )
        except _ConditionFailed:
            return None  # another sweeper was first (or the job was redriven meanwhile)
        job = _decode_job(out["Attributes"])
        self._counts.add(job.queue, job.state.value, -1)
        if job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        """Walk the succeeded jobs (through ``list``: a purge is an operator's rare act) and drop
        the results of those with this ``sticky`` flag, each by an update conditional on the
        version seen, so concurrent purges answer each job once. The walk goes on from where
        the previous call stopped; an empty answer means it reached the end."""
        dropped: list[Job] = []
        cursor = self._drop_cursor.pop(sticky, None)
        where = ListFilter(state=State.SUCCEEDED)
        while len(dropped) < limit:
            page, after = await self._list_jobs(where, 100, cursor)
            doomed = [j for j in page if droppable(j, sticky, before)]
            doomed = doomed[: limit - len(dropped)]
            if doomed and doomed[-1] is not page[-1]:
                after = doomed[-1].id  # the batch is full: go on just below its last job
            won = await self._all(self._drop_one(j, frees_key(j)) for j in doomed)
            dropped += [j for j, ok in zip(doomed, won, strict=True) if ok]
            cursor = after
            if cursor is None:
                return dropped  # the walk reached the end
        if cursor is not None:
            self._drop_cursor[sticky] = cursor
        return dropped

    async def _drop_one(self, job: Job, free_key: bool) -> bool:
        values: dict[str, Any] = {
            "dropped": _j(ResultRef(area=DROPPED)),
            "one": ONE,
            "succeeded": _s(State.SUCCEEDED.value),
            "seen_v": _n(job.version),
        }
        update = DROP_SET
        if free_key:
            update, values["true"] = f"{DROP_SET}, {FREE_KEY_SET}", TRUE
        try:
            await self._update_item(_job_key(job.id), **_expr(update, DROP_IF, **values))
        except _ConditionFailed:
            return False  # changed (or dropped by another purge) since the walk read it
        if job.key is not None and free_key:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return True
