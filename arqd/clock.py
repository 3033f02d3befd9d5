"""One injectable clock for the core and the backends: lease expiry is testable without sleeping."""

from __future__ import annotations

import time


class Clock:
    """Wall-clock seconds since the Unix epoch, as the backends store them."""

    def time(self) -> float:
        return time.time()


class ManualClock(Clock):
    """A clock that only moves when told: ``advance()`` lets a test skip past a lease or a TTL."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


SYSTEM_CLOCK = Clock()
