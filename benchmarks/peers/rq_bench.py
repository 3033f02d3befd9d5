"""RQ on Redis, run with ``.venv-peers/bin/python``. RQ is synchronous, one job at a time per
worker process.

Settings: ``SimpleWorker`` (runs each job in the worker process; RQ's default ``Worker`` forks
a child per job, several times slower for short jobs) except for recovery; default serializer
(pickle); results kept (``result_ttl`` 500 s, the default).

- noop: ``Queue.enqueue_many`` (one Redis pipeline per 1,000 jobs); then one ``SimpleWorker``
  in this process, ``work(burst=True)``, until the queue is empty.
- sleep: RQ has no concurrency inside a worker, so this runs ``--concurrency`` (100)
  ``SimpleWorker`` processes (RQ's documented way to scale: more workers). They are started and
  registered first; then the jobs are written in one transaction (a pipeline prepared before
  the clock starts), and the clock runs from that write until RQ's finished-job registry holds
  every job. Not the same shape as the other rows (100 processes, started beforehand) and the
  machine has two cores.
- rtt: one ``SimpleWorker`` process; the client is ``enqueue`` + ``Job.latest_result(timeout=
  30)`` (a blocking XREAD on the job's result stream: no polling).
- recovery: the default forking ``Worker``, which heartbeats a running job every
  ``job_monitoring_interval`` (1 s here; default 30 s). RQ holds a started job's registry
  entry for 60 s past its last heartbeat, and the job comes back only if it has retries left:
  enqueued with ``Retry(max=3)``. The fresh worker's maintenance (which requeues abandoned jobs)
  runs every ``maintenance_interval = 1`` s (default 600 s) and, since an idle worker only
  checks between blocking dequeues, ``worker_ttl = 16`` (a 1 s dequeue timeout; default 420 s,
  a 405 s one). The whole worker (the parent and its forked child) is killed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Retry, SimpleWorker, Worker
from rq.registry import FinishedJobRegistry

from benchmarks.peers import common

MODULE = "benchmarks.peers.rq_bench"
ENQUEUE_CHUNK = 1000
MONITORING_INTERVAL = 1  # seconds between heartbeats of a running job (recovery)
MAINTENANCE_INTERVAL = 1  # seconds between maintenance runs (recovery)
WORKER_TTL = 16  # makes an idle worker's blocking dequeue last 1 s (recovery)


def noop() -> None:
    pass


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def crash(marker: str, seconds: float) -> None:
    common.mark(marker, "start")
    time.sleep(seconds)
    common.mark(marker, "end")


def datas(args: argparse.Namespace, n: int) -> list[Any]:
    if args.workload == "sleep":
        return [Queue.prepare_data(f"{MODULE}.sleep", (args.sleep_ms / 1000,)) for _ in range(n)]
    return [Queue.prepare_data(f"{MODULE}.noop") for _ in range(n)]


def noop_bench(conn: Redis, args: argparse.Namespace) -> dict[str, Any]:
    queue = Queue(args.queue, connection=conn)
    t0 = time.perf_counter()
    for start in range(0, args.jobs, ENQUEUE_CHUNK):
        queue.enqueue_many(datas(args, min(ENQUEUE_CHUNK, args.jobs - start)))
    t1 = time.perf_counter()
    worker = SimpleWorker([queue], connection=conn)
    t2 = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    t3 = time.perf_counter()
    done = FinishedJobRegistry(queue=queue).count
    assert done == args.jobs, done
    return common.noop_figures(args.jobs, t1 - t0, t3 - t2)


def sleep_bench(conn: Redis, args: argparse.Namespace) -> dict[str, Any]:
    queue = Queue(args.queue, connection=conn)
    log = Path(args.tmp) / "worker.log"
    workers = [
        common.spawn(common.worker_command(MODULE, args), log) for _ in range(args.concurrency)
    ]
    try:
        common.wait_until(
            lambda: Worker.count(queue=queue) >= args.concurrency, 300, "RQ workers registering"
        )
        finished = FinishedJobRegistry(queue=queue)
        with conn.pipeline() as pipe:
            queue.enqueue_many(datas(args, args.jobs), pipeline=pipe)
            t0 = time.perf_counter()
            pipe.execute()
        while finished.count < args.jobs:
            time.sleep(common.POLL)
        t1 = time.perf_counter()
        return common.sleep_figures(args.jobs, t1 - t0, args.concurrency, args.sleep_ms)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            common.stop(w)


def rtt(conn: Redis, args: argparse.Namespace) -> dict[str, Any]:
    queue = Queue(args.queue, connection=conn)
    worker = common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")
    try:
        latencies = []
        for i in range(common.RTT_WARMUP + args.jobs):
            t = time.perf_counter()
            result = queue.enqueue(f"{MODULE}.noop").latest_result(timeout=30)
            assert result is not None and result.type == result.Type.SUCCESSFUL, result
            if i >= common.RTT_WARMUP:
                latencies.append((time.perf_counter() - t) * 1000)
        return common.rtt_figures(latencies)
    finally:
        common.stop(worker)


def recovery(conn: Redis, args: argparse.Namespace) -> dict[str, Any]:
    queue = Queue(args.queue, connection=conn)

    def start_worker() -> Any:
        cmd = common.worker_command(MODULE, args)
        return common.spawn(cmd, Path(args.tmp) / "worker.log")

    def submit(marker: str) -> None:
        queue.enqueue(  # by name: functions of __main__ cannot be enqueued
            f"{MODULE}.crash",
            marker,
            args.job_seconds,
            job_timeout=args.job_seconds + 5,
            retry=Retry(max=3),
        )

    return common.recovery(start_worker, submit, args)


def run_worker(args: argparse.Namespace) -> None:
    conn = Redis.from_url(args.url)
    queues = [Queue(args.queue, connection=conn)]
    if args.workload == "recovery":
        worker: SimpleWorker | Worker = Worker(
            queues,
            connection=conn,
            job_monitoring_interval=MONITORING_INTERVAL,
            maintenance_interval=MAINTENANCE_INTERVAL,
            worker_ttl=WORKER_TTL,
        )
    else:
        worker = SimpleWorker(queues, connection=conn)
    worker.work(logging_level="WARNING")  # until SIGTERM


def main() -> None:
    args = common.parse_args(common.parser(__doc__.splitlines()[0]))
    if args.role == "worker":
        run_worker(args)
        return
    common.terminate_on_sigterm()
    conn = Redis.from_url(args.url)
    conn.flushdb()
    bench = {"noop": noop_bench, "sleep": sleep_bench, "rtt": rtt, "recovery": recovery}
    common.emit(bench[args.workload](conn, args))


if __name__ == "__main__":
    main()
