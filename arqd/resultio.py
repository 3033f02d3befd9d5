"""Results in and out of the result store: where a handler's return value goes (inline or a blob,
which area), what a reader gets back (the value, its size, or the error that explains its
absence), and deleting blobs, including the orphans a purge's last pass finds.

The core owns one :class:`ResultIO` (``Core.resultio``); the pool stores through it, the clients
and the HTTP routes read through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from arqd.backends.base import QueueBackend
from arqd.clock import Clock
from arqd.config import Config
from arqd.errors import JobCancelled, JobFailed, NotReady, ResultExpired
from arqd.model import BLOB_NAME_RE, DROPPED, Job, ResultRef, State, blob_name
from arqd.results.base import Area, ResultStore

ORPHAN_BATCH = 100  # blobs checked against their job records per read (a purge's last pass)
JSON = "application/json"
OCTETS = "application/octet-stream"
_SCALARS = (int, float, bool, type(None))  # results always small enough to keep inline


def area_of(value: str) -> Area:
    """The store area a result reference or a purge names (``temporary`` unless persistent)."""
    if value == "persistent":
        return "persistent"
    return "temporary"


class ResultIO:
    """Results of one queue's jobs in one result store, under the current config."""

    def __init__(
        self, results: ResultStore, queue: QueueBackend, config: Config, clock: Clock
    ) -> None:
        self.results = results
        self.queue = queue
        self.config = config  # replaced on reload (``Core.config``)
        self.clock = clock

    # --- writing ----------------------------------------------------------------------------------

    async def store(self, job: Job, token: str, value: Any) -> ResultRef:
        """Keep a handler's return value: ``None`` and scalars inline; bytes, and async
        iterators (streamed), as a blob; other values as JSON, inline up to
        ``results.inline_max`` bytes, else a blob. A blob is named after the lease
        (``<job id>-<token>``, see :meth:`sweep_orphans`), in the area of the job's stickiness."""
        if value is None or type(value) in _SCALARS:
            return ResultRef(inline=value)
        area: Area = "persistent" if job.sticky else "temporary"
        name = blob_name(job.id, token)
        if isinstance(value, bytes | bytearray | memoryview):
            size = await self.results.put(area, name, bytes(value))
            return ResultRef(size=size, content_type=OCTETS, area=area, name=name)
        if hasattr(value, "__aiter__"):
            size = await self._stream(area, name, value)
            return ResultRef(size=size, content_type=OCTETS, area=area, name=name)
        encoded = msgspec.json.encode(value)
        if len(encoded) <= self.config.results.inline_max:
            return ResultRef(inline=msgspec.json.decode(encoded))
        size = await self.results.put(area, name, encoded)
        return ResultRef(size=size, content_type=JSON, area=area, name=name)

    async def _stream(self, area: Area, name: str, chunks: AsyncIterator[Any]) -> int:
        writer = await self.results.writer(area, name)
        try:
            async for chunk in chunks:
                if chunk:
                    await writer.write(bytes(chunk))
            return await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    async def delete(self, ref: ResultRef | None) -> None:
        """Delete the blob ``ref`` names, if it names one: a deleted or expired job's, or one no
        record will name (its outcome's write was refused)."""
        if ref is not None and ref.name is not None and ref.area in ("temporary", "persistent"):
            await self.results.delete(area_of(ref.area), ref.name)

    async def sweep_orphans(self, area: Area) -> int:
        """Delete the blobs of ``area`` that no record points to, nor ever can; answers how many.

        A blob is published before the outcome that names it is written, and that wait has no
        bound (the pool retries an outcome through a backend outage, heartbeating meanwhile),
        so age cannot tell an orphan from a result about to be recorded. Its job can: a blob
        ``<job id>-<token>`` is kept while the job is not terminal (its consumer may yet record
        it) and while the job's result names it. A terminal job never comes to name another
        blob of that lease (its outcome is fenced), and a deleted job never comes back."""
        deleted = 0
        async for page in self.results.names(area):
            names = [n for n in page if BLOB_NAME_RE.match(n)]  # never touch what is not ours
            for start in range(0, len(names), ORPHAN_BATCH):
                chunk = names[start : start + ORPHAN_BATCH]
                jobs = await self.queue.get_many([n[:32] for n in chunk])
                for name, job in zip(chunk, jobs, strict=True):
                    if not _may_name(job, area, name):
                        await self.results.delete(area, name)
                        deleted += 1
        return deleted

    # --- reading ----------------------------------------------------------------------------------

    def check(self, job: Job) -> ResultRef:
        """The result reference of a succeeded job, or the error that explains its absence."""
        if job.state is State.FAILED:
            raise JobFailed(f"job {job.id} failed: {job.error.message if job.error else ''}")
        if job.state is State.CANCELLED:
            raise JobCancelled(f"job {job.id} was cancelled")
        if job.state is not State.SUCCEEDED or job.result is None:
            raise NotReady(f"job {job.id} is {job.state.value}, it has no result yet")
        if job.expires_at is not None and job.expires_at.timestamp() <= self.clock.time():
            raise ResultExpired(f"the result of job {job.id} has expired")
        if job.result.area == DROPPED:
            raise ResultExpired(f"the result of job {job.id} was purged from the cache")
        return job.result

    async def read(
        self, ref: ResultRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes of a result (inline values as JSON), from ``start`` up to ``end``."""
        if ref.is_inline:
            data = msgspec.json.encode(ref.inline)[start:end]
            if data:
                yield data
            return
        assert ref.name is not None, "a blob result always has a name"
        async for chunk in self.results.read(area_of(ref.area or ""), ref.name, start, end):
            yield chunk

    async def blob_size(self, ref: ResultRef) -> int | None:
        """The stored size of a blob result; ``None`` once the store dropped it."""
        if ref.name is None:
            return None
        return await self.results.size(area_of(ref.area or ""), ref.name)

    @staticmethod
    def size(ref: ResultRef) -> int:
        """The size of a result as recorded: an inline value's JSON, a blob's bytes."""
        return len(msgspec.json.encode(ref.inline)) if ref.is_inline else (ref.size or 0)


def _may_name(job: Job | None, area: Area, name: str) -> bool:
    """Whether ``job``'s record names, or may yet come to name, the blob ``area``/``name``."""
    if job is None:
        return False
    if not job.state.terminal:
        return True
    ref = job.result
    return ref is not None and ref.area == area and ref.name == name
