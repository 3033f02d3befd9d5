"""Tokens, scopes and tenant isolation (docs/http-api.md), checked route by route."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import arqd
from arqd.config import Config
from arqd.http.server import ROUTES, make_app

SECRETS = {
    "alice": "alice-secret-0123456789",
    "bob": "bob-secret-0123456789",
    "reader": "reader-secret-0123456789",
    "ops": "ops-secret-0123456789",
}
SCOPES = {
    "alice": ["submit", "read", "cancel"],
    "bob": ["submit", "read", "cancel"],
    "reader": ["read"],
    "ops": ["admin"],
}


def config(tmp_path: Path) -> Config:
    tokens = [
        {"name": n, "sha256": hashlib.sha256(s.encode()).hexdigest(), "scopes": SCOPES[n]}
        for n, s in SECRETS.items()
    ]
    return Config.from_dict(
        {
            "queue": {"backend": "memory"},
            "results": {"backend": "memory"},
            "workers": {"concurrency": 2, "poll_max": "50ms"},
            "handlers": {"echo": "arqd.demo:echo"},
            "groups": {"g": {"jobs": [{"handler": "echo"}]}},
            "auth": {"tokens": tokens},
        }
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestServer]:
    app = arqd.App(config(tmp_path))
    async with app:
        srv = TestServer(make_app(app), host="127.0.0.1")
        await srv.start_server()
        try:
            yield srv
        finally:
            await srv.close()


def bearer(name: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"} if name else {}


# Each route's scope, as a request that passes validation when authorised.
SAMPLE = "0" * 32
PATHS = {"{id}": SAMPLE, "{name}": "g"}


def concrete(path: str) -> str:
    for placeholder, value in PATHS.items():
        path = path.replace(placeholder, value)
    return path


def test_every_route_has_an_auth_decision():
    """The router serves exactly the routes of ROUTES, each with a scope, so a new route cannot
    slip in without an auth decision."""
    from aiohttp import web

    app = make_app(
        arqd.App(
            Config.from_dict({"queue": {"backend": "memory"}, "results": {"backend": "memory"}})
        )
    )
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and isinstance(r.resource, web.Resource)
    }
    decided = {(m, p) for m, p, _, scope in ROUTES if scope}
    assert served == decided


@pytest.mark.parametrize(
    ("method", "path", "scope"), [(m, p, s) for m, p, _, s in ROUTES if s != "public"]
)
async def test_scopes_are_enforced_on_every_route(
    server: TestServer, method: str, path: str, scope: str
):
    """No token → 401; a token without the route's scope → 403; with it → neither."""
    url = server.make_url(concrete(path))
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"
        async with http.request(method, url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        # a token that lacks the scope ("authenticated" routes take any valid token)
        lacking = {"read": None, "admin": "alice", "authenticated": None}.get(scope, "reader")
        if lacking:
            async with http.request(method, url, headers=bearer(lacking)) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "forbidden"
        allowed = "ops" if scope == "admin" else ("reader" if scope == "read" else "alice")
        async with http.request(method, url, headers=bearer(allowed)) as r:
            assert r.status not in (401, 403)


async def test_health_routes_stay_open(server: TestServer):
    """/healthz and /readyz need no token."""
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(server.make_url(path)) as r:
                assert r.status == 200


async def test_tenants_see_only_their_own_jobs(server: TestServer):
    """Another tenant's job is a 404 (not a 403) for reads, results, events and cancels; lists
    show only one's own; an admin sees everything."""
    url = str(server.make_url(""))
    async with (
        arqd.HttpClient(url, SECRETS["alice"]) as alice,
        arqd.HttpClient(url, SECRETS["bob"]) as bob,
        arqd.HttpClient(url, SECRETS["ops"]) as ops,
    ):
        mine = await alice.submit("echo", {"secret": "alice's"}, key="report")
        await alice.wait(mine.id, timeout=10)
        for call in (bob.get, bob.result, bob.cancel, bob.delete):
            with pytest.raises(arqd.JobNotFound):
                await call(mine.id)
        theirs = await bob.submit("echo", 2, key="report")
        assert theirs.id != mine.id and not theirs.deduplicated
        assert [j.id for j in (await bob.list())[0]] == [theirs.id]
        assert {j.id for j in (await ops.list())[0]} == {mine.id, theirs.id}
        assert (await ops.get(mine.id)).key == "report"
        group = await alice.trigger_group("g")
        with pytest.raises(arqd.JobNotFound):
            await bob.group(group.id)
        assert (await alice.group(group.id)).id == group.id
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.make_url(f"/v1/jobs/{mine.id}/events"), headers=bearer("bob")) as r,
    ):
        assert r.status == 404


async def test_secrets_never_appear_in_answers_or_logs(server: TestServer):
    """Neither a token's secret nor a wrong one shows up in any response or log line."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            for headers in (bearer("alice"), {"Authorization": "Bearer not-a-real-secret-42"}):
                async with http.post(
                    server.make_url("/v1/jobs"), json={"handler": "echo"}, headers=headers
                ) as r:
                    body = await r.text()
                    assert SECRETS["alice"] not in body and "not-a-real-secret-42" not in body
    text = repr(logs)
    assert SECRETS["alice"] not in text and "not-a-real-secret-42" not in text
