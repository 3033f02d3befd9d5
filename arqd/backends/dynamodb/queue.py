"""``DynamoQueue``: the three queue contracts on one DynamoDB table, assembled from the parts
of this package; cancel, delete, redrive and the reads of the job store live here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arqd.backends.base import Redrive
from arqd.backends.dynamodb.catalog import _Catalog
from arqd.backends.dynamodb.codec import (
    CANCEL_QUEUED_SET,
    CANCEL_RUNNING_IF,
    CANCEL_RUNNING_SET,
    FALSE,
    FREE_KEY_SET,
    ONE,
    REDRIVE_SET,
    TRUE,
    Item,
    _decode_job,
    _expr,
    _holds_key,
    _job_key,
    _key_key,
    _n,
    _s,
    _state,
)
from arqd.backends.dynamodb.leasing import _Leasing
from arqd.backends.dynamodb.maintenance import _Maintenance
from arqd.backends.dynamodb.refusals import _ConditionFailed
from arqd.backends.dynamodb.schema import DEAD_INDEX
from arqd.backends.dynamodb.submit import _Submit
from arqd.model import Job, State


class DynamoQueue(_Submit, _Leasing, _Catalog, _Maintenance):
    """Job records in one DynamoDB table; see ``arqd.backends.dynamodb`` and ``docs/dynamodb.md``.

    One class implements the three contracts, from parts: :class:`_Submit` and
    :class:`_Leasing` (the job store's writes), :class:`_Catalog`, :class:`_Maintenance`, all on
    :class:`_Table`'s requests; the rest of the job store (cancel, delete, redrive, reads) is
    here."""

    name = "dynamodb"
    multi_host = True

    # --- cancel, delete, redrive ------------------------------------------------------------------

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        values: dict[str, Any] = {
            "cancelled": _s(State.CANCELLED.value),
            "queued": _s(State.QUEUED.value),
            "now": _n(self.clock.time()),
            "one": ONE,
        }
        sets = ""
        if free_key:
            sets, values["true"] = f", {FREE_KEY_SET}", TRUE
        try:
            kw = _expr(CANCEL_QUEUED_SET.format(sets=sets), "#st = :queued", **values)
            item = await self._update_item(_job_key(job_id), **kw)
        except _ConditionFailed as exc:
            if exc.item is None:
                return None
            return await self._cancel_running(job_id, exc.item)
        job = _decode_job(item)
        self._counts.move(job.queue, State.QUEUED.value, State.CANCELLED.value)
        if free_key and job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _cancel_running(self, job_id: str, item: Item) -> Job:
        if _state(item) != State.RUNNING.value or item.get("cr", FALSE)["BOOL"]:
            return _decode_job(item)
        values = {"true": TRUE, "false": FALSE, "running": _s(State.RUNNING.value), "one": ONE}
        try:
            kw = _expr(CANCEL_RUNNING_SET, CANCEL_RUNNING_IF, **values)
            return _decode_job(await self._update_item(_job_key(job_id), **kw))
        except _ConditionFailed as exc:  # it ended (or was asked to) meanwhile
            return _decode_job(exc.item) if exc.item else _decode_job(item)

    async def _delete(self, job_id: str) -> Job | None:
        item = await self._get_item(_job_key(job_id))
        if item is None:
            return None
        job = _decode_job(item)
        if not job.state.terminal:
            return job
        try:
            await self._call(
                "delete_item",
                TableName=self.table,
                Key=_job_key(job_id),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **_expr(None, "#st = :seen", seen=_s(job.state.value)),
            )
        except _ConditionFailed as exc:  # redriven meanwhile: not terminal any more
            return _decode_job(exc.item) if exc.item else None
        self._counts.add(job.queue, job.state.value, -1)
        if job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _redrive(self, plan: Redrive) -> int:
        now, queue = self.clock.time(), plan.queue
        failed = await self._dead_ids(queue, State.FAILED)

        async def one(job_id: str) -> bool:
            values = {
                "queued": _s(State.QUEUED.value),
                "failed": _s(State.FAILED.value),
                "attempts": _n(plan.attempts),
                "ready": _n(plan.ready_at),
                "one": ONE,
            }
            try:
                kw = _expr(REDRIVE_SET, "#st = :failed", **values)
                item = await self._update_item(_job_key(job_id), **kw)
            except _ConditionFailed:
                return False  # deleted or redriven by someone else meanwhile
            self._counts.move(queue, State.FAILED.value, State.QUEUED.value)
            key = item.get("k") if plan.take_keys else None
            if key is not None and await self._take_key(key["S"], job_id, now):
                kw = _expr("REMOVE #kf")
                await self._call("update_item", TableName=self.table, Key=_job_key(job_id), **kw)
            return True

        return sum(await self._all(one(i) for i in failed))

    async def _dead_ids(self, queue: str, state: State) -> list[str]:
        """Ids of ``queue``'s jobs in ``state`` (failed or cancelled), from every shard."""

        async def ids(partition: str) -> list[str]:
            items = await self._query_all(
                IndexName=DEAD_INDEX,
                KeyConditionExpression="#dq = :dq",
                FilterExpression="#st = :st",
                ExpressionAttributeNames={"#dq": "dq", "#st": "st"},
                ExpressionAttributeValues={":dq": _s(partition), ":st": _s(state.value)},
            )
            return [item["pk"]["S"][2:] for item in items]

        pages = await self._all(ids(p) for p in await self._partitions(queue))
        return [i for page in pages for i in page]

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        item = await self._get_item(_job_key(job_id))
        return None if item is None else _decode_job(item)

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        items = await self._batch_get(
            [_job_key(i) for i in dict.fromkeys(job_ids)], consistent=True
        )
        return [_decode_job(items[f"J#{i}"]) if f"J#{i}" in items else None for i in job_ids]

    async def _find_by_key(self, key: str) -> Job | None:
        pointer = await self._get_item(_key_key(key))
        if pointer is None:
            return None
        item = await self._get_item(_job_key(pointer["j"]["S"]))
        if not _holds_key(item, self.clock.time()):
            return None
        assert item is not None
        return _decode_job(item)
