"""The HTTP API's bounds, in process: the status cache in bytes, job pages in bytes, held
requests (long-polls, event streams) in number, and long-polls that hold on terminal jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import arqd
from arqd.config import Config
from arqd.http import server as http_server
from arqd.http.cache import ChangeCache
from arqd.http.server import STATE, make_app
from arqd.model import Job

from .util import eventually

PARKED = "parked"  # no consumer: jobs stay queued


def config(tmp_path: Path, **server: Any) -> Config:
    return Config.from_dict(
        {
            "server": server,
            "queue": {"backend": "sqlite", "path": str(tmp_path / "q.sqlite3")},
            "results": {"path": str(tmp_path / "results")},
            "workers": {"concurrency": 2, "poll_max": "50ms"},
            "handlers": {"echo": "arqd.demo:echo"},
        }
    )


class Served:
    def __init__(self, app: arqd.App, server: TestServer, http: aiohttp.ClientSession) -> None:
        self.app, self.server, self.http = app, server, http

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def submit(self, payload: Any = None, queue: str = PARKED) -> dict[str, Any]:
        spec = {"handler": "echo", "payload": payload, "queue": queue}
        async with self.http.post(self.url("/v1/jobs"), json=spec) as resp:
            assert resp.status == 202, await resp.text()
            job: dict[str, Any] = await resp.json()
            return job


async def serve(app: arqd.App) -> AsyncIterator[Served]:
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                yield Served(app, server, http)
        finally:
            await server.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in serve(arqd.App(config(tmp_path, max_held=3))):
        yield s


async def test_cache_is_bounded_in_bytes_and_keeps_no_job(served: Served):
    """The status cache keeps encoded bodies within ``server.status_cache`` bytes, evicting the
    oldest, and holds no decoded job (only the body and a few small fields)."""
    cache = ChangeCache(max_bytes=3 * 110_000)
    ids = [(await served.submit("x" * 100_000))["id"] for _ in range(5)]
    jobs = [await served.app.core.get(job_id) for job_id in ids]
    for job in jobs:
        entry = cache.put(job)
        assert entry.body.startswith(b"{") and entry.etag == job.etag
        assert not any(isinstance(getattr(entry, f), Job) for f in entry.__slots__)
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert [cache.fresh(j.id) is not None for j in jobs] == [False, False, True, True, True]
    tiny = ChangeCache(max_bytes=1000)
    assert tiny.put(jobs[0]).etag == jobs[0].etag and len(tiny) == 0  # too big to keep


async def test_cache_entries_leave_when_stale(served: Served):
    """An entry older than the cache's TTL is evicted at the next look, not kept to the size
    bound."""
    cache = ChangeCache(max_bytes=10**6, ttl=0.0)
    job = await served.app.core.get((await served.submit(1))["id"])
    cache.put(job)
    await eventually(lambda: cache.fresh(job.id) is None and len(cache) == 0)


async def test_pages_of_large_jobs_end_early_with_a_cursor(
    served: Served, monkeypatch: pytest.MonkeyPatch
):
    """A page whose JSON passes ``LIST_BYTES`` ends early with a ``next`` cursor; following the
    cursors yields every job once, newest first, as one big page would."""
    monkeypatch.setattr(http_server, "LIST_BYTES", 250_000)
    ids = [(await served.submit({"i": i, "pad": "x" * 60_000}))["id"] for i in range(9)]
    seen: list[str] = []
    pages: list[int] = []
    cursor: str | None = None
    while True:
        params = {"queue": PARKED, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        async with served.http.get(served.url("/v1/jobs"), params=params) as resp:
            assert resp.status == 200
            assert len(await resp.read()) < 250_000 + 70_000
            page = await resp.json()
        seen += [job["id"] for job in page["jobs"]]
        pages.append(len(page["jobs"]))
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == [5, 4]  # 60 KB jobs: the fifth passes 250 KB
    async with served.http.get(served.url("/v1/jobs"), params={"limit": "2"}) as resp:
        small = await resp.json()
    assert len(small["jobs"]) == 2 and small["next"] == small["jobs"][1]["id"]


async def long_poll(served: Served, job_id: str, wait: float, **headers: str) -> tuple[int, Any]:
    url = served.url(f"/v1/jobs/{job_id}")
    async with served.http.get(url, params={"wait": f"{wait:g}"}, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_long_poll_holds_a_terminal_job(served: Served):
    """``?wait=`` on a terminal job holds the request (it is watched, not answered) until the
    job is deleted (404) or ``wait`` passes (200, or 304 with a matching ``If-None-Match``); a
    different ETag answers at once."""
    job_id = (await served.submit("done", queue="default"))["id"]
    done = await served.app.client.wait(job_id, timeout=10)
    hub = served.app.core.hub

    held = asyncio.create_task(long_poll(served, job_id, 60))
    await eventually(lambda: job_id in hub.watched() or held.done())
    assert not held.done(), "a long-poll of a terminal job answered at once"
    await served.app.client.delete(job_id)
    status, _ = await asyncio.wait_for(held, 10)
    assert status == 404

    job_id = (await served.submit("done", queue="default"))["id"]
    done = await served.app.client.wait(job_id, timeout=10)
    assert (await long_poll(served, job_id, 0.2))[0] == 200
    assert (await long_poll(served, job_id, 0.2, **{"If-None-Match": done.etag}))[0] == 304
    stale = asyncio.create_task(long_poll(served, job_id, 60, **{"If-None-Match": '"x-1"'}))
    assert (await asyncio.wait_for(stale, 10))[0] == 200


async def test_held_requests_are_capped_and_freed_when_clients_leave(served: Served):
    """Beyond ``server.max_held`` (3 here) a long-poll or event stream gets 429 with
    ``Retry-After``; a client that hangs up frees its place and its hub watcher. (The test
    server cancels such handlers itself; ``arqd serve`` does not, and tests/test_bounds.py
    checks that it notices them all the same.)"""
    job_id = (await served.submit())["id"]
    state = served.server.app[STATE]
    sessions = [aiohttp.ClientSession() for _ in range(3)]
    try:
        polls = [
            asyncio.create_task(s.get(served.url(f"/v1/jobs/{job_id}"), params={"wait": "60"}))
            for s in sessions
        ]
        await eventually(lambda: len(state.held) == 3)
        assert (await long_poll(served, job_id, 0))[0] == 200  # not held: not counted
        async with served.http.get(served.url(f"/v1/jobs/{job_id}"), params={"wait": "1"}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "rate_limited"
        async with served.http.get(served.url(f"/v1/jobs/{job_id}/events")) as resp:
            assert resp.status == 429
        for poll in polls:
            poll.cancel()
        for s in sessions:
            await s.close()
        await eventually(lambda: len(state.held) == 0, limit=10)
        assert job_id not in served.app.core.hub.watched()
        async with served.http.get(served.url(f"/v1/jobs/{job_id}/events")) as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"event: state")
    finally:
        for s in sessions:
            await s.close()
