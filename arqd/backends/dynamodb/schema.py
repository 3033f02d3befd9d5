"""The table: its item keys, its indexes, and creating what is missing (``arqd init-aws``, or
on open against a local endpoint). The layout is reasoned in ``docs/dynamodb.md``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from arqd.backends import aws
from arqd.backends.dynamodb.refusals import _translate
from arqd.backends.dynamodb.settings import DynamoSettings, _client_config
from arqd.errors import BackendError
from arqd.model import State

JOB_SK = "J"
QUEUES_PK = "Q"
WORKERS_PK = "W"
GROUP_SK = "G"
MARK_SK = "M"
STATES = tuple(s.value for s in State)


# --- the indexes ----------------------------------------------------------------------------------

VIS_INDEX, LIST_INDEX, DEAD_INDEX, EXPIRY_INDEX, GROUP_INDEX = "vis", "list", "dead", "exp", "grp"

ATTRIBUTES = {
    "pk": "S",
    "sk": "S",
    "vq": "S",
    "va": "N",
    "lq": "S",
    "dq": "S",
    "xp": "S",
    "x": "N",
    "g": "S",
}


def _gsi(name: str, hash_key: str, range_key: str, include: Sequence[str] = ()) -> dict[str, Any]:
    projection: dict[str, Any] = {"ProjectionType": "INCLUDE" if include else "KEYS_ONLY"}
    if include:
        projection["NonKeyAttributes"] = list(include)
    return {
        "IndexName": name,
        "KeySchema": [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ],
        "Projection": projection,
    }


# ``vis``: ready jobs and expired leases, oldest first (the state rides along so a lease can
# re-check it). ``exp``: ended jobs with an expiry, soonest first, for the sweeper. The others
# sort by ``pk`` = "J#<id>", that is by creation time: ``list`` holds every job, ``dead`` the
# failed and cancelled ones (state projected, so listing can filter on it), ``grp`` the jobs of
# a group. All but ``grp`` are partitioned like ``vis``, by "<queue>#<shard>" (``dq`` and ``xp``
# are copied from ``lq`` inside the update that ends a job).
GSIS = (
    _gsi(VIS_INDEX, "vq", "va", include=("st",)),
    _gsi(LIST_INDEX, "lq", "pk"),
    _gsi(DEAD_INDEX, "dq", "pk", include=("st",)),
    _gsi(EXPIRY_INDEX, "xp", "x"),
    _gsi(GROUP_INDEX, "g", "pk"),
)


# --- creating the table ---------------------------------------------------------------------------


def table_definition(table: str) -> dict[str, Any]:
    """CreateTable arguments: on-demand billing, the key schema and every index."""
    return {
        "TableName": table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": name, "AttributeType": kind} for name, kind in ATTRIBUTES.items()
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": list(GSIS),
    }


async def _wait_active(client: Any, table: str, index: str | None = None) -> None:
    """Poll until the table (or one of its indexes) is ACTIVE."""
    for attempt in range(600):
        desc = (await client.describe_table(TableName=table))["Table"]
        status = desc.get("TableStatus")
        if index is not None:
            gsis = {g["IndexName"]: g for g in desc.get("GlobalSecondaryIndexes", [])}
            status = gsis.get(index, {}).get("IndexStatus")
        if status == "ACTIVE":
            return
        await asyncio.sleep(min(5.0, 0.05 * 2**attempt))
    raise BackendError(f"dynamodb table {table} did not become active")


async def ensure_table(client: Any, table: str) -> list[str]:
    """Create the table, its missing indexes and its TTL; answer what was done. Idempotent."""
    try:
        return await _ensure_table(client, table)
    except aws.driver_errors() as exc:
        raise _translate("init", exc) from exc


async def _ensure_table(client: Any, table: str) -> list[str]:
    done: list[str] = []
    try:
        desc = (await client.describe_table(TableName=table))["Table"]
    except client.exceptions.ResourceNotFoundException:
        with contextlib.suppress(client.exceptions.ResourceInUseException):
            await client.create_table(**table_definition(table))
            done.append(f"created table {table} (on-demand) with indexes {_index_names()}")
        await _wait_active(client, table)
        desc = (await client.describe_table(TableName=table))["Table"]
    have = {g["IndexName"] for g in desc.get("GlobalSecondaryIndexes", [])}
    for gsi in GSIS:
        if gsi["IndexName"] in have:
            continue
        keys = {k["AttributeName"] for k in gsi["KeySchema"]}
        await client.update_table(
            TableName=table,
            AttributeDefinitions=[
                {"AttributeName": a, "AttributeType": t} for a, t in ATTRIBUTES.items() if a in keys
            ],
            GlobalSecondaryIndexUpdates=[{"Create": gsi}],
        )
        await _wait_active(client, table, gsi["IndexName"])
        done.append(f"created index {gsi['IndexName']} on {table}")
    ttl = await client.describe_time_to_live(TableName=table)
    if ttl["TimeToLiveDescription"].get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        await client.update_time_to_live(
            TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"}
        )
        done.append(f"enabled TTL on {table}.ttl")
    return done


def _index_names() -> str:
    return ", ".join(g["IndexName"] for g in GSIS)


async def init_table(settings: DynamoSettings) -> list[str]:
    """``arqd init-aws`` for the queue: create what is missing; answer what was done."""
    async with contextlib.AsyncExitStack() as stack:
        client = await aws.open_client(stack, "dynamodb", settings, _client_config(settings))
        done = await ensure_table(client, settings.table)
    return done or [f"table {settings.table} is ready (nothing to do)"]
