"""Requests the server holds open — long-polls (``GET /v1/jobs/{id}?wait=``) and event streams —
counted against ``server.max_held``, and watched for clients that went away.

Each held request costs a connection, a hub watcher and a place in the change follower's reads,
so their number is capped (beyond it the routes answer 429 with ``Retry-After``). aiohttp tells
a handler nothing when its client disconnects (unless it cancels every handler, writes
included), so one task looks at the held requests' transports every ``GONE_CHECK`` and resolves
the ``gone`` future of those whose connection closed: the handler ends within that time, not at
its next write or when its wait runs out, and its place is free again.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

GONE_CHECK = 1.0  # seconds between looks at the held requests' connections
WATCH_SLICE = 500  # held requests looked at per turn of the event loop


class Held:
    def __init__(self, limit: int, check: float = GONE_CHECK) -> None:
        self.limit, self.check = limit, check
        # by id(): a request is a mutable mapping, not hashable
        self._held: dict[int, tuple[web.BaseRequest, asyncio.Future[None]]] = {}
        self._watcher: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def enter(self, request: web.BaseRequest) -> asyncio.Future[None] | None:
        """Hold ``request``: a future resolved once its client is gone; ``None`` when
        ``limit`` requests are held already. Every entered request must ``leave``."""
        if len(self._held) >= self.limit:
            return None
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held[id(request)] = (request, gone)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="arqd-held-watch")
        return gone

    def leave(self, request: web.BaseRequest) -> None:
        _, gone = self._held.pop(id(request), (request, None))
        if gone is not None and not gone.done():
            gone.cancel()

    async def close(self) -> None:
        """Stop watching (the application's cleanup)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        """Runs while anything is held."""
        while self._held:
            await asyncio.sleep(self.check)
            held = list(self._held.values())
            for start in range(0, len(held), WATCH_SLICE):
                for request, gone in held[start : start + WATCH_SLICE]:
                    if gone_now(request) and not gone.done():
                        gone.set_result(None)
                await asyncio.sleep(0)  # requests run between slices, not after all 10,000


def gone_now(request: web.BaseRequest) -> bool:
    """Whether ``request``'s connection is closed already."""
    transport = request.transport
    return transport is None or transport.is_closing()
