"""Keep ``/v1/openapi.json`` true: schemathesis fuzzes a running ``arqd serve`` from the document.

Every operation gets schemathesis's example, coverage (boundary values, missing and invalid
parameters) and fuzzing phases, positive and negative data, a fixed seed and a small budget; each
response must not be a 5xx, and its status, content type, headers and body must be the documented
ones.

Random ids only ever reach 404s, so the daemon is seeded first with jobs in every state (inline
and blob results, failed by a handler and by a refused step, cancelled, queued, running), two
groups and a schedule, and a ``flatmap_case`` hook swaps those ids into some of the generated
cases (with the job's ETag as ``If-None-Match`` now and then, for the 304).

The daemon consumes only the ``seeded`` queue, so jobs the fuzzer submits (to ``default`` or a
random queue) are stored and listed but never run: no handler runs on fuzzed input, and no step
ever makes a request (``http_steps.allow_hosts`` names only a closed loopback port besides).
Event streams end at once on terminal jobs, so only terminal jobs are swapped into
``/events``. A long-poll of a terminal job is held until ``wait`` passes (docs/http-api.md: a client
long-polling in a loop must not spin), so where a seeded (terminal) id goes into
``GET /v1/jobs/{id}`` a valid ``wait`` is shortened to at most ``SEEDED_WAIT``: the case still
long-polls, with and without a matching ``If-None-Match``, and answers 304 or 200 after it;
invalid ``wait`` values are kept as generated. Every request has a timeout all the same.
Schemathesis leaves out the operation serving the document itself; ``tests/test_openapi.py``
covers it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .daemons import Daemons, sqlite_config

pytestmark = pytest.mark.timeout(240)

SEEDED = "seeded"  # the only queue the daemon consumes
PARKED = "parked"  # jobs here stay queued
DEDUPE_KEY = "seeded-echo"  # the key of a succeeded seeded job
TIMEOUT = 10.0  # seconds for any one request
SEEDED_WAIT = 0.2  # the longest long-poll of a seeded (terminal) job
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CONFIG = {
    "seed": 20240601,
    "request-timeout": TIMEOUT,
    "generation": {"max-examples": 20, "deterministic": True, "mode": "all"},
    "phases": {"stateful": {"enabled": False}},
    "suppress-health-check": ["all"],  # a loaded CI machine must not fail on generation speed
}

WORKERS = f"""
queues = ["{SEEDED}"]
concurrency = 4
"""
EXTRA = f"""
[groups.nightly]
jobs = [
  {{ name = "a", handler = "noop", queue = "{SEEDED}" }},
  {{ name = "b", handler = "echo", queue = "{SEEDED}", payload = {{ n = 1 }} }},
]

[[schedules]]
name = "hourly"
every = "1h"
handler = "noop"
queue = "{SEEDED}"

[http_steps]
allow_hosts = ["127.0.0.1:9"]
"""


@dataclass
class Seeds:
    """Ids worth sending, per path parameter of each operation."""

    terminal: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    doomed: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    etags: dict[str, str] = field(default_factory=dict)

    def pools(self) -> dict[tuple[str, str], tuple[str, list[str]]]:
        return {
            ("GET", "/v1/jobs/{id}"): ("id", self.terminal),
            ("GET", "/v1/jobs/{id}/events"): ("id", self.terminal),
            ("GET", "/v1/jobs/{id}/result"): ("id", self.terminal + self.live),
            ("DELETE", "/v1/jobs/{id}"): ("id", self.doomed),
            ("POST", "/v1/jobs/{id}/cancel"): ("id", self.doomed),
            ("GET", "/v1/groups/{id}"): ("id", self.groups),
            ("DELETE", "/v1/groups/{id}"): ("id", self.groups),
            ("POST", "/v1/groups/{name}"): ("name", ["nightly"]),
            ("POST", "/v1/queues/{name}/redrive"): ("name", [PARKED]),
        }


class Api:
    """Plain requests for seeding; any answer but a 2xx fails the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        resp = self.http.request(
            method, self.url + path, json=body, params=params or None, timeout=TIMEOUT
        )
        assert resp.status_code < 300, (method, path, resp.status_code, resp.text)
        return resp.json() if resp.content else None

    def submit(self, handler: str, payload: Any = None, **fields: Any) -> str:
        job = self.call("POST", "/v1/jobs", {"handler": handler, "payload": payload, **fields})
        return str(job["id"])

    def settle(self, job_id: str, *states: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            job: dict[str, Any] = self.call("GET", f"/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.02)


def seed(url: str) -> Seeds:
    """Jobs in every state, two groups; returns their ids."""
    api = Api(url)
    seeds = Seeds()
    finished = [
        api.submit("echo", {"hello": "world"}, queue=SEEDED, key=DEDUPE_KEY, meta={"a": 1}),
        api.submit("echo", {"big": "x" * 4096}, queue=SEEDED),  # a JSON blob
        api.submit("blob", {"size": 5000}, queue=SEEDED),
        api.submit("echo", [1, 2], queue=SEEDED, sticky=True),
        api.submit("progress", {"steps": 2, "seconds": 0.1}, queue=SEEDED),
        api.submit("fail", {"permanent": True}, queue=SEEDED),
        api.submit("fail", None, queue=SEEDED, max_attempts=2),
    ]
    step = {"name": "refused", "url": "http://host.invalid/", "max_attempts": 1}
    steps_job = api.call("POST", "/v1/jobs", {"steps": [step], "queue": SEEDED})
    finished.append(steps_job["id"])
    cancelled = api.submit("noop", queue=PARKED)
    api.call("POST", f"/v1/jobs/{cancelled}/cancel")
    for job_id in finished:
        api.settle(job_id, "succeeded", "failed")
    seeds.terminal = [*finished, cancelled]
    for job_id in seeds.terminal:
        resp = api.http.get(f"{url}/v1/jobs/{job_id}", timeout=TIMEOUT)
        seeds.etags[job_id] = resp.headers["ETag"]

    running = api.submit("sleep", {"seconds": 600}, queue=SEEDED)
    doomed_running = api.submit("sleep", {"seconds": 600}, queue=SEEDED)
    api.settle(running, "running")
    api.settle(doomed_running, "running")
    queued = api.submit("noop", queue=PARKED, delay=300 * 86400)
    seeds.live = [running, queued]
    done = api.submit("noop", queue=SEEDED)
    api.settle(done, "succeeded")
    seeds.doomed = [
        doomed_running,
        done,
        *(api.submit("echo", i, queue=PARKED) for i in range(3)),
    ]

    nightly = api.call("POST", "/v1/groups/nightly")["group"]["id"]
    adhoc = api.call(
        "POST", "/v1/groups", {"name": "adhoc", "jobs": [{"handler": "noop", "queue": PARKED}]}
    )["group"]["id"]
    seeds.groups = [nightly, adhoc]
    api.call("DELETE", "/v1/cache", area="persistent")  # the sticky result: 410 expired
    return seeds


def with_handler(body: Any, fields: dict[str, str]) -> Any:
    """``body`` with ``fields`` in each job spec that names a handler."""
    if isinstance(body, dict) and isinstance(body.get("jobs"), list):
        return {**body, "jobs": [with_handler(spec, fields) for spec in body["jobs"]]}
    if isinstance(body, dict) and "handler" in body:
        return {**body, **fields}
    return body


SUBMITS = {("POST", "/v1/jobs"), ("POST", "/v1/jobs/batch"), ("POST", "/v1/groups")}
# What a generated job spec may become: itself, a job of a registered handler, a dedupe hit.
SPEC_EDITS: list[dict[str, str] | None] = [
    None,
    {"handler": "echo"},
    {"handler": "echo", "key": DEDUPE_KEY},
]


def swap_in(seeds: Seeds) -> Callable[..., Any]:
    """A ``flatmap_case`` hook: keep the generated case, or put a seeded id (and its ETag) in it,
    or a registered handler in its job specs (random names are only ever unknown handlers)."""
    pools = seeds.pools()

    def flatmap_case(context: Any, case: Any) -> Any:
        operation = (case.operation.method.upper(), case.operation.path)
        if operation in SUBMITS:

            def edit(fields: dict[str, str] | None) -> Any:
                if fields is not None:
                    case.body = with_handler(case.body, fields)
                return case

            return st.sampled_from(SPEC_EDITS).map(edit)
        if operation not in pools:
            return st.just(case)
        name, values = pools[operation]

        def put(value: str | None, etag: bool) -> Any:
            if value is not None:
                case.path_parameters = {**(case.path_parameters or {}), name: value}
                if etag and value in seeds.etags:
                    case.headers = {**(case.headers or {}), "If-None-Match": seeds.etags[value]}
                if operation == ("GET", "/v1/jobs/{id}"):
                    case.query = shorter_wait(case.query)
            return case

        return st.builds(put, st.sampled_from([None, *values]), st.booleans())

    return flatmap_case


def shorter_wait(query: dict[str, Any] | None) -> dict[str, Any] | None:
    """``query`` with a valid ``wait`` cut to ``SEEDED_WAIT`` (a terminal job is held that long)."""
    if not query or "wait" not in query or isinstance(query["wait"], bool):
        return query
    try:
        wait = float(query["wait"])
    except (TypeError, ValueError):
        return query
    if not 0 <= wait <= 60:
        return query
    return {**query, "wait": min(wait, SEEDED_WAIT)}


@pytest.fixture
def api_schema(daemons: Daemons, tmp_path: Path) -> Any:
    """The document as served by a seeded daemon, with the seeds hook."""
    daemon = daemons.start(sqlite_config(tmp_path, workers=WORKERS, extra=EXTRA))
    seeds = seed(daemon.url)
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(f"{daemon.url}/v1/openapi.json", config=config)
    schema.hook(swap_in(seeds))
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_daemon_matches_its_openapi_document(case: Any) -> None:
    """Every response to generated requests is documented: status, media type, headers, body."""
    case.call_and_validate(checks=CHECKS, timeout=TIMEOUT)
