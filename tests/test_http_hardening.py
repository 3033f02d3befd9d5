"""What an outside audit broke (issue 12), pinned: client input that reached a 500."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import arqd
from arqd.config import Config
from arqd.http.server import make_app

from .util import eventually

SECRET = "ops-hardening-secret-0123456789"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
BEARER = {"Authorization": f"Bearer {SECRET}"}
JSON = {"Content-Type": "application/json"}


# --- in-process servers ---------------------------------------------------------------------------


def app_config(tmp_path: Path, backend: str = "memory", **server: Any) -> Config:
    queue: dict[str, Any] = {"backend": backend, "path": str(tmp_path / "q.sqlite3")}
    return Config.from_dict(
        {
            "server": server,
            "queue": queue,
            "results": {"backend": "memory"},
            "workers": {"concurrency": 0},  # nothing runs: the store holds what was submitted
            "handlers": {"echo": "arqd.demo:echo"},
            "groups": {"nightly": {"jobs": [{"handler": "echo"}]}},
        }
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestServer]:
    """An anonymous daemon (no tokens) on loopback, memory backends."""
    async with Serve(app_config(tmp_path)) as srv:
        yield srv


class Serve:
    """``async with Serve(config) as srv``: the app of ``config`` on a test server."""

    def __init__(self, config: Config) -> None:
        self.app = arqd.App(config)
        self.srv: TestServer | None = None

    async def __aenter__(self) -> TestServer:
        await self.app.__aenter__()
        self.srv = TestServer(make_app(self.app), host="127.0.0.1")
        await self.srv.start_server()
        return self.srv

    async def __aexit__(self, *exc: object) -> None:
        assert self.srv is not None
        await self.srv.close()
        await self.app.__aexit__(None, None, None)


async def stored(srv: TestServer) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(srv.make_url("/v1/jobs")) as r:
        assert r.status == 200
        return [j["id"] for j in (await r.json())["jobs"]]


async def call(
    srv: TestServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """Status, headers and decoded JSON body of one request."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, srv.make_url(path), data=body, headers=headers or {}) as r,
    ):
        data = await r.read()
        decoded = json.loads(data) if r.content_type == "application/json" else data
        return r.status, dict(r.headers), decoded


def assert_error(answer: tuple[int, dict[str, Any], Any], status: int, code: str) -> None:
    got, _, body = answer
    assert got == status, body
    assert body["error"]["code"] == code and body["error"]["message"], body


SPEC = json.dumps({"handler": "echo", "payload": 1}).encode()


# --- item 4: no input reaches a 500 ---------------------------------------------------------------


def spec(**fields: Any) -> bytes:
    return json.dumps({"handler": "echo", **fields}).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


REFUSED = [
    spec(delay=1e308),
    spec(delay=366 * 86400 + 1),
    b'{"handler": "echo", "delay": 1e999}',
    spec(timeout=1e308),
    spec(run_at="9999-12-31T23:59:59Z"),
    spec(run_at=(datetime.now(UTC) + timedelta(days=367)).isoformat()),
    b'{"handler": "echo", "payload": ' + nested(100_000) + b"}",
    b'{"handler": "echo", "payload": ' + nested(1_001) + b"}",
    b'{"handler": "echo", "payload": ' + nested(65) + b"}",
    b'{"handler": "echo", "meta": {"a": ' + nested(64) + b"}}",
    spec(queue="default\n"),
    spec(queue="def\x00ault"),
    spec(handler="echo\n"),
    spec(handler="ec\x1bho"),
    spec(key="k\n"),
    spec(key="k\x00"),
    spec(key="k\x85"),
    spec(handler="arqd.steps"),
    spec(handler="arqd.steps", payload={"steps": [], "sealed": "x"}),
    json.dumps({"steps": [{"name": "s\n", "url": "http://127.0.0.1:9/"}]}).encode(),
    json.dumps(
        {"steps": [{"name": "s", "url": "http://127.0.0.1:9/", "headers": {"X-A\n": "1"}}]}
    ).encode(),
    json.dumps(
        {"steps": [{"name": "s", "url": "http://127.0.0.1:9/", "body": json.loads(nested(70))}]}
    ).encode(),
]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_out_of_range_input_is_a_422(tmp_path: Path, backend: str):
    """Times beyond the bound, JSON nested past 64 levels (or past the interpreter's limit),
    names with control characters or a trailing newline, and the steps runner by name are each
    a 422 JSON error; nothing is stored, on POST /v1/jobs, batches and groups alike."""
    async with Serve(app_config(tmp_path, backend)) as srv:
        for body in REFUSED:
            answer = await call(srv, "POST", "/v1/jobs", body, JSON)
            assert_error(answer, 422, answer[2]["error"]["code"])
            assert answer[2]["error"]["code"] in ("invalid_request", "unknown_handler")
            batch = b'{"jobs": [{"handler": "echo"}, ' + body + b"]}"
            assert (await call(srv, "POST", "/v1/jobs/batch", batch, JSON))[0] == 422, body
            group = b'{"jobs": [{"handler": "echo"}, ' + body + b"]}"
            assert (await call(srv, "POST", "/v1/groups", group, JSON))[0] == 422, body
        assert await stored(srv) == []


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_past_run_at_is_ready_now_and_readable(tmp_path: Path, backend: str):
    """run_at in year 1 (with an offset that would take it to year 0 in UTC) is accepted as
    ready at once, stored no earlier than the epoch, and reads back without error; 64 levels of
    nesting are accepted."""
    async with Serve(app_config(tmp_path, backend)) as srv:
        for run_at in ("0001-01-01T00:00:00+05:00", "0001-01-01T00:00:00-05:00"):
            status, _, job = await call(srv, "POST", "/v1/jobs", spec(run_at=run_at), JSON)
            assert status == 202, job
            assert job["ready_at"].startswith("1970-01-01")
            assert (await call(srv, "GET", f"/v1/jobs/{job['id']}"))[0] == 200
        deep = b'{"handler": "echo", "payload": ' + nested(64) + b"}"
        assert (await call(srv, "POST", "/v1/jobs", deep, JSON))[0] == 202
        assert (await call(srv, "GET", "/v1/jobs"))[0] == 200


async def test_a_handlers_huge_retry_delay_is_bounded(tmp_path: Path):
    """A handler's Retry(delay=1e308) (or NaN) requeues the job within the bound instead of a
    ready time no one can read back."""
    config = Config.from_dict(
        {
            "queue": {"backend": "memory"},
            "results": {"backend": "memory"},
            "workers": {"concurrency": 2, "poll_max": "50ms"},
        }
    )
    app = arqd.App(config)

    @app.handler("stubborn")
    async def stubborn(ctx: arqd.JobContext, payload: Any) -> None:
        raise arqd.Retry("later", delay=payload)

    async with app:
        for delay in (1e308, float("nan")):
            job = await app.client.submit("stubborn", delay)

            async def requeued(job_id: str = job.id) -> bool:
                return (await app.client.get(job_id)).attempts == 1

            await eventually(requeued)
            again = await app.client.get(job.id)
            assert again.state == "queued"
            assert again.ready_at < datetime.now(UTC) + timedelta(days=367)


async def test_redrive_refuses_a_name_with_a_trailing_newline(server: TestServer):
    """Route names are matched to the true end: ``default%0A`` is no queue (404)."""
    answer = await call(server, "POST", "/v1/queues/default%0A/redrive")
    assert_error(answer, 404, "not_found")
