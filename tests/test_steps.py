"""Multi-step HTTP jobs (``arqd.steps``): order, retries, poison, resume, the host allow-list
(checked on the resolved address and on every redirect) and secrets kept out of everything
recorded. Runs against local aiohttp servers that count what reaches them; no real waiting."""

from __future__ import annotations

import ast
import asyncio
import base64
import datetime
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from arqd import errors
from arqd import steps as steps_pkg
from arqd.errors import ConfigError, HostNotAllowed, InvalidRequest, RedirectRefused
from arqd.model import StepState
from arqd.steps import (
    BODY_LIMIT,
    Checkpoint,
    Credentials,
    CredentialsUnreadable,
    StepFailed,
    decrypt_credentials,
    encrypt_credentials,
    is_public_address,
    load_or_create_key,
    parse_credentials,
    parse_steps,
    redact_steps,
    run_steps,
)

from .daemons import ROOT

# --- local servers that count ---------------------------------------------------------------------


@dataclass
class Recorder:
    """What reached one test server: (method, path, headers) per request, in order."""

    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, path: str) -> int:
        return sum(1 for _, p, _ in self.calls if p == path)


class Routes:
    """The test server's routes; ``flaky`` and ``hang`` keep their state in the recorder."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.rec.calls.append((request.method, request.path, dict(request.headers)))
        self.rec.seen[request.path_qs] += 1
        return await handler(request)  # type: ignore[no-any-return]

    async def reserve(self, _: web.Request) -> web.Response:
        return web.json_response({"reserved": True}, status=201)

    async def charge(self, request: web.Request) -> web.Response:
        return web.json_response({"charged": await request.json()})

    async def release(self, _: web.Request) -> web.Response:
        return web.Response(text="released")

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def flaky(self, request: web.Request) -> web.Response:
        """Answers ``code`` to the first ``times`` calls, then 200."""
        calls = self.rec.seen[request.path_qs]
        if calls <= int(request.match_info["times"]):
            return web.Response(status=int(request.match_info["code"]), text="busy")
        return web.json_response({"ok": True, "calls": calls})

    async def echo(self, request: web.Request) -> web.Response:
        return web.json_response({"method": request.method, "headers": dict(request.headers)})

    async def echo_all(self, request: web.Request) -> web.Response:
        """Everything the request carried: method, headers, query and body."""
        raw = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "headers": dict(request.headers),
                "query": dict(request.query),
                "body": raw.decode(),
            }
        )

    async def echo_text(self, request: web.Request) -> web.Response:
        return web.Response(text=repr(dict(request.headers)))

    async def redirect(self, request: web.Request) -> web.Response:
        code = int(request.query.get("code", "302"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def loop(self, _: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/loop"})

    async def big(self, _: web.Request) -> web.Response:
        return web.Response(text="x" * (BODY_LIMIT + 40_000))

    async def hang(self, _: web.Request) -> web.Response:
        await self.rec.release.wait()
        return web.Response(text="late")

    async def anything(self, _: web.Request) -> web.Response:
        return web.Response(text="reached")


def make_app(rec: Recorder) -> web.Application:
    r = Routes(rec)
    app = web.Application(middlewares=[r.record])
    app.router.add_put("/reserve", r.reserve)
    app.router.add_post("/charge", r.charge)
    app.router.add_delete("/release", r.release)
    app.router.add_get("/status/{code}", r.status)
    app.router.add_get("/flaky/{code}/{times}", r.flaky)
    app.router.add_route("*", "/echo", r.echo)
    app.router.add_get("/echo-text", r.echo_text)
    app.router.add_route("*", "/echo-all", r.echo_all)
    app.router.add_route("*", "/redirect", r.redirect)
    app.router.add_get("/loop", r.loop)
    app.router.add_get("/big", r.big)
    app.router.add_get("/hang", r.hang)
    app.router.add_route("*", "/{tail:.*}", r.anything)
    return app


@dataclass
class Server:
    rec: Recorder
    server: TestServer

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def entry(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def serve(port: int | None = None) -> Server:
    rec = Recorder()
    server = TestServer(make_app(rec), host="127.0.0.1", port=port)
    await server.start_server()
    return Server(rec, server)


@pytest.fixture
async def api() -> AsyncIterator[Server]:
    """The allowed server."""
    srv = await serve()
    yield srv
    srv.rec.release.set()
    await srv.server.close()


@pytest.fixture
async def other() -> AsyncIterator[Server]:
    """A second server, forbidden unless a test lists it: it must see no request."""
    srv = await serve()
    yield srv
    await srv.server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Run:
    """One ``run_steps`` call with a recording ``save`` and an instant, recording ``sleep``."""

    allow: list[str]
    credentials: Credentials | None = None
    resolver: Any = None
    session: aiohttp.ClientSession | None = None
    saves: list[Checkpoint] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Any = None
    before: Any = None

    async def __call__(
        self, raw: list[dict[str, Any]], checkpoint: Checkpoint | None = None
    ) -> dict[str, Any]:
        steps = parse_steps(raw)
        cp = checkpoint if checkpoint is not None else Checkpoint.start(steps)
        return await run_steps(
            steps,
            self.credentials,
            self.allow,
            cp,
            self._save,
            sleep=self._sleep,
            resolver=self.resolver,
            session=self.session,
            before=self.before,
        )

    async def _save(self, cp: Checkpoint) -> None:
        self.saves.append(cp)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            await self.on_sleep(seconds)

    def last_states(self) -> list[tuple[str, str, int | None, int]]:
        return [(s.name, s.state, s.status, s.attempts) for s in self.saves[-1].states]


THREE_STEPS = [
    {"name": "reserve", "method": "PUT", "path": "/reserve", "expect": [200, 201]},
    {"name": "charge", "method": "POST", "path": "/charge", "body": {"amount": 5}},
    {"name": "release", "method": "DELETE", "path": "/release"},
]


def steps_for(srv: Server, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        step = {k: v for k, v in spec.items() if k != "path"}
        step["url"] = srv.url(spec["path"])
        out.append(step)
    return out


# --- order, result, credentials -------------------------------------------------------------------


async def test_steps_run_in_order_and_result_holds_each_response(api: Server):
    """PUT, POST, DELETE run in order; the result maps each step to its status and parsed body."""
    run = Run([api.entry])
    result = await run(steps_for(api, THREE_STEPS))
    assert [(m, p) for m, p, _ in api.rec.calls] == [
        ("PUT", "/reserve"),
        ("POST", "/charge"),
        ("DELETE", "/release"),
    ]
    assert result == {
        "steps": {
            "reserve": {"status": 201, "body": {"reserved": True}},
            "charge": {"status": 200, "body": {"charged": {"amount": 5}}},
            "release": {"status": 200, "body": "released"},
        }
    }
    assert api.rec.calls[1][2]["Content-Type"] == "application/json"
    assert run.sleeps == []


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        (
            {"basic": "alice:open sesame"},
            "Basic " + base64.b64encode(b"alice:open sesame").decode(),
        ),
        ({"bearer": "tok-0123456789"}, "Bearer tok-0123456789"),
    ],
)
async def test_credentials_sent_on_every_step(api: Server, raw: dict[str, str], header: str):
    """Job credentials become the Authorization header of every step, over a step's own."""
    run = Run([api.entry], credentials=parse_credentials(raw))
    specs = [*THREE_STEPS]
    specs[0] = {**specs[0], "headers": {"authorization": "Bearer step-own-value"}}
    await run(steps_for(api, specs))
    assert [h.get("Authorization") for _, _, h in api.rec.calls] == [header] * 3


# --- retries and poison ---------------------------------------------------------------------------


async def test_503_is_retried_with_exponential_delays(api: Server):
    """503 twice then 200: retried after retry_exponent ** attempt seconds, then succeeds."""
    run = Run([api.entry])
    step = {"name": "poll", "url": api.url("/flaky/503/2"), "retry_exponent": 3}
    result = await run([step])
    assert run.sleeps == [3**1, 3**2]
    assert api.rec.count("/flaky/503/2") == 3
    assert result["steps"]["poll"] == {"status": 200, "body": {"ok": True, "calls": 3}}
    assert [(s.states[0].state, s.states[0].status, s.states[0].attempts) for s in run.saves] == [
        ("running", 503, 1),
        ("running", 503, 2),
        ("succeeded", 200, 3),
    ]


async def test_before_is_awaited_before_every_request_and_can_stop_the_run(api: Server):
    """The pool's lease check runs before each request, retries included; when it raises
    (the lease is gone), no further request is sent."""
    calls: list[int] = []

    async def before() -> None:
        calls.append(api.rec.count("/flaky/503/2"))
        if len(calls) == 3:
            raise asyncio.CancelledError

    run = Run([api.entry], before=before)
    step = {"name": "poll", "url": api.url("/flaky/503/2")}
    with pytest.raises(asyncio.CancelledError):
        await run([step, {"name": "next", "url": api.url("/next")}])
    assert calls == [0, 1, 2]  # checked before requests 1, 2 and 3; the third never went
    assert api.rec.count("/flaky/503/2") == 2 and api.rec.count("/next") == 0


async def test_429_is_retried(api: Server):
    """429 (rate limited) is retried like a 5xx, with the default exponent 2."""
    run = Run([api.entry])
    result = await run([{"name": "poll", "url": api.url("/flaky/429/1")}])
    assert run.sleeps == [2]
    assert result["steps"]["poll"]["status"] == 200


async def test_connection_refused_is_retried():
    """A refused connection to an allowed port is a network error: retried, then succeeds once
    something listens there."""
    port = closed_port()
    started: list[Server] = []

    async def start_listening(_: float) -> None:
        if not started:
            started.append(await serve(port))

    run = Run([f"127.0.0.1:{port}"], on_sleep=start_listening)
    try:
        result = await run([{"name": "late", "url": f"http://127.0.0.1:{port}/ping"}])
    finally:
        for srv in started:
            await srv.server.close()
    assert run.sleeps == [2]
    assert result["steps"]["late"] == {"status": 200, "body": "reached"}
    assert run.saves[0].states[0] == StepState("late", "running", None, 1)


async def test_timeout_is_retried_then_exhausts(api: Server):
    """A step that gets no answer within its timeout is retried; out of attempts it fails."""
    run = Run([api.entry])
    with pytest.raises(StepFailed) as info:
        await run([{"name": "slow", "url": api.url("/hang"), "timeout": 0.05, "max_attempts": 2}])
    assert info.value.step == "slow" and info.value.type == "StepFailed"
    assert info.value.response_status is None and info.value.attempts == 2
    assert "gave up after 2 attempts" in str(info.value) and "no answer" in str(info.value)
    assert run.sleeps == [2] and api.rec.count("/hang") == 2


async def test_400_fails_at_once_naming_step_and_status(api: Server):
    """An unexpected 4xx is poison: no retry, the error names the step and the status."""
    run = Run([api.entry])
    raw = [*steps_for(api, THREE_STEPS[:1]), {"name": "pay", "url": api.url("/status/400")}]
    with pytest.raises(StepFailed) as info:
        await run(raw)
    assert info.value.step == "pay" and info.value.response_status == 400
    assert info.value.type == "StepFailed" and info.value.attempts == 1
    assert "'pay'" in str(info.value) and "400" in str(info.value)
    assert api.rec.count("/status/400") == 1 and run.sleeps == []
    assert run.last_states() == [("reserve", "succeeded", 201, 1), ("pay", "failed", 400, 1)]


async def test_attempts_exhausted_fails_naming_step(api: Server):
    """A step answering 503 every time fails after max_attempts, naming the step."""
    run = Run([api.entry])
    with pytest.raises(StepFailed) as info:
        await run([{"name": "pay", "url": api.url("/status/503"), "max_attempts": 3}])
    assert (
        info.value.step == "pay" and info.value.response_status == 503 and info.value.attempts == 3
    )
    assert "'pay'" in str(info.value) and "gave up after 3 attempts" in str(info.value)
    assert run.sleeps == [2, 4] and api.rec.count("/status/503") == 3
    assert run.last_states() == [("pay", "failed", 503, 3)]


async def test_expect_decides_success(api: Server):
    """``expect`` replaces "any 2xx": a listed 404 succeeds, an unlisted 200 is poison."""
    run = Run([api.entry])
    result = await run([{"name": "gone", "url": api.url("/status/404"), "expect": [404]}])
    assert result["steps"]["gone"] == {"status": 404, "body": "nope"}
    with pytest.raises(StepFailed) as info:
        await run([{"name": "made", "url": api.url("/release"), "expect": [201]}])
    assert info.value.response_status == 200 and "expected 201" in str(info.value)


async def test_long_body_is_truncated(api: Server):
    """A response body over 64 KiB is cut to 64 KiB and marked truncated."""
    result = await Run([api.entry])([{"name": "big", "url": api.url("/big")}])
    outcome = result["steps"]["big"]
    assert outcome["truncated"] is True and outcome["body"] == "x" * BODY_LIMIT


# --- resume ---------------------------------------------------------------------------------------


async def test_resume_skips_succeeded_steps(api: Server):
    """A checkpoint with steps 1–2 succeeded runs only step 3; the result still has all three."""
    steps = parse_steps(steps_for(api, THREE_STEPS))
    cp = Checkpoint(
        outcomes={
            "reserve": {"status": 201, "body": {"reserved": "earlier"}},
            "charge": {"status": 200, "body": {"charged": "earlier"}},
        },
        states=[
            StepState("reserve", "succeeded", 201, 1),
            StepState("charge", "succeeded", 200, 2),
            StepState("release", "pending"),
        ],
    )
    run = Run([api.entry])
    result = await run(steps_for(api, THREE_STEPS), cp)
    assert [p for _, p, _ in api.rec.calls] == ["/release"]
    assert result["steps"]["reserve"]["body"] == {"reserved": "earlier"}
    assert result["steps"]["release"] == {"status": 200, "body": "released"}
    assert run.last_states() == [
        ("reserve", "succeeded", 201, 1),
        ("charge", "succeeded", 200, 2),
        ("release", "succeeded", 200, 1),
    ]
    assert len(run.saves) == 1 and len(steps) == 3


async def test_resume_continues_a_running_steps_attempt_count(api: Server):
    """A step interrupted while running keeps its attempts: 2 of 3 done means one more request."""
    cp = Checkpoint({}, [StepState("pay", "running", 503, 2)])
    run = Run([api.entry])
    with pytest.raises(StepFailed) as info:
        await run([{"name": "pay", "url": api.url("/status/503"), "max_attempts": 3}], cp)
    assert info.value.attempts == 3 and api.rec.count("/status/503") == 1


async def test_resume_restarts_a_failed_step(api: Server):
    """A step recorded as failed (the job was redriven) gets its attempts afresh."""
    cp = Checkpoint({}, [StepState("poll", "failed", 503, 5)])
    run = Run([api.entry])
    result = await run([{"name": "poll", "url": api.url("/flaky/503/1")}], cp)
    assert result["steps"]["poll"]["status"] == 200 and run.sleeps == [2]


# --- the allow-list -------------------------------------------------------------------------------

REFUSED = [
    ("http://169.254.169.254/latest/meta-data", "listed"),
    ("http://169.254.169.254/latest/meta-data", "empty"),
    ("http://127.0.0.1:{other}/x", "listed"),
    ("http://127.0.0.1:{other}/x", "empty"),
    ("http://localhost:{other}/x", "listed"),
    ("http://localhost:{other}/x", "empty"),
    ("http://localhost:{api}/x", "listed"),  # the list names 127.0.0.1:{api}, not localhost
    ("http://[::ffff:127.0.0.1]:{other}/x", "empty"),
    ("http://0.0.0.0:{other}/x", "empty"),
]


@pytest.mark.parametrize(("template", "mode"), REFUSED)
async def test_refused_hosts_fail_at_once(api: Server, other: Server, template: str, mode: str):
    """Metadata, unlisted loopback ports and localhost fail as HostNotAllowed, unsent."""
    url = template.format(api=api.port, other=other.port)
    run = Run([api.entry] if mode == "listed" else [])
    with pytest.raises(StepFailed) as info:
        await run([{"name": "peek", "url": url}])
    assert info.value.type == "HostNotAllowed" and info.value.step == "peek"
    assert isinstance(info.value, HostNotAllowed)
    assert info.value.response_status is None and "'peek'" in str(info.value)
    assert other.rec.calls == [] and api.rec.calls == []
    assert run.sleeps == [] and run.last_states() == [("peek", "failed", None, 1)]


async def test_redirect_to_unlisted_port_is_refused(api: Server, other: Server):
    """A redirect from the allowed server to an unlisted loopback port is refused, unsent."""
    run = Run([api.entry])
    target = other.url("/target")
    with pytest.raises(StepFailed) as info:
        await run([{"name": "hop", "url": api.url(f"/redirect?to={target}")}])
    assert info.value.type == "HostNotAllowed"
    assert api.rec.count("/redirect") == 1 and other.rec.calls == []


async def test_redirects_are_followed_with_secrets_kept_in_origin(api: Server, other: Server):
    """Redirects are followed (303 turns POST into GET); another origin gets no credentials."""
    run = Run([api.entry, other.entry], credentials=Credentials("bearer", "tok-0123456789"))
    same = api.url("/redirect?code=303&to=/echo")
    cross = api.url(f"/redirect?code=307&to={other.url('/landed')}")
    result = await run(
        [
            {"name": "same", "method": "POST", "url": same, "body": {"a": 1}},
            {"name": "cross", "url": cross, "headers": {"X-Api-Key": "k-abcdef", "X-Tag": "t"}},
        ]
    )
    assert result["steps"]["same"]["body"]["method"] == "GET"
    assert result["steps"]["same"]["body"]["headers"]["Authorization"] == "Bearer [redacted]"
    assert "Content-Type" not in result["steps"]["same"]["body"]["headers"]
    assert result["steps"]["cross"] == {"status": 200, "body": "reached"}
    ((_, path, headers),) = other.rec.calls
    assert path == "/landed"
    assert "Authorization" not in headers and "X-Api-Key" not in headers and "X-Tag" not in headers


SAFE_AND_UNSAFE = {
    "Accept": "application/json",
    "Accept-Language": "fr",
    "User-Agent": "mine/1",
    "X-Auth-Key": "ak-0123456789",
    "X-Tag": "t",
    "X-Trace": "r-1",
}


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_cross_origin_redirect_sends_only_safe_headers(api: Server, other: Server, code: int):
    """A redirect to another origin (another port) carries only the allow-listed headers
    (Accept, Accept-Language, User-Agent...) that the step does not mark secret: every other
    header stays behind, secret-looking or not. A same-origin redirect keeps them all."""
    run = Run([api.entry, other.entry])
    cross = api.url(f"/redirect?code={code}&to={other.url('/echo-all')}")
    same = api.url(f"/redirect?code={code}&to=/echo-all")
    marked = {"headers": ["accept-language"]}
    result = await run(
        [
            {"name": "cross", "url": cross, "headers": SAFE_AND_UNSAFE},
            {"name": "same", "url": same, "headers": SAFE_AND_UNSAFE},
            {"name": "marked", "url": cross, "headers": SAFE_AND_UNSAFE, "secret": marked},
        ]
    )
    (_, path, got), (_, _, without_marked) = other.rec.calls
    assert path == "/echo-all"
    assert (
        "Accept-Language" not in without_marked and without_marked["Accept"] == "application/json"
    )
    assert [k for k in got if k.lower().startswith("x-")] == []
    assert (got["Accept"], got["Accept-Language"], got["User-Agent"]) == (
        "application/json",
        "fr",
        "mine/1",
    )
    kept = result["steps"]["same"]["body"]["headers"]
    assert kept["X-Tag"] == "t" and kept["X-Trace"] == "r-1"


@pytest.mark.parametrize("code", [307, 308])
@pytest.mark.parametrize(
    ("body", "secret"),
    [
        ({"login": "alice", "password": "pw-0123456789"}, None),
        ({"login": "alice", "card": {"pin": "pin-0123456789"}}, {"body": ["/card/pin"]}),
    ],
    ids=["named", "marked"],
)
async def test_cross_origin_307_with_a_secret_body_is_refused(
    api: Server, other: Server, code: int, body: dict[str, Any], secret: Any
):
    """A 307/308 to another origin would resend the body: when it holds a secret field (named
    like one, or marked in "secret"), the step fails at once as RedirectRefused and the other
    origin receives nothing; the error and the logs do not quote the secret."""
    run = Run([api.entry, other.entry])
    step: dict[str, Any] = {
        "name": "pay",
        "method": "POST",
        "url": api.url(f"/redirect?code={code}&to={other.url('/echo-all')}"),
        "body": body,
    }
    if secret is not None:
        step["secret"] = secret
    with capture_logs() as logs, pytest.raises(StepFailed) as info:
        await run([step])
    assert info.value.type == "RedirectRefused" and info.value.response_status == code
    assert isinstance(info.value, RedirectRefused)
    assert info.value.attempts == 1 and run.sleeps == []
    assert "another origin" in str(info.value)
    assert other.rec.calls == [] and api.rec.count("/redirect") == 1
    assert "0123456789" not in str(info.value) + repr(logs)


async def test_307_bodies_without_secrets_or_within_the_origin_follow(api: Server, other: Server):
    """A cross-origin 307 whose body holds no secret is followed with its body; a same-origin
    307 keeps a secret body (it goes back to the server that already had it)."""
    run = Run([api.entry, other.entry])
    cross = api.url(f"/redirect?code=307&to={other.url('/echo-all')}")
    same = api.url("/redirect?code=307&to=/echo-all")
    result = await run(
        [
            {"name": "plain", "method": "POST", "url": cross, "body": {"n": 1}},
            {"name": "own", "method": "POST", "url": same, "body": {"password": "pw-0123456789"}},
        ]
    )
    plain = result["steps"]["plain"]["body"]
    assert (plain["method"], json.loads(plain["body"])) == ("POST", {"n": 1})
    assert plain["headers"]["Content-Type"] == "application/json"
    own = [h for m, p, h in api.rec.calls if p == "/echo-all"]
    assert len(own) == 1 and result["steps"]["own"]["status"] == 200


async def test_redirect_loop_fails(api: Server):
    """More than 5 redirects fail the step as poison."""
    with pytest.raises(StepFailed) as info:
        await Run([api.entry])([{"name": "loop", "url": api.url("/loop")}])
    assert info.value.type == "StepFailed" and info.value.response_status == 302
    assert "redirects" in str(info.value) and api.rec.count("/loop") == 6


async def test_name_resolving_to_private_address_is_refused(other: Server):
    """With an empty list, a name is refused if any address it resolves to is not public."""
    asked: list[tuple[str, int]] = []
    answers = {"internal.test": ["127.0.0.1"], "mixed.test": ["93.184.216.34", "10.0.0.7"]}

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return answers[host]

    for host in answers:
        run = Run([], resolver=resolve)
        with pytest.raises(StepFailed) as info:
            await run([{"name": "in", "url": f"http://{host}:{other.port}/x"}])
        assert info.value.type == "HostNotAllowed"
    assert asked == [("internal.test", other.port), ("mixed.test", other.port)]
    assert other.rec.calls == []


async def test_listed_name_connects_to_the_resolved_address(api: Server):
    """A listed name is resolved once by arqd and reached at that address, Host kept."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    run = Run([f"api.test:{api.port}"], resolver=resolve)
    result = await run([{"name": "named", "url": f"http://API.test:{api.port}/echo"}])
    assert asked == ["api.test"]
    assert result["steps"]["named"]["body"]["headers"]["Host"] == f"api.test:{api.port}"


def make_tls(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A CA and a server certificate for ``name``: (server context, client context trusting CA)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.DNSName(subject)])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("arqd test CA", ca_key, "arqd test CA", ca_key, True)
    leaf = cert(name, key, "arqd test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return server_ctx, ssl.create_default_context(cafile=tmp_path / "ca.pem")


async def test_tls_is_verified_against_the_url_host(tmp_path: Path):
    """Over https arqd connects to the checked address but verifies the certificate against the
    URL's host; a certificate for another name fails (a network error, so retried)."""
    server_ctx, client_ctx = make_tls(tmp_path, "api.test")
    rec = Recorder()
    server = TestServer(make_app(rec), host="127.0.0.1")
    await server.start_server(ssl=server_ctx)

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    port = server.port
    run = Run([f"api.test:{port}", f"wrong.test:{port}"], resolver=resolve)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as http:
            run.session = http
            result = await run([{"name": "tls", "url": f"https://api.test:{port}/echo"}])
            with pytest.raises(StepFailed) as info:
                await run(
                    [{"name": "bad", "url": f"https://wrong.test:{port}/", "max_attempts": 1}]
                )
    finally:
        await server.close()
    assert result["steps"]["tls"]["body"]["headers"]["Host"] == f"api.test:{port}"
    assert info.value.type == "StepFailed" and "gave up after 1 attempt:" in str(info.value)
    assert "CertificateError" in str(info.value)
    assert [p for _, p, _ in rec.calls] == ["/echo"]


def test_is_public_address():
    """Only globally routable unicast addresses count as public, also inside IPv6 forms."""
    public = ["93.184.216.34", "2606:4700::1111", "64:ff9b::5db8:d822"]
    private = [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "2002:c0a8:0101::1",
        "64:ff9b::7f00:1",
        "not-an-ip",
    ]
    assert all(is_public_address(a) for a in public)
    assert not any(is_public_address(a) for a in private)


async def test_bad_allow_list_is_a_config_error():
    """A malformed allow_hosts entry is refused as configuration, naming the entry."""
    run = Run(["a b"])
    with pytest.raises(ConfigError, match="a b"):
        await run([{"name": "a", "url": "http://example.com/"}])
    assert run.saves == []


# --- secrets --------------------------------------------------------------------------------------

SECRET_PASSWORD = "s3cret-pass"
SECRET_TOKEN = "tok-bearer-987654"
SECRET_HEADER = "hdr-token-xyz123"
SECRET_KEY = "key-abcdef123"


@pytest.mark.parametrize(
    "creds",
    [Credentials("basic", f"alice:{SECRET_PASSWORD}"), Credentials("bearer", SECRET_TOKEN), None],
    ids=["basic", "bearer", "header"],
)
async def test_no_secret_in_checkpoints_errors_logs_or_result(
    api: Server, creds: Credentials | None
):
    """Credentials and secret header values (an Authorization given in step headers too) appear
    in no checkpoint, error, log or result, even when the server echoes them; ``save`` is called
    after every attempt."""
    sent = creds.secrets() if creds else (SECRET_HEADER,)
    secrets = [*sent, SECRET_HEADER, SECRET_KEY]
    run = Run([api.entry], credentials=creds)
    own = {"Authorization": f"Bearer {SECRET_HEADER}"}
    raw = [
        {"name": "json", "url": api.url("/echo"), "headers": {"X-Api-Key": SECRET_KEY, **own}},
        {"name": "text", "url": api.url("/echo-text"), "headers": own},
        {"name": "flaky", "url": api.url("/flaky/503/1")},
        {"name": "bad", "url": api.url("/status/400"), "headers": own},
    ]
    with capture_logs() as logs, pytest.raises(StepFailed) as info:
        await run(raw)
    assert [
        (s.states[i].name, s.states[i].state)
        for i, s in zip([0, 1, 2, 2, 3], run.saves, strict=True)
    ] == [
        ("json", "succeeded"),
        ("text", "succeeded"),
        ("flaky", "running"),
        ("flaky", "succeeded"),
        ("bad", "failed"),
    ]
    assert any(secret in json.dumps(api.rec.calls) for secret in sent)  # it was sent
    recorded = msgspec.json.encode(run.saves).decode() + repr(run.saves)
    recorded += str(info.value) + repr(info.value.args) + repr(logs)
    recorded += repr(parse_steps(raw)) + repr(creds) + json.dumps(redact_steps(raw))
    for secret in secrets:
        assert secret not in recorded
    echoed = run.saves[-1].outcomes["json"]["body"]["headers"]
    assert echoed["Authorization"].endswith("[redacted]") and echoed["X-Api-Key"] == "[redacted]"
    assert "[redacted]" in run.saves[-1].outcomes["text"]["body"]


def test_redact_steps_hides_secret_values_only():
    """redact_steps replaces secret headers, URL passwords, secret query parameters and body
    fields with "[redacted]", keeps the rest, and leaves its input alone."""
    raw: list[dict[str, Any]] = [
        {
            "name": "a",
            "url": "https://u:pw-123456@api.example.com/x?api_key=k-123456&page=2",
            "headers": {
                "Authorization": f"Bearer {SECRET_HEADER}",
                "cookie": "sid=c-123456",
                "Proxy-Authorization": "Basic cHJveHk6cHc=",
                "X-Auth-Token": "t-123456",
                "Accept": "application/json",
            },
            "body": {"user": "alice", "password": SECRET_PASSWORD, "items": [{"secret": "z"}]},
        }
    ]
    before = json.dumps(raw)
    out = redact_steps(raw)
    assert json.dumps(raw) == before
    step = out[0]
    assert step["headers"] == {
        "Authorization": "[redacted]",
        "cookie": "[redacted]",
        "Proxy-Authorization": "[redacted]",
        "X-Auth-Token": "[redacted]",
        "Accept": "application/json",
    }
    assert step["body"] == {
        "user": "alice",
        "password": "[redacted]",
        "items": [{"secret": "[redacted]"}],
    }
    assert "pw-123456" not in step["url"] and "k-123456" not in step["url"]
    assert "page=2" in step["url"] and step["name"] == "a"


HK, QK, BK = "hk-5551234", "qk-5559876", "bk-5554321"  # names no pattern would catch


def marked_steps(srv: Server) -> list[dict[str, Any]]:
    """Two steps whose header X-Sig-Thing, query parameter sig and body fields /pin and
    /n/1/deep are secrets only because the step marks them so."""
    return [
        {
            "name": "echo",
            "method": "POST",
            "url": srv.url(f"/echo-all?sig={QK}&page=2"),
            "headers": {"X-Sig-Thing": HK, "X-Tag": "visible"},
            "body": {"login": "alice", "pin": BK, "n": [1, {"deep": BK + "2"}]},
            "secret": {"headers": ["x-sig-thing"], "query": ["sig"], "body": ["/pin", "/n/1/deep"]},
        },
        {
            "name": "bad",
            "url": srv.url(f"/status/400?sig={QK}"),
            "headers": {"X-Sig-Thing": HK},
            "secret": {"headers": ["X-Sig-Thing"], "query": ["sig"]},
        },
    ]


async def test_marked_secrets_never_appear_in_what_is_recorded(api: Server):
    """A header, query parameter or body field marked in "secret" is sent as given, but appears
    in no redacted step, repr, checkpoint, result, error or log line, even echoed back."""
    raw = marked_steps(api)
    run = Run([api.entry])
    with capture_logs() as logs, pytest.raises(StepFailed) as info:
        await run(raw)
    sent = json.dumps(api.rec.calls) + json.dumps(list(api.rec.seen))
    assert HK in sent and QK in sent  # they were sent
    echoed = run.saves[-1].outcomes["echo"]["body"]
    assert (
        echoed["headers"]["X-Sig-Thing"] == "[redacted]" and echoed["query"]["sig"] == "[redacted]"
    )
    assert echoed["headers"]["X-Tag"] == "visible" and echoed["query"]["page"] == "2"
    recorded = msgspec.json.encode(run.saves).decode() + repr(run.saves)
    recorded += str(info.value) + repr(info.value.args) + repr(logs) + repr(parse_steps(raw))
    recorded += json.dumps(redact_steps(raw))
    for secret in (HK, QK, BK):
        assert secret not in recorded


def test_redact_steps_hides_marked_values():
    """redact_steps replaces every marked value (headers case-insensitively, every value of a
    repeated query parameter, the body field a JSON pointer names, whole subtrees and the whole
    body with ""), keeps the rest, and leaves its input alone."""
    raw = [
        {
            "name": "a",
            "url": f"https://api.example.com/x?sig={QK}&sig=2nd-value&page=2",
            "headers": {"X-Sig-Thing": HK, "X-Tag": "visible"},
            "body": {"a/b": {"c~d": BK}, "list": [0, {"obj": [BK]}], "keep": "me"},
            "secret": {
                "headers": ["x-sig-thing"],
                "query": ["sig"],
                "body": ["/a~1b/c~0d", "/list/1"],
            },
        },
        {"name": "b", "url": "https://api.example.com/", "body": BK, "secret": {"body": [""]}},
    ]
    before = json.dumps(raw)
    out = redact_steps(raw)
    assert json.dumps(raw) == before
    assert out[0]["headers"] == {"X-Sig-Thing": "[redacted]", "X-Tag": "visible"}
    assert out[0]["body"] == {
        "a/b": {"c~d": "[redacted]"},
        "list": [0, "[redacted]"],
        "keep": "me",
    }
    assert (
        QK not in out[0]["url"] and "2nd-value" not in out[0]["url"] and "page=2" in out[0]["url"]
    )
    assert out[0]["secret"] == raw[0]["secret"]  # the names are shown, not the values
    assert out[1]["body"] == "[redacted]"


# --- validation -----------------------------------------------------------------------------------

URL = "https://api.example.com/x"


@pytest.mark.parametrize(
    ("step", "field_name"),
    [
        ({"name": "a b", "url": URL}, "name"),
        ({"name": "x" * 65, "url": URL}, "name"),
        ({"name": "a"}, "url: required"),
        ({"name": "a", "url": "ftp://example.com/"}, "url"),
        ({"name": "a", "url": "/relative"}, "url"),
        ({"name": "a", "url": "https://u:pw@example.com/"}, "url"),
        ({"name": "a", "url": URL, "method": "TRACE"}, "method"),
        ({"name": "a", "url": URL, "expect": [99]}, "expect"),
        ({"name": "a", "url": URL, "expect": [600]}, "expect"),
        ({"name": "a", "url": URL, "expect": []}, "expect"),
        ({"name": "a", "url": URL, "expect": ["200"]}, "expect"),
        ({"name": "a", "url": URL, "timeout": 0}, "timeout"),
        ({"name": "a", "url": URL, "max_attempts": 0}, "max_attempts"),
        ({"name": "a", "url": URL, "max_attempts": 101}, "max_attempts"),
        ({"name": "a", "url": URL, "retry_exponent": 0.5}, "retry_exponent"),
        ({"name": "a", "url": URL, "retries": 3}, "retries: unknown field"),
        ({"name": "a", "url": URL, "headers": {"Host": "evil"}}, "headers"),
        ({"name": "a", "url": URL, "headers": {"X-A": "1\r\nX-B: 2"}}, "headers"),
        ({"name": "a", "url": URL, "headers": {"X-A": 1}}, "headers"),
        ({"name": "a", "url": URL, "headers": {"bad name": "1"}}, "headers"),
        (
            {"name": "a", "url": URL, "headers": {"X-A": "1"}, "secret": {"headers": ["X-B"]}},
            "secret.headers",
        ),
        ({"name": "a", "url": URL + "?q=1", "secret": {"query": ["Q"]}}, "secret.query"),
        (
            {"name": "a", "url": URL, "body": {"pw": 1}, "secret": {"body": ["/pass"]}},
            "secret.body",
        ),
        (
            {"name": "a", "url": URL, "body": {"pw": 1}, "secret": {"body": ["no-slash"]}},
            "secret.body",
        ),
        ({"name": "a", "url": URL, "body": [1], "secret": {"body": ["/01"]}}, "secret.body"),
        ({"name": "a", "url": URL, "body": [1], "secret": {"body": ["/1"]}}, "secret.body"),
        ({"name": "a", "url": URL, "secret": {"body": [""]}}, "secret.body"),
        ({"name": "a", "url": URL, "secret": {"cookies": ["x"]}}, "cookies: unknown field"),
        ({"name": "a", "url": URL, "secret": ["X-A"]}, "secret"),
    ],
)
def test_bad_step_names_the_step_and_field(step: dict[str, Any], field_name: str):
    """A step object that breaks the contract is InvalidRequest naming the step and field."""
    with pytest.raises(InvalidRequest) as info:
        parse_steps([{"name": "ok", "url": URL}, step])
    message = str(info.value)
    assert message.startswith("steps[1]") and field_name in message
    assert "pw" not in message


def test_step_defaults_and_list_rules():
    """Defaults are GET, no headers or body, any 2xx, 30 s, 5 attempts, exponent 2; names are
    unique and the list is non-empty."""
    (step,) = parse_steps([{"name": "a", "url": URL}])
    assert (step.method, step.headers, step.body, step.expect) == ("GET", {}, None, None)
    assert (step.timeout, step.max_attempts, step.retry_exponent) == (30.0, 5, 2.0)
    assert step.expects(204) and not step.expects(301)
    with pytest.raises(InvalidRequest, match=r"steps\[1\] \(a\): name"):
        parse_steps([{"name": "a", "url": URL}, {"name": "a", "url": URL}])
    with pytest.raises(InvalidRequest, match="steps"):
        parse_steps([])
    with pytest.raises(InvalidRequest, match=r"steps\[0\]: must be an object"):
        parse_steps(["nope"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "raw",
    [
        {"basic": "no-colon-secret"},
        {"basic": ":only-secret"},
        {"bearer": ""},
        {"bearer": "two words-secret"},
        {"bearer": "line\nbreak-secret"},
        {"bearer": "x-secret", "basic": "a:b"},
        {"digest": "x-secret"},
        {"bearer": 5},
    ],
)
def test_bad_credentials_are_refused_without_quoting_them(raw: dict[str, Any]):
    """Malformed credentials are InvalidRequest, and the message never quotes the secret."""
    with pytest.raises(InvalidRequest) as info:
        parse_credentials(raw)
    assert str(info.value).startswith("credentials") and "secret" not in str(info.value)


def test_credentials_shapes():
    """basic and bearer both parse; None means no credentials; repr hides the secret."""
    assert parse_credentials(None) is None
    basic = parse_credentials({"basic": "alice:pw:with:colons"})
    assert basic == Credentials("basic", "alice:pw:with:colons")
    assert basic.header() == "Basic " + base64.b64encode(b"alice:pw:with:colons").decode()
    assert parse_credentials({"bearer": "abc.def"}) == Credentials("bearer", "abc.def")
    assert "abc.def" not in repr(Credentials("bearer", "abc.def"))


# --- encryption -----------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip():
    """Credentials survive encryption, and the stored token does not hold them in clear."""
    key = Fernet.generate_key()
    creds = Credentials("basic", f"alice:{SECRET_PASSWORD}")
    token = encrypt_credentials(creds, key)
    assert SECRET_PASSWORD not in token and "alice" not in token
    assert decrypt_credentials(token, key) == creds
    assert decrypt_credentials(token.encode(), key) == creds


def test_wrong_key_fails_to_decrypt():
    """A token made with another key (or damaged) is CredentialsUnreadable; a malformed key is a
    ConfigError."""
    token = encrypt_credentials(Credentials("bearer", SECRET_TOKEN), Fernet.generate_key())
    with pytest.raises(CredentialsUnreadable) as info:
        decrypt_credentials(token, Fernet.generate_key())
    assert SECRET_TOKEN not in str(info.value)
    with pytest.raises(CredentialsUnreadable):
        decrypt_credentials("garbage", Fernet.generate_key())
    with pytest.raises(ConfigError):
        encrypt_credentials(Credentials("bearer", SECRET_TOKEN), b"short")


def test_load_or_create_key(tmp_path: Path):
    """The key file is made 0600 when missing, read back unchanged, and refused when others can
    read it."""
    path = tmp_path / "keys" / "steps.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert decrypt_credentials(encrypt_credentials(Credentials("bearer", "t"), key), key)
    assert [p.name for p in path.parent.iterdir()] == ["steps.key"]
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_key(path)


# --- where the pieces live ------------------------------------------------------------------------

# Loads a config whose group has steps and whose allow-list has a bad entry, then lists what was
# imported: the config's step checks must run without the step machinery (HTTP, Fernet) loaded.
CONFIG_CHECKS = """
import json, sys
from arqd.config import validate_config
_, problems = validate_config(sys.argv[1], {})
loaded = sorted(m for m in sys.modules if m == "arqd.steps" or m.startswith("arqd.steps.")
                or m.split(".")[0] == "cryptography")
print(json.dumps({"problems": [str(p) for p in problems], "loaded": loaded}))
"""


def test_config_checks_steps_without_loading_the_step_machinery(tmp_path: Path):
    """Loading a config checks its groups' steps and its allow-list (the same 422 reasons as a
    submit) without importing ``arqd.steps`` or ``cryptography``: config sits below the steps."""
    path = tmp_path / "arqd.toml"
    path.write_text(
        "[http_steps]\nallow_hosts = ['api.example.com', 'bad/path']\n"
        "[groups.g]\njobs = [{ steps = [{ name = 'a', url = 'ftp://x.example' }] }]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_CHECKS, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["loaded"] == []
    problems = "\n".join(answer["problems"])
    assert "http_steps.allow_hosts: 'bad/path' is not a host or host:port" in problems
    assert "groups.g.jobs[0]: steps[0] (a): url: must be an absolute http or https URL" in problems


# Modules that arqd.config and arqd.model load: none may import the HTTP client, Fernet or the
# step runner (``arqd.steps`` depends on them, never the reverse).
MODEL_LEVEL = ("config.py", "model.py", "errors.py", "stepmodel.py", "jsonpointer.py")
HEAVY = ("aiohttp", "cryptography", "arqd.steps")


def test_model_level_modules_import_no_step_machinery():
    """arqd/config.py, model.py, errors.py, stepmodel.py and jsonpointer.py import neither
    aiohttp nor cryptography nor arqd.steps, not even inside a function."""
    wrong = []
    for name in MODEL_LEVEL:
        tree = ast.parse((ROOT / "arqd" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            wrong += [
                f"{name}:{node.lineno} {t}"
                for t in targets
                if any(t == h or t.startswith(f"{h}.") for h in HEAVY)
            ]
    assert wrong == []


def test_step_errors_are_arqd_errors():
    """StepFailed (and its HostNotAllowed and RedirectRefused), and CredentialsUnreadable, live in
    arqd.errors under ArqdError; arqd.steps re-exports the same classes; ``type`` is the name a
    failed job's ``error.type`` shows, and a StepFailed's HTTP ``status`` stays an int."""
    assert steps_pkg.StepFailed is errors.StepFailed
    assert steps_pkg.CredentialsUnreadable is errors.CredentialsUnreadable
    for cls in (errors.StepFailed, errors.HostNotAllowed, errors.RedirectRefused):
        assert issubclass(cls, errors.StepFailed) and issubclass(cls, errors.ArqdError)
        exc = cls("pay", "step 'pay' failed", response_status=502, attempts=3)
        assert exc.type == cls.__name__ and exc.step == "pay"
        assert exc.response_status == 502 and exc.attempts == 3 and isinstance(exc.status, int)
    assert issubclass(errors.CredentialsUnreadable, errors.ArqdError)


DUCK_TYPED = {"code", "step", "type", "status", "errno"}


def test_no_duck_typed_errors():
    """No module of arqd reads an error's code, step, type, status or errno with getattr: errors
    are classes (arqd's under ArqdError), told apart with isinstance."""
    found = []
    for path in sorted((ROOT / "arqd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in DUCK_TYPED
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.args[1].value}")
    assert found == []
