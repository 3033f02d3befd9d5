"""Imported by a daemon under test as a handler module (``[handlers] x = "tests.sabotage:noop"``):
importing it breaks the pool's worker-registration loop for good, so a test can watch what the
daemon does about a background task that keeps crashing."""

from __future__ import annotations

from typing import Any

from arqd.handlers import JobContext
from arqd.pool import Pool


async def _register_loop(self: Pool) -> None:
    raise RuntimeError("sabotaged: the register loop crashes at once")


Pool._register_loop = _register_loop  # type: ignore[method-assign]  # the point of this module


async def noop(ctx: JobContext, payload: Any) -> None:
    """A handler, so the config can name this module."""
