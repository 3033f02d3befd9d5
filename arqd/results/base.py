"""The result store contract: blobs by (area, name), published atomically.

A result store keeps the blobs of results too large to keep inline in a job record, by area
(``temporary`` for the cache, ``persistent`` for sticky results) and name (``model.blob_name``:
the job id and the lease token). Its writers publish atomically, so no reader ever sees half a
result. Like a queue backend it stores and never decides: which area, when a blob goes and which
blobs are orphans is the core's business (``arqd/core.py``).

A store is an async context manager; ``aclose()`` releases its connections. Driver errors
(``OSError``, botocore's) are translated to :class:`arqd.errors.BackendError` at this seam; a
blob that is not there is :class:`arqd.errors.ResultExpired` on ``read`` and ``None`` on ``size``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Literal

from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.closing import AsyncClosing
from arqd.errors import BackendError
from arqd.model import BLOB_NAME_RE

Area = Literal["temporary", "persistent"]
AREAS: tuple[Area, ...] = ("temporary", "persistent")


def checked(area: str, name: str) -> str:
    """``name`` if it is a well-formed blob name in a known area; every store calls this before
    a name becomes a path, a key or a dict entry, so no name can escape its store."""
    if area not in AREAS or not BLOB_NAME_RE.match(name):
        raise BackendError(f"refusing result name for area={area!r} name={name!r}")
    return name


class ResultWriter(abc.ABC):
    """A result being written; invisible to readers until ``commit``."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> int:
        """Publish atomically; answers the size in bytes."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Drop what was written; safe to call after commit or twice."""


class ResultStore(AsyncClosing, abc.ABC):
    name: str = "abstract"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock

    @abc.abstractmethod
    async def writer(self, area: Area, name: str) -> ResultWriter: ...

    async def put(self, area: Area, name: str, data: bytes) -> int:
        writer = await self.writer(area, name)
        try:
            await writer.write(data)
            return await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    @abc.abstractmethod
    def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` up to (excluding) ``end``; raises :class:`ResultExpired` if missing."""

    @abc.abstractmethod
    async def size(self, area: Area, name: str) -> int | None: ...

    @abc.abstractmethod
    async def delete(self, area: Area, name: str) -> None: ...

    @abc.abstractmethod
    def names(self, area: Area) -> AsyncIterator[list[str]]:
        """The names of every result stored in ``area``, a page at a time (at most 1,000 a
        page), in no particular order; a result published meanwhile may or may not appear."""

    async def ping(self) -> None:
        """Raise :class:`BackendError` unless the storage answers."""

    async def sweep_partials(self) -> tuple[int, int]:
        """Delete what writers that died left behind (files, bytes); never a live writer's.
        Called at start and periodically; stores with nothing to sweep answer (0, 0)."""
        return 0, 0
