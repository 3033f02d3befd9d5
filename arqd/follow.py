"""The follower: how changes made by other processes reach this one's waits. One loop per storage
and process reads the versions of every job a long-poll or event stream waits on, once a second,
in batches, and wakes the waiters of those another process changed (local changes reach them
through the hub at once). A backend that hears of other processes' changes (postgres: a NOTIFY
naming the jobs that ended) wakes those jobs' waiters through the hub at once, between rounds.

The core owns a :class:`Follower` (``Core.follow``); an ``App`` runs it for its life
(:meth:`Follower.start`), and a wait with none running in its event loop starts one on demand
(:meth:`Follower.join`), stopped when its last user leaves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import structlog

from arqd.backends.base import QueueBackend
from arqd.errors import BackendError
from arqd.hub import Hub

FOLLOW_INTERVAL = 1.0  # other processes' changes reach long-polls within this much
FOLLOW_BATCH = 250  # watched jobs read per backend call (small enough to run in place)

log = structlog.get_logger("arqd.follow")


@dataclass(eq=False)
class Running:
    """The task running :meth:`Follower.run` for one storage in this process, and how many
    waits use it; one started on demand (for a bare ``Client``) stops when the last of them ends."""

    task: asyncio.Task[None]
    on_demand: bool
    users: int = 0


# One follower per storage (hub) and process, whichever of the cores sharing the storage runs it.
_running: WeakKeyDictionary[Hub, Running] = WeakKeyDictionary()


class Follower:
    """Follows one storage's changes for the waits of this process."""

    def __init__(self, queue: QueueBackend, hub: Hub) -> None:
        self.queue = queue
        self.hub = hub

    def start(self, task: asyncio.Task[None] | None = None) -> asyncio.Task[None]:
        """Run :meth:`run` for this storage until the task is cancelled (an ``App`` does, for
        its life, passing the supervised task that runs it); waits use it instead of starting
        their own."""
        if task is None:
            task = asyncio.create_task(self.run(), name="arqd-follow")
        _running[self.hub] = Running(task, on_demand=False)
        return task

    def join(self) -> Running:
        """The follower of this storage running in this event loop, started if there is none;
        the caller uses it until :meth:`leave`."""
        running = _running.get(self.hub)
        loop = asyncio.get_running_loop()
        if running is None or running.task.done() or running.task.get_loop() is not loop:
            task = asyncio.create_task(self.run(), name="arqd-follow-on-demand")
            running = _running[self.hub] = Running(task, on_demand=True)
        running.users += 1
        return running

    def leave(self, running: Running) -> None:
        """One user less; a follower started on demand stops with its last user."""
        running.users -= 1
        if running.on_demand and running.users == 0:
            running.task.cancel()
            if _running.get(self.hub) is running:
                del _running[self.hub]

    async def run(self, interval: float | None = None) -> None:
        """Run forever: every ``interval`` read the jobs that long-polls and event streams wait
        on, in batches, and wake the waiters of those another process changed. One loop reads
        N watched jobs once per interval, where each waiter reading its own job cost N reads
        and N encodes per interval (10,000 open long-polls took the whole core)."""
        interval = FOLLOW_INTERVAL if interval is None else interval
        while True:
            await self.hub.next_round(interval)
            watched = self.hub.watched()
            # In id order: neighbouring ids share index pages (ids are time-ordered), a quarter
            # less time per read of a million-row table than ids in arrival order.
            ids = sorted(watched)
            for start in range(0, len(ids), FOLLOW_BATCH):
                chunk = ids[start : start + FOLLOW_BATCH]
                try:
                    # Versions only: decoding every watched record each second was most of
                    # the cost (10,000 long-polls: a p99 of 480 ms for other requests).
                    current = await self.queue.versions(chunk)
                    changed = [i for i in chunk if current.get(i, -1) > watched[i]]
                    gone = [i for i in chunk if i not in current]
                    jobs = await self.queue.get_many(changed) if changed else []
                except BackendError as exc:
                    log.warning("backend.follow_failed", error=str(exc), jobs=len(chunk))
                    break
                for job_id, job in zip(changed, jobs, strict=True):
                    self.hub.job_changed(job_id, job)
                for job_id in gone:
                    self.hub.job_changed(job_id, None)
                await asyncio.sleep(0)  # let requests in between batches
