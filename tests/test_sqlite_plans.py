"""The sqlite backend's hot statements use indexes, so their cost grows with log n, not n.

Checked on the query plan rather than by timing (timings belong in benchmarks/scale.py)."""

from __future__ import annotations

import sqlite3

import pytest

from arqd.backends import sqlite_queries as sq
from arqd.backends.base import ListFilter
from arqd.model import State

HOT = {
    "lease": (
        sq.LEASE,
        {
            "now": 1,
            "token": "t",
            "expires": 2,
            "worker": "w",
            "queue": "q",
            "state": "queued",
            "limit": 100,
        },
    ),
    "lease probe": (sq.ANY_VISIBLE, ("q", "queued", 1)),
    "droppable": (sq.DROPPABLE, ("", 0, 1e18, 1000)),
    "drop take": (sq.DROP_TAKE, ("id",)),
    "heartbeat": (sq.HEARTBEAT, (1, "id", "t")),
    "update": (sq.UPDATE, ("{}", None, None, "id", "t")),
    "requeue": (sq.REQUEUE, (0, 1, 1, 1, None, "id", "t")),
    "end": (sq.END, ("succeeded", 0, 1, 1, None, None, None, "id", "t")),
    "get": (sq.GET, ("id",)),
    "oldest": (sq.OLDEST, ("q", 1)),
    "key holder": (sq.KEY_HOLDER, ("k", 1)),
}


@pytest.mark.parametrize("name", sorted(HOT))
def test_hot_statement_never_scans_jobs(name: str):
    """No hot-path statement walks the whole jobs table."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(sq.SCHEMA)
    sql, params = HOT[name]
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "SCAN jobs" not in plan, plan
    assert "SEARCH" in plan, plan


def test_lease_walks_the_visibility_index():
    """Leasing finds ready jobs through jobs_visible, in visibility order, without sorting."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(sq.SCHEMA)
    sql, params = HOT["lease"]
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "jobs_visible" in plan and "TEMP B-TREE" not in plan, plan


def test_lease_probe_reads_only_the_visibility_index():
    """The probe before each lease statement never touches the table itself."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(sq.SCHEMA)
    sql, params = HOT["lease probe"]
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "COVERING INDEX jobs_visible" in plan, plan


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_listing_dead_jobs_uses_the_partial_index(state: str):
    """Failed and cancelled jobs are few among millions: listing them (the dashboard does,
    every few seconds) must not walk the table."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(sq.SCHEMA)
    sql, params = sq.list_sql(ListFilter(state=State(state)), 10, None)
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "jobs_dead" in plan and "SCAN" not in plan, plan


def test_redrive_uses_the_partial_index():
    conn = sqlite3.connect(":memory:")
    conn.executescript(sq.SCHEMA)
    params = {"ready": 1, "attempts": 0, "queue": "q"}
    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sq.REDRIVE, params))
    assert "jobs_dead" in plan and "SCAN" not in plan, plan
