"""The base of the DynamoDB backend's classes: clients, requests, counters (see ``_Table``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

from arqd.backends import aws
from arqd.backends.base import QueueBackend, StateCounts
from arqd.backends.dynamodb.codec import (
    KEY_OURS,
    SHARDS_IF,
    SHARDS_SET,
    Item,
    _expr,
    _key_key,
    _n,
    _names,
    _partition,
    _pk_values,
    _s,
    _ttl,
)
from arqd.backends.dynamodb.refusals import _ConditionFailed, _translate
from arqd.backends.dynamodb.schema import QUEUES_PK, ensure_table
from arqd.backends.dynamodb.settings import (
    COUNTS_FLUSH,
    MAX_PARALLEL,
    SHARDS_REFRESH,
    DynamoSettings,
    _client_config,
)
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, BackendUnavailable

T = TypeVar("T")


class _Counts(StateCounts):
    """Per-(queue, state) changes made by this process and not yet written to the ``Q`` items."""

    def take(self) -> dict[str, dict[str, int]]:
        by_queue = self.by_queue()
        self.clear()
        return by_queue

    def give_back(self, by_queue: dict[str, dict[str, int]]) -> None:
        for queue, per in by_queue.items():
            for state, n in per.items():
                self.add(queue, state, n)


class _Table(QueueBackend):
    """The table as this process talks to it: the clients, one request with its errors mapped,
    batched reads, the per-queue counters and shard counts, and tidying a key item. Implements
    no contract hook itself: the mixins (``submit``, ``leasing``, ``catalog``, ``maintenance``)
    and :class:`~arqd.backends.dynamodb.queue.DynamoQueue` do, on these requests."""

    def __init__(self, settings: DynamoSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self.table = settings.table
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._ping_client: Any = None
        self._limit = asyncio.Semaphore(MAX_PARALLEL)
        self._counts = _Counts()
        self._flusher: asyncio.Task[None] | None = None
        self._registered: set[str] = set()
        self._shards: dict[str, tuple[float, int]] = {}
        # The mixins' own state, here so that one place lists all a DynamoQueue holds.
        # (job id, token) → the lease expiry this process last wrote: heartbeats skip rewrites
        # of fresh leases, and a retried finish is counted only once.
        self._extended: dict[tuple[str, str], float] = {}
        self._drop_cursor: dict[bool, str] = {}  # where drop_results' walk goes on, per flag
        self._ended: OrderedDict[tuple[str, str], None] = OrderedDict()  # see ENDED_MEMORY

    @property
    def identity(self) -> str:
        where = self.settings.endpoint_url or self.settings.region or "default"
        return f"dynamodb:{where}/{self.table}"

    @property
    def client(self) -> Any:
        """The aiobotocore client once open, for instrumentation (benchmarks hook its events)."""
        return self._client

    async def open(self) -> None:
        s = self.settings
        with aws.remembering_open_failure(self.identity):
            clients = await aws.open_clients(self._stack, "dynamodb", s, _client_config)
            self._client, self._ping_client = clients
            create = (
                s.create_missing if s.create_missing is not None else s.endpoint_url is not None
            )
            if create:
                await ensure_table(self._client, self.table)
        self._flusher = asyncio.create_task(self._flush_loop(), name="arqd-dynamodb-counts")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
            with contextlib.suppress(BackendError):
                await self._flush_counts()
        await self._stack.aclose()
        self._client = self._ping_client = None

    # --- requests ---------------------------------------------------------------------------------

    async def _call(self, op: str, client: Any = None, **kw: Any) -> dict[str, Any]:
        """One request (botocore retries it); failures leave as arqd errors."""
        if self._client is None:
            raise aws.not_open("the dynamodb backend", self.identity)
        try:
            async with self._limit:
                result: dict[str, Any] = await getattr(client or self._client, op)(**kw)
                return result
        except aws.driver_errors() as exc:
            raise _translate(op, exc) from exc

    async def _update_item(self, key: Item, **kw: Any) -> Item:
        """A conditional UpdateItem answering the new item; refusals carry the old one."""
        out = await self._call(
            "update_item",
            TableName=self.table,
            Key=key,
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            **kw,
        )
        return dict(out["Attributes"])

    async def _get_item(self, key: Item, *, consistent: bool = True) -> Item | None:
        out = await self._call("get_item", TableName=self.table, Key=key, ConsistentRead=consistent)
        item = out.get("Item")
        return None if item is None else dict(item)

    async def _batch_get(
        self, keys: Sequence[Item], *, consistent: bool, projection: str | None = None
    ) -> dict[str, Item]:
        """Items by ``pk`` (missing ones absent), 100 keys per request, unprocessed ones retried."""
        found: dict[str, Item] = {}
        chunks = [list(keys[i : i + 100]) for i in range(0, len(keys), 100)]

        async def fetch(chunk: list[Item]) -> None:
            request: dict[str, Any] = {"Keys": chunk, "ConsistentRead": consistent}
            if projection:
                request["ProjectionExpression"] = projection
                request["ExpressionAttributeNames"] = _names(projection)
            for attempt in range(10):
                out = await self._call("batch_get_item", RequestItems={self.table: request})
                for item in out.get("Responses", {}).get(self.table, []):
                    found[item["pk"]["S"]] = item
                rest = out.get("UnprocessedKeys", {}).get(self.table)
                if not rest:
                    return
                request = rest
                await asyncio.sleep(0.05 * 2**attempt)
            raise BackendUnavailable("dynamodb batch_get_item: keys left unprocessed")

        await asyncio.gather(*(fetch(c) for c in chunks))
        return found

    async def _query_all(self, **kw: Any) -> list[Item]:
        items: list[Item] = []
        while True:
            out = await self._call("query", TableName=self.table, **kw)
            items.extend(out.get("Items", []))
            last = out.get("LastEvaluatedKey")
            if not last:
                return items
            kw["ExclusiveStartKey"] = last

    # --- counters and the queue registry ----------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(COUNTS_FLUSH)
            with contextlib.suppress(BackendError):
                await self._flush_counts()

    async def _flush_counts(self) -> None:
        by_queue = self._counts.take()
        failed: dict[str, dict[str, int]] = {}

        async def write(queue: str, per: dict[str, int]) -> None:
            update = "ADD " + ", ".join(f"#{state} :{state}" for state in per)
            values = {state: _n(n) for state, n in per.items()}
            try:
                await self._call(
                    "update_item",
                    TableName=self.table,
                    Key={"pk": _s(QUEUES_PK), "sk": _s(queue)},
                    **_expr(update, **values),
                )
            except BackendError:
                failed[queue] = per

        await asyncio.gather(*(write(q, per) for q, per in by_queue.items()))
        self._counts.give_back(failed)
        if failed:
            raise BackendUnavailable("dynamodb: queue counters not written; kept for the next try")

    async def _register(self, queues: Iterable[str]) -> None:
        """Make each queue known to stats/list (once per process), with its shard count."""

        async def register(queue: str) -> None:
            with contextlib.suppress(_ConditionFailed):
                await self._call(
                    "update_item",
                    TableName=self.table,
                    Key={"pk": _s(QUEUES_PK), "sk": _s(queue)},
                    **_expr(SHARDS_SET, SHARDS_IF, ns=_n(self.settings.shards)),
                )
            self._registered.add(queue)

        await asyncio.gather(*(register(q) for q in set(queues) - self._registered))

    async def _shard_count(self, queue: str) -> int:
        """Shards to read for ``queue``: the most any process ever wrote to, or ours."""
        now = self.clock.time()
        cached = self._shards.get(queue)
        if cached is not None and now - cached[0] < SHARDS_REFRESH:
            return cached[1]
        item = await self._get_item({"pk": _s(QUEUES_PK), "sk": _s(queue)}, consistent=False)
        stored = int(item["ns"]["N"]) if item and "ns" in item else 0
        count = max(stored, self.settings.shards)
        self._shards[queue] = (now, count)
        return count

    async def _partitions(self, queue: str) -> list[str]:
        """Every "<queue>#<shard>" partition any process may have written ``queue``'s jobs to."""
        return [_partition(queue, s) for s in range(await self._shard_count(queue))]

    async def _queues(self) -> list[str]:
        """Every queue that ever had a job (the ``Q`` items)."""
        items = await self._query_all(
            ConsistentRead=True, KeyConditionExpression="#pk = :pk", **_pk_values(QUEUES_PK)
        )
        return [item["sk"]["S"] for item in items]

    @staticmethod
    async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
        """Run requests side by side (``_call`` bounds how many are in flight)."""
        return list(await asyncio.gather(*calls))

    # --- key items --------------------------------------------------------------------------------

    async def _tidy_key(
        self, key: str, job_id: str, *, free: bool, expires_at: float | None
    ) -> None:
        """Delete a freed key item, or give it the result's TTL. Best effort: whether a key is
        held is decided by its job, so a failure here changes no answer."""
        cond = _expr(None, KEY_OURS, id=_s(job_id))
        with contextlib.suppress(_ConditionFailed, BackendError):
            if free:
                await self._call("delete_item", TableName=self.table, Key=_key_key(key), **cond)
            elif expires_at is not None:
                kw = _expr("SET #ttl = :ttl", KEY_OURS, ttl=_ttl(expires_at), id=_s(job_id))
                await self._call("update_item", TableName=self.table, Key=_key_key(key), **kw)
