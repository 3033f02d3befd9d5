"""Keeping the process's own machinery alive: its background loops and its event loop's timers.

- :class:`Supervisor` runs every background loop (the pool's fetcher, completer, heartbeat…,
  the app's scheduler, sweeper and follower, the daemon's watchdog). A loop that raises is
  logged with its traceback (``task.crashed``) and started again after a backoff; one that
  crashes ``CRASH_LIMIT`` times within ``CRASH_WINDOW`` is given up (``task.gave_up``) and
  ``failed`` is set: the daemon then stops and exits non-zero, so systemd restarts it. Nothing
  dies silently.
- :class:`LoopWatch` watches the event loop's timers from a thread. A handler can break them
  for everyone: ``asyncio.sleep(float("nan"))`` puts a timer that compares neither less nor
  greater than any other into the loop's heap, whose order then breaks, and timers (heartbeats,
  timeouts) end up behind a far-away one. A watchdog made of the loop's own timers would be
  stuck behind the same heap, so the loop only stamps the time from a timer, and a thread
  reports when the stamp is late (``loop.timers_late``, with how late: a blocked or broken
  loop) and, four times a second through ``call_soon_threadsafe`` (which does not go through
  the timer heap), has the loop drop unordered timers and re-heapify (``loop.timers_repaired``).
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("arqd.supervise")

CRASH_LIMIT = 5  # crashes of one loop within CRASH_WINDOW before the process gives up
CRASH_WINDOW = 60.0
RESTART_BASE = 0.1  # first pause before a crashed loop runs again; doubles per recent crash
RESTART_MAX = 5.0

WATCH_TICK = 0.1  # the loop stamps the time this often, from a timer
WATCH_CHECK = 0.25  # the watching thread looks this often
WATCH_LATE = 1.0  # a stamp this much overdue is reported (the heartbeat is at most 2 s)
WATCH_REPEAT = 10.0  # while timers stay late, the report is repeated this often

LoopFactory = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """Starts background loops and restarts those that crash; ``failed`` is set when one keeps
    crashing (its name in ``failure``)."""

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self.failure: str | None = None

    def spawn(self, name: str, factory: LoopFactory) -> asyncio.Task[None]:
        """A task running ``factory()`` under supervision; a normal return ends it."""
        return asyncio.create_task(self.run(name, factory), name=name)

    async def run(self, name: str, factory: LoopFactory) -> None:
        """Run ``factory()`` in the current task until it returns; restart it when it raises
        (cancellation is not a crash: it propagates)."""
        crashes: deque[float] = deque()
        while True:
            try:
                await factory()
                return
            except Exception:
                now = time.monotonic()
                crashes.append(now)
                while crashes[0] <= now - CRASH_WINDOW:
                    crashes.popleft()
                log.error("task.crashed", task=name, crashes=len(crashes), exc_info=True)
                if len(crashes) >= CRASH_LIMIT:
                    self.give_up(name)
                    return
            await asyncio.sleep(min(RESTART_MAX, RESTART_BASE * 2 ** (len(crashes) - 1)))

    def give_up(self, name: str) -> None:
        if self.failure is None:
            self.failure = name
            log.critical(
                "task.gave_up",
                task=name,
                crashes=CRASH_LIMIT,
                window_s=CRASH_WINDOW,
                message="a background task keeps crashing; stopping so the service restarts",
            )
        self.failed.set()


def report_crash(task: asyncio.Task[Any]) -> None:
    """A done callback for one-shot tasks (not restarted): log their exception, if any."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task.crashed", task=task.get_name(), exc_info=exc)


class LoopWatch:
    """A thread that notices the event loop's timers running late and repairs the timer heap."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._stamp = time.monotonic()  # written by the loop, read by the thread
        self._probing = False  # a probe is queued on the loop and has not run yet
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="arqd-loopwatch", daemon=True)
        self.repaired = 0  # unordered timers dropped so far

    def start(self) -> None:
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread.is_alive():
            self._thread.join(WATCH_CHECK * 4)

    # --- on the loop ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._stamp = time.monotonic()
        if not self._stop.is_set():
            self._handle = self.loop.call_later(WATCH_TICK, self._tick)

    def _probe(self) -> None:
        self._probing = False
        late = time.monotonic() - self._stamp - WATCH_TICK
        dropped, overdue = repair_timers(self.loop)
        if dropped:
            self.repaired += dropped
            log.error(
                "loop.timers_repaired",
                dropped=dropped,
                late_s=round(max(0.0, late), 3),
                overdue_s=round(overdue, 3),
                message="a handler scheduled a timer at NaN (asyncio.sleep(nan)?); it was "
                "dropped and the timer heap rebuilt",
            )

    # --- on the thread ----------------------------------------------------------------------------

    def _watch(self) -> None:
        since: float | None = None  # when the current episode of late timers began
        reported = worst = 0.0
        while not self._stop.wait(WATCH_CHECK):
            now = time.monotonic()
            late = now - self._stamp - WATCH_TICK
            if late > WATCH_LATE:
                worst = max(worst, late)
                if since is None or now - reported >= WATCH_REPEAT:
                    since = now if since is None else since
                    reported = now
                    log.error("loop.timers_late", late_s=round(late, 3), limit_s=WATCH_LATE)
            elif since is not None:
                log.warning("loop.timers_recovered", worst_late_s=round(worst, 3))
                since, worst = None, 0.0
            # Every check also has the loop look for unordered timers, whether or not our own
            # stamp is late: a broken heap may delay other timers before ours (the scan costs
            # ~0.7 ms per 10,000 timers, so ~0.3 % of a core with 10,000 open long-polls).
            if not self._probing:
                self._probing = True
                try:
                    self.loop.call_soon_threadsafe(self._probe)
                except RuntimeError:  # the loop is closed: nothing left to watch
                    return


def repair_timers(loop: asyncio.AbstractEventLoop) -> tuple[int, float]:
    """Drop the loop's timers scheduled at NaN and restore the heap order; answer how many were
    dropped and how overdue the earliest remaining timer is (seconds).

    This reaches into CPython's ``BaseEventLoop._scheduled`` (a heap of ``TimerHandle``): there
    is no public way to see the timers, and a NaN ``when`` (``asyncio.sleep(nan)``,
    ``call_later(nan)``) compares false with everything, so ``heapq`` misplaces the timers
    around it. Loops without that attribute (uvloop) are left alone. A dropped timer never
    fires: its awaiter waits until cancelled (the pool's timeout sweep does that to a handler).
    """
    scheduled = getattr(loop, "_scheduled", None)
    if not isinstance(scheduled, list) or not scheduled:
        return 0, 0.0
    # ``_when`` rather than ``when()``: this runs four times a second over every timer, and the
    # attribute read costs half as much; NaN is the one float unequal to itself.
    bad = [h for h in scheduled if h._when != h._when]
    if bad:
        scheduled[:] = [h for h in scheduled if h._when == h._when]
        heapq.heapify(scheduled)
        for handle in bad:
            # Already out of the heap: cancelling must not count it among the cancelled timers
            # still inside (the loop compacts the heap by that count).
            if hasattr(handle, "_scheduled"):
                handle._scheduled = False
            handle.cancel()
    overdue = loop.time() - scheduled[0].when() if scheduled else 0.0
    return len(bad), max(0.0, overdue)
