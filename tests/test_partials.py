"""Partial results of writers that died are swept; a live writer's never is (the files store,
``arqd/results/files.py``): in one process, across processes, and with a daemon killed -9
in the middle of streaming a large result."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

from arqd.model import blob_name, new_job_id, new_token
from arqd.results.files import FileResults

from .daemons import ROOT, Daemons, sqlite_config
from .util import eventually

MIB = 1024 * 1024


def partials(root: Path) -> list[Path]:
    return sorted((root / ".partial").glob("*.part"))


async def test_a_sweep_removes_dead_partials_and_never_a_live_writers(tmp_path: Path):
    """A partial no writer holds is removed with its bytes counted; the partial of a writer
    still writing (however old) stays, and that writer publishes its result afterwards."""
    async with FileResults(str(tmp_path)) as store:
        name = blob_name(new_job_id(), new_token())
        live = await store.writer("temporary", name)
        await live.write(b"a" * 1000)
        dead = tmp_path / ".partial" / "dead.0000.part"
        dead.write_bytes(b"d" * 4096)  # as a killed process leaves it: no lock held
        assert await store.sweep_partials() == (1, 4096)
        assert not dead.exists() and len(partials(tmp_path)) == 1
        await live.write(b"b" * 1000)
        assert await live.commit() == 2000
        assert await store.size("temporary", name) == 2000
        assert partials(tmp_path) == [] and await store.sweep_partials() == (0, 0)


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from arqd.results.files import FileResults
    from arqd.model import blob_name, new_job_id, new_token

    async def main():
        async with FileResults(sys.argv[1]) as store:
            writer = await store.writer("temporary", blob_name(new_job_id(), new_token()))
            await writer.write(b"x" * 100_000)
            print("writing", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # hold the partial until killed

    asyncio.run(main())
    """
)


async def test_another_process_partial_is_swept_only_once_it_died(tmp_path: Path):
    """The partial of a writer in another process survives sweeps while that process lives,
    and goes with the first sweep after it was killed -9."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"writing\n"
        async with FileResults(str(tmp_path)) as store:
            assert await store.sweep_partials() == (0, 0)
            assert len(partials(tmp_path)) == 1
            proc.kill()
            await proc.wait()
            assert await store.sweep_partials() == (1, 100_000)
            assert partials(tmp_path) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_writers_racing_sweeps_all_publish(tmp_path: Path):
    """Writers created while sweeps run back to back all publish: a sweep never takes a
    partial from a writer that has just created it."""
    async with FileResults(str(tmp_path)) as store:
        done = asyncio.Event()

        async def sweeping() -> int:
            swept = 0
            while not done.is_set():
                swept += (await store.sweep_partials())[0]
            return swept

        async def write(i: int) -> str:
            name = blob_name(new_job_id(), new_token())
            await store.put("temporary", name, bytes([i % 256]) * 10)
            return name

        sweeper = asyncio.create_task(sweeping())
        names = await asyncio.gather(*(write(i) for i in range(300)))
        done.set()
        assert await sweeper == 0
        for name in names:
            assert await store.size("temporary", name) == 10


async def test_a_creation_left_half_done_goes_once_stale(tmp_path: Path):
    """A ``.new`` file (a process died between creating and locking its partial) is left alone
    while fresh, and removed once it is a minute old."""
    async with FileResults(str(tmp_path)) as store:
        leftover = tmp_path / ".partial" / f"{blob_name(new_job_id(), new_token())}.0.new"
        leftover.write_bytes(b"x" * 10)
        assert await store.sweep_partials() == (0, 0) and leftover.exists()
        old = leftover.stat().st_mtime - 120
        os.utime(leftover, (old, old))
        assert await store.sweep_partials() == (1, 10) and not leftover.exists()


def submit(url: str, spec: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"{url}/v1/jobs",
        data=json.dumps(spec).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.loads(answer.read())["id"])


def get(url: str, path: str) -> bytes:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as answer:
        return bytes(answer.read())


async def test_a_daemon_killed_mid_stream_leaves_no_partial_after_restart(
    daemons: Daemons, tmp_path: Path
):
    """kill -9 while a 1 GiB result streams leaves its partial behind; the restarted daemon
    sweeps it at start (and says so in its log)."""
    config = sqlite_config(tmp_path)
    first = daemons.start(config, name="d0")
    submit(first.url, {"handler": "blob", "payload": {"size": 1024 * MIB}, "max_attempts": 1})
    results = tmp_path / "results"

    def streaming() -> bool:
        return any(p.stat().st_size >= MIB for p in partials(results))

    await eventually(streaming)
    first.kill()
    (left,) = partials(results)
    size = left.stat().st_size
    again = daemons.start(config, name="d0")
    swept = again.wait_log("results.partials_swept")
    assert swept["files"] == 1 and swept["bytes"] == size
    assert partials(results) == []


async def test_a_daemon_starting_never_sweeps_a_live_writers_partial(
    daemons: Daemons, tmp_path: Path
):
    """A second daemon on the same result directory, starting (and sweeping) while the first
    streams a result, leaves that partial alone: the result is published whole."""
    config = sqlite_config(tmp_path)
    first = daemons.start(config, name="d0")
    gate = tmp_path / "gate"
    job_id = submit(first.url, {"handler": "trickle", "payload": {"gate": str(gate), "chunks": 3}})
    results = tmp_path / "results"
    await eventually(lambda: len(partials(results)) == 1)
    (live,) = partials(results)
    second = daemons.start(config, name="d1")  # its start sweep has run once it is ready
    assert partials(results) == [live] and second.events("results.partials_swept") == []
    gate.touch()

    def succeeded() -> bool:
        return json.loads(get(first.url, f"/v1/jobs/{job_id}"))["state"] == "succeeded"

    await eventually(succeeded)
    assert get(first.url, f"/v1/jobs/{job_id}/result") == b"x" * 65536 + b"y" * 2 * 65536
