"""The postgres backend's statements use their indexes at a million rows, so their cost grows
with log n, not n: pinned on the planner's plans (generic and custom: asyncpg prepares every
statement, and PostgreSQL may switch a prepared statement to its generic plan), never by timing
(timings belong in benchmarks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from arqd.backends.base import ListFilter
from arqd.backends.postgres import PostgresQueue
from arqd.backends.postgres import queries as q
from arqd.model import State

from .conftest import drop_postgres_schema, postgres_schema
from .servers import PostgresServer

ROWS = 1_000_000
T = "ARRAY['a']::text[]"
F = "ARRAY[1.0]::float8[]"
I = "ARRAY[0]::integer[]"  # noqa: E741 - one letter per array type, as T and F
B = "ARRAY[false]::boolean[]"

# Each hot statement with values for its parameters (SQL literals); the generic plan ignores them.
HOT: dict[str, tuple[str, list[str]]] = {
    "lease": (q.LEASE, ["ARRAY['q1','q2']::text[]", "5e5", "100", "'t'", "2e6", "'w'", "0"]),
    "heartbeat": (q.HEARTBEAT, [T, T, "1.0"]),
    "update": (q.UPDATE, [T, T, T, T, T]),
    "finish": (q.FINISH, [T, T, T, I, F, T, T, F, F, "1.0", B, B, "0", "'c'", T]),
    "lease again": (q.LEASE_AGAIN, ["ARRAY['q1','q2']::text[]", "5e5", "'t'"]),
    "keys free": (q.KEYS_FREE, [T, T]),
    "key take": (q.KEY_TAKE, ["'k'", "'j'", "1.0"]),
    "key holder": (q.KEY_HOLDER, ["'k'", "1.0"]),
    "get": (q.GET, ["'j'"]),
    "get many": (q.GET_MANY, [T]),
    "versions": (q.VERSIONS, [T]),
    "cancel queued": (q.CANCEL_QUEUED, ["1.0", "'j'"]),
    "cancel running": (q.CANCEL_RUNNING, ["'j'"]),
    "delete": (q.DELETE, ["'j'"]),
    "sweep": (q.SWEEP, ["1.0", "100"]),
    "droppable": (q.DROPPABLE, ["''", "false", "1e18", "100"]),
    "drop": (q.DROP, ["'{}'", T]),
    "oldest": (q.OLDEST, ["'q1'", "5e5"]),
    "redrive": (q.REDRIVE, ["'q1'", "0", "1.0"]),
}
for state in ("failed", "cancelled"):
    sql, params = q.list_sql(ListFilter(queue="q1", state=State(state)), 50, None)
    HOT[f"list {state}"] = (sql, ["'q1'", f"'{state}'", "51"])


@pytest.fixture(scope="module")
def plans_server() -> Iterator[PostgresServer]:
    """A server of this module's own: its million rows never slow the other tests' server."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def million(plans_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """A schema holding a million jobs, as a busy queue's history looks: mostly succeeded, some
    queued and running in two queues, a few failed and cancelled, every tenth with a key."""
    schema = postgres_schema()
    asyncio.run(fill(plans_server.dsn, schema))
    yield plans_server.dsn, schema
    asyncio.run(drop_postgres_schema(plans_server.dsn, schema))


async def fill(dsn: str, schema: str) -> None:
    async with PostgresQueue(dsn, schema=schema, statement_timeout=600):
        pass
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        await conn.execute(
            """
            INSERT INTO jobs (id, queue, handler, state, payload, key, max_attempts, timeout,
                              created_at, ready_at, visible_at, finished_at, expires_at, result)
            SELECT lpad(i::text, 12, '0'), CASE WHEN i % 2 = 0 THEN 'q1' ELSE 'q2' END, 'h', s,
                   '{}', CASE WHEN i % 10 = 0 THEN 'k' || i END, 3, 10, i, i,
                   CASE WHEN s IN ('queued', 'running') THEN i END,
                   CASE WHEN s NOT IN ('queued', 'running') THEN i END,
                   CASE WHEN s NOT IN ('queued', 'running') THEN i + 1e6 END,
                   CASE WHEN s = 'succeeded' THEN '{"area": "temporary"}'::json END
            FROM (SELECT i, CASE WHEN i % 100 < 3 THEN 'queued' WHEN i % 100 < 5 THEN 'running'
                                 WHEN i % 1000 = 7 THEN 'failed' WHEN i % 1000 = 9 THEN 'cancelled'
                                 ELSE 'succeeded' END AS s
                  FROM generate_series(1, $1) AS i) g
            """,
            ROWS,
        )
        await conn.execute(
            "INSERT INTO dedupe (key, job_id) SELECT key, id FROM jobs WHERE key IS NOT NULL"
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every (node type, relation, index) of a JSON plan, depth first; a Sort is named after
    the relations below it (``Sort``, ``jobs`` sorts rows read from jobs)."""
    below: list[tuple[str, str, str]] = []
    for child in plan.get("Plans", []):
        below += scans(child)
    relation = plan.get("Relation Name", "")
    if plan["Node Type"] == "Sort":
        relation = ",".join(sorted({n[1] for n in below if n[1] and n[0].endswith("Scan")}))
    return [(plan["Node Type"], relation, plan.get("Index Name", "")), *below]


async def plan_of(dsn: str, schema: str, name: str, mode: str) -> list[tuple[str, str, str]]:
    sql, params = HOT[name]
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute(f"PREPARE s AS {sql}")
        text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE s({', '.join(params)})")
        return scans(json.loads(text)[0]["Plan"])
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
@pytest.mark.parametrize("name", sorted(HOT))
async def test_hot_statement_never_scans_a_table(
    million: tuple[str, str], name: str, mode: str
) -> None:
    """No statement of the backend reads the whole jobs (or dedupe) table at a million rows."""
    nodes = await plan_of(*million, name, mode)
    seq = [n for n in nodes if n[0] == "Seq Scan" and n[1] in ("jobs", "dedupe")]
    assert not seq, nodes


@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
async def test_lease_walks_the_visibility_index(million: tuple[str, str], mode: str) -> None:
    """Leasing finds ready jobs and expired leases through jobs_visible, in its order (the only
    sort is of the leased rows' count changes, a CTE's, never of jobs read from the table)."""
    nodes = await plan_of(*million, "lease", mode)
    assert ("Index Scan", "jobs", "jobs_visible") in nodes, nodes
    assert not any(n[0] == "Sort" and "jobs" in n[1].split(",") for n in nodes), nodes
