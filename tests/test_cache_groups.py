"""The request cache (TTL, sticky, purge, sweeper) and groups, on every local backend and over
both clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

import arqd
from arqd.backends.base import QueueBackend
from arqd.backends.memory import MemoryQueue
from arqd.backends.sqlite import SqliteQueue
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.http.server import make_app
from arqd.results.base import ResultStore
from arqd.results.files import FileResults
from arqd.results.memory import MemoryResults

from .util import eventually

TTL = 3600.0


def config(tmp_path: Path, **extra: Any) -> Config:
    return Config.from_dict(
        {
            "queue": {"backend": "sqlite", "path": str(tmp_path / "q.sqlite3")},
            "results": {
                "path": str(tmp_path / "results"),
                "inline_max": "1KiB",
                "temporary_ttl": f"{TTL:g}s",
            },
            "workers": {"concurrency": 4, "heartbeat": "100ms", "poll_max": "50ms"},
            "defaults": {"max_attempts": 1},
            "handlers": {
                "echo": "arqd.demo:echo",
                "blob": "arqd.demo:blob",
                "fail": "arqd.demo:fail",
                "sleep": "arqd.demo:sleep",
                "cached": {"call": "tests.test_cache_groups:cached", "cache": True},
            },
            "groups": {
                "nightly": {
                    "jobs": [
                        {"name": "a", "handler": "echo", "payload": 1},
                        {"name": "b", "handler": "echo", "payload": 2},
                        {"name": "c", "handler": "fail", "payload": {"permanent": True}},
                    ]
                }
            },
            **extra,
        }
    )


RUNS: list[Any] = []


async def cached(ctx: arqd.JobContext, payload: Any) -> Any:
    """A cache=true handler that counts its runs."""
    RUNS.append(payload)
    await asyncio.sleep(0.1)
    return {"answer": payload}


def _backends(
    kind: str, tmp_path: Path, clock: ManualClock, request: pytest.FixtureRequest
) -> tuple[QueueBackend, ResultStore]:
    if kind == "memory":
        return MemoryQueue(clock=clock), MemoryResults(clock=clock)
    if kind == "sqlite":
        return (
            SqliteQueue(str(tmp_path / "q.sqlite3"), clock=clock),
            FileResults(str(tmp_path / "results"), clock=clock),
        )
    from arqd.backends.dynamodb import DynamoQueue
    from arqd.results.s3 import S3Results

    from .conftest import dynamo_settings, s3_settings

    url = request.getfixturevalue("moto_url")
    return DynamoQueue(dynamo_settings(url), clock=clock), S3Results(s3_settings(url), clock=clock)


@pytest.fixture(params=["memory", "sqlite", "dynamodb"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[arqd.App]:
    clock = ManualClock(start=1_800_000_000.0)
    queue, results = _backends(request.param, tmp_path, clock, request)
    application = arqd.App(config(tmp_path), queue=queue, results=results)
    async with queue, results, application:
        yield application


def clock_of(app: arqd.App) -> ManualClock:
    clock = app.core.clock
    assert isinstance(clock, ManualClock)
    return clock


@pytest.fixture
async def http_client(app: arqd.App) -> AsyncIterator[arqd.HttpClient]:
    server = TestServer(make_app(app), host="127.0.0.1")
    await server.start_server()
    try:
        async with arqd.HttpClient(str(server.make_url(""))) as client:
            yield client
    finally:
        await server.close()


async def test_two_clients_share_one_cached_run(app: arqd.App, http_client: arqd.HttpClient):
    """Two clients submitting the same cached request at once get the same job id; the handler
    runs once; a later identical request is a dedupe hit on the cached result."""
    RUNS.clear()
    second = arqd.HttpClient(http_client.url)
    async with second:
        a, b = await asyncio.gather(
            http_client.submit("cached", {"q": "sales", "year": 2026}),
            second.submit("cached", {"year": 2026, "q": "sales"}),
        )
    assert a.id == b.id and (a.deduplicated or b.deduplicated)
    done = await http_client.wait(a.id, timeout=20)
    assert done.state == "succeeded"
    again = await http_client.submit("cached", {"q": "sales", "year": 2026})
    assert again.id == a.id and again.deduplicated
    assert len(RUNS) == 1


async def test_temporary_results_expire_and_are_swept(app: arqd.App):
    """A temporary result answers 410 once its TTL passed, frees its key, and the sweeper then
    deletes the record and its blob; a sticky result outlives the TTL."""
    temp = await app.client.submit("blob", {"size": 5000, "stream": False}, key="t")
    sticky = await app.client.submit("blob", {"size": 5000, "stream": False}, sticky=True)
    for job in (temp, sticky):
        await app.client.wait(job.id, timeout=20)
    done = await app.core.get(temp.id)  # the stored record: it says where the blob is
    assert done.result is not None and done.result.area == "temporary"
    assert await app.client.result(temp.id) == (bytes(range(256)) * 20)[:5000]
    clock_of(app).advance(TTL + 1)
    with pytest.raises(arqd.ResultExpired):
        await app.client.result(temp.id)
    fresh = await app.client.submit("blob", {"size": 10, "stream": False}, key="t")
    assert fresh.id != temp.id and not fresh.deduplicated
    assert await app.core.sweep() >= 1
    with pytest.raises(arqd.JobNotFound):
        await app.client.get(temp.id)
    assert await app.core.results.size("temporary", done.result.name or "") is None
    assert len(await app.client.result(sticky.id)) == 5000


async def test_purge_drops_an_area(app: arqd.App, http_client: arqd.HttpClient):
    """DELETE /v1/cache?area=persistent drops sticky results (410 afterwards, key freed) and
    leaves temporary ones; area=temporary the reverse."""
    sticky = await http_client.submit("echo", {"v": 1}, sticky=True, key="s")
    temp = await http_client.submit("echo", {"v": 2}, key="k")
    for job in (sticky, temp):
        await http_client.wait(job.id, timeout=20)
    assert await http_client.purge("persistent") == 1
    with pytest.raises(arqd.ResultExpired):
        await http_client.result(sticky.id)
    assert await http_client.result(temp.id) == {"v": 2}
    again = await http_client.submit("echo", {"v": 1}, sticky=True, key="s")
    assert again.id != sticky.id
    assert await http_client.purge("temporary") == 1
    with pytest.raises(arqd.ResultExpired):
        await http_client.result(temp.id)
    with pytest.raises(arqd.InvalidRequest):
        await http_client.purge("everything")


async def test_group_with_a_failing_job(app: arqd.App, http_client: arqd.HttpClient):
    """A config group of three jobs, one failing: state failed, counts right, progress 1."""
    group = await http_client.trigger_group("nightly")
    assert [j.name for j in group.jobs] == ["a", "b", "c"]
    for member in group.jobs:
        await http_client.wait(member.id, timeout=20)
    status = await http_client.group(group.id)
    assert status.state == "failed" and status.name == "nightly"
    assert status.counts["succeeded"] == 2 and status.counts["failed"] == 1
    assert status.progress == 1.0 and len(status.jobs) == 3
    assert {j.group_id for j in status.jobs} == {group.id}
    with pytest.raises(arqd.UnknownGroup):
        await http_client.trigger_group("weekly")


async def test_cancelling_a_running_group(app: arqd.App, http_client: arqd.HttpClient):
    """Cancelling a running group cancels its queued jobs and its running one."""
    group = await http_client.submit_group(
        [
            {"name": "long", "handler": "sleep", "payload": {"seconds": 60}},
            {"name": "later1", "handler": "echo", "payload": 1, "delay": 600},
            {"name": "later2", "handler": "echo", "payload": 2, "delay": 600},
        ],
        name="adhoc",
    )
    long_id = group.jobs[0].id

    async def running() -> bool:
        return (await http_client.get(long_id)).state == "running"

    await eventually(running)
    status = await http_client.group(group.id)
    assert status.state == "running" and status.counts["running"] == 1
    assert await http_client.cancel_group(group.id) == 3
    for member in group.jobs:
        assert (await http_client.wait(member.id, timeout=20)).state == "cancelled"
    assert (await http_client.group(group.id)).state == "failed"


async def test_ad_hoc_group_is_all_or_nothing(app: arqd.App, http_client: arqd.HttpClient):
    """An ad-hoc group with one invalid job stores nothing; duplicate names are refused."""
    with pytest.raises(arqd.UnknownHandler):
        await http_client.submit_group([{"handler": "echo"}, {"handler": "nope"}])
    with pytest.raises(arqd.InvalidRequest):
        await http_client.submit_group(
            [{"handler": "echo", "name": "x"}, {"handler": "echo", "name": "x"}]
        )
    jobs, _ = await http_client.list()
    assert jobs == []
    with pytest.raises(arqd.JobNotFound):
        await http_client.group("0" * 32)
