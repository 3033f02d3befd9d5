"""arqd's rows of ``benchmarks.compare``, run with arqd's own interpreter.

    python -m benchmarks.peers.arqd_bench --workload noop|sleep|rtt|recovery \
        --mode sqlite|memory|postgres|redis|http|http_postgres|http_redis [--url <server>]

Settings (the same for every mode): ``workers.concurrency = --concurrency`` (100), ``workers.batch =
200`` (leases per call, as ``benchmarks/throughput.py``), everything else at its default; logs
at warning level (the canonical per-job line is an info line).

- ``sqlite`` / ``memory``: in-process, as ``benchmarks/throughput.py``: ``arqd.Client`` submits
  (``submit_many``, batches of 1,000), then an ``arqd.App`` pool on the same opened backends runs
  them until ``App.drain()``; round trips are ``client.submit`` + ``client.wait`` with the pool
  in the same event loop.
- ``postgres``: as ``sqlite``, on the PostgreSQL of ``--url`` (a schema of its own per run), except
  the round trips, which cross two processes: ``client.submit`` + ``client.wait`` here, the job
  run by an ``arqd serve`` daemon on the same schema (woken by NOTIFY, its end NOTIFYed back).
- ``http``: ``python -m arqd serve`` on sqlite as a separate process. Submits are
  ``POST /v1/jobs/batch`` (1,000 a request) while the daemon runs with ``concurrency = 0``; the
  processing clock starts when the benchmark rewrites the config with ``concurrency = 100`` and
  sends SIGHUP (the documented reload, which resizes the pool at once), and stops when
  ``GET /v1/queues`` counts every job succeeded. Round trips are ``POST /v1/jobs`` then
  ``GET /v1/jobs/{id}?wait=10`` with ``If-None-Match`` until the job is terminal.
- ``redis``: as ``postgres``, on the Redis of ``--url`` (a key prefix of its own per run).
- ``http_postgres``, ``http_redis``: as ``http``, the daemon on the server of ``--url``.
- ``recovery`` (``http`` and ``http_postgres``): the daemon with ``visibility_timeout = "5s"``
  runs a ``--job-seconds`` job (``benchmarks.peers.arqd_handlers:crash``), is SIGKILLed one second
  into it, and a fresh daemon on the same storage starts at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

import arqd
from arqd import logs
from arqd.config import Config
from arqd.stores import make_queue, make_results
from benchmarks.peers import common
from benchmarks.peers.services import free_port

BATCH = 1000  # jobs per submit_many / POST /v1/jobs/batch (the API's limit)
LEASE_BATCH = 200  # workers.batch
VISIBILITY_TIMEOUT = 5.0  # seconds; the recovery target is this + 2 s
HTTP_WAIT = 10  # seconds a status long-poll may hold

DAEMON_CONFIG = """\
[server]
listen = "127.0.0.1:{port}"
max_body = "4MiB"
[queue]
{queue}
[results]
path = "{dir}/results"
[workers]
concurrency = {concurrency}
batch = {batch}
visibility_timeout = "{vt}s"
[handlers]
noop = "arqd.demo:noop"
sleep = "arqd.demo:sleep"
crash = "benchmarks.peers.arqd_handlers:crash"
[log]
level = "warning"
format = "json"
{extra}"""


def queue_settings(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The ``[queue]`` of this run: a sqlite file in ``tmp``, or a schema of this run's own on
    the PostgreSQL of ``--url`` (every process of one run shares ``args.schema``)."""
    if args.mode.endswith("postgres"):
        return {"backend": "postgres", "dsn": args.url, "schema": args.schema}
    if args.mode.endswith("redis"):
        return {"backend": "redis", "url": args.url, "prefix": args.schema}
    return {"backend": "sqlite" if args.mode != "memory" else "memory", "path": f"{tmp}/q.sqlite3"}


def queue_toml(settings: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.workload == "sleep":
        return [{"handler": "sleep", "payload": {"seconds": args.sleep_ms / 1000}}] * args.jobs
    return [{"handler": "noop"}] * args.jobs


def figures_for(args: argparse.Namespace, submit_s: float, process_s: float) -> dict[str, Any]:
    if args.workload == "sleep":
        return common.sleep_figures(args.jobs, process_s, args.concurrency, args.sleep_ms)
    return common.noop_figures(args.jobs, submit_s, process_s)


# --- in-process ----------------------------------------------------------------------------------


async def in_process(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    config = Config.from_dict(
        {
            "queue": queue_settings(args, tmp),
            "results": {"backend": "files", "path": str(tmp / "results")},
            "workers": {"concurrency": args.concurrency, "batch": LEASE_BATCH},
            "handlers": {"noop": "arqd.demo:noop", "sleep": "arqd.demo:sleep"},
        }
    )
    queue, results = make_queue(config.queue), make_results(config.results)
    async with queue, results:
        app = arqd.App(config, queue=queue, results=results)
        client = arqd.Client(queue, results, config=config)
        if args.workload == "rtt" and args.mode in ("postgres", "redis"):
            return common.rtt_figures(await across_processes_rtt(client, args, tmp))
        if args.workload == "rtt":
            async with app:
                return common.rtt_figures(await in_process_rtt(app.client, args.jobs))
        all_specs = specs(args)
        t0 = time.perf_counter()
        for start in range(0, len(all_specs), BATCH):
            await client.submit_many(all_specs[start : start + BATCH])
        t1 = time.perf_counter()
        async with app:
            t2 = time.perf_counter()
            await app.drain()
            t3 = time.perf_counter()
        stats = {s.name: s for s in await queue.stats()}
        assert stats["default"].succeeded == args.jobs, stats
        return figures_for(args, t1 - t0, t3 - t2)


async def across_processes_rtt(
    client: arqd.Client, args: argparse.Namespace, tmp: Path
) -> list[float]:
    """Round trips from this process's client to a daemon running the jobs: the submit's
    NOTIFY wakes the daemon, the finish's NOTIFY wakes this process's wait."""
    daemon = Daemon(tmp, args)
    try:
        async with aiohttp.ClientSession() as http:
            await daemon.ready(http)
        return await in_process_rtt(client, args.jobs)
    finally:
        common.stop(daemon.proc, grace=30)


async def in_process_rtt(client: arqd.Client, n: int) -> list[float]:
    latencies = []
    for i in range(common.RTT_WARMUP + n):
        t = time.perf_counter()
        job = await client.submit("noop")
        done = await client.wait(job.id, timeout=30)
        if i >= common.RTT_WARMUP:
            latencies.append((time.perf_counter() - t) * 1000)
        assert done.state == arqd.State.SUCCEEDED, done
    return latencies


# --- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """``python -m arqd serve`` on a config of its own (port, concurrency) over a shared dir."""

    def __init__(self, tmp: Path, args: argparse.Namespace, concurrency: int | None = None) -> None:
        self.tmp, self.port = tmp, free_port()
        self.queue = queue_toml(queue_settings(args, tmp))
        # Daemons sharing PostgreSQL must share the key sealing step secrets (any one will do).
        key = base64.urlsafe_b64encode(args.schema.encode().ljust(32, b"k")).decode()
        shared = args.mode.endswith(("postgres", "redis"))
        self.extra = f'[http_steps]\nkey = "{key}"\n' if shared else ""
        concurrency = args.concurrency if concurrency is None else concurrency
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"config-{self.port}.toml"
        self.write(concurrency)
        cmd = [sys.executable, "-m", "arqd", "serve", "-c", str(self.config)]
        self.proc = common.spawn(cmd, tmp / "daemon.log")

    def write(self, concurrency: int) -> None:
        self.config.write_text(
            DAEMON_CONFIG.format(
                port=self.port,
                queue=self.queue,
                extra=self.extra,
                dir=self.tmp,
                concurrency=concurrency,
                batch=LEASE_BATCH,
                vt=VISIBILITY_TIMEOUT,
            )
        )

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with http.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.tmp / "daemon.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"arqd serve did not start:\n{log}")
            await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[dict[str, Any], str]:
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as r:
        assert r.status in (200, 202), await r.text()
        return await r.json(), r.headers.get("ETag", "")


async def over_http(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    daemon = Daemon(tmp, args, args.concurrency if args.workload == "rtt" else 0)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await daemon.ready(http)
            if args.workload == "rtt":
                return common.rtt_figures(await http_rtt(http, daemon.url, args.jobs))
            return await http_throughput(http, daemon, args)
    finally:
        common.stop(daemon.proc, grace=30)


async def http_throughput(
    http: aiohttp.ClientSession, daemon: Daemon, args: argparse.Namespace
) -> dict[str, Any]:
    all_specs = specs(args)
    bodies = [
        json.dumps({"jobs": all_specs[i : i + BATCH]}).encode()
        for i in range(0, len(all_specs), BATCH)
    ]
    t0 = time.perf_counter()
    for body in bodies:
        await post(http, f"{daemon.url}/v1/jobs/batch", body)
    t1 = time.perf_counter()
    daemon.write(args.concurrency)
    t2 = time.perf_counter()
    daemon.proc.send_signal(signal.SIGHUP)
    await common.until(lambda: succeeded(http, daemon.url, args.jobs))
    t3 = time.perf_counter()
    return figures_for(args, t1 - t0, t3 - t2)


async def succeeded(http: aiohttp.ClientSession, url: str, jobs: int) -> bool:
    async with http.get(f"{url}/v1/queues") as r:
        queues = (await r.json())["queues"]
    done: int = sum(q["succeeded"] for q in queues if q["name"] == "default")
    return done >= jobs


async def http_rtt(http: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    body = json.dumps({"handler": "noop"}).encode()
    latencies = []
    for i in range(common.RTT_WARMUP + n):
        t = time.perf_counter()
        job, etag = await post(http, f"{url}/v1/jobs", body)
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            async with http.get(
                f"{url}/v1/jobs/{job['id']}",
                params={"wait": str(HTTP_WAIT)},
                headers={"If-None-Match": etag},
            ) as r:
                if r.status == 200:
                    job, etag = await r.json(), r.headers["ETag"]
        if i >= common.RTT_WARMUP:
            latencies.append((time.perf_counter() - t) * 1000)
        assert job["state"] == "succeeded", job
    return latencies


def recovery(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    daemons: list[Daemon] = []

    def start_worker() -> subprocess.Popen[bytes]:
        daemons.append(Daemon(tmp, args, concurrency=10))
        return daemons[-1].proc

    def submit(marker: str) -> None:
        async def go() -> None:
            async with aiohttp.ClientSession() as http:
                await daemons[0].ready(http)
                payload = {"marker": marker, "seconds": args.job_seconds}
                body = json.dumps({"handler": "crash", "payload": payload}).encode()
                await post(http, f"{daemons[0].url}/v1/jobs", body)

        asyncio.run(go())

    figures = common.recovery(start_worker, submit, args)
    return {**figures, "recovery_vt_s": VISIBILITY_TIMEOUT}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--mode",
        choices=("sqlite", "memory", "postgres", "redis", "http", "http_postgres", "http_redis"),
        required=True,
    )
    args = p.parse_args()
    args.schema = f"bench_{uuid.uuid4().hex[:12]}"
    common.terminate_on_sigterm()
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="arqd-compare-arqd-") as tmp:
        args.tmp = args.tmp or tmp
        if args.workload == "recovery":
            if not args.mode.startswith("http"):
                raise SystemExit("recovery needs a separate process: --mode http[_postgres]")
            figures = recovery(args, Path(tmp))
        elif args.mode.startswith("http"):
            figures = asyncio.run(over_http(args, Path(tmp)))
        else:
            figures = asyncio.run(in_process(args, Path(tmp)))
    common.emit(figures)


if __name__ == "__main__":
    main()
