"""The handlers the chaos daemons run. Each execution appends a ``start`` line and, when the
handler body completes, an ``end`` line to the record file named by ``ARQD_CHAOS_RECORD`` (JSON
lines; ``O_APPEND`` writes of one short line are atomic, so the daemons share the file).

A line holds the job id, the attempt, the lease identity (the ``started_at`` the lease wrote:
every lease writes a fresh one), the lease token's first 8 hex digits when the recorder can see
it, the pid and the wall-clock time. Results are deterministic functions of the payload
(:func:`expected_inline`, :func:`payload_bytes`), so the driver can check every result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import arqd
from arqd.backends.base import Lease

RECORD_ENV = "ARQD_CHAOS_RECORD"
CHUNK = 32 * 1024


def payload_bytes(seed: int, size: int) -> bytes:
    """The deterministic bytes a ``stream`` or ``cached`` job answers."""
    return hashlib.shake_256(f"arqd-chaos:{seed}".encode()).digest(size)


def expected_inline(payload: dict[str, Any]) -> dict[str, Any]:
    """What a ``work`` job answers (inline JSON)."""
    return {"kind": payload["kind"], "n": payload["n"]}


def _lease_token(job_id: str) -> str | None:
    """The token of the lease this execution runs under, found on the worker's stack (the pool
    holds the ``Lease`` in a local of the coroutine that awaits the handler). Test-only
    introspection: the handler API does not expose tokens, but the result blob's name carries
    the token's prefix, and matching the two proves which execution's result was kept."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, Lease) and value.job.id == job_id:
                return value.token[:8]
        frame = frame.f_back
    return None


class Recorder:
    """Start and end lines of one execution."""

    def __init__(self, ctx: arqd.JobContext) -> None:
        self.path = os.environ[RECORD_ENV]
        started = ctx.job.started_at
        self.base = {
            "job": ctx.job.id,
            "attempt": ctx.attempt,
            "lease": None if started is None else started.timestamp(),
            "token": _lease_token(ctx.job.id),
            "pid": os.getpid(),
        }
        self._write("start")

    def end(self, outcome: str) -> None:
        self._write("end", outcome=outcome)

    def _write(self, event: str, **extra: Any) -> None:
        line = json.dumps({**self.base, "ev": event, "t": time.time(), **extra}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


async def work(ctx: arqd.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps ``sleep`` seconds (default none); with ``flaky``, attempt 1 fails by design."""
    rec = Recorder(ctx)
    if payload.get("flaky") and ctx.attempt == 1:
        rec.end("raised")
        raise RuntimeError("designed failure of attempt 1")
    await asyncio.sleep(float(payload.get("sleep", 0)))
    rec.end("ok")
    return expected_inline(payload)


async def fail(ctx: arqd.JobContext, payload: dict[str, Any]) -> None:
    """Fails the job at once, by design."""
    rec = Recorder(ctx)
    rec.end("raised")
    raise arqd.Fail(f"designed failure {payload['n']}")


async def stream(ctx: arqd.JobContext, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    """Streams ``payload_bytes(seed, size)`` in chunks, pausing ``pace`` seconds between them."""
    rec = Recorder(ctx)
    return _chunks(rec, payload_bytes(payload["seed"], payload["size"]), payload.get("pace", 0))


async def _chunks(rec: Recorder, data: bytes, pace: float) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), CHUNK):
        yield data[offset : offset + CHUNK]
        await asyncio.sleep(pace)
    rec.end("ok")


async def cached(ctx: arqd.JobContext, payload: dict[str, Any]) -> bytes:
    """Answers ``payload_bytes(seed, size)`` whole; registered with ``cache = true``."""
    rec = Recorder(ctx)
    await asyncio.sleep(float(payload.get("sleep", 0)))
    rec.end("ok")
    return payload_bytes(payload["seed"], payload["size"])


# --- stall monitor --------------------------------------------------------------------------------
# A daemon whose event loop stops turning (CPU starvation on a loaded machine, a blocking call)
# cannot heartbeat, and loses its leases as if it had been paused. This thread notes every such
# stall in ``<record file>.stalls``, so the verdict can tell an observed stall from an
# unexplained duplicate. It starts when the daemon imports this module (on its event loop).

STALL_REPORTED = 0.5  # seconds of event-loop lag worth a line
STALL_PROBE = 0.05  # seconds between probes


def _watch_loop(loop: asyncio.AbstractEventLoop, path: str) -> None:
    pid = os.getpid()
    while not loop.is_closed():
        sent = time.time()
        turned = threading.Event()
        try:
            loop.call_soon_threadsafe(turned.set)
        except RuntimeError:  # the loop closed
            return
        turned.wait(600)
        lag = time.time() - sent
        if lag >= STALL_REPORTED:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps({"pid": pid, "t": sent, "lag": lag}) + "\n").encode())
            finally:
                os.close(fd)
        time.sleep(STALL_PROBE)


def _start_stall_monitor() -> None:
    path = os.environ.get(RECORD_ENV)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # imported outside a daemon's event loop (the driver, a test)
    if path:
        args = (loop, path + ".stalls")
        threading.Thread(target=_watch_loop, args=args, daemon=True, name="chaos-stalls").start()


_start_stall_monitor()
