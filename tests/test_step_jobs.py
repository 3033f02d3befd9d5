"""Multi-step HTTP jobs end to end: submitted through the API, run by the pool, checkpointed,
resumed after a crash, secrets kept out of every record, answer and log line."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import arqd
from arqd.config import Config
from arqd.http.server import make_app

from .daemons import Daemons, sqlite_config
from .util import eventually

TOKEN = "tok-very-secret-4242"


class Remote:
    """The service a multi-step job talks to: counts calls per route, answers as told."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.auth: list[str | None] = []
        self.received: list[tuple[str | None, str | None, Any]] = []  # X-Sig-Thing, ?sig, body
        self.script: dict[str, list[int]] = {}
        self.hold = asyncio.Event()
        self.hold.set()
        app = web.Application()
        app.router.add_route("*", "/{name}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        name = f"{request.method} /{request.match_info['name']}"
        self.calls[name] += 1
        self.auth.append(request.headers.get("Authorization"))
        if request.match_info["name"] == "slow":
            await self.hold.wait()
        script = self.script.get(name)
        status = script.pop(0) if script else 200
        body = await request.read()
        got = json.loads(body) if body else None
        self.received.append((request.headers.get("X-Sig-Thing"), request.query.get("sig"), got))
        return web.json_response(
            {"route": name, "got": json.loads(body) if body else None}, status=status
        )

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def remote() -> AsyncIterator[Remote]:
    r = Remote()
    await r.server.start_server()
    try:
        yield r
    finally:
        r.hold.set()
        await r.server.close()


@pytest.fixture
async def client(tmp_path: Path, remote: Remote) -> AsyncIterator[arqd.HttpClient]:
    config = Config.from_dict(
        {
            "queue": {"backend": "sqlite", "path": str(tmp_path / "q.sqlite3")},
            "results": {"path": str(tmp_path / "results")},
            "workers": {"concurrency": 2, "poll_max": "50ms", "heartbeat": "100ms"},
            "http_steps": {
                "allow_hosts": [f"127.0.0.1:{remote.server.port}"],
                "key_file": str(tmp_path / "steps.key"),
            },
        }
    )
    app = arqd.App(config)
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            async with arqd.HttpClient(str(server.make_url(""))) as c:
                yield c
        finally:
            await server.close()


async def submit_steps(
    client: arqd.HttpClient, steps: list[dict[str, Any]], **extra: Any
) -> arqd.Job:
    job = await client.request_json("POST", "/v1/jobs", {"steps": steps, **extra})
    return await client.get(job["id"])


async def test_steps_run_in_order_with_retries(client: arqd.HttpClient, remote: Remote):
    """PUT, POST, DELETE run in order; a step answering 503 twice then 200 is retried and
    succeeds; the result holds every step's status and body; credentials go on every step."""
    remote.script["POST /pay"] = [503, 503, 200]
    job = await submit_steps(
        client,
        [
            {
                "name": "reserve",
                "method": "PUT",
                "url": remote.url("/reserve"),
                "body": {"n": 1},
                "expect": [200],
            },
            {"name": "pay", "method": "POST", "url": remote.url("/pay"), "retry_exponent": 1.01},
            {"name": "release", "method": "DELETE", "url": remote.url("/release")},
        ],
        credentials={"bearer": TOKEN},
    )
    assert job.handler == "arqd.steps" and [s.name for s in job.steps or []] == [
        "reserve",
        "pay",
        "release",
    ]
    done = await client.wait(job.id, timeout=30)
    assert done.state == "succeeded", done.error
    result = await client.result(job.id)
    assert result["steps"]["reserve"] == {
        "status": 200,
        "body": {"route": "PUT /reserve", "got": {"n": 1}},
    }
    assert list(remote.calls) == ["PUT /reserve", "POST /pay", "DELETE /release"]
    assert remote.calls["POST /pay"] == 3
    assert set(remote.auth) == {f"Bearer {TOKEN}"}
    assert [(s.state, s.status) for s in done.steps or []] == [("succeeded", 200)] * 3
    shown = json.dumps(await client.request_json("GET", f"/v1/jobs/{job.id}"))
    assert TOKEN not in shown and "sealed" not in shown


def database_bytes(where: Path) -> bytes:
    """Every byte of the queue database, its WAL included."""
    return b"".join(p.read_bytes() for p in sorted(where.glob("q.sqlite3*")))


async def test_marked_secrets_are_stored_only_sealed(
    tmp_path: Path, client: arqd.HttpClient, remote: Remote
):
    """Values a step marks secret (a header, a query parameter, a body field) reach the remote
    service, but the job JSON shows "[redacted]" in their place, the result has them scrubbed,
    and no file of the queue database holds them in clear."""
    header, query, field = "hv-7770001", "qv-7770002", "bv-7770003"
    job = await submit_steps(
        client,
        [
            {
                "name": "call",
                "method": "POST",
                "url": remote.url(f"/call?sig={query}"),
                "headers": {"X-Sig-Thing": header},
                "body": {"user": "alice", "pin": field},
                "secret": {"headers": ["X-Sig-Thing"], "query": ["sig"], "body": ["/pin"]},
            }
        ],
    )
    done = await client.wait(job.id, timeout=30)
    assert done.state == "succeeded", done.error
    assert remote.received[-1] == (header, query, {"user": "alice", "pin": field})
    shown = await client.request_json("GET", f"/v1/jobs/{job.id}")
    (step,) = shown["payload"]["steps"]
    assert step["headers"] == {"X-Sig-Thing": "[redacted]"}
    assert step["body"] == {"user": "alice", "pin": "[redacted]"}
    assert query not in step["url"] and "sig=" in step["url"]
    result = await client.result(job.id)
    assert result["steps"]["call"]["body"]["got"] == {"user": "alice", "pin": "[redacted]"}
    stored = database_bytes(tmp_path)
    assert stored and b"alice" in stored
    for secret in (header, query, field):
        assert secret.encode() not in stored


async def test_an_unexpected_status_fails_the_job_naming_the_step(
    client: arqd.HttpClient, remote: Remote
):
    """A step answering 400 fails the job at once (poison) with the step and status in error."""
    remote.script["POST /charge"] = [400]
    job = await submit_steps(
        client,
        [
            {"name": "ok", "url": remote.url("/ok")},
            {"name": "charge", "method": "POST", "url": remote.url("/charge")},
            {"name": "never", "url": remote.url("/never")},
        ],
    )
    done = await client.wait(job.id, timeout=30)
    assert done.state == "failed" and done.attempts == 1
    assert done.error is not None and done.error.step == "charge" and done.error.status == 400
    assert remote.calls["GET /never"] == 0


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/forbidden"]
)
async def test_forbidden_hosts_are_refused(client: arqd.HttpClient, url: str):
    """A step to the cloud metadata address or an unlisted loopback port fails the job at once
    with HostNotAllowed."""
    job = await submit_steps(client, [{"name": "sneaky", "url": url}])
    done = await client.wait(job.id, timeout=30)
    assert done.state == "failed"
    assert done.error is not None and done.error.type == "HostNotAllowed"
    assert done.error.step == "sneaky"


async def test_invalid_steps_are_refused_at_submit(client: arqd.HttpClient):
    """Bad steps or credentials are a 422 naming the problem; nothing is stored."""
    for body in (
        {"steps": [{"name": "x", "url": "ftp://example.com"}]},
        {"steps": [{"name": "x", "url": "http://example.com"}], "handler": "echo"},
        {"steps": [{"name": "x", "url": "http://e.com"}], "credentials": {"api": "k"}},
    ):
        with pytest.raises(arqd.InvalidRequest):
            await client.request_json("POST", "/v1/jobs", body)
    assert (await client.list())[0] == []


async def test_killed_daemon_resumes_after_the_last_checkpoint(
    tmp_path: Path, daemons: Daemons, remote: Remote
):
    """Killing the daemon during step 3 and restarting it resumes at step 3: steps 1 and 2 ran
    once; no secret reaches the daemon's log."""
    remote.hold.clear()
    extra = f'[http_steps]\nallow_hosts = ["127.0.0.1:{remote.server.port}"]\n'
    config = sqlite_config(tmp_path, workers='visibility_timeout = "2s"', extra=extra)
    first = daemons.start(config)
    async with arqd.HttpClient(first.url) as c:
        job = await c.request_json(
            "POST",
            "/v1/jobs",
            {
                "steps": [
                    {"name": "one", "method": "PUT", "url": remote.url("/one")},
                    {
                        "name": "two",
                        "method": "POST",
                        "url": remote.url("/two"),
                        "headers": {"Authorization": f"Bearer {TOKEN}"},
                    },
                    {"name": "three", "method": "DELETE", "url": remote.url("/slow")},
                ]
            },
        )
    await eventually(lambda: remote.calls["DELETE /slow"] == 1)
    first.kill()
    remote.hold.set()
    second = daemons.start(config)
    async with arqd.HttpClient(second.url) as c:
        done = await c.wait(job["id"], timeout=40)
    assert done.state == "succeeded" and done.attempts == 2
    assert remote.calls["PUT /one"] == 1 and remote.calls["POST /two"] == 1
    assert remote.calls["DELETE /slow"] == 2
    for daemon in (first, second):
        assert TOKEN not in daemon.log_path.read_text()
