"""procrastinate on PostgreSQL (``PsycopgConnector``, psycopg 3 with its C speedups), run with
``.venv-peers/bin/python``.

Settings: a worker with ``concurrency=--concurrency`` (100; default 1) and LISTEN/NOTIFY on
(the default: a defer wakes an idle worker at once); jobs kept after they finish (the default).
The server runs with ``synchronous_commit = off`` (see ``services.Postgres``).

- noop / sleep: ``Task.batch_defer_async`` (1,000 jobs per call); then ``run_worker_async(
  wait=False)`` in this process, which returns once no job is left.
- rtt: the worker is a separate process. procrastinate stores no results and offers no way to
  wait for a job, so the client defers and then reads the job's status every millisecond
  (``SELECT status FROM procrastinate_jobs WHERE id = ...``) until it is ``succeeded``.
- recovery: procrastinate does not retry a dead worker's job by itself; its documented recipe is
  a periodic task that retries ``job_manager.get_stalled_jobs()`` (jobs of workers whose
  heartbeat is too old). Here it runs every second (cron ``* * * * * *``), with workers that
  heartbeat every second (``update_heartbeat_interval=1``; default 10 s) and a job stalled after
  5 s without one (``seconds_since_heartbeat=5``, ``stalled_worker_timeout=5``; defaults 30 s):
  the peer of arqd's 5 s visibility timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from procrastinate import App, PsycopgConnector

from benchmarks.peers import common

MODULE = "benchmarks.peers.procrastinate_bench"
DEFER_CHUNK = 1000
STATUS_POLL = 0.001  # seconds between status reads while waiting for a job (rtt)
HEARTBEAT = 1.0  # seconds between worker heartbeats (recovery)
STALLED_AFTER = 5.0  # seconds without a heartbeat before a worker's jobs count as stalled


def make_app(args: argparse.Namespace) -> App:
    url = args.url
    app = App(connector=PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        pass

    @app.task(name="sleep")
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @app.task(name="crash")
    async def crash(marker: str, seconds: float) -> None:
        common.mark(marker, "start")
        await asyncio.sleep(seconds)
        common.mark(marker, "end")

    if args.workload != "recovery":
        return app

    @app.periodic(cron="* * * * * *")  # every second (a sixth field: seconds)
    @app.task(name="retry_stalled_jobs", queueing_lock="retry_stalled_jobs")
    async def retry_stalled_jobs(timestamp: int) -> None:
        for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=STALLED_AFTER):
            await app.job_manager.retry_job(job)

    return app


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "concurrency": args.concurrency,
        "install_signal_handlers": args.role == "worker",
        "update_heartbeat_interval": HEARTBEAT,
        "stalled_worker_timeout": STALLED_AFTER,
    }


async def reset(app: App) -> None:
    """A fresh schema: no job, worker or periodic run of an earlier workload."""
    await app.connector.execute_query_async("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    await app.schema_manager.apply_schema_async()


async def throughput(app: App, args: argparse.Namespace) -> dict[str, Any]:
    task = app.tasks[args.workload]
    kwargs = {"seconds": args.sleep_ms / 1000} if args.workload == "sleep" else {}
    t0 = time.perf_counter()
    for start in range(0, args.jobs, DEFER_CHUNK):
        n = min(DEFER_CHUNK, args.jobs - start)
        await task.batch_defer_async(*([kwargs] * n))
    t1 = time.perf_counter()
    await app.run_worker_async(wait=False, **worker_options(args))
    t2 = time.perf_counter()
    row = await app.connector.execute_query_one_async(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
    )
    assert row["n"] == args.jobs, row
    if args.workload == "sleep":
        return common.sleep_figures(args.jobs, t2 - t1, args.concurrency, args.sleep_ms)
    return common.noop_figures(args.jobs, t1 - t0, t2 - t1)


async def rtt(app: App, args: argparse.Namespace) -> dict[str, Any]:
    worker = common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")
    noop = app.tasks["noop"]
    try:

        async def once() -> None:
            job_id = await noop.defer_async()
            while True:
                row = await app.connector.execute_query_one_async(
                    "SELECT status FROM procrastinate_jobs WHERE id = %(id)s", id=job_id
                )
                if row["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(STATUS_POLL)
            assert row["status"] == "succeeded", row

        return await common.time_round_trips(once, args.jobs)
    finally:
        common.stop(worker)


def recovery(args: argparse.Namespace) -> dict[str, Any]:
    def start_worker() -> Any:
        return common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")

    def submit(marker: str) -> None:
        async def go() -> None:
            app = make_app(args)
            async with app.open_async():
                await app.tasks["crash"].defer_async(marker=marker, seconds=args.job_seconds)

        asyncio.run(go())

    return common.recovery(start_worker, submit, args)


async def run_worker(args: argparse.Namespace) -> None:
    app = make_app(args)
    async with app.open_async():
        await app.run_worker_async(**worker_options(args))


async def bench(args: argparse.Namespace) -> dict[str, Any] | None:
    app = make_app(args)
    async with app.open_async():
        await reset(app)
        if args.workload == "rtt":
            return await rtt(app, args)
        if args.workload == "recovery":
            return None
        return await throughput(app, args)


def main() -> None:
    args = common.parse_args(common.parser(__doc__.splitlines()[0]))
    # Its warning that the App is made in __main__ (where workers could not import it) does not
    # apply: every process here makes the same App with make_app().
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    if args.role == "worker":
        asyncio.run(run_worker(args))  # until SIGTERM
        return
    common.terminate_on_sigterm()
    figures = asyncio.run(bench(args))
    common.emit(figures if figures is not None else recovery(args))


if __name__ == "__main__":
    main()
