"""arq on Redis, run with ``.venv-peers/bin/python``.

Settings: ``Worker(max_jobs=--concurrency)`` (100; arq's default is 10) in one process,
``poll_delay=0.001`` (arq polls its queue's sorted set; default 0.5 s, the figure that sets an
idle worker's latency), ``handle_signals=False`` in-process; the rest at arq's defaults (pickle,
results kept one hour).

- noop / sleep: ``ArqRedis.enqueue_job`` (arq has no batch enqueue), 500 at a time concurrently;
  then a ``burst=True`` worker in this process runs until the queue is empty.
- rtt: the worker is a separate process; the client is ``enqueue_job`` + ``Job.result(
  poll_delay=0.001)`` (default 0.5 s).
- recovery: arq marks a started job "in progress" with a key that expires after the function's
  timeout + 10 s (the longest timeout of the worker's functions) and has no heartbeat, so a dead
  worker's job runs again only after that. The workers run with ``job_timeout`` = job length +
  5 s (the tightest timeout that lets the job finish, with the same 5 s margin as arqd's
  visibility timeout; arq's default of 300 s would strand the job for over five minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

from benchmarks.peers import common

MODULE = "benchmarks.peers.arq_bench"
ENQUEUE_CHUNK = 500
POLL_DELAY = 0.001  # seconds: the worker's queue poll and the client's result poll
TIMEOUT_MARGIN = 5  # seconds of the recovery job's timeout beyond its length


async def noop(ctx: dict[str, Any]) -> None:
    pass


async def sleep(ctx: dict[str, Any], seconds: float) -> None:
    await asyncio.sleep(seconds)


async def crash(ctx: dict[str, Any], marker: str, seconds: float) -> None:
    common.mark(marker, "start")
    await asyncio.sleep(seconds)
    common.mark(marker, "end")


def make_worker(args: argparse.Namespace, *, burst: bool) -> Worker:
    return Worker(
        functions=[noop, sleep, crash],
        queue_name=args.queue,
        redis_settings=RedisSettings.from_dsn(args.url),
        burst=burst,
        max_jobs=args.concurrency,
        poll_delay=POLL_DELAY,
        job_timeout=args.job_seconds + TIMEOUT_MARGIN,
        handle_signals=not burst,
    )


async def throughput(pool: ArqRedis, args: argparse.Namespace) -> dict[str, Any]:
    fn_args = (args.sleep_ms / 1000,) if args.workload == "sleep" else ()
    t0 = time.perf_counter()
    for start in range(0, args.jobs, ENQUEUE_CHUNK):
        n = min(ENQUEUE_CHUNK, args.jobs - start)
        await asyncio.gather(
            *(pool.enqueue_job(args.workload, *fn_args, _queue_name=args.queue) for _ in range(n))
        )
    t1 = time.perf_counter()
    worker = make_worker(args, burst=True)
    t2 = time.perf_counter()
    await worker.main()
    t3 = time.perf_counter()
    assert worker.jobs_complete == args.jobs, (worker.jobs_complete, worker.jobs_failed)
    await worker.close()
    if args.workload == "sleep":
        return common.sleep_figures(args.jobs, t3 - t2, args.concurrency, args.sleep_ms)
    return common.noop_figures(args.jobs, t1 - t0, t3 - t2)


async def rtt(pool: ArqRedis, args: argparse.Namespace) -> dict[str, Any]:
    worker = common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")
    try:

        async def once() -> None:
            job = await pool.enqueue_job("noop", _queue_name=args.queue)
            assert job is not None
            await job.result(timeout=30, poll_delay=POLL_DELAY)

        return await common.time_round_trips(once, args.jobs)
    finally:
        common.stop(worker)


def recovery(args: argparse.Namespace) -> dict[str, Any]:
    def start_worker() -> Any:
        return common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")

    def submit(marker: str) -> None:
        async def go() -> None:
            pool = await create_pool(RedisSettings.from_dsn(args.url))
            await pool.enqueue_job("crash", marker, args.job_seconds, _queue_name=args.queue)
            await pool.aclose()

        asyncio.run(go())

    return common.recovery(start_worker, submit, args)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    pool = await create_pool(RedisSettings.from_dsn(args.url))
    await pool.flushdb()
    try:
        if args.workload == "rtt":
            return await rtt(pool, args)
        return await throughput(pool, args)
    finally:
        await pool.aclose()


async def flush(url: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    await pool.flushdb()
    await pool.aclose()


def main() -> None:
    args = common.parse_args(common.parser(__doc__.splitlines()[0]))
    if args.role == "worker":
        make_worker(args, burst=False).run()  # until SIGTERM
        return
    common.terminate_on_sigterm()
    if args.workload == "recovery":
        asyncio.run(flush(args.url))
        common.emit(recovery(args))
    else:
        common.emit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
