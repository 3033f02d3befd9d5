"""In-process notifications between clients and consumers sharing one storage.

A submit wakes idle consumers at once (no polling delay), and a finished or changed job wakes its
waiters. Hubs are kept per storage identity, so a ``Client`` and an ``App`` opened separately on
the same sqlite file in one process still see each other. Other processes are reached by polling
(the follower), sped up by a backend that hears of their changes (postgres: LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import TypeVar
from weakref import WeakValueDictionary

from arqd.model import Job

T = TypeVar("T")
Listener = Callable[[str, Job | None], None]


class Hub:
    def __init__(self) -> None:
        self._wake: set[asyncio.Future[None]] = set()
        self.ready_seq = 0  # counts ``jobs_ready`` calls, so a wake-up between two looks is kept
        self._waiters: dict[str, set[asyncio.Future[Job | None]]] = {}
        self._known: dict[str, int] = {}  # watched job -> the oldest version a waiter holds
        self._listeners: list[Listener] = []
        self._unnamed = False  # another process changed jobs it did not name
        self._round: asyncio.Future[None] | None = None  # the follower waiting for its round

    # --- new work ---------------------------------------------------------------------------------

    def jobs_ready(self) -> None:
        """New jobs were stored: wake every idle consumer."""
        self.ready_seq += 1
        wake, self._wake = self._wake, set()
        for fut in wake:
            _resolve(fut, None)

    async def wait_ready(self, timeout: float, since: int | None = None) -> None:
        """Return when ``jobs_ready`` is called or ``timeout`` passes; at once if it was called
        since ``ready_seq`` was ``since`` (a submit made while the caller was busy looking)."""
        if since is not None and since != self.ready_seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._wake.discard(fut)

    # --- changed jobs -----------------------------------------------------------------------------

    def job_changed(self, job_id: str, job: Job | None = None) -> None:
        """``job`` is the new record when the caller has it; ``None`` means: read it again."""
        self._known.pop(job_id, None)
        for fut in self._waiters.pop(job_id, ()):
            _resolve(fut, job)
        for listener in self._listeners:
            listener(job_id, job)

    def watch(self, job_id: str, version: int | None = None) -> asyncio.Future[Job | None]:
        """A future resolved at the next change of ``job_id``; ``unwatch`` it if unused.
        With the ``version`` the caller holds, ``watched()`` offers the job to a follower of
        other processes' changes (``Core.follow``, arqd/follow.py)."""
        fut: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        if version is not None:
            known = self._known.get(job_id)
            self._known[job_id] = version if known is None else min(known, version)
        return fut

    def unwatch(self, job_id: str, fut: asyncio.Future[Job | None]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[job_id]
                self._known.pop(job_id, None)

    def watched(self) -> dict[str, int]:
        """Jobs watched with a known version: job id -> the oldest version a waiter holds."""
        return dict(self._known)

    # --- other processes' changes ----------------------------------------------------------------

    def others_changed(self, job_ids: Collection[str] | None) -> None:
        """Another process changed ``job_ids``: their waiters read them again now, instead of
        at the follower's next round (any waiter, also one still reading the job: a change
        heard while the read is in flight must not be lost). ``None`` (some jobs, unnamed, e.g.
        after a lost connection) makes the follower read every watched job now."""
        if job_ids is None:
            self._unnamed = True
            if self._round is not None:
                _resolve(self._round, None)
            return
        for job_id in job_ids:
            if job_id in self._waiters:
                self.job_changed(job_id, None)

    async def next_round(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or at once when other processes changed jobs they
        did not name (the follower then reads every watched job)."""
        if not self._unnamed:
            fut = self._round = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                pass
            finally:
                self._round = None
        self._unnamed = False

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _resolve(fut: asyncio.Future[T], value: T) -> None:
    if fut.done():
        return
    loop = fut.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        fut.set_result(value)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(_resolve, fut, value)


_hubs: WeakValueDictionary[str, Hub] = WeakValueDictionary()


def hub_for(identity: str) -> Hub:
    """The hub of one storage; alive while anything in this process holds it."""
    hub = _hubs.get(identity)
    if hub is None:
        hub = _hubs[identity] = Hub()
    return hub
