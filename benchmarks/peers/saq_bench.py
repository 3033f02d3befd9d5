"""SAQ on Redis (``saq.queue.redis.RedisQueue``), run with ``.venv-peers/bin/python``.

Settings: ``Worker(concurrency=--concurrency)`` (100; SAQ's default is 10) in one process, SAQ's
blocking dequeue (BLMOVE: a worker wakes as soon as a job is queued); the rest at its defaults.

- noop / sleep: ``queue.enqueue`` (SAQ has no batch enqueue), 500 at a time concurrently; the
  worker then runs in this process until ``queue.count("incomplete")`` is 0.
- rtt: the worker is a separate process; the client is ``queue.apply(poll_interval=0.001)``
  (enqueue, then read the job's status every millisecond; default 0.5 s), SAQ's documented way
  to run a job and get its result. ``job.refresh(until_complete=...)`` waits on pub/sub instead,
  but it subscribes after reading the job, so a job that completes in between is missed until
  the timeout: it hung within 300 round trips here.
- recovery: SAQ finds a dead worker's job only by its ``heartbeat`` or ``timeout`` in the
  sweeper. The job is enqueued with ``heartbeat=5`` (the peer of arqd's 5 s visibility timeout),
  ``timeout`` = job length + 30 s, ``retries=3``, and heartbeats by calling ``job.update()``
  every second (the documented way: SAQ's worker does not heartbeat a running job by itself);
  the workers sweep every second (``timers={"sweep": 1}``; default 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from saq import Worker
from saq.queue.redis import RedisQueue
from saq.types import Context, Function, PartialTimersDict

from benchmarks.peers import common

MODULE = "benchmarks.peers.saq_bench"
ENQUEUE_CHUNK = 500
SWEEP_EVERY = 1  # seconds
HEARTBEAT = 5  # seconds without a heartbeat before the sweeper retries a job
RESULT_POLL = 0.001  # seconds between apply()'s status checks (default 0.5)


async def noop(ctx: Context) -> None:
    pass


async def sleep(ctx: Context, *, seconds: float) -> None:
    await asyncio.sleep(seconds)


async def crash(ctx: Context, *, marker: str, seconds: float) -> None:
    common.mark(marker, "start")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, end - time.monotonic()))
        await ctx["job"].update()  # SAQ's documented in-job heartbeat
    common.mark(marker, "end")


FUNCTIONS: list[Function[Context]] = [noop, sleep, crash]


def make_worker(queue: RedisQueue, args: argparse.Namespace) -> Worker[Context]:
    # Sweeping every second also sweeps a job caught between BLMOVE and its status update
    # (a SAQ race), so only the recovery worker, which runs one job, sweeps that often.
    timers: PartialTimersDict | None = None
    if args.workload == "recovery":
        timers = PartialTimersDict(schedule=1, worker_info=10, sweep=SWEEP_EVERY, abort=1)
    return Worker(
        queue,
        functions=FUNCTIONS,
        concurrency=args.concurrency,
        timers=timers,
    )


async def throughput(queue: RedisQueue, args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"seconds": args.sleep_ms / 1000} if args.workload == "sleep" else {}
    t0 = time.perf_counter()
    for start in range(0, args.jobs, ENQUEUE_CHUNK):
        n = min(ENQUEUE_CHUNK, args.jobs - start)
        await asyncio.gather(*(queue.enqueue(args.workload, **kwargs) for _ in range(n)))
    t1 = time.perf_counter()
    worker = make_worker(queue, args)
    t2 = time.perf_counter()
    task = asyncio.create_task(worker.start())
    await common.until(lambda: none_incomplete(queue))
    t3 = time.perf_counter()
    await worker.stop()
    task.cancel()
    if args.workload == "sleep":
        return common.sleep_figures(args.jobs, t3 - t2, args.concurrency, args.sleep_ms)
    return common.noop_figures(args.jobs, t1 - t0, t3 - t2)


async def none_incomplete(queue: RedisQueue) -> bool:
    return await queue.count("incomplete") == 0


async def rtt(queue: RedisQueue, args: argparse.Namespace) -> dict[str, Any]:
    worker = common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")
    try:

        async def once() -> None:
            await queue.apply("noop", timeout=30, poll_interval=RESULT_POLL)

        return await common.time_round_trips(once, args.jobs)
    finally:
        common.stop(worker)


def recovery(args: argparse.Namespace) -> dict[str, Any]:
    def start_worker() -> Any:
        return common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")

    def submit(marker: str) -> None:
        async def go() -> None:
            queue = RedisQueue.from_url(args.url, name=args.queue)
            await queue.connect()
            await queue.enqueue(
                "crash",
                marker=marker,
                seconds=args.job_seconds,
                heartbeat=HEARTBEAT,
                timeout=int(args.job_seconds + 30),
                retries=3,
            )
            await queue.disconnect()

        asyncio.run(go())

    return common.recovery(start_worker, submit, args)


async def run_worker(args: argparse.Namespace) -> None:
    queue = RedisQueue.from_url(args.url, name=args.queue)
    await queue.connect()
    await make_worker(queue, args).start()  # until SIGTERM


async def flush(url: str) -> None:
    queue = RedisQueue.from_url(url)
    await queue.connect()
    await queue.redis.flushdb()
    await queue.disconnect()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    queue = RedisQueue.from_url(args.url, name=args.queue)
    await queue.connect()
    await queue.redis.flushdb()
    try:
        if args.workload == "rtt":
            return await rtt(queue, args)
        return await throughput(queue, args)
    finally:
        await queue.disconnect()


def main() -> None:
    args = common.parse_args(common.parser(__doc__.splitlines()[0]))
    if args.role == "worker":
        asyncio.run(run_worker(args))
        return
    common.terminate_on_sigterm()
    if args.workload == "recovery":
        asyncio.run(flush(args.url))
        common.emit(recovery(args))
    else:
        common.emit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
