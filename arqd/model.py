"""The job model: ids, states, the job record and the submitted spec.

This module imports nothing of arqd, so every other module may import it.
"""

from __future__ import annotations

import enum
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

__all__ = [
    "AHEAD_MAX",
    "BATCH_MAX",
    "BLOB_NAME_RE",
    "DROPPED",
    "GROUP_MAX",
    "JOB_ID_RE",
    "LIST_MAX",
    "META_MAX",
    "NAME_PATTERN",
    "NAME_RE",
    "SCHEDULE_KEY",
    "TEXT_PATTERN",
    "WAIT_MAX",
    "ErrorInfo",
    "GroupMember",
    "GroupMemberSpec",
    "GroupRecord",
    "GroupSpec",
    "Job",
    "JobSpec",
    "ListQuery",
    "NewJob",
    "Progress",
    "ResultRef",
    "State",
    "StepState",
    "blob_name",
    "etag_of",
    "explain",
    "from_ts",
    "links_of",
    "member_names",
    "new_job_id",
    "new_token",
    "owned_key",
    "public_key",
    "to_ts",
    "version_of",
    "where_and_why",
]


class State(enum.StrEnum):
    """A job's state; a ``str`` so ``job.state == "succeeded"`` holds."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})

# Every pattern ends in ``\Z``, the true end of the string: ``$`` also matches before a final
# newline, and msgspec's ``pattern`` and ``re.match`` would let ``"default\n"`` through.
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
# A result blob is named by its job and the lease that wrote it, so a consumer that lost its lease
# can never overwrite the result of the consumer that took over.
BLOB_NAME_RE = re.compile(r"^[0-9a-f]{32}-[0-9a-f]{8}\Z")
# Queue, group, group member, step, schedule and token names.
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}\Z"
NAME_RE = re.compile(NAME_PATTERN)
# Handler names and keys: free text, but no control characters (C0, DEL, C1).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+\Z"
# The furthest ahead a client may set a job (``delay``, ``run_at``) or its ``timeout``: a year
# and a day, so "the same date next year" always fits. Jobs further out are a unit mistake more
# often than a plan (recurring work belongs in [[schedules]]), and the bound keeps every time a
# backend stores far from the limits of datetime and of the platform's time_t.
AHEAD_MAX = 366 * 86400.0


def blob_name(job_id: str, token: str) -> str:
    return f"{job_id}-{token[:8]}"


# --- ids ------------------------------------------------------------------------------------------
# A job id is a UUIDv7 in lowercase hex: 48 bits of Unix milliseconds, then a 12-bit sequence that
# keeps ids from one process strictly increasing within a millisecond, then 62 random bits that
# keep ids from different hosts apart. Sorting ids sorts jobs by creation time.

_id_lock = threading.Lock()
# Seeded from os.urandom, and reseeded in a forked child by the random module itself, so two
# processes never share a sequence; a syscall per id would cost more than the rest of the id.
_random = random.Random()
_last_ms = 0
_seq = 0


def new_job_id() -> str:
    global _last_ms, _seq
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # 4096 ids in one millisecond: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        else:
            _last_ms, _seq = ms, 0
        seq = _seq
    rand = _random.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    return f"{value:032x}"


def new_token() -> str:
    """A fresh lease token: 128 random bits, never reused."""
    return os.urandom(16).hex()


def to_ts(value: datetime) -> float:
    return value.timestamp()


def from_ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


# --- the record -----------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why an attempt (or the job) failed."""

    type: str
    message: str
    attempt: int
    step: str | None = None
    status: int | None = None


class Progress(msgspec.Struct, frozen=True):
    fraction: float | None = None
    message: str | None = None


DROPPED = "dropped"  # ResultRef.area of a result the cache dropped (purged): reads answer 410


class ResultRef(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where a succeeded job's result is: inline JSON, or a blob in the result store's ``area``."""

    inline: Any = msgspec.UNSET
    size: int | None = None
    content_type: str | None = None
    area: str | None = None
    name: str | None = None

    @property
    def is_inline(self) -> bool:
        return self.inline is not msgspec.UNSET


class StepState(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    state: str
    status: int | None = None
    attempts: int = 0


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One job as stored. Immutable: each change makes a new record with a higher ``version``."""

    id: str
    queue: str
    handler: str
    state: State
    payload: Any = None
    key: str | None = None
    sticky: bool = False
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    attempts: int = 0
    max_attempts: int = 5
    timeout: float = 300.0
    created_at: datetime
    ready_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress | None = None
    error: ErrorInfo | None = None
    result: ResultRef | None = None
    steps: list[StepState] | None = None
    group_id: str | None = None
    cancel_requested: bool = False
    owner: str | None = None
    version: int = 1
    expires_at: datetime | None = None
    name: str | None = None  # the job's name within its group
    checkpoint: dict[str, Any] | None = None  # succeeded steps' outcomes (multi-step jobs)
    deduplicated: bool = False  # set on the answer to a submit that matched a live job's key

    @property
    def links(self) -> dict[str, str]:
        return links_of(self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.version)


def links_of(job_id: str) -> dict[str, str]:
    """A job's API links: itself, its result, its event stream."""
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "result": f"{base}/result", "events": f"{base}/events"}


def etag_of(job_id: str, version: int) -> str:
    """A job's HTTP ETag: its id's last 12 digits and its version (``"5e6f7a8b9c0d-3"``)."""
    return f'"{job_id[-12:]}-{version}"'


def version_of(etag: str | None, job_id: str) -> int | None:
    """The version an ETag of ``job_id`` names; ``None`` if it is not one (or is missing)."""
    if etag is None:
        return None
    prefix, _, version = etag.removeprefix("W/").strip('"').rpartition("-")
    if prefix != job_id[-12:] or not (version.isascii() and version.isdigit()):
        return None
    return int(version)


def owned_key(owner: str, key: str) -> str:
    """A key inside its owner's namespace: tenants never share dedupe keys or cached results."""
    return f"@{owner}/{key}"


def public_key(job: Job) -> str | None:
    """The key as its submitter gave it (without the owner's namespace)."""
    if job.key is not None and job.owner is not None:
        return job.key.removeprefix(f"@{job.owner}/")
    return job.key


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job ready to be stored: the spec with every default resolved by the core."""

    id: str
    queue: str
    handler: str
    payload: Any
    key: str | None
    sticky: bool
    meta: dict[str, Any]
    max_attempts: int
    timeout: float
    created_at: float
    ready_at: float
    group_id: str | None = None
    owner: str | None = None
    steps: list[StepState] | None = None
    name: str | None = None

    def to_job(self) -> Job:
        """The record as first stored: queued, no attempt yet."""
        return Job(
            id=self.id,
            queue=self.queue,
            handler=self.handler,
            state=State.QUEUED,
            payload=self.payload,
            key=self.key,
            sticky=self.sticky,
            meta=self.meta,
            max_attempts=self.max_attempts,
            timeout=self.timeout,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            ready_at=datetime.fromtimestamp(self.ready_at, UTC),
            group_id=self.group_id,
            owner=self.owner,
            steps=self.steps,
            name=self.name,
        )


class GroupMember(msgspec.Struct, frozen=True):
    name: str
    id: str


class GroupRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A group as stored: which job answers for which member name (a member whose key matched
    a live job is that job)."""

    id: str
    name: str
    created_at: float
    owner: str | None = None
    members: list[GroupMember]


# --- what clients submit --------------------------------------------------------------------------

QueueName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
HandlerName = Annotated[str, msgspec.Meta(max_length=256, pattern=TEXT_PATTERN)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=TEXT_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=AHEAD_MAX)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=AHEAD_MAX)]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=100)]


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job as a client submits it (docs/jobs.md). Unknown fields are an error."""

    handler: HandlerName | None = None
    steps: list[dict[str, Any]] | None = None
    payload: Any = None
    queue: QueueName | None = None
    key: Key | None = None
    sticky: bool = False
    delay: Seconds | None = None
    run_at: datetime | None = None
    max_attempts: Attempts | None = None
    timeout: PositiveSeconds | None = None
    meta: dict[str, Any] | None = None
    credentials: dict[str, str] | None = None


MemberName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]


class GroupMemberSpec(JobSpec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job of an ad-hoc group: a job spec with an optional ``name`` within the group."""

    name: MemberName | None = None


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/groups``: an ad-hoc group."""

    name: MemberName | None = None
    jobs: list[GroupMemberSpec]


# Limits of the contract, checked by the core on submit and by the config on load.
META_MAX = 4096  # bytes of a job's ``meta`` as JSON
GROUP_MAX = 1000  # jobs in one group
BATCH_MAX = 1000  # jobs in one ``POST /v1/jobs/batch``
LIST_MAX = 1000  # jobs in one page of a listing
WAIT_MAX = 60.0  # seconds a long-poll (``GET /v1/jobs/{id}?wait=``) is held at most
SCHEDULE_KEY = "schedule:"  # the key prefix of schedule ticks (arqd/schedules.py); reserved


def member_names(names: Sequence[str | None]) -> list[str]:
    """A group's member names: each as given, else ``job<position>`` counted from 1. One rule for
    submitted and configured groups, so a config can be checked for duplicates when it loads."""
    return [name or f"job{i + 1}" for i, name in enumerate(names)]


JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_RE.pattern)]


class ListQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A listing as a client asks for it (``GET /v1/jobs``, ``list()``): the filters, the page
    size and where to go on from. Each filter is held to the pattern of what it filters on, so
    one that can match no job is refused (422), never sent to a backend."""

    queue: QueueName | None = None
    state: State | None = None
    handler: HandlerName | None = None
    group_id: JobId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=LIST_MAX)] = 100
    cursor: JobId | None = None


# --- what a refusal says --------------------------------------------------------------------------

# What each pattern means, for error messages (a regex is no answer to a client).
_PATTERNS = {
    NAME_PATTERN: "1 to 64 letters, digits, '_', '.' or '-'",
    TEXT_PATTERN: "a string without control characters",
    JOB_ID_RE.pattern: "32 lowercase hex digits (an id this API gave out)",
}
_FIELD = re.compile(r"^Object (contains unknown|missing required) field `(.*)`\Z")
_REASONS = {"Expected `array` of length >= 1": "must not be empty"}


def where_and_why(exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's ``reason - at `$.jobs[0].queue` `` as (``jobs[0].queue``, ``reason``): the
    path without ``$``, an unknown or missing field named in the path, a pattern by its
    meaning. Every refusal of msgspec's validation is worded here, once."""
    reason, _, where = str(exc).partition(" - at ")
    path = where.strip("`").removeprefix("$").lstrip(".")
    field = _FIELD.match(reason)
    if field is not None:
        path = f"{path}.{field.group(2)}" if path else field.group(2)
        reason = "unknown field" if field.group(1) == "contains unknown" else "required"
    for pattern, meaning in _PATTERNS.items():
        reason = reason.replace(f"`str` matching regex {pattern!r}", meaning)
    return path, _REASONS.get(reason, reason)


def explain(exc: msgspec.ValidationError) -> str:
    """``where: reason`` (or the reason alone at the top level) for a client's error message."""
    path, reason = where_and_why(exc)
    return f"{path}: {reason}" if path else reason
