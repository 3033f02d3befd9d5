"""Prometheus metrics (``GET /metrics``), with the official client library.

Each ``App`` owns one registry (so several apps in one process, as in tests, do not collide).
:class:`Metrics` is the core's and the pool's :class:`~arqd.observe.Observer` (which includes the
backends' ``BackendObserver``): counters and histograms are fed where things happen (submits in
the core, outcomes and leases in the pool, backend calls by the backend's base), through the
observer's calls; queue depth, oldest ready age, in-flight jobs and concurrency are read when
scraped. ``docs/operations.md`` explains each and suggests alerts.

Label values come from configuration, never from clients: a series per queue only for the queues
the config names (``Metrics.name``: the workers' queues, handlers', schedules' and groups' queues
and ``default``) and per handler only for registered handlers; every other queue or handler
counts under ``other``. Any client may submit to queues ``x1``, ``x2``, ... (and name
unknown handlers, with no registry), and each name made new series for as long as the process
lived.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from arqd.backends.base import QueueStats
from arqd.observe import Ended, LostAt

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
BACKEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
OTHER = "other"  # the label value of every queue or handler the config does not name

Labels = tuple[str, ...]
Guard = Callable[[Labels], Labels]


def _as_is(labels: Labels) -> Labels:
    return labels


class FastCounter:
    """A labelled counter for the per-job hot path: a dict increment, no lock (the event loop
    is one thread); exposed in Prometheus form by :class:`_Fast` at scrape time. Label values
    not seen yet pass ``guard`` first (see the module docstring)."""

    def __init__(self, name: str, doc: str, labels: Labels, guard: Guard = _as_is) -> None:
        self.name, self.doc, self.label_names, self.guard = name, doc, labels, guard
        self.values: dict[Labels, float] = {}

    def inc(self, *labels: str) -> None:
        if labels not in self.values:
            labels = self.guard(labels)
        self.values[labels] = self.values.get(labels, 0.0) + 1.0

    def labels(self, *labels: str) -> _Child:
        """``prometheus_client``'s ``counter.labels(...).inc()`` form."""
        return _Child(self, labels)

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class _Child:
    def __init__(self, counter: FastCounter, labels: Labels) -> None:
        self._counter, self._labels = counter, labels

    def inc(self) -> None:
        self._counter.inc(*self._labels)


class FastHistogram:
    """A labelled histogram for the hot path: one ``bisect`` and two additions per observation
    (prometheus_client's own took a fifth of the pool's time per job)."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Labels,
        buckets: tuple[float, ...],
        guard: Guard = _as_is,
    ) -> None:
        self.name, self.doc, self.label_names, self.bounds = name, doc, labels, buckets
        self.guard = guard
        self.data: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        entry = self.data.get(labels)
        if entry is None:
            labels = self.guard(labels)
            entry = self.data.get(labels)
        if entry is None:
            entry = self.data[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        entry[0][bisect.bisect_left(self.bounds, value)] += 1
        entry[1][0] += value

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels, (counts, total) in self.data.items():
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(labels, cumulative, total[0])
        return family


class _Fast(Collector):
    def __init__(self, metrics: list[FastCounter | FastHistogram]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return [m.collect() for m in self._metrics]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._queues: frozenset[str] = frozenset({"default"})
        self._handlers: frozenset[str] | None = None  # None: every name (no registry yet)
        by_queue_handler = self._guard(queue=0, handler=1)
        self.submitted = FastCounter(
            "arqd_jobs_submitted_total",
            "Jobs stored by submits.",
            ("queue", "handler"),
            by_queue_handler,
        )
        self.finished = FastCounter(
            "arqd_jobs_finished_total",
            "Jobs that reached a terminal state in this process.",
            ("queue", "handler", "state"),
            by_queue_handler,
        )
        self.retries = FastCounter(
            "arqd_job_retries_total",
            "Failed attempts sent back to the queue for another try.",
            ("queue", "handler"),
            by_queue_handler,
        )
        self.lease_expiries = FastCounter(
            "arqd_lease_expiries_total",
            "Jobs leased again after their lease expired: recovered from a dead or stalled "
            "consumer.",
            ("queue",),
            self._guard(queue=0),
        )
        self.lease_conflicts = Counter(
            "arqd_lease_conflicts_total",
            "Writes refused because this process had lost the job's lease.",
            ["operation"],
            registry=r,
        )
        self.queue_jobs = Gauge(
            "arqd_queue_jobs", "Jobs per queue and state.", ["queue", "state"], registry=r
        )
        self.queue_oldest = Gauge(
            "arqd_queue_oldest_ready_seconds",
            "Age of the oldest job ready to run, per queue.",
            ["queue"],
            registry=r,
        )
        self.handler_seconds = FastHistogram(
            "arqd_handler_duration_seconds",
            "Duration of attempts, by handler and outcome.",
            ("handler", "outcome"),
            DURATION_BUCKETS,
            self._guard(handler=0),
        )
        self.queue_wait = FastHistogram(
            "arqd_queue_wait_seconds",
            "Time from ready to leased, per queue.",
            ("queue",),
            DURATION_BUCKETS,
            self._guard(queue=0),
        )
        self.backend_seconds = Histogram(
            "arqd_backend_request_seconds",
            "Latency of queue backend calls.",
            ["operation"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "arqd_backend_errors_total",
            "Queue backend calls that failed.",
            ["operation"],
            registry=r,
        )
        self._backend_ops: dict[str, tuple[Any, Any]] = {}  # label children, bound once
        self.in_flight = Gauge(
            "arqd_jobs_in_flight", "Attempts running in this process.", registry=r
        )
        self.concurrency = Gauge(
            "arqd_workers_concurrency",
            "Configured consumer concurrency of this process.",
            registry=r,
        )
        self.held = Gauge(
            "arqd_http_held_requests",
            "Long-polls and event streams open in this process (at most server.max_held).",
            registry=r,
        )
        self.reloads = Counter(
            "arqd_config_reloads_total", "Config reloads (SIGHUP).", ["result"], registry=r
        )
        fast: list[FastCounter | FastHistogram] = [
            self.submitted,
            self.finished,
            self.retries,
            self.lease_expiries,
            self.handler_seconds,
            self.queue_wait,
        ]
        r.register(_Fast(fast))

    def name(self, queues: Iterable[str], handlers: Collection[str] | None) -> None:
        """The queues and handlers that get series of their own (the core calls this with each
        config and registry); ``handlers=None`` keeps every handler name."""
        self._queues = frozenset(queues)
        self._handlers = None if handlers is None else frozenset(handlers)

    # --- the Observer (arqd/observe.py): what the core and the pool report ------------------------

    def configured(self, queues: Collection[str], handlers: Collection[str] | None) -> None:
        self.name(queues, handlers)

    def job_submitted(self, queue: str, handler: str) -> None:
        self.submitted.inc(queue, handler)

    def lease_recovered(self, queue: str) -> None:
        self.lease_expiries.inc(queue)

    def lease_lost(self, where: LostAt) -> None:
        self.lease_conflicts.labels(where).inc()

    def attempt_started(self, queue: str, waited: float) -> None:
        self.queue_wait.observe(waited, queue)

    def attempt_ended(self, queue: str, handler: str, ended: Ended, seconds: float | None) -> None:
        if ended == "retry":
            self.retries.inc(queue, handler)
        elif ended != "released":
            self.finished.inc(queue, handler, ended)
        if seconds is not None:
            self.handler_seconds.observe(seconds, handler, ended)

    def queue(self, name: str) -> str:
        return name if name in self._queues else OTHER

    def handler(self, name: str) -> str:
        return name if self._handlers is None or name in self._handlers else OTHER

    def _guard(self, *, queue: int | None = None, handler: int | None = None) -> Guard:
        def guard(labels: Labels) -> Labels:
            out = list(labels)
            if queue is not None:
                out[queue] = self.queue(out[queue])
            if handler is not None:
                out[handler] = self.handler(out[handler])
            return tuple(out)

        return guard

    def set_queue_stats(self, stats: list[QueueStats]) -> None:
        """The backend's per-queue counts; queues the config does not name are summed into
        ``other`` (their oldest ready age is the oldest of them)."""
        states = ("queued", "running", "succeeded", "failed", "cancelled")
        counts: dict[str, list[int]] = {}
        oldest: dict[str, float] = {}
        for s in stats:
            name = self.queue(s.name)
            row = counts.setdefault(name, [0] * len(states))
            for i, state in enumerate(states):
                row[i] += getattr(s, state)
            oldest[name] = max(oldest.get(name, 0.0), s.oldest_queued_seconds or 0.0)
        self.queue_jobs.clear()
        self.queue_oldest.clear()
        for name, row in counts.items():
            for state, n in zip(states, row, strict=True):
                self.queue_jobs.labels(name, state).set(n)
            self.queue_oldest.labels(name).set(oldest[name])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def backend_call(self, op: str, seconds: float, failed: bool) -> None:
        """A queue backend call (``arqd.backends.base.BackendObserver``): its latency, and
        whether it failed. ``op`` is a method name of the backend contract, never a client's."""
        children = self._backend_ops.get(op)
        if children is None:
            children = self._backend_ops[op] = (
                self.backend_seconds.labels(op),
                self.backend_errors.labels(op),
            )
        children[0].observe(seconds)
        if failed:
            children[1].inc()
