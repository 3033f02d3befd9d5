"""The HTTP API under load: status polls (plain and 304) and batch submits.

    python -m benchmarks.http_api [--seconds 5] [--concurrency 64] [--batches 20]

Starts ``arqd serve`` (sqlite, a temporary directory) as a separate process, fills it with 1,000
finished jobs, then polls their status for ``--seconds`` with ``--concurrency`` connections:
GET /v1/jobs/{id} of random jobs (200), then the same with If-None-Match (304). The load comes
from ``wrk`` when it is installed (``apt-get install wrk``: a C load generator, so the client is
not what is measured), else from aiohttp coroutines in this process (which then compete with
the daemon for the same two cores and report less). Then submits ``--batches`` batches of
1,000 jobs to a queue no worker consumes (the cost of accepting work, not of running it). The
last line of output is one JSON object with the figures (keys in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp

from benchmarks.throughput import percentile

CONFIG = """
[server]
listen = "127.0.0.1:0"
max_body = "4MiB"
[queue]
path = "{dir}/q.sqlite3"
[results]
path = "{dir}/results"
[workers]
concurrency = 32
[handlers]
noop = "arqd.demo:noop"
[log]
level = "warning"
format = "json"
"""


def start_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / "config.toml"
    config.write_text(CONFIG.format(dir=tmp).replace('level = "warning"', 'level = "info"'))
    log = tmp / "daemon.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arqd", "serve", "-c", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"daemon.ready"' in line:
                return proc, "http://" + json.loads(line)["listen"]
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("arqd did not start:\n" + log.read_text())


async def hammer(
    url: str, ids: list[str], seconds: float, concurrency: int, etags: dict[str, str] | None
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as http:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                job_id = random.choice(ids)
                headers = {"If-None-Match": etags[job_id]} if etags else None
                t = time.perf_counter()
                async with http.get(f"/v1/jobs/{job_id}", headers=headers) as r:
                    await r.read()
                    assert r.status == (304 if etags else 200), r.status
                latencies.append((time.perf_counter() - t) * 1000)
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, latencies


WRK_SCRIPT = """
local paths = {}
local etag = nil
init = function(args)
  for line in io.lines(args[1]) do
    local id, tag = line:match("(%S+) (%S+)")
    paths[#paths + 1] = {"/v1/jobs/" .. id, tag}
  end
  etag = args[2] == "304"
end
request = function()
  local p = paths[math.random(#paths)]
  local headers = {}
  if etag then headers["If-None-Match"] = p[2] end
  return wrk.format("GET", p[1], headers)
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %d %d %.3f %.3f %d\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read))
end
"""


def wrk(
    url: str, etags: dict[str, str], seconds: float, concurrency: int, mode: str, tmp: Path
) -> tuple[float, float, float]:
    """(requests per second, p50 ms, p99 ms) measured by wrk."""
    (tmp / "ids.txt").write_text("".join(f"{k} {v}\n" for k, v in etags.items()))
    (tmp / "poll.lua").write_text(WRK_SCRIPT)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{round(seconds)}s",
            "-s",
            str(tmp / "poll.lua"),
            url,
            "--",
            str(tmp / "ids.txt"),
            mode,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    requests, duration_us, p50, p99, errors = line.split()[1:]
    assert int(errors) == 0, out
    return int(requests) / (int(duration_us) / 1e6), float(p50), float(p99)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"concurrency": args.concurrency, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="arqd-http-") as tmp:
        proc, url = start_daemon(Path(tmp))
        try:
            async with aiohttp.ClientSession(url) as http:
                body = {"jobs": [{"handler": "noop"} for _ in range(1000)]}
                async with http.post("/v1/jobs/batch", json=body) as r:
                    ids = [j["id"] for j in (await r.json())["jobs"]]
                etags: dict[str, str] = {}
                for job_id in ids:  # wait for them to finish, and learn their final ETags
                    while True:
                        async with http.get(f"/v1/jobs/{job_id}") as r:
                            if (await r.json())["state"] == "succeeded":
                                etags[job_id] = r.headers["ETag"]
                                break
                        await asyncio.sleep(0.01)
            figures["load_generator"] = "wrk" if shutil.which("wrk") else "aiohttp"
            for name, tags in (("status", None), ("status_304", etags)):
                if shutil.which("wrk"):
                    rate, p50, p99 = wrk(
                        url,
                        etags,
                        args.seconds,
                        args.concurrency,
                        "304" if tags else "200",
                        Path(tmp),
                    )
                else:
                    count, lat = await hammer(url, ids, args.seconds, args.concurrency, tags)
                    rate, p50, p99 = count / args.seconds, percentile(lat, 50), percentile(lat, 99)
                figures[f"{name}_per_s"] = round(rate)
                figures[f"{name}_p50_ms"] = round(p50, 3)
                figures[f"{name}_p99_ms"] = round(p99, 3)
            async with aiohttp.ClientSession(url) as http:
                body = {"jobs": [{"handler": "noop", "queue": "parked"} for _ in range(1000)]}
                payload = json.dumps(body).encode()
                t = time.perf_counter()
                for _ in range(args.batches):
                    async with http.post(
                        "/v1/jobs/batch", data=payload, headers={"Content-Type": "application/json"}
                    ) as r:
                        assert r.status == 202, await r.text()
                        await r.read()
                elapsed = time.perf_counter() - t
            figures["batch_submit_jobs_per_s"] = round(args.batches * 1000 / elapsed)
        finally:
            proc.terminate()
            proc.wait(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(
        f"machine: {os.cpu_count()} cores shared by client and daemon; "
        f"load from {figures['load_generator']}"
    )
    print(f"{'request':24} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("status", "status_304"):
        print(
            f"GET /v1/jobs/{{id}} {name[7:] or '200':5} {figures[f'{name}_per_s']:>8} "
            f"{figures[f'{name}_p50_ms']:>8} {figures[f'{name}_p99_ms']:>8}"
        )
    print(f"POST /v1/jobs/batch      {figures['batch_submit_jobs_per_s']:>8} jobs/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
