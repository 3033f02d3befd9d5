"""The memory result store: blobs in a dict of this process, for tests and throwaway runs.

A real store, held to the same contract suite as files and S3 (``tests/test_contract_results.py``).
Every method runs without awaiting anything, so each is atomic on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import ResultExpired
from arqd.results.base import Area, ResultStore, ResultWriter, checked

NAMES_PAGE = 1000  # result names answered per page by ``MemoryResults.names``
CHUNK = 64 * 1024  # bytes per chunk handed to readers


class _MemoryWriter(ResultWriter):
    def __init__(self, store: MemoryResults, area: Area, name: str) -> None:
        self._store, self._area, self._name = store, area, name
        self._parts: list[bytes] = []
        self._done = False

    async def write(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    async def commit(self) -> int:
        blob = b"".join(self._parts)
        self._store._blobs[(self._area, self._name)] = blob
        self._done = True
        return len(blob)

    async def abort(self) -> None:
        self._parts.clear()


class MemoryResults(ResultStore):
    """Result blobs in a dict; see the module docstring."""

    name = "memory"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._blobs: dict[tuple[Area, str], bytes] = {}

    def reset(self) -> None:
        """Forget every blob (for tests: ``arqd.testing``)."""
        self._blobs.clear()

    async def writer(self, area: Area, name: str) -> ResultWriter:
        return _MemoryWriter(self, area, checked(area, name))

    async def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        entry = self._blobs.get((area, checked(area, name)))
        if entry is None:
            raise ResultExpired(f"the result of job {name} is no longer stored")
        blob = entry[start:end]
        for i in range(0, len(blob), CHUNK):
            yield blob[i : i + CHUNK]

    async def size(self, area: Area, name: str) -> int | None:
        entry = self._blobs.get((area, checked(area, name)))
        return None if entry is None else len(entry)

    async def delete(self, area: Area, name: str) -> None:
        self._blobs.pop((area, checked(area, name)), None)

    async def names(self, area: Area) -> AsyncIterator[list[str]]:
        found = [name for a, name in self._blobs if a == area]
        for i in range(0, len(found), NAMES_PAGE):
            yield found[i : i + NAMES_PAGE]
