"""One suite, two clients: ``arqd.Client`` (in-process) and ``arqd.HttpClient`` (over HTTP to the
same app served on loopback) have the same methods, return types and exceptions."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

import arqd
from arqd import follow
from arqd.api import JobsAPI
from arqd.config import Config
from arqd.http.server import make_app
from arqd.results.memory import MemoryResults

from .daemons import Daemons, sqlite_config
from .util import eventually


def settings(tmp_path: Path) -> dict[str, Any]:
    return {
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


def config(tmp_path: Path) -> Config:
    return Config.from_dict(settings(tmp_path))


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


# --- one view of a job, and cheap waits -------------------------------------------------------

SECRET = "s3cret-token-for-tests"


def config_with_token(tmp_path: Path) -> Config:
    """``config`` plus a token ``web``, so jobs submitted over HTTP have an owner."""
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    base = settings(tmp_path)
    base["auth"] = {"tokens": [{"name": "web", "sha256": digest, "scopes": ["admin"]}]}
    return Config.from_dict(base)


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[tuple[arqd.App, arqd.HttpClient]]:
    """One app, read by its in-process client and by an HttpClient holding the token ``web``."""
    app = arqd.App(config_with_token(tmp_path))
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with arqd.HttpClient(str(server.make_url("")), SECRET) as http:
                yield app, http
        finally:
            await server.close()


def unversioned(jobs: list[arqd.Job]) -> list[arqd.Job]:
    """Jobs of a list or a group answer: over HTTP they carry no ETag, so no version."""
    return [msgspec.structs.replace(j, version=None) for j in jobs]


async def test_both_clients_answer_the_json_view(both: tuple[arqd.App, arqd.HttpClient]):
    """Client and HttpClient answer equal jobs, and that is the JSON's view: a result as inline
    JSON or size and content type (no storage area or name), a purged result as None, the key
    without its owner's namespace, no owner or checkpoint, and an etag matching the header."""
    app, http = both
    local = app.client
    inline = await http.submit("echo", {"n": 1}, key="mine")
    blob = await http.submit("blob", {"size": 3000, "stream": False}, sticky=True)
    failed = await local.submit("fail", {"permanent": True})
    for job in (inline, blob, failed):
        assert await local.wait(job.id, timeout=20) == await http.wait(job.id, timeout=20)
    for job in (inline, blob, failed):
        a, b = await local.get(job.id), await http.get(job.id)
        assert a == b
        raw = await http.request_json("GET", f"/v1/jobs/{job.id}")
        shown = set(raw) - {"links"}
        assert shown == set(arqd.Job.__struct_fields__) - {"version", "deduplicated"}
        assert a.version is not None and a.etag == f'"{job.id[-12:]}-{a.version}"'
    got = await local.get(inline.id)
    assert got.key == "mine" and got.result == arqd.ResultInfo(inline={"n": 1})
    for hidden in ("owner", "checkpoint"):
        assert not hasattr(got, hidden)
    assert (await local.get(blob.id)).result == arqd.ResultInfo(
        size=3000, content_type="application/octet-stream"
    )
    assert (await app.core.get(inline.id)).key == "@web/mine"  # the stored record is intact
    assert (await app.core.get(blob.id)).result.name is not None  # type: ignore[union-attr]
    await local.purge("persistent")
    dropped = await local.get(blob.id)
    assert dropped.result is None and dropped == await http.get(blob.id)
    page, _ = await local.list(limit=10)
    assert unversioned(page) == (await http.list(limit=10))[0]
    group = await http.submit_group([{"handler": "echo", "payload": 1}], name="g")
    await local.wait(group.jobs[0].id, timeout=20)
    a_group, b_group = await local.group(group.id), await http.group(group.id)
    assert unversioned(a_group.jobs) == b_group.jobs
    assert msgspec.structs.replace(a_group, jobs=[]) == msgspec.structs.replace(b_group, jobs=[])


def count_reads(queue: Any) -> Counter[str]:
    """Count the queue backend's reads of job records (``get``, ``get_many``) and version probes
    (``versions``), whoever makes them; ``followers`` counts the most follower tasks running at
    any of those calls."""
    calls: Counter[str] = Counter()
    for name in ("get", "get_many", "versions"):
        method = getattr(queue, name)

        async def counted(*args: Any, _name: str = name, _method: Any = method) -> Any:
            calls[_name] += 1
            calls["followers"] = max(calls["followers"], len(followers()))
            return await _method(*args)

        setattr(queue, name, counted)
    return calls


def followers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("arqd-follow")]


async def test_http_wait_long_polls_with_the_etag(tmp_path: Path):
    """HttpClient.wait on a 2 s job costs at most 5 requests: it long-polls with the ETag the
    daemon sent, where a made-up ETag never matched and it asked again at once, thousands of
    times."""
    app = arqd.App(config(tmp_path))
    web_app = make_app(app)
    seen: list[str] = []

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(f"{request.method} {request.path_qs} {response.status}")

    web_app.on_response_prepare.append(count)
    async with app:
        server = TestServer(web_app, host="127.0.0.1")
        await server.start_server()
        try:
            async with arqd.HttpClient(str(server.make_url(""))) as http:
                # queued for 0.5 s, then running for 2 s: two changes to wait through
                job = await http.submit("sleep", {"seconds": 2}, delay=0.5)
                seen.clear()
                done = await http.wait(job.id, timeout=20)
        finally:
            await server.close()
    assert done.state == "succeeded"
    assert len(seen) <= 5, f"{len(seen)} requests: {seen[:8]}"


async def test_a_change_made_while_a_long_poll_reads_the_job_answers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A job that changes while a long-poll's first read of it is in flight (the daemon's own
    pool finishing it, as a round trip on PostgreSQL did) answers the long-poll at once: it
    watched during the read. It waited for the follower's next round (up to 1 s; here, with the
    rounds an hour apart, until the client gave up)."""
    monkeypatch.setattr(follow, "FOLLOW_INTERVAL", 3600.0)
    app = arqd.App(config(tmp_path))
    async with app:
        job = await app.client.submit("sleep", {"seconds": 0}, delay=600)
        queue = app.core.queue
        read = queue.get
        armed = [True]

        async def get_then_change(job_id: str) -> Any:
            stale = await read(job_id)
            if armed[0] and job_id == job.id:
                armed[0] = False
                await app.client.cancel(job_id)  # the change lands while this read returns
            return stale

        monkeypatch.setattr(queue, "get", get_then_change)
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession(str(server.make_url(""))) as http:
                path, etag = f"/v1/jobs/{job.id}", job.etag
                async with http.get(
                    path, params={"wait": "20"}, headers={"If-None-Match": str(etag)}, timeout=10
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["state"] == "cancelled"
        finally:
            await server.close()


async def test_http_wait_outlasts_a_short_request_timeout(tmp_path: Path):
    """An HttpClient whose request timeout (3 s) is shorter than a long-poll's hold (60 s) holds
    its long-polls for less, so waiting on a 4 s job answers it instead of timing out."""
    app = arqd.App(config(tmp_path))
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with arqd.HttpClient(str(server.make_url("")), timeout=3) as http:
                job = await http.submit("sleep", {"seconds": 4})
                done = await http.wait(job.id, timeout=20)
        finally:
            await server.close()
    assert done.state == "succeeded"


async def test_inprocess_wait_reads_once_per_change(tmp_path: Path):
    """App.client.wait on a 2 s job reads the record once per change it sees (local changes
    through the hub, others through the app's one follower, no second follower started) and
    leaves the probing to that follower, where it read the job every 0.5 s."""
    app = arqd.App(config(tmp_path))
    async with app:
        job = await app.client.submit("sleep", {"seconds": 2})
        reads = count_reads(app.core.queue)
        done = await app.client.wait(job.id, timeout=20)
    assert done.state == "succeeded"
    assert reads["get"] + reads["get_many"] <= 3, reads
    assert reads["versions"] <= 3, reads
    assert reads["followers"] == 1, reads


async def test_bare_client_wait_follows_another_process(tmp_path: Path, daemons: Daemons):
    """A bare Client waiting on a job another process runs starts the follower of other
    processes' changes on demand, reads the record once per change it sees, and stops the
    follower when the wait ends."""
    d = daemons.start(sqlite_config(tmp_path))
    settings = {
        "queue": {"backend": "sqlite", "path": str(tmp_path / "q.sqlite3")},
        "results": {"path": str(tmp_path / "results")},
    }
    async with arqd.Client(config=Config.from_dict(settings)) as client:
        job = await client.submit("sleep", {"seconds": 2})
        reads = count_reads(client.core.queue)
        done = await client.wait(job.id, timeout=20)
        assert done.state == "succeeded" and done.attempts == 1
        assert reads["get"] + reads["get_many"] <= 3, reads
        assert reads["versions"] <= 4, reads
        assert reads["followers"] == 1, reads
        await eventually(lambda: not followers())
    assert d.url


# --- one interface: JobsAPI -------------------------------------------------------------------

API_METHODS = sorted(
    name
    for name, value in vars(JobsAPI).items()
    if callable(value) and (not name.startswith("_") or name in ("__aenter__", "__aexit__"))
)


def test_both_clients_have_every_method_of_the_interface_with_one_signature():
    """Client, HttpClient and JobsAPI name the same methods with the same parameters, defaults
    and annotations (mypy checks the types; this pins the names, which it lets differ)."""
    assert {"submit", "list", "queues", "redrive", "workers", "stream_result"} <= set(API_METHODS)
    for name in API_METHODS:
        want = inspect.signature(getattr(JobsAPI, name))
        for cls in (arqd.Client, arqd.HttpClient):
            assert inspect.signature(getattr(cls, name)) == want, f"{cls.__name__}.{name}"
    public = {n for n in vars(arqd.Client) if not n.startswith("_")}
    assert public - set(API_METHODS) == {"core", "from_config"}  # the in-process extras


async def test_queues_redrive_and_workers(client: Any):
    """queues counts each queue's jobs (the configured ones too), redrive requeues a queue's
    failed jobs, workers lists the app's pool: the same answers from either client."""
    failed = await client.submit("fail", {"permanent": True})
    await client.wait(failed.id, timeout=20)
    await client.submit("echo", 1, queue="elsewhere")  # no consumer takes this queue
    queues = {q.name: q for q in await client.queues()}
    assert all(isinstance(q, arqd.QueueInfo) for q in queues.values())
    assert queues["default"] == arqd.QueueInfo("default", failed=1)
    assert queues["elsewhere"].queued == 1 and queues["elsewhere"].oldest_queued_seconds is not None
    assert await client.redrive("elsewhere") == 0
    assert await client.redrive("default") == 1
    again = await client.wait(failed.id, timeout=20)
    assert again.state == "failed" and again.attempts == 1  # ran once more, from attempt 0
    with pytest.raises(arqd.JobNotFound):
        await client.redrive("no/such queue")
    (worker,) = await client.workers()
    assert isinstance(worker, arqd.WorkerInfo) and worker.concurrency == 4
    assert worker.started_at.tzinfo is not None and worker.last_seen >= worker.started_at


@pytest.mark.parametrize(
    "asked",
    [
        {"queue": ""},
        {"queue": "a/b"},
        {"group_id": ""},
        {"group_id": "not-a-group"},
        {"handler": ""},
        {"state": "lost"},
        {"cursor": "zz"},
        {"limit": 1001},
    ],
)
async def test_list_refuses_what_no_job_can_match(client: Any, asked: dict[str, Any]):
    """A listing filter no job can match, a cursor the API never gave out or a page too large
    is InvalidRequest from either client, stated for that parameter."""
    with pytest.raises(arqd.InvalidRequest, match=f"^{next(iter(asked))}: "):
        await client.list(**asked)


async def test_an_id_is_one_path_segment(client: Any):
    """A job id or group id holding '/' or '?' names no job or group: HttpClient no longer sent
    ``get(id + "/result")`` to the result route (and failed decoding the answer)."""
    job = await client.submit("echo", {"n": 1})
    await client.wait(job.id, timeout=20)
    for odd in (f"{job.id}/result", f"{job.id}?wait=1", f"{job.id}/cancel"):
        with pytest.raises(arqd.JobNotFound):
            await client.get(odd)
        with pytest.raises(arqd.JobNotFound):
            await client.cancel(odd)
    with pytest.raises(arqd.JobNotFound):
        await client.group(f"{job.id}/x")
    assert (await client.get(job.id)).state == "succeeded"


async def test_submit_group_takes_a_datetime_run_at(client: Any):
    """A group member's run_at may be a datetime, as for submit_many (HttpClient raised
    TypeError: its JSON encoder could not encode it)."""
    at = datetime.now(UTC) + timedelta(hours=1)
    group = await client.submit_group([{"handler": "echo", "run_at": at}], name="later")
    (member,) = (await client.group(group.id)).jobs
    assert member.ready_at == at.replace(microsecond=member.ready_at.microsecond)
    assert abs((member.ready_at - at).total_seconds()) < 0.001


LIST_QUERIES = ["queue=", "group_id=", "group_id=x", "queue=a%2Fb", "cursor=zz", "state=lost"]


async def test_list_filters_are_checked_before_any_backend(queue: Any, tmp_path: Path):
    """``GET /v1/jobs`` with a filter no job can match answers 422 on every backend, and stores
    nothing: DynamoDB refused an empty queue name or group id as a key, which became a 503."""
    settings = {
        "workers": {"concurrency": 0},
        "results": {"backend": "memory"},
    }
    app = arqd.App(Config.from_dict(settings), queue=queue, results=MemoryResults())
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession(server.make_url("")) as session:
                for asked in LIST_QUERIES:
                    async with session.get(f"/v1/jobs?{asked}") as resp:
                        body = await resp.json()
                    assert resp.status == 422, (asked, resp.status, body)
                    assert body["error"]["code"] == "invalid_request", asked
                async with session.get("/v1/jobs?queue=default&limit=5") as resp:
                    assert resp.status == 200 and (await resp.json())["jobs"] == []
        finally:
            await server.close()


async def test_refusals_are_worded_alike(client: Any):
    """An unknown field, a missing one and a bad name are worded the same in a job spec, a group
    and a step (one formatter: a job spec said ``Object contains unknown field `oops```)."""
    cases = [
        (lambda: client.submit_many([{"handler": "echo", "oops": 1}]), r"oops: unknown field$"),
        (lambda: client.submit_group([{"handler": "echo", "name": "a b"}]), r"\]\.name: Expected"),
        (lambda: client.submit_many([{"steps": [{"name": "s"}]}]), r"\(s\): url: required$"),
        (lambda: client.submit("echo", queue="a b"), r"^queue: Expected 1 to 64 letters"),
    ]
    for call, message in cases:
        with pytest.raises(arqd.InvalidRequest, match=message):
            await call()
