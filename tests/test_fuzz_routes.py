"""Generated junk against every route of ``ROUTES``: never a 5xx, every error is the JSON error
body, and a refused request (4xx) changes nothing stored.

The daemon is the real aiohttp application (``make_app``) on ``aiohttp.test_utils.TestServer``,
served from a thread with its own event loop so that hypothesis (synchronous) can send raw bytes
over a socket: aiohttp's client refuses header values that are not UTF-8 or hold control
characters, and those are among the inputs. Two daemons share one memory backend: an anonymous
one (the browser guards apply) and one with a token (the auth path). The store is seeded first
with jobs in every state, a config group and an ad-hoc group, by an app whose consumers then
stop: the fuzzed daemons run no consumer, so the store changes only by what a request does.

A request the HTTP parser itself refuses (a control character in a header value) never reaches
arqd: aiohttp answers it with its own plain-text 400 (docs/design.md section 5). Those requests
are marked when generated, and for them the test asks only for a 400.

``wait`` values stay at most 0.05 s and event streams are opened only on terminal jobs (or ids
that do not exist), so no request is held open; the examples are derandomized, so every run
sends the same requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arqd
from arqd.backends.base import ListFilter
from arqd.backends.memory import MemoryQueue
from arqd.config import Config
from arqd.http.server import ROUTES, make_app
from arqd.results.memory import MemoryResults

pytestmark = pytest.mark.timeout(120)

SECRET = "fuzz-secret-0123456789"
TOKEN = {"name": "ops", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(), "scopes": ["admin"]}
HANDLERS = {"echo": "arqd.demo:echo", "fail": "arqd.demo:fail", "blob": "arqd.demo:blob"}
# The failed seed lives in a queue no generated path names: a redrive of it would make a job
# that event streams are opened on live again (and nothing consumes it).
QUEUES = ["default", "failures-kept-apart"]
GROUPS = {"nightly": {"jobs": [{"handler": "echo", "name": "a"}, {"handler": "echo"}]}}
EXAMPLES = 400  # per test; both take about 12 s on a quiet machine
SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def config(concurrency: int, tokens: bool) -> Config:
    return Config.from_dict(
        {
            "queue": {"backend": "memory"},
            "results": {"backend": "memory", "inline_max": "1KiB"},
            "workers": {"concurrency": concurrency, "poll_max": "20ms", "queues": QUEUES},
            "handlers": HANDLERS,
            "groups": GROUPS,
            "auth": {"tokens": [TOKEN] if tokens else []},
        }
    )


@dataclass
class Seeds:
    terminal: list[str] = field(default_factory=list)  # safe for /events and ?wait
    live: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    etags: list[str] = field(default_factory=list)


class Served:
    """Both daemons on one memory backend, in a thread with its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.queue = MemoryQueue()
        self.results = MemoryResults()
        self.ports: dict[str, int] = {}
        self.seeds = Seeds()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-daemon", daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        assert self._ready.wait(30), "the fuzzed daemons did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self.queue.open()
        await self.results.open()
        await self._seed()
        apps = {name: self._app(tokens) for name, tokens in (("anon", False), ("token", True))}
        servers = {}
        for name, app in apps.items():
            await app.__aenter__()
            servers[name] = TestServer(make_app(app), host="127.0.0.1")
            await servers[name].start_server()
            self.ports[name] = servers[name].port or 0
        self._ready.set()
        await self._stop.wait()
        for name, app in apps.items():
            await servers[name].close()
            await app.__aexit__(None, None, None)
        await self.queue.aclose()
        await self.results.aclose()

    def _app(self, tokens: bool, concurrency: int = 0) -> arqd.App:
        return arqd.App(config(concurrency, tokens), queue=self.queue, results=self.results)

    async def _seed(self) -> None:
        """Jobs in every state, run by an app whose consumers stop before fuzzing starts."""
        seeder = self._app(tokens=False, concurrency=4)
        async with seeder:
            client = seeder.client
            done = [
                await client.submit("echo", {"hello": "world"}, key="seeded"),
                await client.submit("echo", {"big": "x" * 4096}),
                await client.submit("blob", {"size": 5000}),
                await client.submit("fail", {"permanent": True}, queue=QUEUES[1]),
            ]
            cancelled = await client.submit("echo", 1, delay=600)
            await client.cancel(cancelled.id)
            for job in done:
                await client.wait(job.id, timeout=20)
            group = await client.trigger_group("nightly")
            for member in group.jobs:
                await client.wait(member.id, timeout=20)
            adhoc = await client.submit_group([{"handler": "echo", "delay": 600}], name="adhoc")
            live = await client.submit("echo", 2, delay=600)
        self.seeds.terminal = [j.id for j in done] + [cancelled.id]
        self.seeds.live = [live.id, adhoc.jobs[0].id]
        self.seeds.groups = [group.id, adhoc.id]
        found = await self.queue.get_many(self.seeds.terminal)
        self.seeds.etags = [job.etag for job in found if job is not None]

    def snapshot(self) -> list[tuple[str, int, str]]:
        """Every stored job's id, version and state, read through the backend's public seam."""
        return asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(30)

    async def _snapshot(self) -> list[tuple[str, int, str]]:
        out: list[tuple[str, int, str]] = []
        cursor: str | None = None
        while True:
            jobs, cursor = await self.queue.list_jobs(ListFilter(), 1000, cursor)
            out += [(j.id, j.version, j.state.value) for j in jobs]
            if cursor is None:
                return sorted(out)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with Served() as s:
        yield s


# --- what a request is made of --------------------------------------------------------------------


@dataclass
class Request:
    target: str  # "anon" or "token"
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    malformed: bool  # holds bytes the HTTP grammar forbids: the parser answers, not arqd

    def encode(self, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode()]
        names = {name.lower() for name, _ in self.headers}
        if b"host" not in names:
            lines.append(f"Host: 127.0.0.1:{port}".encode())
        lines += [name + b": " + value for name, value in self.headers]
        if self.body is not None:
            lines.append(f"Content-Length: {len(self.body)}".encode())
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + (self.body or b"")


def junk_text(max_size: int = 20) -> st.SearchStrategy[str]:
    """Text with control characters, newlines, non-ASCII and surrogate-free odd code points."""
    return st.text(st.characters(codec="utf-8"), max_size=max_size) | st.sampled_from(
        ["", "\n", "a\n", "\x00", "default\n", "..", "%", "\u2028", "x" * 300]
    )


def segment(seeds: Seeds, route: str, name: str) -> st.SearchStrategy[str]:
    """A value for a path placeholder: a seeded id, a config name, or percent-encoded junk."""
    ids = seeds.terminal if route.endswith("/events") else [*seeds.terminal, *seeds.live]
    known = [*ids, *seeds.groups, "nightly", "default", "0" * 32, "f" * 33]
    encoded = junk_text().filter(bool).map(lambda t: quote(t, safe=""))
    raw = st.sampled_from(["%ff", "%00", "%0A", "%zz", "a%2Fb", "nightly%0A", "default%0a"])
    return st.sampled_from(known) | encoded | raw


SAFE_WAITS = ["0", "0.01", "0.05", "-1", "nan", "inf", "-inf", "1e308", "61", "x", ""]
QUERY_KEYS = ["limit", "cursor", "queue", "state", "handler", "group_id", "area", "colour"]


def not_wait(key: str) -> bool:
    """Random keys are never ``wait``: its values are chosen so that nothing is held open."""
    return key != "wait"


@st.composite
def query(draw: st.DrawFn) -> str:
    pairs = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*QUERY_KEYS, "wait"]) | junk_text(8).filter(not_wait))
        if key == "wait":
            value = draw(st.sampled_from(SAFE_WAITS))
        else:
            value = draw(junk_text() | st.sampled_from(["5", "0", "1001", "queued", "persistent"]))
        pairs.append(f"{quote(key, safe='')}={quote(value, safe='')}")
    if draw(st.booleans()):
        pairs.append(draw(st.sampled_from(["%", "%zz", "&&", "=", "a=%ff", "wait"])))
    return ("?" + "&".join(pairs)) if pairs else ""


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.sampled_from([1e308, -1e308, 2**64, 0.0])
    | junk_text()
)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(junk_text(8), inner, max_size=4),
    max_leaves=12,
)
TIMES = st.sampled_from(
    [
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+05:00",
        "0001-01-01T00:00:00-23:59",
        "2026-13-01T00:00:00Z",
        "2020-01-01T00:00:00",
        "now",
    ]
)
# Each field of a job spec: values that pass, and junk. A generated spec is a valid one with at
# most one junk field, so the junk reaches the code behind the checks of the other fields.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "payload": ANY_JSON,
    "queue": st.sampled_from(["default", "q-1", "a.b_c"]),
    "key": st.sampled_from(["k1", "k2", "ключ", "a" * 256]),
    "delay": st.floats(0, 366 * 86400) | st.just(366 * 86400),
    "run_at": st.sampled_from(["2001-01-01T00:00:00Z", "1970-01-01T00:00:00+14:00"]),
    "timeout": st.floats(1e-3, 366 * 86400),
    "max_attempts": st.integers(1, 100),
    "meta": st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=3),
    "sticky": st.booleans(),
}
JUNK: dict[str, st.SearchStrategy[Any]] = {
    "handler": st.sampled_from(["arqd.steps", "nope", "echo\n", "ec\x00ho", "e\x85"]) | ANY_JSON,
    "payload": st.sampled_from([64, 65, 200]).map(lambda d: json.loads(b"[" * d + b"]" * d)),
    "queue": st.sampled_from(["default\n", "a b", "", "x" * 65]) | ANY_JSON,
    "key": st.sampled_from(["k\n", "schedule:x", "", "\x00", "a" * 257]) | ANY_JSON,
    "delay": st.sampled_from([1e308, -1, 366 * 86400 + 1, 2**64]) | ANY_JSON,
    "run_at": TIMES | ANY_JSON,
    "timeout": st.sampled_from([0, 1e308, -1]) | ANY_JSON,
    "max_attempts": st.sampled_from([0, 101, 2**63]) | ANY_JSON,
    "meta": st.sampled_from([{"x": "y" * 5000}, {"d": [[[[[[[[]]]]]]]] * 1}]) | ANY_JSON,
    "sticky": ANY_JSON,
    "steps": st.lists(
        st.fixed_dictionaries(
            {"name": junk_text(), "url": st.sampled_from(["http://127.0.0.1:9/", "ftp://x"])},
            optional={
                "headers": st.dictionaries(junk_text(8), junk_text(), max_size=2),
                "body": ANY_JSON,
            },
        ),
        max_size=2,
    )
    | ANY_JSON,
    "credentials": ANY_JSON,
    "name": junk_text(),
    "colour": ANY_JSON,
}


@st.composite
def job_spec(draw: st.DrawFn) -> dict[str, Any]:
    """``{"handler": "echo"}``, some valid fields, and (mostly) one junk field."""
    spec: dict[str, Any] = {"handler": "echo"}
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True)):
        spec[name] = draw(VALID[name])
    if draw(st.integers(0, 4)):
        name = draw(st.sampled_from(sorted(JUNK)))
        spec[name] = draw(JUNK[name])
        if name == "steps":
            del spec["handler"]
    return spec


def nested(depth: int) -> bytes:
    return b'{"handler": "echo", "payload": ' + b"[" * depth + b"]" * depth + b"}"


SPEC_BODIES = st.one_of(
    job_spec().map(lambda v: json.dumps(v).encode()),
    st.lists(job_spec(), max_size=3).map(lambda js: json.dumps({"jobs": js}).encode()),
    st.builds(
        lambda js, name: json.dumps({"jobs": js, "name": name}).encode(),
        st.lists(job_spec(), max_size=3),
        junk_text(),
    ),
    st.sampled_from([64, 65, 999, 1001, 100_000]).map(nested),
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    ANY_JSON.map(lambda v: json.dumps(v).encode()),
    SPEC_BODIES,
)
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/JSON",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"application/json; charset=\xff",
        b"",
        b";;;",
    ]
)
# Bytes a header value may not hold (RFC 9110 field-value: no controls but HTAB); CR and LF are
# left out so a value cannot end the header early.
FORBIDDEN = bytes([*range(0x00, 0x09), *range(0x0B, 0x0D), *range(0x0E, 0x20), 0x7F])
CRLF = b"\r\n"
RAW_BYTES = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
CLEAN_BYTES = st.binary(max_size=24).map(
    lambda b: bytes(x for x in b if x not in FORBIDDEN + b"\r\n")
)
# Mostly values the HTTP parser lets through (non-UTF-8 included), now and then a control byte.
HEADER_BYTES = st.one_of(CLEAN_BYTES, CLEAN_BYTES, CLEAN_BYTES, RAW_BYTES)


def header_values(port_hint: str, etags: list[str]) -> dict[bytes, st.SearchStrategy[bytes]]:
    return {
        b"Content-Type": CONTENT_TYPES | HEADER_BYTES,
        b"Authorization": st.sampled_from(
            [f"Bearer {SECRET}".encode(), b"Bearer wrong", b"Bearer \xff\xfe", b"Basic x", b""]
        )
        | CLEAN_BYTES.map(lambda b: b"Bearer " + b)
        | HEADER_BYTES,
        b"If-None-Match": st.sampled_from([b"*", b'"x"', b"W/", b'"\xff"', *map(str.encode, etags)])
        | HEADER_BYTES,
        b"Range": st.sampled_from([b"bytes=0-1", b"bytes=-5", b"bytes=9-1", b"bytes=\xff"])
        | HEADER_BYTES,
        b"Origin": st.sampled_from(
            [f"http://{port_hint}".encode(), b"http://evil.example", b"null", b"\xff://x"]
        )
        | HEADER_BYTES,
        b"Host": st.sampled_from(
            [port_hint.encode(), b"localhost", b"evil.example", b"[::1", b"\xff", b"a:b:c"]
        )
        | HEADER_BYTES,
        b"Sec-Fetch-Site": st.sampled_from([b"cross-site", b"same-origin", b"none", b"\xff"]),
        b"Sec-Fetch-Mode": st.sampled_from([b"navigate", b"cors"]),
        b"X-Junk": HEADER_BYTES,
    }


JSON_ROUTES = {("POST", "/v1/jobs"), ("POST", "/v1/jobs/batch"), ("POST", "/v1/groups")}
MUTATIONS = ["method", "path", "query", "header", "header", "auth", "body", "headers"]


@st.composite
def requests(draw: st.DrawFn, seeds: Seeds) -> Request:
    """A request that passes the envelope checks (the route's method, a seeded id, the daemon's
    Host, JSON declared, the token on the token daemon, a job spec for submit routes), then one
    to three mutations: method, path, query, one header, all headers, or body."""
    target = draw(st.sampled_from(["anon", "anon", "token"]))
    method, route, _, _ = draw(st.sampled_from(ROUTES))
    known = seeds.terminal if route.endswith("/events") else seeds.terminal + seeds.live
    path = route.replace("{id}", draw(st.sampled_from(known + seeds.groups)))
    path = path.replace("{name}", draw(st.sampled_from(["nightly", "default"])))
    sent = [(b"Content-Type", b"application/json")]
    if target == "token":
        sent.append((b"Authorization", f"Bearer {SECRET}".encode()))
    body = draw(SPEC_BODIES) if (method, route) in JSON_ROUTES else None
    values = header_values("127.0.0.1", seeds.etags)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if mutation == "method":
            method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"]))
        elif mutation == "path":
            path = route
            for name in ("{id}", "{name}"):
                path = path.replace(name, draw(segment(seeds, route, name)))
        elif mutation == "query":
            path = path.partition("?")[0] + draw(query())
        elif mutation in ("header", "auth"):
            name = b"Authorization" if mutation == "auth" else draw(st.sampled_from(sorted(values)))
            sent = [(n, v) for n, v in sent if n != name] + [(name, draw(values[name]))]
        elif mutation == "headers":
            names = draw(st.lists(st.sampled_from(sorted(values)), max_size=5, unique=True))
            sent = [(name, draw(values[name])) for name in names]
        else:
            body = draw(BODIES)
    malformed = any(byte in FORBIDDEN for _, value in sent for byte in value)
    return Request(target, method, path, sent, body, malformed)


# --- sending and checking -------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(port: int, request: Request) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request.encode(port))
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding") == "chunked":
        body = unchunk(body)
    return Answer(int(lines[0].split(" ")[1]), found, body)


def unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def check(served: Served, request: Request) -> None:
    before = served.snapshot()
    answer = send(served.ports[request.target], request)
    assert answer.status < 500, (request, answer)
    if answer.status < 400:
        return
    assert served.snapshot() == before, ("a refused request changed the store", request, answer)
    if request.malformed and answer.headers.get("content-type", "").startswith("text/plain"):
        assert answer.status == 400, (request, answer)  # aiohttp's parser, before arqd
        return
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    if request.method == "HEAD":
        return  # the error's headers, without its body
    body = json.loads(answer.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def test_every_route_survives_generated_requests(served: Served):
    """Random methods, paths with seeded and junk ids, query strings, headers (non-UTF-8,
    control characters, odd Host/Origin) and bodies (JSON, bytes, deep nesting) on every route:
    no 5xx, JSON errors, and no stored change for a refused request."""

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        check(served, data.draw(requests(served.seeds)))

    run()


def test_job_specs_survive_generated_fields(served: Served):
    """Job specs built from junk field values (times, names, nesting, steps) on the submit
    routes, declared as JSON from the daemon's own host: no 5xx, a refused one stores nothing."""
    routes = ["/v1/jobs", "/v1/jobs/batch", "/v1/groups"]

    @SETTINGS
    @given(st.sampled_from(routes), st.lists(job_spec(), min_size=1, max_size=3))
    def run(route: str, specs: list[dict[str, Any]]) -> None:
        body = specs[0] if route == "/v1/jobs" else {"jobs": specs}
        headers = [(b"Content-Type", b"application/json")]
        check(served, Request("anon", "POST", route, headers, json.dumps(body).encode(), False))

    run()
