"""Lease bookkeeping: what this process holds, one :class:`Held` per lease, from its lease until
its outcome lands; heartbeats that keep them, and the discovery that one was lost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from arqd.backends.base import Lease
from arqd.core import Core
from arqd.errors import BackendError
from arqd.observe import Observer

if TYPE_CHECKING:
    from arqd.pool.attempt import Attempt

log = structlog.get_logger("arqd.pool")


@dataclass(slots=True, eq=False)
class Held:
    """One lease this process holds: buffered, running (``attempt``) or ending (its outcome is
    being written)."""

    lease: Lease
    valid_until: float  # when the lease expires, as last known (each heartbeat pushes it on)
    attempt: Attempt | None = None  # the attempt running it, once a consumer took it
    ending: bool = False  # its outcome is being written: a heartbeat's "lost" is a race
    dropped: bool = False  # found lost while buffered: no consumer may start it


class Leases:
    """Every lease this process holds, by job id. ``room`` is set whenever one is let go."""

    def __init__(self, core: Core, observer: Observer, room: asyncio.Event) -> None:
        self.core = core
        self.observer = observer
        self._room = room
        self._held: dict[str, Held] = {}
        self.running = 0  # how many have an attempt
        self.ending = 0  # how many have an outcome being written

    def __len__(self) -> int:
        return len(self._held)

    def add(self, lease: Lease) -> Held:
        old = self._held.get(lease.job.id)
        held = self._held[lease.job.id] = Held(lease, lease.expires)
        if old is not None and not old.ending:
            # This process leased the job again: its older lease expired (it stalled, or its
            # heartbeats failed). Stop the older attempt now: nothing of it can be written, and
            # it was no longer heartbeated, so nothing else would have told it.
            log.warning("job.lease_lost", job_id=lease.job.id, where="leased_again")
            self.observer.lease_lost("leased_again")
            if old.attempt is not None:
                old.attempt.interrupt("lost")
            else:
                old.dropped = True
        return held

    def get(self, job_id: str) -> Held | None:
        return self._held.get(job_id)

    def attempts(self) -> list[Attempt]:
        """The attempts running now (a copy: interrupting one may end it)."""
        return [h.attempt for h in self._held.values() if h.attempt is not None]

    def begin(self, held: Held, attempt: Attempt) -> None:
        held.attempt = attempt
        self.running += 1

    def end(self, held: Held) -> None:
        held.attempt = None
        self.running -= 1

    def ending_now(self, held: Held) -> None:
        """``held``'s outcome is being written: a heartbeat's "lost" is a race from now on."""
        if not held.ending:
            held.ending = True
            self.ending += 1
            self._room.set()  # it no longer holds back the next lease (Pool._room_for)

    def forget(self, held: Held) -> None:
        """Stop holding ``held`` (its outcome landed, or the lease is lost or abandoned)."""
        job_id = held.lease.job.id
        if self._held.get(job_id) is held:
            del self._held[job_id]
            if held.ending:
                self.ending -= 1
        self._room.set()

    def lost(self, held: Held) -> None:
        """``held`` was taken over (a heartbeat, a progress or step write said so): interrupt
        its attempt, or drop it from the buffer; nothing of it will be written."""
        if self._held.get(held.lease.job.id) is not held or held.ending:
            return  # already ended by us: the heartbeat raced the outcome's write
        log.warning("job.lease_lost", job_id=held.lease.job.id, where="heartbeat")
        self.observer.lease_lost("heartbeat")
        if held.attempt is not None:
            held.attempt.interrupt("lost")
        else:
            held.dropped = True

    async def still_held(self, held: Held) -> bool:
        """Whether ``held`` is still ours: by our own clock while it has not expired (each
        heartbeat pushes the expiry on), else by asking the backend, which extends it if so."""
        core = self.core
        if core.clock.time() < held.valid_until:
            return True
        vt = core.config.workers.visibility_timeout
        sent = core.clock.time()
        lease = held.lease
        try:
            (reply,) = await core.queue.heartbeat([(lease.job.id, lease.token)], vt)
        except BackendError:
            return True  # unknown: run it; its outcome is fenced by the token anyway
        if reply.held:
            held.valid_until = sent + vt
        return reply.held

    async def heartbeat_loop(self) -> None:
        """Extend every held lease in one call per ``workers.heartbeat``; learn of lost leases
        and of cancels requested by other processes."""
        core = self.core
        while True:
            await asyncio.sleep(core.config.workers.heartbeat_interval)
            entries = list(self._held.values())
            if not entries:
                continue
            vt = core.config.workers.visibility_timeout
            sent = core.clock.time()
            try:
                replies = await core.queue.heartbeat(
                    [(h.lease.job.id, h.lease.token) for h in entries], vt
                )
            except BackendError as exc:
                log.warning("backend.heartbeat_failed", error=str(exc), leases=len(entries))
                continue
            until = sent + vt
            for held, reply in zip(entries, replies, strict=True):
                if not reply.held:
                    self.lost(held)
                    continue
                held.valid_until = until
                if reply.cancel_requested and held.attempt is not None:
                    held.attempt.interrupt("cancelled")
