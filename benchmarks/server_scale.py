"""arqd on a shared server (PostgreSQL or Redis): scale-out over daemons, and per-job cost
against the depth of the queue.

    python -m benchmarks.server_scale --backend postgres|redis [--daemons 1,2,3] [--jobs 30000]
                                      [--concurrency 64] [--depths 1000,1000000]
                                      [--sample 10000] [--rounds 3] [--no-settle]

The server is started for the run as for ``benchmarks.compare`` (``benchmarks/peers/services.py``:
127.0.0.1; PostgreSQL with ``synchronous_commit = off`` and fsync on; Redis without persistence,
as the Redis peers are measured).

1. **Scale-out.** For each count in ``--daemons``: that many ``arqd serve`` daemons on one fresh
   schema (PostgreSQL) or key prefix (Redis), each at ``workers.concurrency = --concurrency``
   (64) and ``workers.batch = 200``, started with concurrency 0; ``--jobs`` no-op jobs submitted
   (``Client.submit_many``, 1,000 a call); then every daemon's config rewritten to the
   concurrency and SIGHUPed at once. The rate is timed from the moment 10 % of the jobs
   succeeded to the moment 90 % did (the backend's counts, polled), so the daemons' start and
   the last stragglers do not count. Also PostgreSQL's or Redis's share of the CPU time spent
   meanwhile (its processes ÷ its processes + the daemons', from ``/proc``). ``--rounds``
   rounds, counts interleaved; medians.
2. **Depth.** One daemon (same settings) per depth, each on a schema or prefix filled with that
   many no-op jobs (PostgreSQL: then settled as autovacuum would soon after a bulk load,
   ``VACUUM (ANALYZE)`` and a ``CHECKPOINT``; ``--no-settle`` measures straight after the
   load). Each round, each depth works through ``--sample`` jobs (a shallower queue is refilled
   to its depth and worked through again until ``--sample`` ran), each pass timed from its 10 %
   to its 90 % as above; rounds alternate the order of the depths. Per-job cost is the median
   round's microseconds of wall time per job; ``cost_ratio`` compares the deepest with the
   shallowest (the goal: at most 1.5). Redis: also the server's memory per queued job
   (``used_memory`` after the fill, less before, ÷ the jobs).

The last line is one JSON object: ``daemons_<n>_per_s``, ``daemons_<n>_ratio``,
``daemons_<n>_server_cpu_share`` per count; ``depth_<d>_per_s``, ``depth_<d>_us_per_job`` per
depth; ``cost_ratio``; ``settled``; Redis: ``bytes_per_queued_job``; the backend, the sizes, the
machine and the server's version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp

from arqd import logs
from arqd.backends.base import QueueBackend
from arqd.client import Client
from arqd.config import Config
from arqd.results.memory import MemoryResults
from arqd.stores import make_queue
from benchmarks.peers import common
from benchmarks.peers.arqd_bench import Daemon
from benchmarks.peers.services import Postgres, Redis, Service

SUBMIT_BATCH = 1000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOW, HIGH = 0.1, 0.9  # a pass is timed between these shares of its jobs done


def progress(message: str) -> None:
    print(f"[server_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def server_pids(server: Service) -> list[int]:
    """The server process and every process it forked (PostgreSQL's backends)."""
    assert server.proc is not None
    return [server.proc.pid, *common.descendants(server.proc.pid)]


class Target:
    """One schema (PostgreSQL) or key prefix (Redis) on the run's server."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend, self.url = backend, url
        self.name = f"scale_{uuid.uuid4().hex[:10]}"

    def queue_config(self) -> dict[str, Any]:
        if self.backend == "postgres":
            return {"backend": "postgres", "dsn": self.url, "schema": self.name}
        return {"backend": "redis", "url": self.url, "prefix": self.name}

    def open(self) -> QueueBackend:
        return make_queue(Config.from_dict({"queue": self.queue_config()}).queue)

    def daemon_args(self, concurrency: int) -> argparse.Namespace:
        return argparse.Namespace(
            mode=f"http_{self.backend}", url=self.url, schema=self.name, concurrency=concurrency
        )

    async def submit(self, jobs: int) -> None:
        queue = self.open()
        async with queue, Client(queue, MemoryResults()) as client:
            for start in range(0, jobs, SUBMIT_BATCH):
                n = min(SUBMIT_BATCH, jobs - start)
                await client.submit_many([{"handler": "noop"}] * n)

    async def settle(self) -> None:
        """PostgreSQL: what autovacuum does to a table soon after a bulk load (VACUUM: hint
        bits, the visibility map, dead index entries; ANALYZE), then a CHECKPOINT so the
        load's writes are not flushed during the measurement. Redis: nothing to do."""
        if self.backend != "postgres":
            return
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f'VACUUM (ANALYZE) "{self.name}".jobs')
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()


class Fleet:
    """``n`` idle daemons on one target; ``run()`` sets them to work and times them."""

    def __init__(self, tmp: Path, target: Target, n: int, concurrency: int) -> None:
        self.target, self.concurrency = target, concurrency
        self.daemons = []
        for i in range(n):
            home = tmp / f"{target.name}-{i}"
            home.mkdir()
            self.daemons.append(Daemon(home, target.daemon_args(concurrency), 0))

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for daemon in self.daemons:
                await daemon.ready(http, timeout=60)

    async def run(self, before: int, jobs: int, server: Service) -> tuple[float, float, float]:
        """Start the daemons and wait until ``before + jobs`` jobs succeeded; answers seconds per
        job between 10 % and 90 % of ``jobs``, and the server's and the daemons' CPU seconds
        over that stretch."""
        theirs, ours = server_pids(server), [d.proc.pid for d in self.daemons]
        low, high = before + max(1, int(jobs * LOW)), before + int(jobs * HIGH)
        marks: dict[int, tuple[float, float, float]] = {}
        for daemon in self.daemons:
            daemon.write(self.concurrency)
        for daemon in self.daemons:
            daemon.proc.send_signal(signal.SIGHUP)
        queue = self.target.open()
        async with queue:

            async def done() -> bool:
                stats = await queue.stats()
                n = sum(s.succeeded for s in stats if s.name == "default")
                for mark in (low, high):
                    if n >= mark and mark not in marks:
                        now = time.perf_counter()
                        marks[mark] = (now, cpu_seconds(theirs), cpu_seconds(ours))
                return n >= before + jobs

            await common.until(done)  # the counts live in the server: no event to wait on
        (t0, s0, o0), (t1, s1, o1) = marks[low], marks[high]
        per_job = (t1 - t0) / max(1, high - low)
        return per_job, s1 - s0, o1 - o0

    async def pause(self) -> None:
        """Back to concurrency 0 (the next ``run`` starts them again)."""
        for daemon in self.daemons:
            daemon.write(0)
            daemon.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)

    def close(self) -> None:
        for daemon in self.daemons:
            common.stop(daemon.proc, grace=30)


async def scale_out(args: argparse.Namespace, server: Service, tmp: Path) -> dict[str, Any]:
    rates: dict[int, list[float]] = {n: [] for n in args.daemons}
    shares: dict[int, list[float]] = {n: [] for n in args.daemons}
    for r in range(args.rounds):
        order = args.daemons if r % 2 == 0 else list(reversed(args.daemons))
        for n in order:
            target = Target(args.backend, server.url)
            await target.submit(1)  # creates the schema before the daemons start
            fleet = Fleet(tmp, target, n, args.concurrency)
            try:
                await fleet.ready()
                await target.submit(args.jobs - 1)
                per_job, theirs, ours = await fleet.run(0, args.jobs, server)
            finally:
                fleet.close()
            rates[n].append(1 / per_job)
            shares[n].append(theirs / max(1e-9, theirs + ours))
            progress(f"{n} daemon(s): {1 / per_job:,.0f} jobs/s")
    one = statistics.median(rates[args.daemons[0]])
    out: dict[str, Any] = {}
    for n in args.daemons:
        rate = statistics.median(rates[n])
        out[f"daemons_{n}_per_s"] = round(rate)
        out[f"daemons_{n}_ratio"] = round(rate / one, 2)
        out[f"daemons_{n}_server_cpu_share"] = round(statistics.median(shares[n]), 2)
    return out


async def depth(args: argparse.Namespace, server: Service, tmp: Path) -> dict[str, Any]:
    """Per-job cost with each depth queued; ``--rounds`` samples per depth, alternating."""
    fleets: dict[int, tuple[Fleet, Target]] = {}
    done: dict[int, int] = dict.fromkeys(args.depths, 0)
    spent: dict[int, list[float]] = {size: [] for size in args.depths}
    out: dict[str, Any] = {}
    try:
        for size in args.depths:
            target = Target(args.backend, server.url)
            memory = redis_memory(server)
            await target.submit(size)
            if size == max(args.depths) and memory is not None:
                out["bytes_per_queued_job"] = round(((redis_memory(server) or 0) - memory) / size)
            if args.settle:
                await target.settle()
            fleets[size] = (Fleet(tmp, target, 1, args.concurrency), target)
            await fleets[size][0].ready()
        for r in range(args.rounds):
            for size in args.depths if r % 2 == 0 else list(reversed(args.depths)):
                fleet, target = fleets[size]
                per_job: list[float] = []
                ran = 0
                while ran < args.sample:
                    batch = min(size, args.sample - ran)
                    if done[size] and size <= args.sample:  # a shallow queue: refill it first
                        await target.submit(batch)
                    seconds, _, _ = await fleet.run(done[size], batch, server)
                    await fleet.pause()
                    done[size] += batch
                    ran += batch
                    per_job.append(seconds)
                spent[size].append(statistics.mean(per_job))
                progress(f"depth {size:,}: {1 / spent[size][-1]:,.0f} jobs/s")
    finally:
        for fleet, _ in fleets.values():
            fleet.close()
    for size in args.depths:
        cost = statistics.median(spent[size])
        out[f"depth_{size}_per_s"] = round(1 / cost)
        out[f"depth_{size}_us_per_job"] = round(cost * 1e6, 1)
    low, high = min(args.depths), max(args.depths)
    out["cost_ratio"] = round(out[f"depth_{high}_us_per_job"] / out[f"depth_{low}_us_per_job"], 2)
    out["settled"] = args.settle and args.backend == "postgres"
    return out


def redis_memory(server: Service) -> int | None:
    """Redis's ``used_memory`` in bytes (``INFO memory`` over a socket); None for PostgreSQL."""
    if not isinstance(server, Redis):
        return None
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("postgres", "redis"), required=True)
    p.add_argument("--daemons", default="1,2,3")
    p.add_argument("--jobs", type=int, default=30_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--depths", default="1000,1000000")
    p.add_argument("--sample", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="PostgreSQL: measure straight after the bulk load (no VACUUM ANALYZE + CHECKPOINT)",
    )
    args = p.parse_args()
    args.daemons = [int(n) for n in str(args.daemons).split(",") if n]
    args.depths = sorted(int(n) for n in str(args.depths).split(",") if n)
    return args


async def main_async(args: argparse.Namespace, server: Service, tmp: Path) -> dict[str, Any]:
    figures = await scale_out(args, server, tmp) if args.daemons else {}
    if args.depths:
        figures.update(await depth(args, server, tmp))
    return figures


def main() -> None:
    args = parse_args()
    common.terminate_on_sigterm()
    logs.configure("warning", "console")
    server: Service = Postgres() if args.backend == "postgres" else Redis()
    with server, tempfile.TemporaryDirectory(prefix="arqd-server-scale-") as tmp:
        server.start()
        figures = asyncio.run(main_async(args, server, Path(tmp)))
        figures.update(
            backend=args.backend, jobs=args.jobs, concurrency=args.concurrency,
            sample=args.sample, rounds=args.rounds, cores=os.cpu_count(),
            python=platform.python_version(), server=server.version(),
        )  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
