"""GET /metrics: every family is arqd_-prefixed and moves as jobs flow."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

import arqd
from arqd.backends.memory import MemoryQueue
from arqd.clock import ManualClock
from arqd.config import Config
from arqd.core import Core
from arqd.handlers import Registry
from arqd.http.server import make_app
from arqd.model import JobSpec
from arqd.observe import Ended, LostAt
from arqd.pool import Pool
from arqd.results.memory import MemoryResults
from arqd.stepmodel import STEPS_HANDLER

from .util import eventually


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[arqd.App, TestServer, ManualClock]]:
    clock = ManualClock()
    config = Config.from_dict(
        {
            "workers": {"concurrency": 2, "poll_max": "50ms"},
            "defaults": {"max_attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}},
            "handlers": {"echo": "arqd.demo:echo", "fail": "arqd.demo:fail"},
        }
    )
    app = arqd.App(config, queue=MemoryQueue(clock=clock), results=MemoryResults(clock=clock))
    async with app:
        server = TestServer(make_app(app), host="127.0.0.1")
        await server.start_server()
        try:
            yield app, server, clock
        finally:
            await server.close()


async def scrape(server: TestServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("arqd_"), family.name
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


async def test_metrics_move_as_jobs_flow(served: tuple[arqd.App, TestServer, ManualClock]):
    """Submits, finishes by state, retries, queue gauges, backend latency and lease expiries
    all show up in the scrape."""
    app, server, clock = served
    for i in range(3):
        await app.client.wait((await app.client.submit("echo", i)).id, timeout=10)
    failing = await app.client.submit("fail")

    async def failed() -> bool:
        clock.advance(1)  # past the retry's backoff, on the injected clock
        return (await app.client.get(failing.id)).state == "failed"

    await eventually(failed)
    await app.client.submit("echo", "later", delay=3600)
    m = await scrape(server)
    q, h = ("handler", "echo"), ("queue", "default")
    assert m["arqd_jobs_submitted_total", (q, h)] == 4
    assert m["arqd_jobs_finished_total", (q, h, ("state", "succeeded"))] == 3
    assert m["arqd_jobs_finished_total", (("handler", "fail"), h, ("state", "failed"))] == 1
    assert m["arqd_job_retries_total", (("handler", "fail"), h)] == 1
    assert m["arqd_queue_jobs", (h, ("state", "succeeded"))] == 3
    assert m["arqd_queue_jobs", (h, ("state", "queued"))] == 1
    assert m["arqd_backend_request_seconds_count", (("operation", "lease"),)] >= 1
    assert m["arqd_workers_concurrency", ()] == 2
    assert m["arqd_handler_duration_seconds_count", (q, ("outcome", "succeeded"))] == 3
    # a lease that expires (its consumer "died") is counted when the job is leased again
    await app.core.queue.lease(["expiring"], 1, 30, "gone")
    job = await app.client.submit("echo", "x", queue="expiring")
    await app.core.queue.lease(["expiring"], 1, 30, "a-dying-worker")
    clock.advance(31)
    app.with_workers(queues=["default", "expiring"])
    await app.client.wait(job.id, timeout=10)
    m = await scrape(server)
    assert m["arqd_lease_expiries_total", (("queue", "expiring"),)] == 1


async def test_client_chosen_names_do_not_grow_the_scrape(
    served: tuple[arqd.App, TestServer, ManualClock],
):
    """Jobs in queues the config does not name count under ``queue="other"``, in the counters
    and the queue gauges alike, however many such names clients invent; so do handlers that are
    not registered (a job stored by a daemon with another config, failed here)."""
    app, server, _ = served
    for i in range(30):
        await app.client.submit("echo", i, queue=f"x{i}", delay=3600)
    await app.client.submit("echo", "mine", delay=3600)
    m = await scrape(server)
    queues = {dict(labels).get("queue") for _, labels in m} - {None}
    assert queues == {"default", "other"}
    other, echo = ("queue", "other"), ("handler", "echo")
    assert m["arqd_jobs_submitted_total", (echo, other)] == 30
    assert m["arqd_queue_jobs", (other, ("state", "queued"))] == 30
    assert m["arqd_queue_jobs", (("queue", "default"), ("state", "queued"))] == 1
    app.metrics.finished.inc("x31", "unheard.of", "failed")
    app.metrics.lease_expiries.labels("x32").inc()
    m = await scrape(server)
    assert m["arqd_jobs_finished_total", (("handler", "other"), other, ("state", "failed"))] == 1
    assert m["arqd_lease_expiries_total", (other,)] == 1


class Recorder:
    """An observer of one's own: what the core and the pool reported, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.backend_ops: set[str] = set()

    def configured(self, queues: Collection[str], handlers: Collection[str] | None) -> None:
        self.calls.append(("configured", set(queues), set(handlers or ())))

    def backend_call(self, op: str, seconds: float, failed: bool) -> None:
        self.backend_ops.add(op)

    def job_submitted(self, queue: str, handler: str) -> None:
        self.calls.append(("submitted", queue, handler))

    def lease_recovered(self, queue: str) -> None:
        self.calls.append(("recovered", queue))

    def lease_lost(self, where: LostAt) -> None:
        self.calls.append(("lost", where))

    def attempt_started(self, queue: str, waited: float) -> None:
        assert waited >= 0
        self.calls.append(("started", queue))

    def attempt_ended(self, queue: str, handler: str, ended: Ended, seconds: float | None) -> None:
        assert seconds is not None and seconds >= 0
        self.calls.append(("ended", queue, handler, ended))


async def test_the_core_and_the_pool_report_to_any_observer(tmp_path: Path):
    """A core and a pool given an observer of one's own (no Prometheus) tell it the configured
    names, each job stored, each attempt started and how each attempt ended; the backend its
    calls."""
    recorder = Recorder()
    config = Config.from_dict(
        {
            "workers": {"concurrency": 2, "poll_max": "20ms"},
            "defaults": {"max_attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}},
            "handlers": {"echo": "arqd.demo:echo", "fail": "arqd.demo:fail"},
        }
    )
    registry = Registry.from_config(config)
    core = Core(MemoryQueue(), MemoryResults(), config, registry, observer=recorder)
    assert recorder.calls[0] == ("configured", {"default"}, {"echo", "fail", STEPS_HANDLER})
    pool = Pool(core)
    await pool.start()
    try:
        await core.submit([JobSpec(handler="echo", payload=1), JobSpec(handler="fail")])
        ended = [("ended", "default", "fail", "failed"), ("ended", "default", "echo", "succeeded")]
        await eventually(lambda: all(c in recorder.calls for c in ended))
    finally:
        await pool.stop()
    calls = recorder.calls[1:]
    assert calls[:2] == [("submitted", "default", "echo"), ("submitted", "default", "fail")]
    assert calls.count(("started", "default")) == 3
    assert ("ended", "default", "fail", "retry") in calls
    assert len([c for c in calls if c[0] == "ended"]) == 3
    assert {"enqueue", "lease", "finish"} <= recorder.backend_ops


async def test_an_apps_metrics_time_a_backend_a_client_used_first():
    """A bare Client used first on a queue does not take the backend's observer: the App that
    shares the queue afterwards still times its backend calls in /metrics."""
    config = Config.from_dict({"handlers": {"echo": "arqd.demo:echo"}})
    queue, results = MemoryQueue(), MemoryResults()
    async with arqd.Client(queue, results, config=config) as client:
        first = await client.submit("echo", 1)
    app = arqd.App(config, queue=queue, results=results)
    async with app:
        await app.client.wait(first.id, timeout=10)
    leases = [
        s.value
        for family in text_string_to_metric_families(app.metrics.render().decode())
        for s in family.samples
        if s.name == "arqd_backend_request_seconds_count" and s.labels["operation"] == "lease"
    ]
    assert leases and leases[0] >= 1
