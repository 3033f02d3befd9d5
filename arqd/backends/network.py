"""What the backends reached over a network connection share (postgres, redis): the wake-ups
they hear from other processes, and lease calls whose answer the network lost.

A backend keeps one :class:`Heard` and one :class:`LostLeases`; the storage-specific parts (how
a notification arrives, how the jobs of a lost lease are looked up, the lease itself) stay in
the backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from arqd.backends.base import Lease, fifo

KEEP = 16  # lease calls whose answer was lost, looked for by the next lease call (the newest)
MARGIN = 1.0  # seconds: a lost lease closer than this to its end is left to expire

Ready = Callable[[], None]
Changed = Callable[[Sequence[str] | None], None]


@dataclass(eq=False)
class Heard:
    """The callbacks a core registered (``on_jobs_ready``, ``on_jobs_changed``): one each per
    hub, however many cores share the backend."""

    ready: list[Ready] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)

    def add_ready(self, callback: Ready) -> None:
        if callback not in self.ready:
            self.ready.append(callback)

    def add_changed(self, callback: Changed) -> bool:
        """Whether it is new (the backend then starts listening for ended jobs)."""
        if callback in self.changed:
            return False
        self.changed.append(callback)
        return True

    def jobs_ready(self, *_: object) -> None:
        """Another process stored jobs that are ready now (or a notification may be lost)."""
        for callback in list(self.ready):
            callback()

    def jobs_changed(self, job_ids: Sequence[str] | None) -> None:
        """Another process ended ``job_ids`` (``None``: some jobs, unnamed)."""
        for callback in list(self.changed):
            callback(job_ids)


@dataclass(frozen=True)
class Lost:
    """A lease call that failed after it was sent: it may have been applied."""

    queues: list[str]
    token: str
    expires: float


LookUp = Callable[[Lost], Awaitable[list[Lease]]]
LeaseNew = Callable[[int], Awaitable[list[Lease]]]


@dataclass(eq=False)
class LostLeases:
    """Lease calls whose answer was lost, so the next lease call hands out their jobs with
    their token (they waited out the lease and each lost an attempt: a job allowed one attempt
    failed without running)."""

    pending: list[Lost] = field(default_factory=list)

    async def lease(
        self, queues: Sequence[str], limit: int, now: float, look_up: LookUp, lease_new: LeaseNew
    ) -> list[Lease]:
        """The jobs of earlier lost leases still held (``look_up``), then up to the rest of
        ``limit`` new ones (``lease_new(n)``, which raises :class:`LeaseFailed` when its call
        failed after it was sent). Jobs found again are handed out even when the new lease
        fails. In queue order, then FIFO."""
        leases = await self._look_up(now, look_up)
        if limit - len(leases) > 0:
            try:
                new = await lease_new(limit - len(leases))
            except LeaseFailed as exc:
                self.pending = [*self.pending, exc.lost][-KEEP:]
                if not leases:
                    raise exc.cause from None
                new = []
            leases += new
        order = {name: i for i, name in enumerate(queues)}
        leases.sort(key=lambda lease: (order.get(lease.job.queue, len(order)), fifo(lease.job)))
        return leases

    async def _look_up(self, now: float, look_up: LookUp) -> list[Lease]:
        pending = [lost for lost in self.pending if lost.expires > now + MARGIN]
        self.pending = []
        found: list[Lease] = []
        for n, lost in enumerate(pending):
            try:
                found += await look_up(lost)
            except BaseException:
                self.pending = pending[n:]
                raise
        return found


class LeaseFailed(Exception):
    """A new lease failed after it was sent (``cause``: the backend's error, ``lost``: what to
    look for next time)."""

    def __init__(self, cause: BaseException, lost: Lost) -> None:
        super().__init__(str(cause))
        self.cause, self.lost = cause, lost
