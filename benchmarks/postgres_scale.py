"""arqd on PostgreSQL: scale-out over daemons, and per-job cost against the depth of the queue.

    python -m benchmarks.postgres_scale [--daemons 1,2,3] [--jobs 30000] [--concurrency 64]
                                        [--depths 1000,1000000] [--sample 10000] [--rounds 3]
                                        [--quick]

A PostgreSQL cluster is started for the run (``benchmarks/peers/services.py``: 127.0.0.1,
``synchronous_commit = off``, fsync on), as for ``benchmarks.compare``.

1. **Scale-out.** For each count in ``--daemons``: that many ``arqd serve`` daemons on one fresh
   schema, each at ``workers.concurrency = --concurrency`` (64) and ``workers.batch = 200``,
   started with concurrency 0; ``--jobs`` no-op jobs submitted (``Client.submit_many``,
   1,000 a call); then every daemon's config rewritten to the concurrency and SIGHUPed at once,
   and the clock runs until the backend counts every job succeeded. Figures: jobs/s, its ratio
   to one daemon, and PostgreSQL's share of the CPU time spent meanwhile (its processes ÷ its
   processes + the daemons', from ``/proc``). ``--rounds`` rounds, counts interleaved; medians.
2. **Depth.** One daemon (same settings) per depth, each on a schema filled with that many
   no-op jobs, then settled as autovacuum would soon after a bulk load (``VACUUM (ANALYZE)``
   and a ``CHECKPOINT``; ``--no-settle`` measures straight after the load). Each round, each
   depth works through ``--sample`` jobs (a shallower queue is refilled to its depth and
   worked through again until ``--sample`` ran), timed from the first job's start to the last
   one's end (the stored ``started_at``, ``finished_at``); rounds alternate the order of the
   depths. Per-job cost is the median round's microseconds of wall time per job;
   ``cost_ratio`` compares the deepest with the shallowest (the issue's goal: at most 1.5).

The last line is one JSON object: ``daemons_<n>_per_s``, ``daemons_<n>_ratio``,
``daemons_<n>_pg_cpu_share`` per count; ``depth_<d>_per_s``, ``depth_<d>_us_per_job`` per depth;
``cost_ratio``, ``settled``; the sizes, the machine and the server's version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
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
import asyncpg

from arqd import logs
from arqd.backends.postgres import PostgresQueue
from arqd.client import Client
from arqd.results.memory import MemoryResults
from benchmarks.peers import common
from benchmarks.peers.arqd_bench import Daemon
from benchmarks.peers.services import Postgres

SUBMIT_BATCH = 1000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[postgres_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def server_pids(server: Postgres) -> list[int]:
    """The postmaster and every backend process it forked (their CPU is the server's)."""
    assert server.proc is not None
    return [server.proc.pid, *common.descendants(server.proc.pid)]


def daemon_args(url: str, schema: str, concurrency: int) -> argparse.Namespace:
    return argparse.Namespace(mode="http_postgres", url=url, schema=schema, concurrency=concurrency)


async def submit(url: str, schema: str, jobs: int) -> None:
    queue = PostgresQueue(url, schema=schema)
    async with queue, Client(queue, MemoryResults()) as client:
        for start in range(0, jobs, SUBMIT_BATCH):
            n = min(SUBMIT_BATCH, jobs - start)
            await client.submit_many([{"handler": "noop"}] * n)


class Fleet:
    """``n`` idle daemons on one schema; ``run()`` sets them to work and times them."""

    def __init__(self, tmp: Path, url: str, schema: str, n: int, concurrency: int) -> None:
        self.url, self.schema, self.concurrency = url, schema, concurrency
        self.daemons = []
        for i in range(n):
            home = tmp / f"{schema}-{i}"
            home.mkdir()
            self.daemons.append(Daemon(home, daemon_args(url, schema, concurrency), 0))

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for daemon in self.daemons:
                await daemon.ready(http, timeout=60)

    async def run(self, until: int, server: Postgres) -> tuple[float, float, float]:
        """Seconds until ``until`` jobs succeeded; the server's and the daemons' CPU seconds."""
        pg, ours = server_pids(server), [d.proc.pid for d in self.daemons]
        pg0, ours0 = cpu_seconds(pg), cpu_seconds(ours)
        t0 = time.perf_counter()
        for daemon in self.daemons:
            daemon.write(self.concurrency)
        for daemon in self.daemons:
            daemon.proc.send_signal(signal.SIGHUP)
        queue = PostgresQueue(self.url, schema=self.schema, migrate=False)
        async with queue:

            async def done() -> bool:
                stats = await queue.stats()
                return sum(s.succeeded for s in stats if s.name == "default") >= until

            await common.until(done)  # the counts live in the server: no event to wait on
        seconds = time.perf_counter() - t0
        return seconds, cpu_seconds(pg) - pg0, cpu_seconds(ours) - ours0

    async def pause(self) -> None:
        """Back to concurrency 0 (the next ``run`` starts them again)."""
        for daemon in self.daemons:
            daemon.write(0)
            daemon.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)

    def close(self) -> None:
        for daemon in self.daemons:
            common.stop(daemon.proc, grace=30)


def new_schema() -> str:
    return f"scale_{uuid.uuid4().hex[:10]}"


async def scale_out(args: argparse.Namespace, server: Postgres, tmp: Path) -> dict[str, Any]:
    rates: dict[int, list[float]] = {n: [] for n in args.daemons}
    shares: dict[int, list[float]] = {n: [] for n in args.daemons}
    for r in range(args.rounds):
        order = args.daemons if r % 2 == 0 else list(reversed(args.daemons))
        for n in order:
            schema = new_schema()
            await submit(server.url, schema, 1)  # creates the schema before the daemons start
            fleet = Fleet(tmp, server.url, schema, n, args.concurrency)
            try:
                await fleet.ready()
                await submit(server.url, schema, args.jobs - 1)
                seconds, pg_cpu, ours_cpu = await fleet.run(args.jobs, server)
            finally:
                fleet.close()
            rates[n].append(args.jobs / seconds)
            shares[n].append(pg_cpu / max(1e-9, pg_cpu + ours_cpu))
            progress(f"{n} daemon(s): {args.jobs / seconds:,.0f} jobs/s")
    one = statistics.median(rates[args.daemons[0]])
    out: dict[str, Any] = {}
    for n in args.daemons:
        rate = statistics.median(rates[n])
        out[f"daemons_{n}_per_s"] = round(rate)
        out[f"daemons_{n}_ratio"] = round(rate / one, 2)
        out[f"daemons_{n}_pg_cpu_share"] = round(statistics.median(shares[n]), 2)
    return out


async def settle(url: str, schema: str) -> None:
    """What autovacuum does to a table soon after a bulk load: VACUUM (hint bits, visibility
    map, dead index entries) and ANALYZE, then a CHECKPOINT so the load's writes are not
    flushed during the measurement."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'VACUUM (ANALYZE) "{schema}".jobs')
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def busy_seconds(url: str, schema: str, since: float) -> tuple[float, int]:
    """From the first start to the last end of the jobs that ended since ``since``, and how
    many they are (the pool's ramp after a SIGHUP left out: it weighed ten times on a 1,000-job
    queue refilled ten times; a job the previous pass ran on its way out is not counted)."""
    conn = await asyncpg.connect(url)
    try:
        first, last, n = await conn.fetchrow(
            f'SELECT min(started_at), max(finished_at), count(*) FROM "{schema}".jobs '
            "WHERE state = 'succeeded' AND finished_at >= $1 AND started_at >= $1",
            since,
        )
    finally:
        await conn.close()
    return float(last - first), int(n)


async def depth(args: argparse.Namespace, server: Postgres, tmp: Path) -> dict[str, Any]:
    """Per-job cost with each depth queued; ``--rounds`` samples per depth, alternating."""
    fleets: dict[int, tuple[Fleet, str]] = {}
    done: dict[int, int] = dict.fromkeys(args.depths, 0)
    spent: dict[int, list[float]] = {size: [] for size in args.depths}
    try:
        for size in args.depths:
            schema = new_schema()
            await submit(server.url, schema, size)
            if args.settle:
                await settle(server.url, schema)
            fleets[size] = (Fleet(tmp, server.url, schema, 1, args.concurrency), schema)
            await fleets[size][0].ready()
        for r in range(args.rounds):
            for size in args.depths if r % 2 == 0 else list(reversed(args.depths)):
                fleet, schema = fleets[size]
                seconds, ran, timed = 0.0, 0, 0
                while ran < args.sample:
                    batch = min(size, args.sample - ran)
                    if done[size] and size <= args.sample:  # a shallow queue: refill it first
                        await submit(server.url, schema, batch)
                    since = time.time()
                    await fleet.run(done[size] + batch, server)
                    took, n = await busy_seconds(server.url, schema, since)
                    await fleet.pause()
                    done[size] += batch
                    seconds += took
                    ran += batch
                    timed += n
                spent[size].append(seconds / timed)
                progress(f"depth {size:,}: {timed / seconds:,.0f} jobs/s")
    finally:
        for fleet, _ in fleets.values():
            fleet.close()
    out: dict[str, Any] = {}
    for size in args.depths:
        per_job = statistics.median(spent[size])
        out[f"depth_{size}_per_s"] = round(1 / per_job)
        out[f"depth_{size}_us_per_job"] = round(per_job * 1e6, 1)
    low, high = min(args.depths), max(args.depths)
    out["cost_ratio"] = round(out[f"depth_{high}_us_per_job"] / out[f"depth_{low}_us_per_job"], 2)
    out["settled"] = args.settle
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        help="measure straight after the bulk load (no VACUUM ANALYZE + CHECKPOINT first)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, to smoke-test")
    args = p.parse_args()
    if args.quick:
        args.jobs, args.depths, args.sample, args.rounds = 1000, "100,2000", 500, 1
    args.daemons = [int(n) for n in str(args.daemons).split(",") if n]
    args.depths = sorted(int(n) for n in str(args.depths).split(",") if n)
    return args


async def main_async(args: argparse.Namespace, server: Postgres, tmp: Path) -> dict[str, Any]:
    figures = await scale_out(args, server, tmp) if args.daemons else {}
    if args.depths:
        figures.update(await depth(args, server, tmp))
    return figures


def main() -> None:
    args = parse_args()
    common.terminate_on_sigterm()
    logs.configure("warning", "console")
    server = Postgres()
    with server, tempfile.TemporaryDirectory(prefix="arqd-pg-scale-") as tmp:
        server.start()
        figures = asyncio.run(main_async(args, server, Path(tmp)))
        figures.update(
            jobs=args.jobs, concurrency=args.concurrency, sample=args.sample, rounds=args.rounds,
            cores=os.cpu_count(), python=platform.python_version(), postgres=server.version(),
        )  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
