"""The short chaos run of CI: three daemons on one backend through kills, SIGTERMs, pauses past
their leases, good and broken reloads, (DynamoDB) backend faults and (PostgreSQL, Redis) restarts
and freezes of the server; every job ends exactly once with the right result, and every duplicate
execution is explained by the chaos.

``ARQD_CHAOS_SEED`` replays a seed (each run prints its own); ``ARQD_CHAOS_SECONDS`` stretches
the chaos phase. The soak is ``python -m tests.chaos --minutes 30``."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.servers import PostgresServer, RedisServer

from .analysis import Report
from .driver import Settings, redis_for_chaos, run_chaos

CHAOS_SECONDS = float(os.environ.get("ARQD_CHAOS_SECONDS", "30"))
pytestmark = pytest.mark.timeout(int(CHAOS_SECONDS * 2 + 120))


def seed() -> int:
    return int(os.environ.get("ARQD_CHAOS_SEED") or random.randrange(1_000_000))


def check(report: Report, backend: str) -> None:
    """The verdict, plus proof that the chaos happened (a run without it proves nothing)."""
    shown = [report.summary(), report.details(), *report.violations[:20]]
    assert report.violations == [], "\n".join(shown)
    assert report.lost == 0
    assert report.jobs > 50
    assert report.kills > 0 and report.pauses > 0 and report.terms > 0
    assert report.reloads > 0 and report.bad_reloads > 0
    assert report.duplicates > 0 and report.explained == report.duplicates
    assert report.blobs_checked > 0 and report.step_calls > 0
    if backend == "dynamodb":
        assert report.faults > 0
    if backend in ("postgres", "redis"):
        assert report.server_restarts > 0 and report.server_pauses > 0


async def test_chaos_sqlite(tmp_path: Path) -> None:
    """Three daemons sharing one sqlite file survive seeded chaos with no job lost or doubled."""
    settings = Settings.of("sqlite", tmp_path, seed(), CHAOS_SECONDS)
    check(await run_chaos(settings), "sqlite")


async def test_chaos_dynamodb(tmp_path: Path, moto_url: str) -> None:
    """Three daemons sharing a DynamoDB table and an S3 bucket (moto, each daemon behind its own
    fault proxy) survive seeded chaos and fault bursts with no job lost or doubled."""
    settings = Settings.of("dynamodb", tmp_path, seed(), CHAOS_SECONDS, moto_url)
    check(await run_chaos(settings), "dynamodb")


async def test_chaos_postgres(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """Three daemons sharing a database of the session's PostgreSQL cluster (results in files)
    survive seeded chaos, the server itself restarted and frozen mid-run, with no job lost or
    doubled; the cluster is up and answering afterwards, for the tests that follow."""
    settings = Settings.of("postgres", tmp_path, seed(), CHAOS_SECONDS, server=postgres_server)
    try:
        check(await run_chaos(settings), "postgres")
    finally:
        conn = await asyncpg.connect(postgres_server.dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


@pytest.fixture
def chaos_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own (AOF, fsync always): restarting the session's server,
    which runs without persistence, would empty it under the tests that follow."""
    with redis_for_chaos() as server:
        yield server


async def test_chaos_redis(tmp_path: Path, chaos_redis: RedisServer) -> None:
    """Three daemons sharing a Redis under a prefix of their own (results in files) survive
    seeded chaos, the server itself restarted (a clean shutdown or a kill -9, AOF on) and frozen
    mid-run, with no acknowledged job lost or doubled; the server is up and answering after."""
    settings = Settings.of("redis", tmp_path, seed(), CHAOS_SECONDS, server=chaos_redis)
    try:
        check(await run_chaos(settings), "redis")
    finally:
        client = Redis.from_url(chaos_redis.url, socket_timeout=10, decode_responses=True)
        try:
            assert await client.ping()
            assert await client.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            await client.aclose()
