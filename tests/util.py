"""Small helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], limit: float = 20.0) -> None:
    """Poll ``predicate`` (plain or async) until it holds; fail after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
