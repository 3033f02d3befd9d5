"""What every benchmark module of this package shares: the command line, the figures, worker
processes and the crash-recovery procedure.

Standard library only: it is imported both in arqd's environment and in ``.venv-peers``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

WORKLOADS = ("noop", "sleep", "rtt", "recovery")
RTT_WARMUP = 50  # round trips before the measured ones: connections, caches, JIT-free warm paths
POLL = 0.005  # seconds between completion checks while a workload runs
STOP_GRACE = 5.0  # seconds a worker gets to stop on SIGTERM before SIGKILL


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark module takes (compare.py passes all of them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("--role", choices=("bench", "worker"), default="bench")
    p.add_argument("--jobs", type=int, default=10_000, help="jobs (noop, sleep) or round trips")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--sleep-ms", type=float, default=10.0)
    p.add_argument("--job-seconds", type=float, default=30.0, help="the recovery job's length")
    p.add_argument("--give-up", type=float, default=90.0, help="recovery: seconds to wait")
    p.add_argument("--url", default="", help="the peer's broker (redis:// or postgresql://)")
    p.add_argument("--tmp", default="", help="a scratch directory of this run")
    p.add_argument("--queue", default="bench", help="queue name")
    return p


def parse_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse; without ``--tmp``, a scratch directory removed at exit (a worker gets the bench's)."""
    args = p.parse_args()
    if not args.tmp:
        args.tmp = tempfile.mkdtemp(prefix="arqd-compare-")
        atexit.register(shutil.rmtree, args.tmp, True)
    return args


def emit(figures: dict[str, Any]) -> None:
    """The last line of a benchmark module's stdout: one JSON object."""
    print(json.dumps(figures), flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rtt_figures(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {f"rtt_p{p}_ms": round(percentile(latencies_ms, p), 3) for p in (50, 95, 99)}


async def time_round_trips(once: Callable[[], Awaitable[object]], n: int) -> dict[str, float]:
    """Run ``once`` (submit one job, await its result) ``RTT_WARMUP`` times untimed, then ``n``
    times timed; answers the latency percentiles."""
    latencies = []
    for i in range(RTT_WARMUP + n):
        t = time.perf_counter()
        await once()
        if i >= RTT_WARMUP:
            latencies.append((time.perf_counter() - t) * 1000)
    return rtt_figures(latencies)


def noop_figures(jobs: int, enqueue_s: float, process_s: float) -> dict[str, float]:
    return {
        "noop_enqueue_per_s": round(jobs / enqueue_s),
        "noop_process_per_s": round(jobs / process_s),
    }


def sleep_figures(jobs: int, seconds: float, concurrency: int, sleep_ms: float) -> dict[str, float]:
    """Jobs per second and its share of the ideal (every slot always sleeping)."""
    per_s = jobs / seconds
    ideal = concurrency * 1000 / sleep_ms
    return {"sleep_per_s": round(per_s), "sleep_pct_ideal": round(100 * per_s / ideal, 1)}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` every ``POLL`` seconds until it is true."""
    # The counters polled live in another process (a broker, a daemon): no event to wait on.
    while not await check():  # noqa: ASYNC110
        await asyncio.sleep(POLL)


# --- worker processes ---------------------------------------------------------------------------


def worker_command(module: str, args: argparse.Namespace, **overrides: Any) -> list[str]:
    """This same module with ``--role worker`` and the bench's arguments."""
    values = {**vars(args), "role": "worker", **overrides}
    cmd = [sys.executable, "-m", module]
    for key, value in values.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends the child SIGTERM when its parent dies, however it died."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A worker process in this process's group (whoever stops the benchmark's group stops it
    too) that dies with this process, its output appended to ``log``."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a worker that forks a child per job, in a session of its
    own, as RQ's does), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and every process it started."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def stop(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL (with whatever it started) if it is still there after ``grace``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            kill(proc)


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop this process's workers."""

    def bye(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bye)


# --- the crash-recovery procedure ----------------------------------------------------------------


def mark(path: str, word: str) -> None:
    """Append ``word <unix time>``: one short O_APPEND write, atomic across processes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{word} {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def marks(path: Path, word: str) -> list[float]:
    if not path.exists():
        return []
    return [
        float(w[1])
        for w in (line.split() for line in path.read_text().splitlines())
        if w[0] == word
    ]


def recovery(
    start_worker: Callable[[], subprocess.Popen[bytes]],
    submit: Callable[[str], None],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run one ``--job-seconds`` job, SIGKILL its worker one second after the job started, start
    a fresh worker at once, and time (from the kill) until the job starts again and until it
    ends. ``None`` means it did not within ``--give-up`` seconds. The job appends ``start`` and
    ``end`` lines to the marker file it is given (``mark``)."""
    marker = Path(args.tmp) / "recovery.marks"
    marker.touch(mode=0o666)
    marker.chmod(0o666)  # a worker running as another user may write it
    first = start_worker()
    second: subprocess.Popen[bytes] | None = None
    try:
        submit(str(marker))
        wait_until(lambda: bool(marks(marker, "start")), 60, "the recovery job never started")
        time.sleep(1.0)
        killed_at = time.time()
        kill(first)
        second = start_worker()
        deadline = killed_at + args.give_up
        while len(marks(marker, "start")) < 2 and time.time() < deadline:
            time.sleep(0.02)
        starts = marks(marker, "start")
        rerun = starts[1] - killed_at if len(starts) > 1 else None
        if rerun is not None:  # now let it run to its end
            end_deadline = time.time() + args.job_seconds + 30
            while not marks(marker, "end") and time.time() < end_deadline:
                time.sleep(0.02)
        ends = marks(marker, "end")
        return {
            "recovery_rerun_s": None if rerun is None else round(rerun, 2),
            "recovery_done_s": round(ends[0] - killed_at, 2) if ends else None,
            "recovery_starts": len(starts),
            "recovery_ends": len(ends),
            "recovery_give_up_s": args.give_up,
            "recovery_job_s": args.job_seconds,
        }
    finally:
        stop(first)
        if second is not None:
            stop(second)
