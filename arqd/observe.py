"""What the core and the pool report as jobs flow, for whoever watches: an :class:`Observer`.

The core and the pool call an observer; they never import a metrics library. ``arqd/metrics.py``
implements it for Prometheus (``GET /metrics``), :data:`NO_OBSERVER` ignores everything (a bare
``Client``), and a test or an embedding program may pass its own. Calls come from the event
loop's thread, on the per-job path: an implementation must be cheap and must not block or raise.
Label values are names from the job (queue, handler); an implementation that keeps series per
name bounds them itself (``configured`` tells it the names the config gives).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, Protocol

from arqd.backends.base import BackendObserver

# Where this process found it had lost a lease: a buffered lease checked before its attempt,
# the heartbeat (or a fenced progress or step write), or an outcome's write refused.
LostAt = Literal["buffer", "heartbeat", "finish", "leased_again"]

# How an attempt ended: a terminal state, ``retry`` (a failed attempt sent back to the queue) or
# ``released`` (given back uncounted, on shutdown).
Ended = Literal["succeeded", "failed", "cancelled", "retry", "released"]


class Observer(BackendObserver, Protocol):
    """What the core and the pool report (every method returns at once), and what the queue
    backend reports (``backend_call``: the core hands its observer to the backend)."""

    def configured(self, queues: Collection[str], handlers: Collection[str] | None) -> None:
        """The queues and handlers the config names (``None``: every handler name is known);
        called at start and with each new config or registry."""

    def job_submitted(self, queue: str, handler: str) -> None:
        """A submit stored a new job (not a deduplicated one)."""

    def lease_recovered(self, queue: str) -> None:
        """This process leased a job whose previous lease had expired (a consumer died)."""

    def lease_lost(self, where: LostAt) -> None:
        """This process found a lease it held taken over: its work is discarded."""

    def attempt_started(self, queue: str, waited: float) -> None:
        """A handler was called, ``waited`` seconds after its job was ready."""

    def attempt_ended(self, queue: str, handler: str, ended: Ended, seconds: float | None) -> None:
        """An attempt's outcome was written; ``seconds`` is how long its handler ran, ``None``
        when no handler ran or the attempt was not counted (released)."""


class NoObserver:
    """An observer that ignores everything (the core does not even hand it to the backend)."""

    def backend_call(self, op: str, seconds: float, failed: bool) -> None:
        pass

    def configured(self, queues: Collection[str], handlers: Collection[str] | None) -> None:
        pass

    def job_submitted(self, queue: str, handler: str) -> None:
        pass

    def lease_recovered(self, queue: str) -> None:
        pass

    def lease_lost(self, where: LostAt) -> None:
        pass

    def attempt_started(self, queue: str, waited: float) -> None:
        pass

    def attempt_ended(self, queue: str, handler: str, ended: Ended, seconds: float | None) -> None:
        pass


NO_OBSERVER: Observer = NoObserver()
