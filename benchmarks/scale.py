"""How arqd's costs grow with the queue: per-job cost, memory and status polls, on sqlite.

    python -m benchmarks.scale [--sizes 1000,100000,1000000] [--sample 10000] [--rounds 5]
                               [--rtt 1000] [--longpolls 10000] [--seconds 10] [--quick]

1. **Depth**, in-process. One master database is filled with no-op jobs (``Client.submit_many``,
   batches of 1,000, ~290 bytes a row) up to each size in turn, and copied at each size. On
   each copy the pool (``arqd.App``, ``--concurrency``) works through ``--sample`` jobs per
   round (a queue shallower than the sample is worked through whole, several times, so every
   depth measures about as many jobs), the queue topped up to its size before each pass. A pass
   is timed from its 10 % to its 90 % outcome, so neither the pool's start nor a queue running
   dry counts; wall-clock and CPU time (this process, every thread: CPU time is what a shared
   machine disturbs least). ``--rounds`` rounds alternate between the depths, forwards then
   backwards, so a busy spell weighs on all alike; per-job cost is the median round, and
   ``cost_ratio`` compares the largest depth with the smallest.
   Round trips (submit one job, await it) use a separate queue, ``rtt``: arqd has no
   priorities and a queue is FIFO, so a new job on the deep queue would wait for the whole
   backlog. They run with the pool consuming only ``rtt`` (the backlog sits in the same table
   and indexes), and, for depths above the sample, with the pool consuming both queues while it
   works through the backlog ("busy"). Also timed: listing failed jobs
   (``GET /v1/jobs?state=failed&limit=50``, the dashboard's 3-second poll) when none failed.
2. **Memory** of ``arqd serve`` (a child process, sqlite): VmRSS (and its anonymous and
   file-backed parts) from ``/proc/PID/status``, idle on an empty database; on the largest
   database with all its jobs queued (the daemon consumes another queue); after a SIGHUP made
   it work through ``--sample`` of them and another made it stop; after it worked through all.
3. **Status polls** (``GET /v1/jobs/{id}`` of 1,000 finished jobs, as ``benchmarks/http_api.py``,
   from ``wrk`` or else aiohttp), on the database the memory phase drained (the largest depth's
   jobs, all finished, plus these) with no long-polls, then with ``--longpolls`` long-polls open:
   ``GET /v1/jobs/{id}?wait=S`` on jobs of a queue no worker consumes, held by a second process
   of this script over raw sockets (one connection each; the first ``wait`` uniform in 1..60 s
   so expiries spread as from independent clients, then ``wait=60``, the API's maximum, re-armed
   as each returns). The file-descriptor limit is raised to its hard limit, and the daemon
   inherits it. Also the daemon's CPU use while it only holds the long-polls.

The last line of output is one JSON object with flat keys. Per depth ``N``: ``process_per_s_N``,
``per_job_us_N``, ``cpu_per_job_us_N``, ``rtt_p50_ms_N``, ``rtt_p99_ms_N``,
``rtt_busy_p50_ms_N``, ``rtt_busy_p99_ms_N`` (null when not measured), ``list_failed_ms_N``,
``table_rows_N`` (jobs in the table then);
with ``<max>``/``<min>`` the largest/smallest depth written 1k, 100k, 1m:
``cost_ratio_<max>_<min>``, ``cpu_cost_ratio_<max>_<min>``; ``rss_idle_mb``,
``rss_<max>_queued_mb``, ``rss_<max>_after_sample_mb``, ``rss_<max>_drained_mb``,
``rss_<max>_drained_anon_mb``, ``daemon_drain_per_s_<max>``; with ``<L>`` the long-polls (10k):
``poll_per_s_no_longpolls``, ``poll_p50_ms_no_longpolls``, ``poll_p99_ms_no_longpolls`` and the
same ending ``_<L>_longpolls``, ``daemon_cpu_pct_<L>_longpolls_idle``, ``rss_<L>_longpolls_mb``,
``longpolls_open``, ``longpolls_returned``, ``longpoll_errors``, ``load_generator``,
``poll_table_rows`` (jobs in the table the polls read); plus
``machine`` and the parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp
import msgspec

import arqd
from arqd import logs
from arqd.backends.base import QueueBackend
from arqd.config import Config
from arqd.results.base import ResultStore
from arqd.stores import make_queue, make_results
from benchmarks.http_api import WRK_SCRIPT, hammer
from benchmarks.throughput import percentile

ROOT = Path(__file__).resolve().parents[1]  # the repository

# A small realistic payload: rows about as large as real ones (~290 bytes per queued job).
JOB = {"handler": "noop", "payload": {"user": 48213, "action": "resize", "src": "img/0001.png"}}
FILL_BATCH = 1000  # jobs per submit_many call (as POST /v1/jobs/batch allows); ~30,000 jobs/s
SKIP = 0.1  # share of a round's outcomes left out at each end (pool start, queue running dry)
REPEAT_MAX = 10  # passes through a queue shallower than the sample, per round
# The top-up's pages are copied from the WAL into the database by arqd's checkpoint thread once
# a second: let that happen before a round, not during it (the top-ups differ in size).
CHECKPOINT_WAIT = 1.2
ROUND_TIMEOUT = 600.0  # seconds; a round that takes longer is a failure, not a figure
RTT_WARMUP = 50
BUSY_RTT_MAX = 200  # round trips against a backlog being worked through (each ~10-30 ms)
BUSY_WARMUP = 5
LIST_LIMIT = 50  # the dashboard's page of failed jobs
SETTLE = 2.0  # seconds to let a daemon settle before reading its memory
CPU_WINDOW = 5.0  # seconds over which the daemon's CPU use with only long-polls open is read
WAIT_MAX = 60  # the API's longest ?wait= (docs/http-api.md)
CONNECTS_IN_FLIGHT = 100  # the daemon listens with aiohttp's default accept backlog of 128
POLL_JOBS = 1000  # finished jobs the status polls pick from (as benchmarks/http_api.py)
POLL_CONCURRENCY = 64  # wrk connections (as benchmarks/http_api.py)
WARMUP_SECONDS = 2.0  # of status polls before the first measured ones
FD_SPARE = 200  # descriptors a process needs besides the long-poll sockets

DAEMON_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
max_body = "4MiB"
[queue]
path = "{db}"
[results]
path = "{root}/results"
[workers]
concurrency = 32
queues = {queues}
[handlers]
noop = "arqd.demo:noop"
[log]
level = "warning"
format = "json"
"""


def label(n: int) -> str:
    """1000 -> 1k, 1000000 -> 1m (the key names of the issue)."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def machine() -> str:
    model = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, arqd {arqd.__version__}"
    )


def raise_fd_limit() -> int:
    """Lift this process's descriptor limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --- 1. depth, in-process -------------------------------------------------------------------------


def bench_config(root: Path, queues: list[str], concurrency: int) -> Config:
    return Config.from_dict(
        {
            "queue": {"backend": "sqlite", "path": str(root / "q.sqlite3")},
            "results": {"backend": "files", "path": str(root / "results")},
            "workers": {"concurrency": concurrency, "batch": 200, "queues": queues},
            "handlers": {"noop": "arqd.demo:noop"},
        }
    )


def with_queues(config: Config, queues: list[str]) -> Config:
    workers = msgspec.structs.replace(config.workers, queues=queues)
    return msgspec.structs.replace(config, workers=workers)


async def top_up(client: arqd.Client, queue: QueueBackend, size: int) -> int:
    """Submit jobs to ``default`` until ``size`` are queued there; answers how many it added."""
    stats = {s.name: s for s in await queue.stats()}
    missing = size - (stats["default"].queued if "default" in stats else 0)
    specs = [JOB] * FILL_BATCH
    for start in range(0, missing, FILL_BATCH):
        await client.submit_many(specs[: min(FILL_BATCH, missing - start)])
    return max(0, missing)


class Outcomes:
    """Counts outcomes written by pools sharing the queue's hub (each lands as a job change),
    noting the wall-clock and CPU time (this process, every thread) at chosen counts."""

    def __init__(self, marks: Sequence[int] = ()) -> None:
        self.count = 0
        self.marks = dict.fromkeys(marks, (0.0, 0.0))
        self.last = asyncio.Event()
        self._last = max(marks, default=0)

    def __call__(self, job_id: str, job: object) -> None:
        self.count += 1
        if self.count in self.marks:
            self.marks[self.count] = (time.perf_counter(), time.process_time())
        if self.count == self._last:
            self.last.set()


async def process_round(
    config: Config, queue: QueueBackend, results: ResultStore, n: int
) -> tuple[float, float]:
    """Wall-clock and CPU seconds per job while the pool works through ``n`` queued jobs (the
    middle 80 % timed)."""
    first, last = round(n * SKIP), n - round(n * SKIP)
    outcomes = Outcomes([first, last])
    app = arqd.App(config, queue=queue, results=results)
    app.core.hub.add_listener(outcomes)
    try:
        async with app:
            await asyncio.wait_for(outcomes.last.wait(), ROUND_TIMEOUT)
    finally:
        app.core.hub.remove_listener(outcomes)
    (wall0, cpu0), (wall1, cpu1) = outcomes.marks[first], outcomes.marks[last]
    return (wall1 - wall0) / (last - first), (cpu1 - cpu0) / (last - first)


async def round_trips(
    config: Config,
    queue: QueueBackend,
    results: ResultStore,
    count: int,
    warmup: int,
    backlog_guard: int | None = None,
) -> list[float]:
    """Milliseconds from submit to finished for jobs on queue ``rtt``, one at a time; stops
    early once the pool finished ``backlog_guard`` jobs (the backlog must not run dry)."""
    outcomes = Outcomes()
    app = arqd.App(config, queue=queue, results=results)
    app.core.hub.add_listener(outcomes)
    out: list[float] = []
    try:
        async with app:
            for i in range(warmup + count):
                if backlog_guard is not None and outcomes.count >= backlog_guard:
                    break
                t = time.perf_counter()
                job = await app.client.submit("noop", queue="rtt")
                await app.client.wait(job.id, timeout=60)
                if i >= warmup:
                    out.append((time.perf_counter() - t) * 1000)
    finally:
        app.core.hub.remove_listener(outcomes)
    return out


async def list_failed_ms(client: arqd.Client) -> float:
    """Median of three ``GET /v1/jobs?state=failed&limit=50`` (the dashboard's poll)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        await client.list(state="failed", limit=LIST_LIMIT)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def copy_database(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):  # a closed database has folded its WAL back; copy any left
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst / src.name}{suffix}")


async def fill_master(root: Path, size: int) -> float:
    """Top the master database up to ``size`` queued jobs; answers jobs submitted per second."""
    config = bench_config(root, ["default"], 1)
    queue, results = make_queue(config.queue), make_results(config.results)
    async with queue, results:
        t = time.perf_counter()
        added = await top_up(arqd.Client(queue, results, config=config), queue, size)
        return added / max(time.perf_counter() - t, 1e-9)


class Depth:
    """One queue depth: its copy of the master database, opened, and its round costs."""

    def __init__(self, root: Path, size: int, concurrency: int) -> None:
        self.size = size
        self.config = bench_config(root, ["default"], concurrency)
        self.queue, self.results = make_queue(self.config.queue), make_results(self.config.results)
        self.client = arqd.Client(self.queue, self.results, config=self.config)
        self.costs: list[float] = []
        self.cpu_costs: list[float] = []

    async def process(self, sample: int) -> None:
        """One round: the pool through ``sample`` jobs, or through the whole queue as many
        times (at most ``REPEAT_MAX``) when it holds fewer, so every depth measures about as
        many jobs; the queue is topped up to the size before each pass."""
        n = min(sample, self.size)
        walls, cpus = [], []
        for _ in range(min(REPEAT_MAX, sample // n)):
            await top_up(self.client, self.queue, self.size)
            await asyncio.sleep(CHECKPOINT_WAIT)
            wall, cpu = await process_round(self.config, self.queue, self.results, n)
            walls.append(wall)
            cpus.append(cpu)
        self.costs.append(statistics.fmean(walls))
        self.cpu_costs.append(statistics.fmean(cpus))

    async def figures(self, args: argparse.Namespace) -> dict[str, Any]:
        size, queue, results = self.size, self.queue, self.results
        await top_up(self.client, queue, size)
        counts = await queue.stats()
        rows = sum(s.queued + s.running + s.succeeded + s.failed + s.cancelled for s in counts)
        listed = await list_failed_ms(self.client)
        only_rtt = with_queues(self.config, ["rtt"])
        rtt = await round_trips(only_rtt, queue, results, args.rtt, RTT_WARMUP)
        busy: list[float] = []
        if size > args.sample:  # a backlog the pool cannot finish while the round trips run
            both = with_queues(self.config, ["default", "rtt"])
            count = min(args.rtt, BUSY_RTT_MAX)
            busy = await round_trips(
                both, queue, results, count, BUSY_WARMUP, backlog_guard=size // 2
            )
        cost = statistics.median(self.costs)
        return {
            f"process_per_s_{size}": round(1 / cost),
            f"per_job_us_{size}": round(cost * 1e6, 1),
            f"cpu_per_job_us_{size}": round(statistics.median(self.cpu_costs) * 1e6, 1),
            f"rtt_p50_ms_{size}": round(percentile(rtt, 50), 3),
            f"rtt_p99_ms_{size}": round(percentile(rtt, 99), 3),
            f"rtt_busy_p50_ms_{size}": round(percentile(busy, 50), 3) if busy else None,
            f"rtt_busy_p99_ms_{size}": round(percentile(busy, 99), 3) if busy else None,
            f"list_failed_ms_{size}": round(listed, 2),
            f"table_rows_{size}": rows,
        }


async def depths(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every depth's figures. Rounds alternate between the depths (forwards, then backwards),
    so a busy spell of a shared machine weighs on all of them alike."""
    figures: dict[str, Any] = {}
    master = tmp / "master"
    levels = []
    for size in args.sizes:
        rate = await fill_master(master, size)
        print(f"  filled the master database to {size:,} queued jobs ({rate:,.0f} jobs/s)")
        copy_database(master / "q.sqlite3", tmp / f"depth-{size}")
        levels.append(Depth(tmp / f"depth-{size}", size, args.concurrency))
    async with AsyncExitStack() as stack:
        for level in levels:
            await stack.enter_async_context(level.queue)
            await stack.enter_async_context(level.results)
        for i in range(args.rounds):
            for level in levels if i % 2 == 0 else levels[::-1]:
                await level.process(args.sample)
            costs = ", ".join(f"{d.size:,}: {d.costs[-1] * 1e6:.1f}" for d in levels)
            print(f"  round {i + 1}, us per job by depth: {costs}", flush=True)
        for level in levels:
            figures.update(await level.figures(args))
    for size in args.sizes:
        shutil.rmtree(tmp / f"depth-{size}")
    small, large = args.sizes[0], args.sizes[-1]
    ratio = figures[f"per_job_us_{large}"] / figures[f"per_job_us_{small}"]
    figures[f"cost_ratio_{label(large)}_{label(small)}"] = round(ratio, 3)
    cpu = figures[f"cpu_per_job_us_{large}"] / figures[f"cpu_per_job_us_{small}"]
    figures[f"cpu_cost_ratio_{label(large)}_{label(small)}"] = round(cpu, 3)
    return figures


# --- 2. and 3.: arqd serve as a child process -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    """``arqd serve`` in a child process, on ``db``, consuming ``queues``."""

    def __init__(self, root: Path, db: Path, queues: list[str]) -> None:
        self.root, self.db, self.queues = root, db, queues
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _write_config(self) -> Path:
        path = self.root / "config.toml"
        path.write_text(
            DAEMON_CONFIG.format(
                port=self.port, db=self.db, root=self.root, queues=json.dumps(self.queues)
            )
        )
        return path

    async def __aenter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        with (self.root / "daemon.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "arqd", "serve", "-c", str(config), stdout=log, stderr=log
            )
        try:
            await self._ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(self.url) as http:
            while time.monotonic() < deadline and self.proc.returncode is None:
                try:
                    async with http.get("/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise SystemExit("arqd did not start:\n" + (self.root / "daemon.log").read_text())

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def reload(self, queues: list[str]) -> None:
        """Consume ``queues`` from now on (SIGHUP re-reads the config)."""
        self.queues = queues
        self._write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)

    def memory_mb(self) -> dict[str, float]:
        """VmRSS, RssAnon (heap) and RssFile (mapped files: sqlite's mmap) in MB."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = round(int(value.split()[0]) / 1024, 1)
        return out

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


async def queue_counts(url: str, name: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(url) as http, http.get("/v1/queues") as r:
        queues = (await r.json())["queues"]
    return next((q for q in queues if q["name"] == name), {})


async def until_succeeded(url: str, count: int) -> None:
    deadline = time.monotonic() + ROUND_TIMEOUT
    while (await queue_counts(url, "default")).get("succeeded", 0) < count:
        assert time.monotonic() < deadline, f"the daemon did not finish {count:,} jobs in time"
        await asyncio.sleep(0.2)


async def memory(tmp: Path, master: Path, size: int, sample: int) -> dict[str, Any]:
    """The daemon's memory idle, with ``size`` jobs queued, after ``sample`` of them ran, and
    after all of them ran (with the rate at which it worked through them)."""
    figures: dict[str, Any] = {}
    async with Daemon(tmp / "idle", tmp / "idle" / "q.sqlite3", ["default"]) as d:
        await asyncio.sleep(SETTLE)
        figures["idle"] = d.memory_mb()
    # The deep daemon consumes a queue with no jobs, so its jobs stay queued until told.
    async with Daemon(tmp / "deep", master, ["idle"]) as d:
        await asyncio.sleep(SETTLE)
        figures["queued"] = d.memory_mb()
        assert (await queue_counts(d.url, "default")).get("queued") == size
        await d.reload(["default"])
        await until_succeeded(d.url, sample)
        await d.reload(["idle"])
        await asyncio.sleep(SETTLE)
        figures["after"] = d.memory_mb()
        done = (await queue_counts(d.url, "default"))["succeeded"]
        t = time.perf_counter()
        await d.reload(["default"])
        await until_succeeded(d.url, size)
        figures["drain_per_s"] = round((size - done) / (time.perf_counter() - t))
        await asyncio.sleep(SETTLE)
        figures["drained"] = d.memory_mb()
    return figures


async def submit_batches(http: aiohttp.ClientSession, count: int, queue: str) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 1000):
        body = {"jobs": [{"handler": "noop", "queue": queue}] * min(1000, count - start)}
        async with http.post("/v1/jobs/batch", json=body) as r:
            assert r.status == 202, await r.text()
            ids.extend(j["id"] for j in (await r.json())["jobs"])
    return ids


async def finished_etags(http: aiohttp.ClientSession, ids: list[str]) -> dict[str, str]:
    etags: dict[str, str] = {}
    for job_id in ids:
        params: dict[str, str] = {}  # read first: a long-poll holds a finished job
        headers: dict[str, str] = {}
        while True:
            async with http.get(f"/v1/jobs/{job_id}", params=params, headers=headers) as r:
                if r.status == 200 and (await r.json())["state"] == "succeeded":
                    etags[job_id] = r.headers["ETag"]
                    break
                params, headers = {"wait": "10"}, {"If-None-Match": r.headers["ETag"]}
    return etags


async def wrk(url: str, etags: dict[str, str], seconds: float, tmp: Path) -> tuple[float, ...]:
    """(requests per second, p50 ms, p99 ms, errors) of plain status polls, measured by wrk with
    the script of benchmarks/http_api.py (a timeout of 30 s, so slow answers count, not vanish)."""
    (tmp / "ids.txt").write_text("".join(f"{k} {v}\n" for k, v in etags.items()))
    (tmp / "poll.lua").write_text(WRK_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        *("wrk", "-t1", f"-c{POLL_CONCURRENCY}", f"-d{round(seconds)}s", "--timeout", "30s"),
        *("-s", str(tmp / "poll.lua"), url, "--", str(tmp / "ids.txt"), "200"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out = (await proc.communicate())[0].decode()
    finally:
        if proc.returncode is None:  # cancelled (Ctrl-C): leave no load generator behind
            proc.kill()
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    requests, duration_us, p50, p99, errors = line.split()[1:]
    return int(requests) / (int(duration_us) / 1e6), float(p50), float(p99), float(errors)


async def status_polls(
    d: Daemon, etags: dict[str, str], seconds: float, tmp: Path
) -> dict[str, float]:
    cpu, t = d.cpu_seconds(), time.perf_counter()
    if shutil.which("wrk"):
        rate, p50, p99, errors = await wrk(d.url, etags, seconds, tmp)
    else:
        count, lat = await hammer(d.url, list(etags), seconds, POLL_CONCURRENCY, None)
        rate, p50, p99, errors = count / seconds, percentile(lat, 50), percentile(lat, 99), 0
    busy = (d.cpu_seconds() - cpu) / (time.perf_counter() - t)
    return {
        "per_s": round(rate),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "errors": errors,
        "cpu_pct": round(busy * 100),
    }


class LongPolls:
    """A child process of this script holding one long-poll per job id (``--hold``)."""

    def __init__(self, url: str, ids: list[str], tmp: Path) -> None:
        self.url, self.ids, self.tmp = url, ids, tmp
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        ids_file = self.tmp / "longpoll-ids.txt"
        ids_file.write_text("\n".join(self.ids))
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks.scale", "--hold", self.url, str(ids_file)),
            cwd=ROOT,  # so that `-m benchmarks.scale` is found from any working directory
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 300)
            if not line.startswith(b"OPEN "):
                raise SystemExit(f"the long-poll holder failed: {line!r}")
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> dict[str, int]:
        """Close the client's stdin (its signal to stop) and answer its counts."""
        proc, self.proc = self.proc, None
        if proc is None:
            return {}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            out = await asyncio.wait_for(proc.stdout.read(), 60)
        except TimeoutError:
            proc.kill()
            out = b""
        await proc.wait()
        for line in out.decode().splitlines():
            if line.startswith("STATS "):
                counts: dict[str, int] = json.loads(line[6:])
                return counts
        return {}


async def polls(tmp: Path, longpolls: int, seconds: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"load_generator": "wrk" if shutil.which("wrk") else "aiohttp"}
    root = tmp / "http"
    async with Daemon(root, root / "q.sqlite3", ["default"]) as d:
        async with aiohttp.ClientSession(d.url) as http:
            etags = await finished_etags(http, await submit_batches(http, POLL_JOBS, "default"))
            parked = await submit_batches(http, longpolls, "parked")  # no worker consumes it
            counts = await (await http.get("/v1/queues")).json()
            figures["rows"] = sum(
                sum(q[s] for s in ("queued", "running", "succeeded", "failed", "cancelled"))
                for q in counts["queues"]
            )
        await status_polls(d, etags, WARMUP_SECONDS, root)  # fill the daemon's caches first
        figures["plain"] = await status_polls(d, etags, seconds, root)
        async with LongPolls(d.url, parked, root) as held:
            await asyncio.sleep(SETTLE)
            cpu, t = d.cpu_seconds(), time.perf_counter()
            await asyncio.sleep(CPU_WINDOW)
            busy = (d.cpu_seconds() - cpu) / (time.perf_counter() - t)
            figures["idle_cpu_pct"] = round(busy * 100)
            figures["memory"] = d.memory_mb()
            figures["fds"] = d.open_fds()
            figures["loaded"] = await status_polls(d, etags, seconds, root)
            figures["client"] = await held.stop()
    return figures


# --- the long-poll holder (a child process) -------------------------------------------------------


async def read_status(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; answer its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def hold(url: str, ids: list[str]) -> None:
    """Keep one long-poll open per job id until stdin closes; print ``OPEN n`` once every one
    was sent, and ``STATS {...}`` at the end."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    counts = {"open": 0, "returned": 0, "errors": 0}
    all_open = asyncio.Event()
    connecting = asyncio.Semaphore(CONNECTS_IN_FLIGHT)

    async def one(job_id: str) -> None:
        wait = random.uniform(1, WAIT_MAX)  # spread expiries, as independent clients would
        opened = False
        while True:
            try:
                async with connecting:
                    reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                counts["errors"] += 1
                await asyncio.sleep(1)
                continue
            try:
                while True:
                    path = f"/v1/jobs/{job_id}?wait={wait:.1f}"
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    if not opened:
                        opened = True
                        counts["open"] += 1
                        if counts["open"] == len(ids):
                            all_open.set()
                    status = await read_status(reader)
                    counts["returned"] += 1
                    counts["errors"] += status != 200
                    wait = WAIT_MAX
            except (OSError, asyncio.IncompleteReadError):
                counts["errors"] += 1
            finally:
                writer.close()

    tasks = [asyncio.create_task(one(job_id)) for job_id in ids]
    await all_open.wait()
    print(f"OPEN {counts['open']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    print("STATS " + json.dumps(counts), flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat figures, and the details the table shows besides them."""
    figures: dict[str, Any] = {
        "machine": machine(),
        "sizes": args.sizes,
        "sample": args.sample,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
    }
    print("1. queue depth (in-process)", flush=True)
    figures.update(await depths(tmp, args))
    large, big = args.sizes[-1], label(args.sizes[-1])
    print("2. daemon memory", flush=True)
    mem = await memory(tmp, tmp / "master" / "q.sqlite3", large, min(args.sample, large))
    # The status polls run on the database the deep daemon drained: a table of ``large``
    # finished jobs, as a daemon that has worked for a while has.
    copy_database(tmp / "master" / "q.sqlite3", tmp / "http")
    shutil.rmtree(tmp / "master")
    shutil.rmtree(tmp / "deep")
    figures["rss_idle_mb"] = mem["idle"]["VmRSS"]
    figures[f"rss_{big}_queued_mb"] = mem["queued"]["VmRSS"]
    figures[f"rss_{big}_after_sample_mb"] = mem["after"]["VmRSS"]
    figures[f"rss_{big}_drained_mb"] = mem["drained"]["VmRSS"]
    figures[f"rss_{big}_drained_anon_mb"] = mem["drained"]["RssAnon"]
    figures[f"daemon_drain_per_s_{big}"] = mem["drain_per_s"]
    print("3. status polls", flush=True)
    lp = label(args.longpolls)
    http = await polls(tmp, args.longpolls, args.seconds)
    figures["load_generator"] = http["load_generator"]
    figures["poll_table_rows"] = http["rows"]
    for key, name in (("plain", "no_longpolls"), ("loaded", f"{lp}_longpolls")):
        for stat in ("per_s", "p50_ms", "p99_ms"):
            figures[f"poll_{stat}_{name}"] = http[key][stat]
    figures[f"daemon_cpu_pct_{lp}_longpolls_idle"] = http["idle_cpu_pct"]
    figures[f"rss_{lp}_longpolls_mb"] = http["memory"]["VmRSS"]
    figures["longpolls_open"] = http["client"].get("open")
    figures["longpolls_returned"] = http["client"].get("returned")
    figures["longpoll_errors"] = http["client"].get("errors")
    return figures, {"memory": mem, "http": http}


def cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.2f}':>{width}}"


def print_depths(f: dict[str, Any], args: argparse.Namespace) -> None:
    sizes = args.sizes
    print(
        f"\nqueue depth: sqlite in-process, concurrency {args.concurrency}; per job: the median "
        f"of {args.rounds} rounds of min({args.sample:,}, depth) jobs, wall-clock and CPU time;"
        "\nround trips on queue 'rtt' (ms): with the pool on 'rtt' only, and busy: on both "
        "while it works through the backlog;\nlist failed: GET /v1/jobs?state=failed&limit=50 "
        "with none failed, rows: jobs in the table (queued, and those this run finished)"
    )
    print(
        f"{'queued':>10} {'process/s':>10} {'us/job':>7} {'cpu us':>7} {'rtt p50':>8} "
        f"{'rtt p99':>8} {'busy p50':>9} {'busy p99':>9} {'list failed ms':>15} {'rows':>10}"
    )
    for n in sizes:
        print(
            f"{n:>10,} {f[f'process_per_s_{n}']:>10,} {f[f'per_job_us_{n}']:>7} "
            f"{f[f'cpu_per_job_us_{n}']:>7} "
            f"{cell(f[f'rtt_p50_ms_{n}'], 8)} {cell(f[f'rtt_p99_ms_{n}'], 8)} "
            f"{cell(f[f'rtt_busy_p50_ms_{n}'], 9)} {cell(f[f'rtt_busy_p99_ms_{n}'], 9)} "
            f"{f[f'list_failed_ms_{n}']:>15.1f} {f[f'table_rows_{n}']:>10,}"
        )
    ratio = f"{label(sizes[-1])}_{label(sizes[0])}"
    print(
        f"per-job cost ratio {ratio}: {f['cost_ratio_' + ratio]} wall-clock, "
        f"{f['cpu_cost_ratio_' + ratio]} CPU (target <= 1.5)"
    )


def print_memory(mem: dict[str, Any], http: dict[str, Any], args: argparse.Namespace) -> None:
    large = args.sizes[-1]
    print("\ndaemon memory (arqd serve, sqlite)   VmRSS MB   anon MB   file MB")
    rows = (
        ("idle, empty database", mem["idle"]),
        (f"{large:,} jobs queued", mem["queued"]),
        (f"after processing {min(args.sample, large):,} of them", mem["after"]),
        (f"after processing all ({mem['drain_per_s']:,} jobs/s)", mem["drained"]),
        (f"idle, {args.longpolls:,} long-polls open", http["memory"]),
    )
    for name, m in rows:
        print(f"{name:36} {m['VmRSS']:>8} {m['RssAnon']:>9} {m['RssFile']:>9}")
    print("(target with the jobs queued: < 150 MB; file = mapped files, sqlite's mmap among them)")


def print_polls(f: dict[str, Any], http: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nstatus polls: GET /v1/jobs/{{id}}, {f['load_generator']}, {POLL_CONCURRENCY} "
        f"connections, {args.seconds:g} s, on a table of {f['poll_table_rows']:,} jobs"
    )
    print(f"{'':28} {'per s':>7} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'daemon CPU %':>13}")
    rows = (("no long-polls", "plain"), (f"{args.longpolls:,} long-polls open", "loaded"))
    for name, key in rows:
        h = http[key]
        print(
            f"{name:28} {h['per_s']:>7,} {h['p50_ms']:>9.2f} {h['p99_ms']:>9.2f} "
            f"{h['errors']:>7g} {h['cpu_pct']:>13}"
        )
    print(
        f"long-polls alone: daemon CPU {http['idle_cpu_pct']} %, {http['fds']:,} open fds; "
        f"holder: {http['client']}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000", help="queue depths")
    parser.add_argument("--sample", type=int, default=10_000, help="jobs processed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rtt", type=int, default=1000, help="round trips per depth")
    parser.add_argument("--longpolls", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="of each status-poll load")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: sizes 1000,20000, 1k long-polls"
    )
    parser.add_argument("--hold", nargs=2, metavar=("URL", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(
            sizes="1000,20000", sample=2000, rounds=3, rtt=200, longpolls=1000, seconds=3.0
        )
        args = parser.parse_args(argv)
    args.sizes = sorted({int(s) for s in str(args.sizes).split(",")})
    return args


def main() -> None:
    args = parse_args()
    limit = raise_fd_limit()
    if args.hold:
        url, ids_file = args.hold
        asyncio.run(hold(url, Path(ids_file).read_text().split()))
        return
    if limit < args.longpolls + FD_SPARE:
        raise SystemExit(
            f"{args.longpolls:,} long-polls need {args.longpolls + FD_SPARE:,} descriptors per "
            f"process; the hard limit is {limit:,} (lower --longpolls or raise `ulimit -Hn`)"
        )
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="arqd-scale-") as tmp:
        figures, details = asyncio.run(run(args, Path(tmp)))
    print(f"\nmachine: {figures['machine']}")
    print_depths(figures, args)
    print_memory(details["memory"], details["http"], args)
    print_polls(figures, details["http"], args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
