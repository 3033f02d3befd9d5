"""Submitting: a batch converted and checked before its first write, then stored in one
transaction while it fits, else in several side by side undone on a failure (best effort);
dedupe keys taken with their job, or over from a holder that let them go."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arqd.backends.base import Enqueued, convert_all, group_record, storable_job
from arqd.backends.dynamodb.codec import (
    KEY_STALE,
    NEW_ITEM,
    ONE,
    UNTOUCHED,
    Item,
    _check_item,
    _decode_job,
    _expr,
    _group_item,
    _group_size,
    _holds_key,
    _item_size,
    _job_item,
    _job_key,
    _key_key,
    _s,
)
from arqd.backends.dynamodb.refusals import THROTTLED_REASONS, _Cancelled, _ConditionFailed
from arqd.backends.dynamodb.schema import GROUP_SK
from arqd.backends.dynamodb.settings import (
    KEY_MAX,
    KEY_TRIES,
    TRANSACT_BYTES,
    TRANSACT_MAX,
    TRANSACT_ROUNDS,
)
from arqd.backends.dynamodb.table import _Table
from arqd.errors import BackendError, BackendUnavailable, Unstorable
from arqd.model import GroupRecord, Job, NewJob, State


@dataclass(frozen=True)
class _Unit:
    """One job of a batch, converted: its first record, its item, and the bytes it and its key
    item take in a transaction."""

    index: int
    new: NewJob
    job: Job
    item: Item
    size: int

    @property
    def actions(self) -> int:
        return 1 if self.new.key is None else 2

    @classmethod
    def of(cls, index: int, new: NewJob, shard: int) -> _Unit:
        job = storable_job(new)
        item = _job_item(new, shard)
        size = _check_item(item, "the job")
        if new.key is not None:
            key_item = {**_key_key(new.key), "j": _s(new.id)}
            if len(key_item["pk"]["S"].encode()) > KEY_MAX:
                raise Unstorable(f"key: at most {KEY_MAX - 2} bytes on DynamoDB")
            size += _item_size(key_item)
        return cls(index, new, job, item, size)


@dataclass
class _Batch:
    """One ``enqueue`` of several jobs: the units to store (every job, but for a key repeated
    in the batch, only its first), the group, and the units a live job answers for."""

    jobs: Sequence[NewJob]
    units: list[_Unit]
    repeats: dict[int, int]  # index of a job repeating a key → index of its first job
    group: GroupRecord | None
    held: dict[int, Enqueued] = field(default_factory=dict)

    @classmethod
    def of(cls, jobs: Sequence[NewJob], units: list[_Unit], group: GroupRecord | None) -> _Batch:
        first: dict[str, int] = {}
        repeats: dict[int, int] = {}
        own: list[_Unit] = []
        for unit in units:
            key = unit.new.key
            if key is not None and key in first:
                repeats[unit.index] = first[key]
                continue
            if key is not None:
                first[key] = unit.index
            own.append(unit)
        return cls(jobs, own, repeats, group)

    def answering(self) -> list[str]:
        """The id of the job answering for each job of the batch, as known so far."""
        ids = []
        for i in range(len(self.jobs)):
            first = self.repeats.get(i, i)
            held = self.held.get(first)
            ids.append(held.job.id if held is not None else self.jobs[first].id)
        return ids

    def answers(self, stored: dict[int, Enqueued]) -> list[Enqueued]:
        out = []
        for i in range(len(self.jobs)):
            first = self.repeats.get(i, i)
            entry = stored[first] if first in stored else self.held[first]
            out.append(entry if first == i else Enqueued(entry.job, created=False))
        return out


def _chunks(units: Sequence[_Unit]) -> list[list[_Unit]]:
    """Units in groups that each fit one transaction; a job travels with its key."""
    chunks: list[list[_Unit]] = []
    actions = size = 0
    for unit in units:
        if chunks and actions + unit.actions <= TRANSACT_MAX and size + unit.size <= TRANSACT_BYTES:
            chunks[-1].append(unit)
            actions, size = actions + unit.actions, size + unit.size
        else:
            chunks.append([unit])
            actions, size = unit.actions, unit.size
    return chunks


Refusal = tuple[str, "_Unit | None", str | None]  # ("key" | "job" | "record", unit, key holder)


def _refusals(
    reasons: list[dict[str, Any]], plan: Sequence[tuple[dict[str, Any], _Unit | None]]
) -> list[Refusal]:
    """What a cancelled transaction says about each of its actions (DynamoDB answers one reason
    per action, in order): the puts refused by their condition. A conflict with another
    transaction refuses nothing (the next try may pass); any other reason is raised."""
    refused: list[Refusal] = []
    for reason, (action, unit) in zip(reasons, plan, strict=False):
        code = reason.get("Code") or "None"
        if code in ("None", "TransactionConflict"):
            continue
        if code != "ConditionalCheckFailed":
            error = BackendUnavailable if code in THROTTLED_REASONS else BackendError
            raise error(f"dynamodb transact_write_items: {code}: {reason.get('Message', '')}")
        if unit is None:
            refused.append(("record", None, None))
        elif action["Put"]["Item"]["pk"]["S"].startswith("K#"):
            holder = (reason.get("Item") or {}).get("j")
            refused.append(("key", unit, None if holder is None else str(holder["S"])))
        else:
            refused.append(("job", unit, None))
    return refused


def _key_holder_id(reasons: list[dict[str, Any]]) -> str | None:
    """The job id a refused key put found in the key item (the transaction's first action)."""
    if not reasons or reasons[0].get("Code") != "ConditionalCheckFailed":
        return None
    item = reasons[0].get("Item") or {}
    holder = item.get("j")
    return None if holder is None else str(holder["S"])


class _Submit(_Table):
    """``enqueue`` (part of the job store contract), and taking a key for ``redrive``."""

    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None
    ) -> list[Enqueued]:
        """Every item is converted and checked against DynamoDB's limits before the first
        write. One job alone is one conditional write (a transaction with its key, if any);
        a batch or a group is one ``TransactWriteItems`` while it fits one (100 items, 4 MB:
        jobs, keys and the record), else several run side by side and, should one fail, what
        the others stored is removed again (best effort: ``docs/dynamodb.md`` §3)."""
        shards = self.settings.shards
        units = convert_all(
            list(enumerate(jobs)), lambda pair: _Unit.of(*pair, random.randrange(shards))
        )
        record_size = _group_size(group, jobs) if group is not None else 0
        now = self.clock.time()
        await self._register(j.queue for j in jobs)
        if group is None and len(units) == 1:
            return [await self._put_one(units[0], now)]
        batch = _Batch.of(jobs, units, group)
        actions = sum(u.actions for u in batch.units) + (group is not None)
        size = sum(u.size for u in batch.units) + record_size
        if actions <= TRANSACT_MAX and size <= TRANSACT_BYTES:
            stored = await self._transact(batch, batch.units, now, with_record=True)
        else:
            stored = await self._store_chunked(batch, now)
        return batch.answers(stored)

    async def _put_one(self, unit: _Unit, now: float) -> Enqueued:
        if unit.new.key is not None:
            return await self._put_keyed(unit, now)
        return await self._put_plain(unit)

    def _put_job(self, unit: _Unit) -> dict[str, Any]:
        return {"TableName": self.table, "Item": unit.item, **_expr(None, NEW_ITEM)}

    async def _put_plain(self, unit: _Unit) -> Enqueued:
        try:
            await self._call("put_item", **self._put_job(unit))
        except _ConditionFailed:  # ids are unique: a retry found our own put, already counted
            return Enqueued(unit.job, created=True)
        self._counts.add(unit.new.queue, State.QUEUED.value)
        return Enqueued(unit.job, created=True)

    async def _put_keyed(self, unit: _Unit, now: float) -> Enqueued:
        """Take the key and store the job in one transaction; a live holder answers instead."""
        new = unit.new
        assert new.key is not None
        stale: str | None = None
        for _ in range(KEY_TRIES):
            key_put = self._put_key(new.key, new.id, stale)
            try:
                await self._call(
                    "transact_write_items",
                    TransactItems=[{"Put": key_put}, {"Put": self._put_job(unit)}],
                )
                self._counts.add(new.queue, State.QUEUED.value)
                return Enqueued(unit.job, created=True)
            except _Cancelled as exc:
                holder = _key_holder_id(exc.reasons)
            if holder == new.id:  # our own earlier attempt landed (its answer was lost)
                return Enqueued(unit.job, created=True)
            if holder is not None:
                item = await self._get_item(_job_key(holder))
                if _holds_key(item, now):
                    assert item is not None
                    return Enqueued(_decode_job(item), created=False)
            stale = holder
        raise BackendUnavailable(f"dedupe key {new.key!r} is contended; try again")

    async def _transact(
        self, batch: _Batch, units: Sequence[_Unit], now: float, *, with_record: bool
    ) -> dict[int, Enqueued]:
        """Store ``units`` (and, ``with_record``, the group record) in one transaction; answers
        the jobs stored, by index. A key held by a live job takes its unit out (``batch.held``)
        and the transaction is tried again without it; a key whose holder let it go is taken
        over (conditional on the holder's id). A unit found already stored was stored by an
        earlier try whose answer was lost (ids are unique)."""
        stale: dict[int, str] = {}
        landed: set[int] = set()
        record_landed = not with_record or batch.group is None
        for _ in range(TRANSACT_ROUNDS):
            todo = [u for u in units if u.index not in batch.held and u.index not in landed]
            plan = self._plan(batch, todo, stale, with_record=not record_landed)
            if not plan:
                break
            try:
                await self._call("transact_write_items", TransactItems=[a for a, _ in plan])
                break
            except _Cancelled as exc:
                refused = _refusals(exc.reasons, plan)
            holders: dict[int, str] = {}
            for kind, unit, holder in refused:
                if unit is None:
                    record_landed = True  # the record exists: written by a lost try of ours
                elif kind == "job" or holder == unit.new.id:
                    landed.add(unit.index)  # a lost try of ours stored it (ids are unique)
                elif holder is None:
                    stale.pop(unit.index, None)  # the key item is gone: take the key afresh
                else:
                    holders[unit.index] = holder
            await self._resolve_holders(batch, holders, stale, now)
        else:
            raise BackendUnavailable("dynamodb: the batch's dedupe keys changed hands; try again")
        stored = [u for u in units if u.index not in batch.held]
        for unit in stored:
            self._counts.add(unit.new.queue, State.QUEUED.value)
        return {u.index: Enqueued(u.job, created=True) for u in stored}

    def _plan(
        self, batch: _Batch, todo: Sequence[_Unit], stale: dict[int, str], *, with_record: bool
    ) -> list[tuple[dict[str, Any], _Unit | None]]:
        """The actions of one transaction, each with the unit it stores (None: the record).
        Refused puts answer the item they found (``ALL_OLD``), which says who holds a key."""
        plan: list[tuple[dict[str, Any], _Unit | None]] = []
        for unit in todo:
            if unit.new.key is not None:
                key_put = self._put_key(unit.new.key, unit.new.id, stale.get(unit.index))
                plan.append(({"Put": key_put}, unit))
            job_put = {**self._put_job(unit), "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}
            plan.append(({"Put": job_put}, unit))
        if with_record:
            plan.append(({"Put": self._put_record(batch)}, None))
        return plan

    def _put_record(self, batch: _Batch) -> dict[str, Any]:
        assert batch.group is not None
        record = group_record(batch.group, batch.answering())
        return {"TableName": self.table, "Item": _group_item(record), **_expr(None, NEW_ITEM)}

    async def _resolve_holders(
        self, batch: _Batch, holders: dict[int, str], stale: dict[int, str], now: float
    ) -> None:
        """For each unit whose key another job pointed at: that job answers for it while it
        holds the key; else the next try takes the key over from it."""
        found = await self._all(self._get_item(_job_key(h)) for h in holders.values())
        for (index, holder), item in zip(holders.items(), found, strict=True):
            if item is not None and _holds_key(item, now):
                batch.held[index] = Enqueued(_decode_job(item), created=False)
            else:
                stale[index] = holder

    async def _store_chunked(self, batch: _Batch, now: float) -> dict[int, Enqueued]:
        """A batch too large for one transaction: transactions side by side, then the record.
        If any write fails, the jobs the others stored are removed before the error is raised,
        as far as they can be (see ``_unstore``)."""
        chunks = _chunks(batch.units)
        results = await asyncio.gather(
            *(self._transact(batch, c, now, with_record=False) for c in chunks),
            return_exceptions=True,
        )
        stored: dict[int, Enqueued] = {}
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                stored.update(result)
        if failure is None and batch.group is not None:
            try:
                with contextlib.suppress(_ConditionFailed):  # a lost try of ours wrote it
                    await self._call("put_item", **self._put_record(batch))
            except Exception as exc:
                failure = exc
        if failure is not None:
            await self._unstore(batch, set(stored))
            raise failure
        return stored

    async def _unstore(self, batch: _Batch, counted: set[int]) -> None:
        """Delete what a failed batch may have stored: every job of it (those of a transaction
        whose answer was lost too, since it may have landed), each only if nothing touched it
        yet (queued, version 1: no consumer leased it, no one cancelled it), then its key; and
        the group record. A job that is not there refuses the delete's condition. Best effort:
        a job already leased, or a delete that fails, stays. ``counted``: the jobs counted as
        queued, to uncount."""

        async def undo(unit: _Unit) -> None:
            values = {"one": ONE, "queued": _s(State.QUEUED.value)}
            try:
                await self._call(
                    "delete_item",
                    TableName=self.table,
                    Key=_job_key(unit.new.id),
                    **_expr(None, UNTOUCHED, **values),
                )
            except (_ConditionFailed, BackendError):
                return
            if unit.index in counted:
                self._counts.add(unit.new.queue, State.QUEUED.value, -1)
            if unit.new.key is not None:
                await self._tidy_key(unit.new.key, unit.new.id, free=True, expires_at=None)

        async def undo_record(group: GroupRecord) -> None:
            key = {"pk": _s(f"G#{group.id}"), "sk": _s(GROUP_SK)}
            with contextlib.suppress(BackendError):
                await self._call("delete_item", TableName=self.table, Key=key)

        held = batch.held
        await self._all(undo(u) for u in batch.units if u.index not in held)
        if batch.group is not None:
            await undo_record(batch.group)

    def _put_key(self, key: str, job_id: str, stale: str | None) -> dict[str, Any]:
        """The key item pointing at ``job_id``: new, or replacing a holder that let it go."""
        put: dict[str, Any] = {
            "TableName": self.table,
            "Item": {**_key_key(key), "j": _s(job_id)},
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        if stale is None:
            put.update(_expr(None, NEW_ITEM))
        else:
            put.update(_expr(None, KEY_STALE, stale=_s(stale)))
        return put

    async def _take_key(self, key: str, job_id: str, now: float) -> bool:
        """Point ``key`` at ``job_id`` unless a live job holds it (used by redrive)."""
        stale: str | None = None
        for _ in range(KEY_TRIES):
            put = self._put_key(key, job_id, stale)
            try:
                await self._call("put_item", **put)
                return True
            except _ConditionFailed as exc:
                holder = exc.item["j"]["S"] if exc.item else None
            if holder == job_id:
                return True
            if holder is not None and _holds_key(await self._get_item(_job_key(holder)), now):
                return False
            stale = holder
        return False
