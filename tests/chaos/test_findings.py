"""Minimal reproductions of what the chaos suite found in arqd, one test each, kept as
regression tests once fixed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

import arqd
from tests.daemons import Daemon, Daemons
from tests.util import eventually

from .cluster import Backend, config_text, holds_write_lock
from .handlers import RECORD_ENV
from .workload import WORK

pytestmark = pytest.mark.timeout(90)


def starts(record: Path, job_id: str) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return [x for x in lines if x["job"] == job_id and x["ev"] == "start"]


async def test_a_buffered_lease_that_expired_is_not_run(tmp_path: Path, daemons: Daemons) -> None:
    """A daemon stopped (SIGSTOP) while one job runs and a second waits in its prefetch
    buffer: another daemon takes both over and completes them; once resumed, the first daemon
    must not start the second job's handler on its expired lease (it could know by its own
    clock, as its heartbeat is about to tell it)."""
    record = tmp_path / "executions.jsonl"
    backend = Backend("sqlite", tmp_path, visibility_timeout=1.0)
    config = config_text(
        backend, endpoint="", concurrency=1, remote_port=1, steps_key="k" * 43 + "="
    )
    env = {RECORD_ENV: str(record)}
    first = daemons.start(config, "first", env)
    async with arqd.HttpClient(first.url) as client:
        # The pool prefetches only while recent attempts are short: time some no-op ones first.
        for i in range(20):
            warm = await client.submit(WORK, {"kind": "noop", "n": f"warm-{i}"})
            await client.wait(warm.id, timeout=20)
        running = await client.submit(WORK, {"kind": "noop", "n": "running", "sleep": 0.3})
        buffered = await client.submit(WORK, {"kind": "noop", "n": "buffered"})

        async def both_leased() -> bool:
            leased = (await client.get(buffered.id)).state == "running"
            return leased and bool(starts(record, running.id))

        await eventually(both_leased)
        assert not starts(record, buffered.id)  # it waits in the buffer
    stop_outside_a_write(first, tmp_path)
    try:
        second = daemons.start(config.replace("concurrency = 1", "concurrency = 4"), "second", env)
        async with arqd.HttpClient(second.url) as client:
            done = await client.wait(buffered.id, timeout=20)
            assert done.state == "succeeded" and done.attempts == 2
            await client.wait(running.id, timeout=20)
    finally:
        first.signal(signal.SIGCONT)
    # The resumed daemon has looked at its leases: it logged the buffered job's lease lost.
    await eventually(lambda: lost(first, buffered.id))
    assert len(starts(record, buffered.id)) == 1, starts(record, buffered.id)


def stop_outside_a_write(daemon: Daemon, workdir: Path) -> None:
    """SIGSTOP the daemon, but not in the middle of a sqlite write (that would stall the other
    daemon too): resume and stop again until the write lock is free."""
    for _ in range(50):
        daemon.signal(signal.SIGSTOP)
        if not holds_write_lock(workdir, tries=1):
            return
        daemon.signal(signal.SIGCONT)
    raise AssertionError("the daemon always held the write lock")


def lost(daemon: Daemon, job_id: str) -> bool:
    return any(line.get("job_id") == job_id for line in daemon.events("job.lease_lost"))
