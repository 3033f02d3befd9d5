"""huey on Redis (``RedisHuey``), run with ``.venv-peers/bin/python``. huey is synchronous.

Settings: ``RedisHuey(blocking=True, notify_result=True)``: workers wait on BRPOP instead of
polling, and ``Result.get(blocking=True)`` waits on BLPOP for the result instead of polling
with backoff (huey's two documented low-latency switches; ``notify_result`` is off by
default); results stored, ``store_none=False`` (the default). One consumer process with thread
workers: one (``-w 1``, huey's default) for noop and rtt, since more threads only fight over
the GIL (noop: ~2,700 jobs/s with 1 thread, ~1,800 with 100 here), and ``--concurrency`` (100,
``-k thread -w 100``) for the sleep jobs; periodic tasks off.

- noop / sleep: ``task()`` calls (huey enqueues one at a time: one LPUSH each); then a consumer
  in this process runs until huey's ``SIGNAL_COMPLETE`` has fired for every job. The sleep job
  is ``time.sleep``: thread workers sleep in parallel. (Greenlet workers, ``-k greenlet``, were
  no faster here and need gevent's monkey-patching before anything imports socket.)
- rtt: the consumer is a separate process; the client calls the task and ``Result.get(
  blocking=True)``; the task returns ``True`` (a ``None`` result is not stored, so nothing
  could be waited for).
- recovery: huey pops a task off its list when a worker takes it and has no acknowledgement or
  lease, so a task running in a killed consumer is gone: expect "never".
"""

# huey ships no type information (no py.typed): its imports and task decorators are untyped.
# mypy: disable-error-code="import-untyped,untyped-decorator"

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from huey import RedisHuey
from huey.signals import SIGNAL_COMPLETE

from benchmarks.peers import common

MODULE = "benchmarks.peers.huey_bench"

huey = RedisHuey("bench", blocking=True, notify_result=True, utc=True)  # connect() sets the URL


def connect(url: str) -> None:
    huey.storage_kwargs["url"] = url
    huey.storage = huey.create_storage()


@huey.task()
def noop() -> None:
    pass


@huey.task()
def ping() -> bool:
    return True


@huey.task()
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@huey.task()
def crash(marker: str, seconds: float) -> None:
    common.mark(marker, "start")
    time.sleep(seconds)
    common.mark(marker, "end")


class Counter:
    """Counts completed tasks (huey's SIGNAL_COMPLETE) and sets ``done`` at ``target``."""

    def __init__(self, target: int) -> None:
        self.target, self.count = target, 0
        self.lock, self.done = threading.Lock(), threading.Event()

    def __call__(self, signal: str, task: Any, *args: Any) -> None:
        with self.lock:
            self.count += 1
            if self.count >= self.target:
                self.done.set()


def consumer(args: argparse.Namespace) -> Any:
    return huey.create_consumer(
        workers=args.concurrency if args.workload == "sleep" else 1,
        worker_type="thread",
        periodic=False,
        check_worker_health=False,
    )


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter(args.jobs)
    huey.signal(SIGNAL_COMPLETE)(counter)
    task = sleep if args.workload == "sleep" else noop
    task_args = (args.sleep_ms / 1000,) if args.workload == "sleep" else ()
    t0 = time.perf_counter()
    for _ in range(args.jobs):
        task(*task_args)
    t1 = time.perf_counter()
    c = consumer(args)
    t2 = time.perf_counter()
    c.start()
    counter.done.wait(600)
    t3 = time.perf_counter()
    c.stop(graceful=True)
    assert counter.count == args.jobs, counter.count
    if args.workload == "sleep":
        return common.sleep_figures(args.jobs, t3 - t2, args.concurrency, args.sleep_ms)
    return common.noop_figures(args.jobs, t1 - t0, t3 - t2)


def start_worker(args: argparse.Namespace) -> Any:
    return common.spawn(common.worker_command(MODULE, args), Path(args.tmp) / "worker.log")


def rtt(args: argparse.Namespace) -> dict[str, Any]:
    worker = start_worker(args)
    try:
        latencies = []
        for i in range(common.RTT_WARMUP + args.jobs):
            t = time.perf_counter()
            assert ping()(blocking=True, timeout=30) is True
            if i >= common.RTT_WARMUP:
                latencies.append((time.perf_counter() - t) * 1000)
        return common.rtt_figures(latencies)
    finally:
        common.stop(worker)


def recovery(args: argparse.Namespace) -> dict[str, Any]:
    return common.recovery(
        lambda: start_worker(args), lambda marker: crash(marker, args.job_seconds), args
    )


def main() -> None:
    args = common.parse_args(common.parser(__doc__.splitlines()[0]))
    connect(args.url)
    if args.role == "worker":
        consumer(args).run()  # until SIGTERM/SIGINT
        return
    common.terminate_on_sigterm()
    huey.storage.conn.flushdb()
    if args.workload == "recovery":
        common.emit(recovery(args))
    elif args.workload == "rtt":
        common.emit(rtt(args))
    else:
        common.emit(throughput(args))


if __name__ == "__main__":
    main()
