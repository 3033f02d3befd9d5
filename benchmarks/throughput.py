"""Throughput and round trip, in-process, on sqlite and on memory.

    python -m benchmarks.throughput [--jobs 20000] [--concurrency 64] [--rtt 1000]

For each backend: submit N no-op jobs (batches of 1,000, as ``POST /v1/jobs/batch`` allows), then
start the consumer pool and time until the last job finished; then, with the pool running,
submit one job and await it, ``--rtt`` times in sequence after a warm-up. Logs are at warning
level (the canonical per-job line is an info line). The last line of output is one JSON object
with the figures (keys in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import arqd
from arqd import logs
from arqd.config import Config
from arqd.stores import make_queue, make_results


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run_backend(backend: str, jobs: int, concurrency: int, rtt: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="arqd-bench-") as tmp:
        config = Config.from_dict(
            {
                "queue": {"backend": backend, "path": str(Path(tmp) / "q.sqlite3")},
                "results": {"backend": "files", "path": str(Path(tmp) / "results")},
                "workers": {"concurrency": concurrency, "batch": 200},
                "handlers": {"noop": "arqd.demo:noop"},
            }
        )
        queue, results = make_queue(config.queue), make_results(config.results)
        async with queue, results:
            client = arqd.Client(queue, results, config=config)
            specs = [{"handler": "noop"}] * 1000
            t0 = time.perf_counter()
            for start in range(0, jobs, 1000):
                await client.submit_many(specs[: min(1000, jobs - start)])
            t1 = time.perf_counter()
            app = arqd.App(config, queue=queue, results=results)
            async with app:
                t2 = time.perf_counter()
                await app.drain()
                t3 = time.perf_counter()
                stats = {s.name: s for s in await queue.stats()}
                assert stats["default"].succeeded == jobs, stats
                for _ in range(min(100, rtt)):  # warm-up
                    job = await app.client.submit("noop")
                    await app.client.wait(job.id)
                rtts = []
                for _ in range(rtt):
                    s = time.perf_counter()
                    job = await app.client.submit("noop")
                    await app.client.wait(job.id)
                    rtts.append((time.perf_counter() - s) * 1000)
        submit_s, process_s = t1 - t0, t3 - t2
        return {
            f"{backend}_submit_per_s": round(jobs / submit_s),
            f"{backend}_process_per_s": round(jobs / process_s),
            f"{backend}_total_per_s": round(jobs / (submit_s + process_s)),
            f"{backend}_rtt_p50_ms": round(percentile(rtts, 50), 3),
            f"{backend}_rtt_p99_ms": round(percentile(rtts, 99), 3),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rtt", type=int, default=1000)
    parser.add_argument("--backends", default="sqlite,memory")
    args = parser.parse_args()
    logs.configure("warning", "console")
    figures: dict[str, Any] = {"jobs": args.jobs, "concurrency": args.concurrency}
    print(f"arqd {arqd.__version__} on Python {platform.python_version()}, {platform.machine()}")
    print(
        f"{'backend':8} {'submit/s':>10} {'process/s':>10} {'total/s':>10} "
        f"{'rtt p50 ms':>11} {'rtt p99 ms':>11}"
    )
    for backend in args.backends.split(","):
        f = await run_backend(backend, args.jobs, args.concurrency, args.rtt)
        figures.update(f)
        print(
            f"{backend:8} {f[f'{backend}_submit_per_s']:>10} {f[f'{backend}_process_per_s']:>10} "
            f"{f[f'{backend}_total_per_s']:>10} {f[f'{backend}_rtt_p50_ms']:>11} "
            f"{f[f'{backend}_rtt_p99_ms']:>11}"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
