"""Demo handlers, enabled by the repository's ``config.toml``; handy for trying arqd out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from arqd.errors import Fail
from arqd.handlers import JobContext


async def noop(ctx: JobContext, payload: Any) -> None:
    """Does nothing: the cost of the queue itself."""


async def echo(ctx: JobContext, payload: Any) -> Any:
    """Answers its payload."""
    return payload


async def sleep(ctx: JobContext, payload: Any) -> dict[str, float]:
    """Sleeps ``payload["seconds"]`` (default 1)."""
    seconds = float((payload or {}).get("seconds", 1.0))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def fail(ctx: JobContext, payload: Any) -> None:
    """Fails every attempt; with ``{"permanent": true}`` fails the job at once."""
    message = str((payload or {}).get("message", "demo failure"))
    if (payload or {}).get("permanent"):
        raise Fail(message)
    raise RuntimeError(message)


async def progress(ctx: JobContext, payload: Any) -> dict[str, int]:
    """Reports progress in ``steps`` steps over ``seconds`` seconds."""
    steps = int((payload or {}).get("steps", 10))
    seconds = float((payload or {}).get("seconds", 2.0))
    for i in range(steps):
        await ctx.progress(i / steps, f"step {i + 1} of {steps}")
        await asyncio.sleep(seconds / steps)
    await ctx.progress(1.0, "done")
    return {"steps": steps}


async def blob(ctx: JobContext, payload: Any) -> AsyncIterator[bytes] | bytes:
    """``size`` bytes (default 1 MiB) of a repeating pattern: streamed in 64 KiB chunks, or with
    ``{"stream": false}`` returned whole as ``bytes``."""
    size = int((payload or {}).get("size", 1024 * 1024))
    if not (payload or {}).get("stream", True):
        return _pattern(size)
    return _chunks(size)


def _pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


async def _chunks(size: int) -> AsyncIterator[bytes]:
    chunk = _pattern(64 * 1024)
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        sent += len(piece)
        yield piece
