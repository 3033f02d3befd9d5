"""One suite, two clients: ``arqd.Client`` (in-process) and ``arqd.HttpClient`` (over HTTP to the
same app served on loopback) have the same methods, return types and exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

import arqd
from arqd.config import Config
from arqd.http.server import make_app


def config(tmp_path: Path) -> Config:
    return Config.from_dict(
        {
            "queue": {"backend": "sqlite", "path": str(tmp_path / "q.sqlite3")},
            "results": {"path": str(tmp_path / "results"), "inline_max": "1KiB"},
            "workers": {"concurrency": 4, "heartbeat": "100ms", "poll_max": "50ms"},
            "defaults": {"backoff": {"base": "10ms", "max": "20ms"}},
            "handlers": {
                "echo": "arqd.demo:echo",
                "blob": "arqd.demo:blob",
                "fail": "arqd.demo:fail",
                "sleep": "arqd.demo:sleep",
            },
        }
    )


@pytest.fixture(params=["inprocess", "http"])
async def client(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    app = arqd.App(config(tmp_path))
    async with app:
        if request.param == "inprocess":
            yield app.client
            return
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with arqd.HttpClient(str(server.make_url(""))) as http:
                yield http
        finally:
            await server.close()


async def test_submit_wait_result(client: Any):
    """submit → wait → result answers the handler's JSON value as an arqd.Job chain."""
    job = await client.submit("echo", {"n": [1, 2]}, meta={"who": "test"})
    assert isinstance(job, arqd.Job) and job.state == "queued" and job.meta == {"who": "test"}
    done = await client.wait(job.id, timeout=20)
    assert isinstance(done, arqd.Job) and done.state is arqd.State.SUCCEEDED
    assert done.result is not None and done.result.inline == {"n": [1, 2]}
    assert await client.result(job.id) == {"n": [1, 2]}
    got = await client.get(job.id)
    assert got.id == job.id and got.attempts == 1


async def test_blob_results_read_and_stream(client: Any):
    """A bytes result reads back as bytes; a streamed one streams in chunks."""
    whole = await client.submit("blob", {"size": 3000, "stream": False})
    streamed = await client.submit("blob", {"size": 2_000_000})
    await client.wait(whole.id, timeout=20)
    await client.wait(streamed.id, timeout=20)
    data = await client.result(whole.id)
    assert isinstance(data, bytes) and len(data) == 3000
    size = 0
    async for chunk in client.stream_result(streamed.id):
        assert isinstance(chunk, bytes)
        size += len(chunk)
    assert size == 2_000_000


async def test_submit_many_and_dedupe(client: Any):
    """submit_many answers jobs in order; a held key answers the live job, deduplicated."""
    jobs = await client.submit_many([{"handler": "echo", "payload": i} for i in range(3)])
    assert [j.payload for j in jobs] == [0, 1, 2]
    first = await client.submit("echo", 1, key="same", delay=60)
    again = await client.submit("echo", 2, key="same")
    assert again.id == first.id and again.deduplicated


async def test_list_pages(client: Any):
    """list pages newest first with a cursor."""
    for i in range(3):
        await client.submit("echo", i, delay=60)
    page, cursor = await client.list(limit=2)
    assert [j.payload for j in page] == [2, 1] and cursor
    rest, end = await client.list(limit=2, cursor=cursor)
    assert [j.payload for j in rest] == [0] and end is None


async def test_cancel_and_delete(client: Any):
    """cancel answers the cancelled job; delete removes a finished job for good."""
    job = await client.submit("echo", 1, delay=60)
    cancelled = await client.cancel(job.id)
    assert cancelled.state == "cancelled"
    assert (await client.cancel(job.id)).state == "cancelled"  # terminal: unchanged
    await client.delete(job.id)
    with pytest.raises(arqd.JobNotFound):
        await client.get(job.id)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get("0" * 32), arqd.JobNotFound),
        (lambda c: c.get("bogus"), arqd.JobNotFound),
        (lambda c: c.submit("no-such-handler"), arqd.UnknownHandler),
        (lambda c: c.submit("echo", max_attempts=0), arqd.InvalidRequest),
        (lambda c: c.submit_many([{"handler": "echo", "oops": 1}]), arqd.InvalidRequest),
        (lambda c: c.list(limit=0), arqd.InvalidRequest),
    ],
)
async def test_errors_are_the_same(client: Any, call: Any, error: type[Exception]):
    """Each misuse raises the same arqd exception from either client."""
    with pytest.raises(error):
        await call(client)


async def test_result_errors(client: Any):
    """result() of a queued, failed or cancelled job raises NotReady, JobFailed, JobCancelled."""
    queued = await client.submit("echo", 1, delay=60)
    with pytest.raises(arqd.NotReady):
        await client.result(queued.id)
    await client.cancel(queued.id)
    with pytest.raises(arqd.JobCancelled):
        await client.result(queued.id)
    failed = await client.submit("fail", {"permanent": True})
    await client.wait(failed.id, timeout=20)
    with pytest.raises(arqd.JobFailed):
        await client.result(failed.id)


async def test_wait_times_out(client: Any):
    """wait() raises TimeoutError when the job is not done in time."""
    job = await client.submit("sleep", {"seconds": 5})
    with pytest.raises(TimeoutError):
        await client.wait(job.id, timeout=0.3)
    await client.cancel(job.id)
    await asyncio.sleep(0)
