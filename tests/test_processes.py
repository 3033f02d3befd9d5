"""Worker processes killed and sharing one sqlite file: no job lost, none run twice at once."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import arqd

from .util import eventually

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, **workers: str | int) -> Path:
    lines = "\n".join(
        f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in workers.items()
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[queue]
backend = "sqlite"
path = "{tmp_path / "q.sqlite3"}"

[results]
path = "{tmp_path / "results"}"

[workers]
{lines}

[defaults]
backoff = {{ base = "10ms", max = "50ms" }}

[handlers]
record = "tests.procs:record"
hang_first = "tests.procs:hang_first"
"""
    )
    return path


class Workers:
    """Worker processes started from ``tests/procs.py``, all killed at the end of the test.
    Their output goes to files (a full pipe would block them)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = self.tmp_path / f"worker-{len(self.procs)}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.procs", str(config)],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while b"ready" not in out.read_bytes():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.02)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()


async def test_killed_worker_job_completes_once_after_visibility_timeout(
    tmp_path: Path, workers: Workers
):
    """A worker killed with SIGKILL mid-job loses nothing: after the visibility timeout another
    worker leases the job again (attempt 2) and completes it, exactly once."""
    config = write_config(tmp_path, visibility_timeout="1s", concurrency=2)
    log, marker = tmp_path / "runs.log", tmp_path / "marker"
    first = workers.start(config)
    async with arqd.Client.from_config(config) as client:
        job = await client.submit("hang_first", {"log": str(log), "marker": str(marker)})
        await eventually(marker.exists)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert (await client.get(job.id)).state == "running"
        workers.start(config)
        done = await client.wait(job.id, timeout=30)
    assert done.state == "succeeded" and done.attempts == 2
    assert await_result(done) == 2
    attempts = [line.split()[2] for line in log.read_text().splitlines()]
    assert attempts == ["1", "2"]


def await_result(job: arqd.Job) -> object:
    assert job.result is not None
    return job.result.inline


async def test_two_processes_share_one_sqlite_file(tmp_path: Path, workers: Workers):
    """Two worker processes on one database run each of 2,000 jobs exactly once, and both work."""
    config = write_config(tmp_path, concurrency=8, visibility_timeout="30s", poll_max="50ms")
    log = tmp_path / "runs.log"
    workers.start(config)
    workers.start(config)
    async with arqd.Client.from_config(config) as client:
        specs = [{"handler": "record", "payload": {"log": str(log), "sleep": 0.005}}] * 2000
        jobs = await client.submit_many(specs)

        async def all_done() -> bool:
            stats = {s.name: s for s in await client.core.queue.stats()}
            return stats["default"].succeeded == 2000

        await eventually(all_done, 60)
    events = collections.Counter()
    pids: set[str] = set()
    for line in log.read_text().splitlines():
        job_id, what, pid, _ = line.split()
        events[job_id, what] += 1
        pids.add(pid)
    assert {j.id for j in jobs} == {job_id for job_id, _ in events}
    assert set(events.values()) == {1}, "a job started or ended more than once"
    assert len(pids) == 2, "both processes should have taken a share"
