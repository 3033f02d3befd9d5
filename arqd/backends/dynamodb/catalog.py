"""The catalog contract on DynamoDB: listing from key-only indexes (never a scan), stats from
the counter items, groups, the worker registry, marks and ping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec

from arqd.backends.base import ListFilter, QueueStats, WorkerInfo
from arqd.backends.dynamodb.codec import (
    MARK_IF,
    MARK_SET,
    _decode_job,
    _expr,
    _job_key,
    _mark_key,
    _n,
    _names,
    _partition,
    _pk_values,
    _s,
    _ttl,
)
from arqd.backends.dynamodb.refusals import _ConditionFailed
from arqd.backends.dynamodb.schema import (
    DEAD_INDEX,
    GROUP_INDEX,
    GROUP_SK,
    LIST_INDEX,
    QUEUES_PK,
    STATES,
    VIS_INDEX,
    WORKERS_PK,
)
from arqd.backends.dynamodb.settings import LIST_READ_BUDGET, WORKER_TTL
from arqd.backends.dynamodb.table import _Table
from arqd.model import GroupRecord, Job, State


@dataclass(frozen=True)
class _ListPlan:
    """Where list_jobs reads: one index, its partitions, and a state to filter on."""

    index: str
    hash_attr: str
    partitions: list[str]
    state: State | None = None


class _Catalog(_Table):
    """The hooks of :class:`~arqd.backends.base.Catalog`."""

    # --- listing and stats ------------------------------------------------------------------------

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Newest first, merged from the partitions of one key-only index and filtered on the
        items themselves; at most ``LIST_READ_BUDGET`` index entries are read per call (then a
        short page answers with a cursor to go on from)."""
        plan = await self._list_plan(where)
        page = min(max(limit + 1, 25), 1000)
        matches: list[Job] = []
        below, examined = cursor, 0
        while True:
            ids, below, scanned = await self._newest_ids(plan, below, page)
            items = await self._batch_get([_job_key(i) for i in ids], consistent=False)
            for job_id in ids:
                item = items.get(f"J#{job_id}")
                job = None if item is None else _decode_job(item)
                if job is not None and where.matches(job):
                    matches.append(job)
                    if len(matches) > limit:
                        return matches[:limit], matches[limit - 1].id
            examined += scanned
            if below is None or examined >= LIST_READ_BUDGET:
                return matches, below

    async def _list_plan(self, where: ListFilter) -> _ListPlan:
        """The index and partitions that hold every job the filter can match."""
        if where.group_id is not None:
            return _ListPlan(GROUP_INDEX, "g", [where.group_id])
        queues = [where.queue] if where.queue is not None else await self._queues()
        parts = [p for q in queues for p in await self._partitions(q)]
        if where.state in (State.FAILED, State.CANCELLED):
            assert where.state is not None
            return _ListPlan(DEAD_INDEX, "dq", parts, state=where.state)
        return _ListPlan(LIST_INDEX, "lq", parts)

    async def _newest_ids(
        self, plan: _ListPlan, below: str | None, n: int
    ) -> tuple[list[str], str | None, int]:
        """Ids below ``below``, newest first, that every partition has been read down to; the
        id to go on below (``None``: all read); how many index entries were read."""
        cond = f"#{plan.hash_attr} = :p" + (" AND #pk < :below" if below is not None else "")
        kw: dict[str, Any] = {"IndexName": plan.index, "KeyConditionExpression": cond}
        names, values = _names(cond), {":below": _s(f"J#{below}")} if below is not None else {}
        if plan.state is not None:
            kw["FilterExpression"] = "#st = :st"
            names["#st"], values[":st"] = "st", _s(plan.state.value)

        async def read(partition: str) -> tuple[list[str], str | None, int]:
            out = await self._call(
                "query",
                TableName=self.table,
                ScanIndexForward=False,
                Limit=n,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={**values, ":p": _s(partition)},
                **kw,
            )
            ids = [item["pk"]["S"][2:] for item in out.get("Items", [])]
            last = out.get("LastEvaluatedKey")
            return ids, None if last is None else last["pk"]["S"][2:], out.get("ScannedCount", 0)

        pages = await self._all(read(p) for p in plan.partitions)
        # Below the highest point where a partition stopped reading, it may hold ids not seen
        # yet: answer only what lies above it, and go on from there.
        stops = [stop for _, stop, _ in pages if stop is not None]
        floor = max(stops) if stops else None
        ids = sorted({i for got, _, _ in pages for i in got if floor is None or i >= floor})
        return ids[::-1], floor, sum(scanned for _, _, scanned in pages)

    async def _stats(self) -> list[QueueStats]:
        await self._flush_counts()
        now = self.clock.time()
        items = await self._query_all(
            ConsistentRead=True, KeyConditionExpression="#pk = :pk", **_pk_values(QUEUES_PK)
        )
        out = []
        for item in sorted(items, key=lambda i: str(i["sk"]["S"])):
            counts = {s: max(0, int(item[s]["N"])) for s in STATES if s in item}
            if not any(counts.values()):
                continue
            queue = item["sk"]["S"]
            oldest = await self._oldest_ready(queue, now) if counts.get("queued") else None
            out.append(
                QueueStats(
                    name=queue,
                    **counts,
                    oldest_queued_seconds=None if oldest is None else now - oldest,
                )
            )
        return out

    async def _oldest_ready(self, queue: str, now: float) -> float | None:
        """The smallest ``va`` of a queued, visible job (expired leases are skipped)."""

        async def first(shard: int) -> float | None:
            kw: dict[str, Any] = {
                "IndexName": VIS_INDEX,
                "KeyConditionExpression": "#vq = :vq AND #va <= :now",
                "FilterExpression": "#st = :queued",
                "ExpressionAttributeNames": {"#vq": "vq", "#va": "va", "#st": "st"},
                "ExpressionAttributeValues": {
                    ":vq": _s(_partition(queue, shard)),
                    ":now": _n(now),
                    ":queued": _s(State.QUEUED.value),
                },
            }
            while True:
                out = await self._call("query", TableName=self.table, Limit=25, **kw)
                if out.get("Items"):
                    return float(out["Items"][0]["va"]["N"])
                if "LastEvaluatedKey" not in out:
                    return None
                kw["ExclusiveStartKey"] = out["LastEvaluatedKey"]

        found = await asyncio.gather(*(first(s) for s in range(await self._shard_count(queue))))
        present = [v for v in found if v is not None]
        return min(present) if present else None

    # --- groups and ping --------------------------------------------------------------------------

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        item = await self._get_item({"pk": _s(f"G#{group_id}"), "sk": _s(GROUP_SK)})
        return None if item is None else msgspec.json.decode(item["rec"]["S"], type=GroupRecord)

    async def _ping(self) -> None:
        await self._call(
            "get_item",
            client=self._ping_client,
            TableName=self.table,
            Key={"pk": _s("PING"), "sk": _s("PING")},
        )

    # --- the worker registry ----------------------------------------------------------------------

    async def _register_worker(self, info: WorkerInfo) -> None:
        item = {
            "pk": _s(WORKERS_PK),
            "sk": _s(info.id),
            "host": _s(info.host),
            "sa": _n(info.started_at),
            "ls": _n(info.last_seen),
            "run": _n(info.running),
            "con": _n(info.concurrency),
            "ttl": _ttl(info.last_seen + WORKER_TTL),
        }
        await self._call("put_item", TableName=self.table, Item=item)

    async def _remove_worker(self, worker_id: str) -> None:
        key = {"pk": _s(WORKERS_PK), "sk": _s(worker_id)}
        await self._call("delete_item", TableName=self.table, Key=key)

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        values = _pk_values(WORKERS_PK)
        values["ExpressionAttributeNames"]["#ls"] = "ls"
        values["ExpressionAttributeValues"][":since"] = _n(seen_since)
        items = await self._query_all(
            ConsistentRead=True,
            KeyConditionExpression="#pk = :pk",
            FilterExpression="#ls >= :since",
            **values,
        )
        return [
            WorkerInfo(
                id=i["sk"]["S"],
                host=i["host"]["S"],
                started_at=float(i["sa"]["N"]),
                last_seen=float(i["ls"]["N"]),
                running=int(i["run"]["N"]),
                concurrency=int(i["con"]["N"]),
            )
            for i in items
        ]

    # --- marks ------------------------------------------------------------------------------------

    async def _advance_mark(self, name: str, value: float) -> float | None:
        """One conditional UpdateItem on ``pk = "M#<name>"``: it raises the mark or, refused,
        answers the mark that stood (a retried request whose first try landed answers
        ``value`` itself, as if another process had set it)."""
        try:
            out = await self._call(
                "update_item",
                TableName=self.table,
                Key=_mark_key(name),
                ReturnValues="UPDATED_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **_expr(MARK_SET, MARK_IF, mv=_n(value)),
            )
        except _ConditionFailed as refused:
            return None if refused.item is None else float(refused.item["mv"]["N"])
        old = out.get("Attributes", {}).get("mv")
        return None if old is None else float(old["N"])

    async def _get_mark(self, name: str) -> float | None:
        item = await self._get_item(_mark_key(name))
        return None if item is None or "mv" not in item else float(item["mv"]["N"])
