"""The crash-recovery job for arqd's row: the same job every peer runs, as an arqd handler."""

from __future__ import annotations

import asyncio
from typing import Any

from arqd.handlers import JobContext
from benchmarks.peers.common import mark


async def crash(ctx: JobContext, payload: Any) -> None:
    """Marks its start, sleeps ``seconds``, marks its end (``common.recovery`` reads the marks)."""
    mark(payload["marker"], "start")
    await asyncio.sleep(float(payload["seconds"]))
    mark(payload["marker"], "end")
