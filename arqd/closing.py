"""``AsyncClosing``: the open/aclose life of a storage object (a queue backend, a result store),
usable as ``async with``. One definition for both contracts."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    async def open(self) -> None:
        """Connect, create what is missing; called once before use."""

    async def aclose(self) -> None:
        """Release connections and threads; the object is unusable afterwards."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
