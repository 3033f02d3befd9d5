"""Demo handlers, enabled by the repository's ``config.toml``; handy for trying arqd out.

Every input is checked before use: a payload that is not an object, a number that is not a
finite number in range (``NaN``, ``"nan"``, ``1e308``), or a value of the wrong type fails the
job at once with :class:`arqd.Fail` and a message naming the field, instead of reaching
``asyncio.sleep`` (a NaN timer breaks the event loop's timer heap for every job) or retrying.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

from arqd.errors import Fail
from arqd.handlers import JobContext

SLEEP_MAX = 3600.0  # seconds: ``sleep`` and ``progress`` run at most an hour
STEPS_MAX = 10_000
BLOB_MAX = 1 << 30  # streamed: 1 GiB at most
BLOB_WHOLE_MAX = 16 << 20  # returned whole (held in memory): 16 MiB at most
MESSAGE_MAX = 2000


async def noop(ctx: JobContext, payload: Any) -> None:
    """Does nothing: the cost of the queue itself."""


async def echo(ctx: JobContext, payload: Any) -> Any:
    """Answers its payload."""
    return payload


async def sleep(ctx: JobContext, payload: Any) -> dict[str, float]:
    """Sleeps ``payload["seconds"]`` (default 1, at most an hour)."""
    seconds = _number(_fields(payload), "seconds", 1.0, 0.0, SLEEP_MAX)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def fail(ctx: JobContext, payload: Any) -> None:
    """Fails every attempt; with ``{"permanent": true}`` fails the job at once."""
    fields = _fields(payload)
    message = fields.get("message", "demo failure")
    if not isinstance(message, str):
        raise Fail("fail: message: expected a string")
    if _flag(fields, "permanent", False):
        raise Fail(message[:MESSAGE_MAX])
    raise RuntimeError(message[:MESSAGE_MAX])


async def progress(ctx: JobContext, payload: Any) -> dict[str, int]:
    """Reports progress in ``steps`` steps over ``seconds`` seconds."""
    fields = _fields(payload)
    steps = int(_number(fields, "steps", 10, 1, STEPS_MAX, integer=True))
    seconds = _number(fields, "seconds", 2.0, 0.0, SLEEP_MAX)
    for i in range(steps):
        await ctx.progress(i / steps, f"step {i + 1} of {steps}")
        await asyncio.sleep(seconds / steps)
    await ctx.progress(1.0, "done")
    return {"steps": steps}


async def blob(ctx: JobContext, payload: Any) -> AsyncIterator[bytes] | bytes:
    """``size`` bytes (default 1 MiB) of a repeating pattern: streamed in 64 KiB chunks, or with
    ``{"stream": false}`` returned whole as ``bytes``."""
    fields = _fields(payload)
    stream = _flag(fields, "stream", True)
    most = BLOB_MAX if stream else BLOB_WHOLE_MAX
    size = int(_number(fields, "size", 1024 * 1024, 0, most, integer=True))
    if not stream:
        return _pattern(size)
    return _chunks(size)


def _fields(payload: Any) -> Mapping[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, Mapping):
        raise Fail(f"payload: expected an object, got {type(payload).__name__}")
    return payload


def _number(
    fields: Mapping[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    """``fields[name]``: a JSON number (not a string, not a bool), finite, within
    [low, high], whole if ``integer``; else the job fails with a message naming the field."""
    value = fields.get(name, default)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Fail(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise Fail(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    if integer and value != int(value):
        raise Fail(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name, default)
    if not isinstance(value, bool):
        raise Fail(f"{name}: expected true or false, got {value!r}")
    return value


def _pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


async def _chunks(size: int) -> AsyncIterator[bytes]:
    chunk = _pattern(64 * 1024)
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        sent += len(piece)
        yield piece
