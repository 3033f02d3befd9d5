"""Garbage-collector pauses bounded by time, not by how many requests are open (the daemon only).

CPython's cyclic collector stops the event loop for a full collection whose length grows with
every live object. Each held long-poll or event stream keeps ~85 objects alive (its aiohttp
request, parser, transport, task and ~12 coroutine frames), so with 10,000 of them open a full
collection took 350-480 ms, and one ran every few seconds as requests came and went: the p99 of
plain status polls went from 21 ms to 426 ms (``benchmarks/scale.py``, GC callbacks timed).

So the daemon keeps the collector's work young: every ``FREEZE_INTERVAL`` it collects the young
generations (cheap: at most a few thousand objects) and freezes what survived (``gc.freeze``:
frozen objects are freed by reference counting as usual, the collector just stops walking them).
Full collections then find next to nothing to walk. Garbage *cycles* among frozen objects wait
for the next thaw: every ``THAW_INTERVAL`` everything is unfrozen and collected once (that one
pause, every few minutes, is the price), which bounds what they can hold.
"""

from __future__ import annotations

import asyncio
import gc
import time

import structlog

log = structlog.get_logger("arqd.gc")

FREEZE_INTERVAL = 1.0  # seconds between young collections + freezes
THAW_INTERVAL = 300.0  # seconds between full collections of everything


class CollectorPolicy:
    """``run()`` until cancelled: freeze survivors often, collect everything rarely."""

    def __init__(self, freeze: float = FREEZE_INTERVAL, thaw: float = THAW_INTERVAL) -> None:
        self.freeze, self.thaw = freeze, thaw
        self.full_collections = 0

    async def run(self) -> None:
        gc.collect()
        gc.freeze()  # what start-up made (modules, classes, config) is never walked again
        next_thaw = time.monotonic() + self.thaw
        try:
            while True:
                await asyncio.sleep(self.freeze)
                if time.monotonic() >= next_thaw:
                    self.collect_all()
                    next_thaw = time.monotonic() + self.thaw
                else:
                    gc.collect(1)
                gc.freeze()
        finally:
            gc.unfreeze()  # leave the process as it was found (tests run several daemons)

    def collect_all(self) -> None:
        """Thaw and collect every generation: the one long pause, timed in the log."""
        gc.unfreeze()
        started = time.perf_counter()
        found = gc.collect()
        self.full_collections += 1
        log.debug(
            "gc.full_collection",
            ms=round((time.perf_counter() - started) * 1000, 1),
            collected=found,
        )
