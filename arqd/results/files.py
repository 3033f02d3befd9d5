"""The files result store: one file per result under a directory.

Layout: ``<root>/<area>/<last two hex digits of the id>/<job id>``; the fan-out uses the id's
random tail, since its head is a timestamp. A writer streams into ``<root>/.partial/`` and
publishes with ``fsync`` + ``os.replace`` (atomic on POSIX), so a reader sees either no result
or all of it. Names are built only from validated job ids and the two known areas, so no request
can reach outside the root.

Partials of writers that died (kill -9, power loss) are swept by ``sweep_partials``, which
every daemon runs at start and every minute. A writer
holds an exclusive ``flock`` on its partial from the moment it creates it until after it has
renamed or removed it, and the kernel drops that lock when its process dies. So a partial whose
lock can be taken has no live writer in any process on this host, whatever its age: the sweep
takes the lock, checks the path still names the file it locked, and removes it. A writer
creates its file under a name the sweep does not take (``.new``), locks it, and only then
renames it to its ``.part`` name, so a sweep never sees a partial before its lock is held; a
``.new`` file left by a process that died in those microseconds is removed once it is a minute
old. (Locks do not reach across hosts: share a results
directory between hosts only on a file system whose ``flock`` does, such as NFSv4 on Linux.)

Every ``OSError`` is translated here, as the other stores translate their drivers' errors: a
result that is not there (``ENOENT``) is the contract's "missing" (:class:`ResultExpired` on
``read``, ``None`` on ``size``, nothing to do on ``delete``); anything else (a full disk, a
directory the daemon may not write, a file where a directory should be, an I/O error) is a
:class:`BackendError` naming what was being done, the path and the error. A write or commit that
fails leaves no partial behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import aiofiles.os

from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, ResultExpired
from arqd.model import new_token
from arqd.results.base import AREAS, Area, ResultStore, ResultWriter, checked

CHUNK = 64 * 1024
PARTIAL = ".partial"
PARTIAL_SUFFIX = ".part"
CREATING_SUFFIX = ".new"  # a partial before its lock is held: the sweep leaves it alone
CREATING_STALE = 60.0  # seconds after which a ``.new`` file is a dead process's leftover
NAMES_PAGE = 1000  # result names answered per page by ``names``


@contextlib.contextmanager
def _translated(doing: str, path: Path) -> Iterator[None]:
    """``OSError`` becomes :class:`BackendError`: what was being done, where, and why."""
    try:
        yield
    except OSError as exc:
        raise _error(doing, path, exc) from exc


def _error(doing: str, path: Path, exc: OSError) -> BackendError:
    name = errno.errorcode.get(exc.errno or 0)
    why = f"{exc.strerror} ({name})" if exc.strerror and name else str(exc)
    return BackendError(f"results: cannot {doing} {path}: {why}")


T = TypeVar("T")


async def _owned(make: Callable[[], T], drop: Callable[[T], None]) -> T:
    """``make()`` in a thread. If the caller is cancelled meanwhile, what ``make`` returns when
    it finishes is dropped with ``drop`` (a file opened for a request that went away is closed,
    not left to the garbage collector: an unclosed-file warning in CI)."""
    fut = asyncio.get_running_loop().run_in_executor(None, make)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:

        def dropped(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                drop(done.result())

        fut.add_done_callback(dropped)
        raise


def _open_read(path: Path) -> BinaryIO:
    return path.open("rb")


def _close(f: BinaryIO) -> None:
    f.close()


def _drop_partial(created: tuple[Path, int]) -> None:
    partial, fd = created
    with contextlib.suppress(OSError):
        partial.unlink()
    os.close(fd)


class _FileWriter(ResultWriter):
    def __init__(self, partial: Path, final: Path, handle: BinaryIO) -> None:
        self._partial, self._final = partial, final
        # The handle's fd carries the partial's lock: it stays open until the file is renamed
        # or removed.
        self._handle = handle
        self._size = 0
        self._closed = False

    async def write(self, data: bytes) -> None:
        assert not self._closed, "writer already finished"
        try:
            await asyncio.to_thread(self._handle.write, data)
        except OSError as exc:
            raise _error("write", self._partial, exc) from exc
        self._size += len(data)

    async def commit(self) -> int:
        assert not self._closed, "writer already finished"
        try:
            with _translated("publish", self._final):
                await asyncio.to_thread(self._handle.flush)
                await asyncio.to_thread(os.fsync, self._handle.fileno())
                # Renamed while still locked: a sweep never sees this partial without its lock.
                await asyncio.to_thread(_publish, self._partial, self._final)
        except BaseException:
            await self.abort()
            raise
        self._closed = True
        self._handle.close()  # flushed above: closing a regular file does not block
        return self._size

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Best effort, and never raising over the error that led here: a partial left behind is
        # unlocked once its handle is closed, and the next sweep removes it.
        with contextlib.suppress(OSError):
            await aiofiles.os.remove(self._partial)  # removed before the lock is let go
        with contextlib.suppress(OSError):  # unwritten bytes may fail again; the fd is closed
            self._handle.close()


def _publish(partial: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def _create_locked(directory: Path, name: str) -> tuple[Path, int]:
    """A new partial for ``name``, created and locked by this process (see the module
    docstring): its path and its open, locked fd."""
    stem = directory / f"{name}.{new_token()[:8]}"
    creating, path = (
        stem.with_name(stem.name + CREATING_SUFFIX),
        stem.with_name(stem.name + PARTIAL_SUFFIX),
    )
    fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: no one else holds it
        os.rename(creating, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(creating)
        raise
    return path, fd


def _names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def sweep_partials(directory: Path) -> tuple[int, int]:
    """Remove every partial in ``directory`` that no live writer holds; answers (files, bytes).
    A partial held by a writer (its lock cannot be taken) is left alone, however old."""
    files = size = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        if entry.name.endswith(CREATING_SUFFIX):
            files, size = _drop_stale_creating(entry, files, size)
            continue
        if not entry.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # published or aborted meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            path = Path(entry.path)
            if _names_file(path, fd):
                length = os.fstat(fd).st_size
                path.unlink()  # under our lock: a writer locking it next sees it gone
                files, size = files + 1, size + length
        finally:
            os.close(fd)
    return files, size


def _drop_stale_creating(entry: os.DirEntry[str], files: int, size: int) -> tuple[int, int]:
    """Remove a ``.new`` file a dying process left between creating and locking it."""
    try:
        st = entry.stat(follow_symlinks=False)
        if time.time() - st.st_mtime < CREATING_STALE:
            return files, size
        os.unlink(entry.path)
    except FileNotFoundError:
        return files, size
    return files + 1, size + st.st_size


class FileResults(ResultStore):
    """See the module docstring."""

    name = "files"

    def __init__(self, path: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.root = Path(path).absolute()

    async def open(self) -> None:
        for sub in (*AREAS, PARTIAL):
            with _translated("create the directory", self.root / sub):
                await asyncio.to_thread((self.root / sub).mkdir, parents=True, exist_ok=True)

    def _path(self, area: Area, name: str) -> Path:
        return self.root / area / checked(area, name)[-11:-9] / name

    async def writer(self, area: Area, name: str) -> ResultWriter:
        final = self._path(area, name)
        with _translated("create a partial result in", self.root / PARTIAL):
            partial, fd = await _owned(
                functools.partial(_create_locked, self.root / PARTIAL, name), _drop_partial
            )
        return _FileWriter(partial, final, os.fdopen(fd, "wb"))

    async def sweep_partials(self) -> tuple[int, int]:
        with _translated("sweep partial results in", self.root / PARTIAL):
            return await asyncio.to_thread(sweep_partials, self.root / PARTIAL)

    async def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self._path(area, name)
        try:
            f = await _owned(functools.partial(_open_read, path), _close)
        except FileNotFoundError:
            raise ResultExpired(f"the result of job {name} is no longer stored") from None
        except OSError as exc:
            raise _error("read", path, exc) from exc
        try:
            left = None if end is None else max(0, end - start)
            try:
                await asyncio.to_thread(f.seek, start)
            except OSError as exc:
                raise _error("read", path, exc) from exc
            while left is None or left > 0:
                try:
                    size = CHUNK if left is None else min(CHUNK, left)
                    chunk = await asyncio.to_thread(f.read, size)
                except OSError as exc:
                    raise _error("read", path, exc) from exc
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            f.close()  # opened for reading: closing does not block

    async def size(self, area: Area, name: str) -> int | None:
        path = self._path(area, name)
        try:
            st = await aiofiles.os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("read", path, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"results: cannot read {path}: not a regular file")
        return st.st_size

    async def delete(self, area: Area, name: str) -> None:
        path = self._path(area, name)
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            pass  # already gone: what a delete asks for
        except OSError as exc:
            raise _error("delete", path, exc) from exc

    async def names(self, area: Area) -> AsyncIterator[list[str]]:
        if area not in AREAS:
            raise BackendError(f"unknown result area {area!r}")
        top = self.root / area
        with _translated("list", top):
            fans = await asyncio.to_thread(_fans, top)
        for fan in fans:  # read one fan-out directory (1/256 of the area) at a time
            with _translated("list", top / fan):
                found = await asyncio.to_thread(_listing, top / fan)
            for i in range(0, len(found), NAMES_PAGE):
                yield found[i : i + NAMES_PAGE]

    async def ping(self) -> None:
        if not await aiofiles.os.path.isdir(self.root):
            raise BackendError(f"result directory {self.root} is missing")


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _fans(area: Path) -> list[str]:
    """The fan-out directories of ``area``; anything else there (a stray file) holds no result."""
    try:
        with os.scandir(area) as entries:
            return sorted(e.name for e in entries if e.is_dir())
    except FileNotFoundError:
        return []
