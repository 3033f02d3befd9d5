"""What an outside audit broke (issue 12), pinned: browsers driving an anonymous daemon, client
input that reached a 500, and a config group read instead of triggered."""

from __future__ import annotations

import asyncio
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
    async with Serve(app_config(tmp_path, allowed_hosts=["arqd.example.org"])) as srv:
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


# --- item 3: browsers cannot drive an anonymous daemon --------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", SPEC),
        ("/v1/jobs/batch", b'{"jobs": [{"handler": "echo"}]}'),
        ("/v1/groups", b'{"jobs": [{"handler": "echo"}]}'),
    ],
)
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_json_bodies_must_be_declared_json(
    server: TestServer, path: str, body: bytes, content_type: str | None
):
    """What an HTML form can send (or no declared type at all) is 415 on every JSON route and
    stores nothing; ``application/json`` with a charset is accepted."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    # aiohttp would add application/octet-stream to bytes; skip_auto_headers keeps it out
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.make_url(path), data=body, headers=headers, skip_auto_headers=["Content-Type"]
        ) as r,
    ):
        assert r.status == 415
        assert (await r.json())["error"]["code"] == "unsupported_media_type"
    assert await stored(server) == []
    status, _, _ = await call(
        server, "POST", path, body, {"Content-Type": "application/json; charset=utf-8"}
    )
    assert status == 202


@pytest.mark.parametrize(
    "path", ["/v1/groups/nightly", "/v1/queues/default/redrive", f"/v1/jobs/{'0' * 32}/cancel"]
)
async def test_a_form_body_cannot_reach_a_bodiless_route(server: TestServer, path: str):
    """A route that reads no body still refuses a body that is not JSON (an HTML form's)."""
    answer = await call(
        server, "POST", path, b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_error(answer, 415, "unsupported_media_type")
    assert await stored(server) == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port of the same host: another origin
        {"Origin": "file://"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},  # a form POST
    ],
)
async def test_other_sites_pages_are_refused(server: TestServer, headers: dict[str, str]):
    """A request from another site's page (its Origin, or Sec-Fetch-Site) is 403 and stores
    nothing, even with a JSON body."""
    answer = await call(server, "POST", "/v1/jobs", SPEC, {**JSON, **headers})
    assert_error(answer, 403, "forbidden")
    assert await stored(server) == []
    if headers.get("Sec-Fetch-Mode") != "navigate":  # following a link is a GET navigation
        assert_error(await call(server, "GET", "/v1/jobs", None, headers), 403, "forbidden")


async def test_the_daemons_own_pages_are_allowed(server: TestServer):
    """The dashboard's own origin (by any accepted Host), a name of server.allowed_hosts behind
    a proxy, and a link followed from another site (a GET navigation) are served."""
    port = server.port
    for headers in (
        {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Origin": f"http://[::1]:{port}", "Host": f"[::1]:{port}"},
        {"Origin": "https://arqd.example.org", "Host": "arqd.example.org"},
        {"Origin": "https://arqd.example.org"},  # a proxy that rewrote Host
    ):
        status, _, body = await call(server, "POST", "/v1/jobs", SPEC, {**JSON, **headers})
        assert status == 202, (headers, body)
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert (await call(server, "GET", "/v1/jobs", None, navigate))[0] == 200
    assert (await call(server, "GET", "/", None, {"Origin": "http://evil.example"}))[0] == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.:x", "[::1"],
)
async def test_dns_rebinding_is_refused_without_a_token(server: TestServer, host: str):
    """Without a token, a Host that names neither this daemon, localhost, an address nor an
    allowed name is 421 on reads and writes; nothing is stored."""
    for method, body in (("GET", None), ("POST", SPEC)):
        answer = await call(server, method, "/v1/jobs", body, {**JSON, "Host": host})
        assert_error(answer, 421, "misdirected_request")
    assert await stored(server) == []


@pytest.mark.parametrize(
    "host", ["localhost:9000", "LOCALHOST", "10.1.2.3:8080", "[::1]", "arqd.example.org:443"]
)
async def test_names_of_the_daemon_are_accepted(server: TestServer, host: str):
    """localhost on any port (a tunnel), an IP address (never rebound by a browser), and a name
    of server.allowed_hosts pass the Host check."""
    assert (await call(server, "GET", "/v1/jobs", None, {"Host": host}))[0] == 200


async def test_health_checks_pass_any_host(server: TestServer):
    """/healthz and /readyz answer a load balancer whatever Host it sends."""
    for path in ("/healthz", "/readyz"):
        assert (await call(server, "GET", path, None, {"Host": "node-7.lb.internal"}))[0] == 200


async def test_a_valid_token_lifts_the_host_check(tmp_path: Path):
    """Behind a proxy with tokens any Host is fine with a valid token; without one it is 401."""
    config = app_config(tmp_path)
    tokens = [{"name": "ops", "sha256": DIGEST, "scopes": ["admin"]}]
    config = Config.from_dict({**_plain(config), "auth": {"tokens": tokens}})
    async with Serve(config) as srv:
        proxy = {"Host": "arqd.behind.proxy"}
        assert (await call(srv, "GET", "/v1/queues", None, {**proxy, **BEARER}))[0] == 200
        assert_error(await call(srv, "GET", "/v1/queues", None, proxy), 401, "unauthorized")


def _plain(config: Config) -> dict[str, Any]:
    return {
        "queue": {"backend": config.queue.backend},
        "results": {"backend": "memory"},
        "workers": {"concurrency": 0},
        "handlers": dict(config.handlers),
    }


async def raw_request(port: int, request: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (aiohttp's client refuses non-UTF-8 headers); status, head, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


async def test_a_non_utf8_token_is_refused_not_a_crash(tmp_path: Path):
    """An Authorization header that is not UTF-8 proves nothing: 401 JSON, not a 500."""
    tokens = [{"name": "ops", "sha256": DIGEST, "scopes": ["admin"]}]
    config = Config.from_dict({**_plain(app_config(tmp_path)), "auth": {"tokens": tokens}})
    async with Serve(config) as srv:
        status, _, body = await raw_request(
            srv.port,
            b"GET /v1/queues HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert status == 401
    assert json.loads(body)["error"]["code"] == "unauthorized"


async def test_http_client_and_raw_json_calls_still_work(server: TestServer):
    """arqd.HttpClient (aiohttp's json=) and the bodiless operator calls pass the guards."""
    async with arqd.HttpClient(str(server.make_url(""))) as client:
        job = await client.submit("echo", {"a": 1})
        assert (await client.submit_many([{"handler": "echo"}]))[0].handler == "echo"
        group = await client.trigger_group("nightly")
        assert (await client.group(group.id)).id == group.id
        await client.cancel(job.id)
        assert await client.request_json("POST", "/v1/queues/default/redrive") == {"requeued": 0}


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


# --- item 17: a config group is triggered, not read -----------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_reading_a_config_group_says_to_post(server: TestServer, method: str):
    """GET or DELETE /v1/groups/<a group of the config> is 405 with Allow: POST and a hint."""
    status, headers, body = await call(server, method, "/v1/groups/nightly")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert body["error"]["code"] == "method_not_allowed"
    assert "POST /v1/groups/nightly" in body["error"]["message"]
    assert_error(await call(server, method, "/v1/groups/nowhere"), 404, "not_found")
