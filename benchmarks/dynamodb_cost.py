"""What a job costs on DynamoDB: requests, write and read request units, per operation.

    python -m benchmarks.dynamodb_cost [--jobs 300] [--rate 20] [--idle 5] [--shards 8]

Starts its own moto server (DynamoDB and S3 over HTTP on 127.0.0.1) and runs no-op jobs through
``arqd.App`` in-process on dynamodb + s3. Jobs are submitted through a second handle on the table
that shares no wake-ups with the pool, as another host would submit them, so the pool finds them
by polling, and polling is part of the bill. Three phases:

- ``backlog``: N jobs submitted in batches of 100, then the pool starts and drains them;
- ``steady``: the pool runs; N jobs arrive one at a time at ``--rate`` per second;
- ``idle``: the pool runs, nothing arrives, for ``--idle`` seconds (cost per host per second).

Results expire after 1 s, and each job phase ends by sweeping them (``sweep_expired``), so a
job's whole life is counted: submit, lease, finish, sweep, plus polling, counter flushes and the
worker row.

Units: moto answers ``ConsumedCapacity`` without regard to item sizes or index writes, so every
request is priced here instead, by DynamoDB's published rules (``price_*`` below): a write unit
per started KiB of the larger of the item before and after (a failed conditional write still
costs), plus one write per index entry added, removed or changed (two when the index key
changes); a read unit per started 4 KiB read, halved for eventually consistent reads, at least
one unit a request (per key for BatchGetItem); transactions cost twice. Prices: on-demand,
$1.25 per million write units and $0.25 per million read units.

The last line of output is one JSON object (keys in the module's ``report`` and
docs/dynamodb.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import arqd
from arqd import logs
from arqd.backends.dynamodb import GSIS, DynamoQueue, DynamoSettings
from arqd.config import Config
from arqd.stores import make_results

WRU_USD = 1.25 / 1e6
RRU_USD = 0.25 / 1e6
WRITE_UNIT = 1024
READ_UNIT = 4096
# Calls the pool does not make for jobs: they are priced but kept out of the per-job figures.
NOT_PER_JOB = frozenset({"setup"})
CONTROL_PLANE = frozenset(
    {"CreateTable", "DescribeTable", "UpdateTable", "DescribeTimeToLive", "UpdateTimeToLive"}
)
SNAKE = re.compile(r"(?<=[a-z])(?=[A-Z])")  # PutItem → put_item
LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("arqd_bench_op", default="other")
METERED = (
    "enqueue",
    "lease",
    "heartbeat",
    "update",
    "finish",
    "cancel",
    "get",
    "get_many",
    "list_jobs",
    "stats",
    "sweep_expired",
    "register_worker",
    "remove_worker",
    "list_workers",
    "ping",
)


# --- item sizes and the price of one request ------------------------------------------------------


def value_size(v: dict[str, Any]) -> int:
    (kind, x), *_ = v.items()
    if kind == "S":
        return len(x.encode())
    if kind == "N":  # about one byte per two significant digits, plus one
        digits = len(x.lstrip("-").replace(".", "").strip("0")) or 1
        return (digits + 1) // 2 + 1
    if kind == "B":
        return len(x)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "M":
        return 3 + sum(len(k.encode()) + value_size(e) + 1 for k, e in x.items())
    if kind == "L":
        return 3 + sum(value_size(e) + 1 for e in x)
    return sum(len(e) for e in x)  # sets


def item_size(item: dict[str, Any] | None) -> int:
    return 0 if not item else sum(len(k.encode()) + value_size(v) for k, v in item.items())


def units(size: int, unit: int) -> int:
    return max(1, math.ceil(size / unit))


def index_writes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> int:
    """Writes to the global secondary indexes when an item goes from ``old`` to ``new``."""
    total = 0
    for gsi in GSIS:
        keys = [k["AttributeName"] for k in gsi["KeySchema"]]
        projected = [*keys, "pk", "sk", *gsi["Projection"].get("NonKeyAttributes", [])]
        was = old is not None and all(k in old for k in keys)
        now = new is not None and all(k in new for k in keys)
        entry = 0
        if now:
            assert new is not None
            entry = units(item_size({a: new[a] for a in projected if a in new}), WRITE_UNIT)
        if was and now:
            assert old is not None and new is not None
            if any(old[k] != new[k] for k in keys):
                total += 1 + entry  # delete the old entry, put the new one
            elif any(old.get(a) != new.get(a) for a in projected):
                total += entry
        elif now:
            total += entry
        elif was:
            total += 1
    return total


def key_of(item: dict[str, Any]) -> tuple[str, str]:
    return item["pk"]["S"], item["sk"]["S"]


class Meter:
    """Prices every request of the clients it is attached to, by (label, operation)."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], dict[str, Any]] = {}  # last known version of items
        self.requests: Counter[tuple[str, str]] = Counter()
        self.wru: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.rru: defaultdict[tuple[str, str], float] = defaultdict(float)

    def attach(self, client: Any) -> None:
        client.meta.events.register("provide-client-params.dynamodb", self._params)
        client.meta.events.register("after-call.dynamodb", self._priced)

    def _params(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["bench_params"] = dict(params)
        context["bench_label"] = LABEL.get()

    def _priced(
        self, parsed: dict[str, Any], model: Any, context: dict[str, Any], **_: Any
    ) -> None:
        op = model.name
        label = "setup" if op in CONTROL_PLANE else context.get("bench_label", "other")
        params = context.get("bench_params", {})
        price = getattr(self, f"price_{SNAKE.sub('_', op).lower()}", None)
        w, r = price(params, parsed) if price is not None else (0.0, 0.0)
        self.requests[label, op] += 1
        self.wru[label, op] += w
        self.rru[label, op] += r

    # One method per operation, named after it: (write units, read units). A response with
    # "Error" is a refused condition (or a cancelled transaction).

    def price_put_item(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        new, key = p["Item"], key_of(p["Item"])
        if "Error" in out:
            return units(item_size(new), WRITE_UNIT), 0.0
        old = self.items.get(key)
        self.items[key] = new
        size = max(item_size(old), item_size(new))
        return units(size, WRITE_UNIT) + index_writes(old, new), 0.0

    def price_update_item(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        key = (p["Key"]["pk"]["S"], p["Key"]["sk"]["S"])
        old = self.items.get(key)
        if "Error" in out:
            current = out.get("Item")
            if current:
                self.items[key] = current
            return units(item_size(current or old), WRITE_UNIT), 0.0
        new = out.get("Attributes")
        if new is None:  # no ReturnValues: a small item, or a change no index sees
            return units(item_size(old), WRITE_UNIT), 0.0
        self.items[key] = new
        size = max(item_size(old), item_size(new))
        return units(size, WRITE_UNIT) + index_writes(old, new), 0.0

    def price_delete_item(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        key = (p["Key"]["pk"]["S"], p["Key"]["sk"]["S"])
        if "Error" in out:
            return units(item_size(out.get("Item") or self.items.get(key)), WRITE_UNIT), 0.0
        old = out.get("Attributes") or self.items.get(key)
        self.items.pop(key, None)
        return units(item_size(old), WRITE_UNIT) + index_writes(old, None), 0.0

    def price_transact_write_items(
        self, p: dict[str, Any], out: dict[str, Any]
    ) -> tuple[float, float]:
        total = 0.0
        for action in p["TransactItems"]:
            put = action.get("Put")
            if put is None:
                total += 2
                continue
            total += 2 * units(item_size(put["Item"]), WRITE_UNIT)
            if "Error" not in out:
                total += index_writes(self.items.get(key_of(put["Item"])), put["Item"])
                self.items[key_of(put["Item"])] = put["Item"]
        return total, 0.0

    def price_get_item(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        per = 1.0 if p.get("ConsistentRead") else 0.5
        return 0.0, per * units(item_size(out.get("Item")), READ_UNIT)

    def price_batch_get_item(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        total = 0.0
        for table, request in p["RequestItems"].items():
            per = 1.0 if request.get("ConsistentRead") else 0.5
            found = {key_of(i): i for i in out.get("Responses", {}).get(table, [])}
            for key in request["Keys"]:
                total += per * units(item_size(found.get(key_of(key))), READ_UNIT)
        return 0.0, total

    def price_query(self, p: dict[str, Any], out: dict[str, Any]) -> tuple[float, float]:
        per = 1.0 if p.get("ConsistentRead") else 0.5
        items = out.get("Items", [])
        size = sum(item_size(i) for i in items)
        scanned, count = out.get("ScannedCount", len(items)), len(items)
        if scanned > count:  # a filter dropped some: they were read all the same
            size = size * scanned // count if count else 100 * scanned
        return 0.0, per * units(size, READ_UNIT)

    def snapshot(self) -> dict[str, Any]:
        return {"requests": Counter(self.requests), "wru": dict(self.wru), "rru": dict(self.rru)}


def since(meter: Meter, before: dict[str, Any]) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(requests, WRU, RRU) per (label, operation) since ``before``."""
    rows = {}
    for key, n in meter.requests.items():
        dn = n - before["requests"].get(key, 0)
        dw = meter.wru.get(key, 0.0) - before["wru"].get(key, 0.0)
        dr = meter.rru.get(key, 0.0) - before["rru"].get(key, 0.0)
        if dn:
            rows[key] = (dn, dw, dr)
    return rows


# --- the queue under measurement ------------------------------------------------------------------


def _labelled(name: str) -> Callable[..., Any]:
    async def method(self: DynamoQueue, *args: Any, **kwargs: Any) -> Any:
        token = LABEL.set(name)
        try:
            return await getattr(DynamoQueue, name)(self, *args, **kwargs)
        finally:
            LABEL.reset(token)

    method.__name__ = name
    return method


class MeteredQueue(DynamoQueue):
    """A DynamoQueue whose requests are labelled with the contract method that made them."""

    def __init__(self, settings: DynamoSettings, meter: Meter, role: str) -> None:
        super().__init__(settings)
        self.meter, self.role = meter, role

    @property
    def identity(self) -> str:  # distinct handles share no in-process wake-ups
        return f"{super().identity}#{self.role}"

    async def open(self) -> None:
        token = LABEL.set("counters")  # the counter flusher started here inherits the label
        try:
            await super().open()
        finally:
            LABEL.reset(token)
        self.meter.attach(self.client)

    async def aclose(self) -> None:
        token = LABEL.set("counters")
        try:
            await super().aclose()
        finally:
            LABEL.reset(token)


for _name in METERED:
    setattr(MeteredQueue, _name, _labelled(_name))


# --- moto -----------------------------------------------------------------------------------------


class _OneAtATime:
    """Moto applies a conditional write in request threads that can interleave; DynamoDB applies
    it atomically. One request at a time gives moto that atomicity (see tests/conftest.py)."""

    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


def start_moto() -> tuple[Any, str]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _OneAtATime(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, threaded=True)
            self._server_ready_event.set()
            self._server.serve_forever()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = SerialMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


# --- the run --------------------------------------------------------------------------------------


def make_config(endpoint: str, shards: int) -> Config:
    name = f"arqd-bench-{uuid.uuid4().hex[:8]}"
    return Config.from_dict(
        {
            "queue": {
                "backend": "dynamodb",
                "table": name,
                "region": "us-east-1",
                "endpoint_url": endpoint,
                "shards": shards,
            },
            "results": {
                "backend": "s3",
                "bucket": name,
                "region": "us-east-1",
                "endpoint_url": endpoint,
                "temporary_ttl": "1s",
            },
            "workers": {"concurrency": 32, "batch": 100},
            "handlers": {"noop": "arqd.demo:noop"},
            "log": {"level": "warning"},
        }
    )


async def sweep_all(app: arqd.App) -> None:
    """Let the phase's results expire, then sweep them all (as the daemons' sweepers would)."""
    await asyncio.sleep(1.1)
    while await app.core.sweep():
        pass


async def run(jobs: int, rate: float, idle: float, shards: int) -> dict[str, Any]:
    server, endpoint = start_moto()
    try:
        config = make_config(endpoint, shards)
        meter = Meter()
        settings = DynamoSettings(
            table=config.queue.table, region="us-east-1", endpoint_url=endpoint, shards=shards
        )
        pool_queue = MeteredQueue(settings, meter, "pool")
        submit_queue = MeteredQueue(settings, meter, "submitter")
        results = make_results(config.results)
        phases: dict[str, Any] = {}
        async with pool_queue, submit_queue, results:
            submitter = arqd.Client(submit_queue, results, config=config)
            mark = meter.snapshot()
            for start in range(0, jobs, 100):
                await submitter.submit_many([{"handler": "noop"}] * min(100, jobs - start))
            app = arqd.App(config, queue=pool_queue, results=results)
            async with app:
                await app.drain()
                await sweep_all(app)
                phases["backlog"] = since(meter, mark)
                mark, started = meter.snapshot(), time.perf_counter()
                for i in range(jobs):
                    await submitter.submit("noop")
                    await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
                await app.drain()
                await sweep_all(app)
                phases["steady"] = since(meter, mark)
                mark, started = meter.snapshot(), time.perf_counter()
                await asyncio.sleep(idle)
                phases["idle"] = since(meter, mark)
                idle_seconds = time.perf_counter() - started
            stats = {s.name: s for s in await pool_queue.stats()}
        assert "default" not in stats, stats  # every job ran and was swept: no counts left
        return report(phases, jobs, rate, idle_seconds, shards)
    finally:
        server.stop()


# --- the report -----------------------------------------------------------------------------------


def usd(wru: float, rru: float) -> float:
    return wru * WRU_USD + rru * RRU_USD


def report(
    phases: dict[str, Any], jobs: int, rate: float, idle: float, shards: int
) -> dict[str, Any]:
    figures: dict[str, Any] = {"jobs": jobs, "rate": rate, "shards": shards}
    for phase in ("backlog", "steady"):
        rows = {k: v for k, v in phases[phase].items() if k[0] not in NOT_PER_JOB}
        print_table(f"{phase}: per job ({jobs} jobs)", rows, jobs, "job")
        n, w, r = (sum(v[i] for v in rows.values()) for i in range(3))
        figures[f"{phase}_requests_per_job"] = round(n / jobs, 3)
        figures[f"{phase}_wru_per_job"] = round(w / jobs, 3)
        figures[f"{phase}_rru_per_job"] = round(r / jobs, 3)
        figures[f"{phase}_usd_per_million_jobs"] = round(usd(w, r) / jobs * 1e6, 3)
        for label in sorted({k[0] for k in rows}):
            w_l = sum(v[1] for k, v in rows.items() if k[0] == label)
            r_l = sum(v[2] for k, v in rows.items() if k[0] == label)
            figures[f"{phase}_{label}_wru_per_job"] = round(w_l / jobs, 3)
            figures[f"{phase}_{label}_rru_per_job"] = round(r_l / jobs, 3)
    rows = phases["idle"]
    print_table(f"idle: per second ({idle:.1f} s, one host)", rows, idle, "s")
    n, w, r = (sum(v[i] for v in rows.values()) for i in range(3))
    figures["idle_seconds"] = round(idle, 2)
    figures["idle_requests_per_s"] = round(n / idle, 3)
    figures["idle_wru_per_s"] = round(w / idle, 3)
    figures["idle_rru_per_s"] = round(r / idle, 3)
    figures["idle_usd_per_hour"] = round(usd(w, r) / idle * 3600, 5)
    return figures


def print_table(
    title: str, rows: dict[tuple[str, str], tuple[int, float, float]], per: float, unit: str
) -> None:
    print(f"\n{title}")
    print(f"{'operation':<34}{'requests':>10}{'WRU':>10}{'RRU':>10}{'$/M ' + unit + 's':>12}")
    for (label, op), (n, w, r) in sorted(rows.items()):
        print(
            f"{label + ' / ' + op:<34}{n / per:>10.3f}{w / per:>10.3f}{r / per:>10.3f}"
            f"{usd(w, r) / per * 1e6:>12.3f}"
        )
    total_n = sum(v[0] for v in rows.values())
    total_w = sum(v[1] for v in rows.values())
    total_r = sum(v[2] for v in rows.values())
    print(
        f"{'total':<34}{total_n / per:>10.3f}{total_w / per:>10.3f}{total_r / per:>10.3f}"
        f"{usd(total_w, total_r) / per * 1e6:>12.3f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="steady arrivals per second")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle phase")
    parser.add_argument("--shards", type=int, default=8, help="queue.shards")
    args = parser.parse_args()
    logs.configure("warning", "console")  # the canonical per-job line is an info line
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto takes any credentials
        os.environ[var] = "bench"
    figures = await run(args.jobs, args.rate, args.idle, args.shards)
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
