"""The files result store: one file per result under a directory.

Layout: ``<root>/<area>/<last two hex digits of the id>/<job id>``; the fan-out uses the id's
random tail, since its head is a timestamp. A writer streams into ``<root>/.partial/`` and
publishes with ``fsync`` + ``os.replace`` (atomic on POSIX), so a reader sees either no result
or all of it. Names are built only from validated job ids and the two known areas, so no request
can reach outside the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiofiles
import aiofiles.os

from arqd.backends.base import AREAS, Area, ResultStore, ResultWriter
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, ResultExpired
from arqd.model import BLOB_NAME_RE, new_token

CHUNK = 64 * 1024


class _FileWriter(ResultWriter):
    def __init__(self, partial: Path, final: Path) -> None:
        self._partial, self._final = partial, final
        self._file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None
        self._size = 0
        self._closed = False

    async def _open(self) -> None:
        self._file = await aiofiles.open(self._partial, "wb")

    async def write(self, data: bytes) -> None:
        assert self._file is not None, "writer not opened"
        assert not self._closed, "writer already finished"
        await self._file.write(data)
        self._size += len(data)

    async def commit(self) -> int:
        assert self._file is not None, "writer not opened"
        assert not self._closed, "writer already finished"
        await self._file.flush()
        await asyncio.to_thread(os.fsync, self._file.fileno())
        await self._file.close()
        self._closed = True
        await asyncio.to_thread(_publish, self._partial, self._final)
        return self._size

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            await self._file.close()
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self._partial)


def _publish(partial: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


class FileResults(ResultStore):
    """See the module docstring."""

    name = "files"

    def __init__(self, path: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.root = Path(path).absolute()

    async def open(self) -> None:
        for sub in (*AREAS, ".partial"):
            await asyncio.to_thread((self.root / sub).mkdir, parents=True, exist_ok=True)

    def _path(self, area: Area, name: str) -> Path:
        if area not in AREAS or not BLOB_NAME_RE.match(name):
            raise BackendError(f"refusing result path for area={area!r} id={name!r}")
        return self.root / area / name[-11:-9] / name

    async def writer(self, area: Area, name: str) -> ResultWriter:
        final = self._path(area, name)
        writer = _FileWriter(self.root / ".partial" / f"{name}.{new_token()[:8]}.part", final)
        await writer._open()
        return writer

    async def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self._path(area, name)
        try:
            f = await aiofiles.open(path, "rb")
        except FileNotFoundError:
            raise ResultExpired(f"the result of job {name} is no longer stored") from None
        try:
            await f.seek(start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                chunk = await f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            await f.close()

    async def size(self, area: Area, name: str) -> int | None:
        try:
            return (await aiofiles.os.stat(self._path(area, name))).st_size
        except FileNotFoundError:
            return None

    async def delete(self, area: Area, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self._path(area, name))

    async def purge(self, area: Area, older_than: float | None = None) -> int:
        if area not in AREAS:
            raise BackendError(f"unknown result area {area!r}")
        return await asyncio.to_thread(_purge_tree, self.root / area, older_than)

    async def ping(self) -> None:
        if not await aiofiles.os.path.isdir(self.root):
            raise BackendError(f"result directory {self.root} is missing")


def _purge_tree(top: Path, older_than: float | None) -> int:
    count = 0
    for entry in top.glob("*/*"):
        try:
            if older_than is None or entry.stat().st_mtime < older_than:
                entry.unlink()
                count += 1
        except FileNotFoundError:
            continue
    return count
