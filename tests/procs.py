"""A worker process for process-level tests: ``python -m tests.procs CONFIG`` runs an
``arqd.App`` until SIGTERM. Its handlers write what they do to files, so a test can check from
outside what ran where and how often."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import arqd
from arqd import logs


def _append(path: str, line: str) -> None:
    # O_APPEND writes of one short line are atomic, so processes can share the file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def record(ctx: arqd.JobContext, payload: Any) -> int:
    """Log start and end of every execution with this process's pid."""
    log = payload["log"]
    _append(log, f"{ctx.job.id} start {os.getpid()} {time.time()}\n")
    await asyncio.sleep(payload.get("sleep", 0))
    _append(log, f"{ctx.job.id} end {os.getpid()} {time.time()}\n")
    return os.getpid()


async def hang_first(ctx: arqd.JobContext, payload: Any) -> int:
    """The first attempt announces itself and hangs (to be killed); later attempts succeed."""
    _append(payload["log"], f"{ctx.job.id} attempt {ctx.attempt} {os.getpid()}\n")
    if ctx.attempt == 1:
        await asyncio.to_thread(Path(payload["marker"]).write_text, str(os.getpid()))
        await asyncio.sleep(3600)
    return ctx.attempt


async def trickle(ctx: arqd.JobContext, payload: Any) -> AsyncIterator[bytes]:
    """Streams ``payload["chunks"]`` chunks of 64 KiB, waiting after the first until the file
    ``payload["gate"]`` exists: a result writer that stays alive as long as a test wants."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        # The gate is a file the test creates from another process: no Event reaches here.
        while not await asyncio.to_thread(os.path.exists, payload["gate"]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for _ in range(payload.get("chunks", 2) - 1):
            yield b"y" * 65536

    return chunks()


async def nan_sleep(ctx: arqd.JobContext, payload: Any) -> None:
    """A misbehaving handler: ``asyncio.sleep(float("nan"))``, ``count`` times at once (default
    1). Each puts a NaN timer into the event loop's heap, whose order then breaks."""
    count = int((payload or {}).get("count", 1))
    await asyncio.gather(*(asyncio.sleep(float("nan")) for _ in range(count)))


async def block_loop(ctx: arqd.JobContext, payload: Any) -> float:
    """A misbehaving handler: blocks the event loop ``seconds`` (a synchronous sleep, as a
    CPU-bound handler would)."""
    seconds = float(payload["seconds"])
    time.sleep(seconds)  # noqa: ASYNC251  # blocking the loop is what this handler is for
    return seconds


async def main(config_path: str) -> None:
    logs.configure("warning", "json")
    app = arqd.App.from_config(config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with app:
        print("ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
