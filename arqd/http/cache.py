"""The status-poll cache: recently served jobs as their encoded JSON, bounded in bytes.

A poll of a job read in the last ``ttl`` (1 s) is answered from here, 304 or 200, without the
backend; a change made in this process drops the entry at once (the server registers
``changed`` with the hub), and one made by another process is seen once the entry is older
than ``ttl``. An entry keeps the encoded body and the few small fields the routes decide on
(ETag, version, owner, state, progress), never the decoded job: holding both took 2 MB per
1 MB job, and 200 reads of such jobs 420 MB that never came back (issue 12). Entries leave
oldest first when they are older than ``ttl`` (they could not answer any more) or when the
bodies would exceed ``max_bytes`` (``server.status_cache``); a body larger than that is not
kept at all.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass

from arqd.http.wire import encode, job_dict
from arqd.model import Job, Progress, State

CACHE_TTL = 1.0  # seconds a cached entry may answer without asking the backend
ENTRY_OVERHEAD = 512  # bytes an entry costs besides its body: the Entry, its key, its dict slot


@dataclass(frozen=True, slots=True)
class Entry:
    """One job as served: its JSON body and what the routes need to decide without it."""

    id: str
    version: int
    etag: str
    owner: str | None
    state: State
    progress: Progress | None
    body: bytes
    at: float  # time.monotonic() of the backend read it came from

    def bare(self) -> Entry:
        """This entry without its body, for a request held open (it reads the body again, or
        gets a new entry, when it answers)."""
        return dataclasses.replace(self, body=b"")

    @property
    def size(self) -> int:
        message = self.progress.message if self.progress is not None else None
        return len(self.body) + len(message or "") + ENTRY_OVERHEAD


def entry_of(job: Job, at: float | None = None) -> Entry:
    return Entry(
        id=job.id,
        version=job.version,
        etag=job.etag,
        owner=job.owner,
        state=job.state,
        progress=job.progress,
        body=encode(job_dict(job)),
        at=time.monotonic() if at is None else at,
    )


class ChangeCache:
    """Entries by job id, oldest first; see the module docstring."""

    def __init__(self, max_bytes: int, ttl: float = CACHE_TTL) -> None:
        self.max_bytes, self.ttl = max_bytes, ttl
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """What the kept entries cost, by ``Entry.size``; at most ``max_bytes``."""
        return self._bytes

    def fresh(self, job_id: str) -> Entry | None:
        """The entry of ``job_id`` if it was read from the backend less than ``ttl`` ago."""
        now = time.monotonic()
        self._evict(now)
        entry = self._entries.get(job_id)
        if entry is None or now - entry.at > self.ttl:
            return None
        return entry

    def put(self, job: Job) -> Entry:
        """The entry of ``job`` just read from the backend, kept when it fits. Waiters woken by
        one change each put the same record: the first encodes it, the others reuse that."""
        now = time.monotonic()
        known = self._entries.get(job.id)
        if known is not None and known.version == job.version:
            entry = dataclasses.replace(known, at=now)
        else:
            entry = entry_of(job, now)
        self._drop(job.id)
        if entry.size <= self.max_bytes:
            self._entries[job.id] = entry
            self._bytes += entry.size
            self._evict(now)
        return entry

    def changed(self, job_id: str, job: Job | None = None) -> None:
        """A hub listener: the job changed in this process, so its entry is stale."""
        self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _evict(self, now: float) -> None:
        """Oldest first: entries too old to answer, then any beyond ``max_bytes``."""
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if now - oldest.at <= self.ttl and self._bytes <= self.max_bytes:
                return
            self._drop(oldest.id)
