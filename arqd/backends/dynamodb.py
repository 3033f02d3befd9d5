"""The DynamoDB queue backend: one table shared by every host, fenced writes, no lease sweeper.

Design (the full reasoning, the request sequence of every operation and its cost are in
``docs/dynamodb.md``):

- **One table**, key ``(pk, sk)``. A job is the item ``pk = "J#<id>", sk = "J"``; a dedupe key
  is ``"K#<key>"``; per-queue counters live under ``pk = "Q"`` and worker rows under ``pk = "W"``;
  a named mark (``advance_mark``) is ``"M#<name>"``, raised by one conditional UpdateItem.
- **Visibility**, as in SQLite: a live job carries ``va`` (visible at: ``ready_at`` while queued,
  the lease expiry while running) and ``vq = "<queue>#<shard>"``. The sparse GSI ``vis`` on
  ``(vq, va)`` lists ready jobs and expired leases alike, oldest first; terminal jobs drop both
  attributes and leave the index. The shard is chosen at random on submit (``shards`` per queue),
  so no index partition is hot; consumers read the shards from a random start, in waves of
  ``LEASE_FANOUT`` parallel queries, and merge each wave oldest first.
- **Leasing** is a conditional ``UpdateItem`` on the base item: ``st`` and ``va`` must still be
  what the index showed. Every lease and heartbeat moves ``va``, so a stale index entry (GSI lag)
  can only cost a failed conditional write, never a second lease. The lease writes a fresh token
  ``lt``; heartbeat, progress and finish are conditional on ``st = running AND lt = <token>``.
- **Unknown outcomes**: botocore retries a write whose response was lost. A retried lease or
  finish that finds its own work already done (``lt`` equal to its token, or ``ft`` equal to the
  fingerprint of the same outcome, returned with the failed condition) counts as applied, so a
  lost response never burns an attempt nor refuses (and discards) a finish that happened.
- **Dedupe keys**: ``K#<key>`` points at the job holding it, written with the job in one
  ``TransactWriteItems`` (only for keyed jobs). Whether the key is *held* is read from that job:
  it exists, has not freed its key (``kf``), and its ``expires_at`` has not passed. So expiry
  needs no write, and the key item is only tidied afterwards (best effort).
- **Listing and stats** never scan: ``list`` (``lq``, by id), ``dead`` (failed and cancelled
  jobs) and ``grp`` (group id) are key-only GSIs; per-queue per-state counters are the ``Q``
  items, written from per-process deltas at most once a second (``COUNTS_FLUSH``).
- **Expiry**: an ended job with an expiry enters ``exp`` (``(xp, x)``); ``sweep_expired``
  deletes expired jobs by conditional DeleteItems, one sweeper per job; DynamoDB's TTL on
  ``ttl`` is the free backstop for whatever no sweeper reached.
- Errors: botocore retries throttling, 5xx and connection errors (``retry_mode``); what is left
  becomes :class:`BackendUnavailable` or :class:`BackendError` in the AWS toolkit
  (``arqd.backends.aws.translate``), never a botocore exception; this module only reads
  DynamoDB's own refusals first (a failed condition, a cancelled transaction, a missing table).

Sessions, clients and their config come from the toolkit too, which imports ``aioboto3`` when
the backend opens, so the core never needs it (extra ``arqd[aws]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import msgspec

from arqd.backends import aws
from arqd.backends.base import (
    Enqueued,
    HeartbeatReply,
    Lease,
    ListFilter,
    Outcome,
    QueueBackend,
    QueueStats,
    Redrive,
    StateCounts,
    Update,
    WorkerInfo,
    convert_all,
    droppable,
    fifo,
    group_record,
    storable_group,
    storable_job,
)
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, BackendUnavailable, Unstorable
from arqd.model import (
    DROPPED,
    GroupRecord,
    Job,
    NewJob,
    ResultRef,
    State,
    new_token,
)

T = TypeVar("T")
Item = dict[str, Any]  # a DynamoDB item in wire format: {"attr": {"S": "..."}}

# --- tuning constants -----------------------------------------------------------------------------

# Shards read in parallel by one lease call before it looks at the next ones. The default
# ``queue.shards`` (8) fits in one wave, so a lease call then sees every shard and leases the
# oldest jobs of the whole queue; with more shards, later waves are read only when the first did
# not fill the request.
LEASE_FANOUT = 8
# Query-and-lease rounds in one wave (plus one per shard) while other consumers keep winning the
# races: each lost race means another consumer made progress, so a few rounds drain the queue.
LEASE_ROUNDS = 8
# Once a lease call has lost a race it reads this many times more candidates from one random
# shard and tries them in random order, so concurrent consumers spread over the queue instead of
# colliding on its oldest jobs (a failed conditional write still costs a write unit).
CONTENDED_SPREAD = 4
# A heartbeat rewrites a lease only once a quarter of ``lease_for`` has passed since this process
# last wrote it; otherwise it answers from a consistent read (1 RRU instead of ~3 WRU).
HEARTBEAT_REWRITE = 0.25
# Leases this process ended, remembered so that a heartbeat racing the finish (the pool beats
# every lease it holds until the outcome is written) is answered without a refused write.
ENDED_MEMORY = 10_000
# Requests one call keeps in flight (the connection pool is sized to match).
MAX_PARALLEL = 32
# Per-state counter deltas are written at most this often (seconds), and on stats() and close.
COUNTS_FLUSH = 1.0
# How long a process trusts its cached shard count of a queue (seconds).
SHARDS_REFRESH = 60.0
# list_jobs reads at most this many index entries per call before it answers a short page with
# a cursor, so a filter that matches nothing never reads the whole table in one request.
LIST_READ_BUDGET = 5000
# Conditional attempts to take a dedupe key whose holder is gone, before giving up.
KEY_TRIES = 4
# Transactions one batch tries while the keys it carries turn out held, or let go, by others.
TRANSACT_ROUNDS = 8
# DynamoDB's limits, checked before a batch's first write (a value beyond them is the client's,
# answered 422, and nothing is stored): items per TransactWriteItems, its bytes (4 MB, with some
# room for our estimate), bytes of an item, of a partition key, digits of a number.
TRANSACT_MAX = 100
TRANSACT_BYTES = 4_000_000
ITEM_MAX = 400 * 1024
KEY_MAX = 2048
NUMBER_DIGITS = 38
# Worker rows of daemons gone for a day are deleted by DynamoDB's TTL.
WORKER_TTL = 86400

JOB_SK = "J"
QUEUES_PK = "Q"
WORKERS_PK = "W"
GROUP_SK = "G"
MARK_SK = "M"
STATES = tuple(s.value for s in State)

# --- the table ------------------------------------------------------------------------------------

VIS_INDEX, LIST_INDEX, DEAD_INDEX, EXPIRY_INDEX, GROUP_INDEX = "vis", "list", "dead", "exp", "grp"

ATTRIBUTES = {
    "pk": "S",
    "sk": "S",
    "vq": "S",
    "va": "N",
    "lq": "S",
    "dq": "S",
    "xp": "S",
    "x": "N",
    "g": "S",
}


def _gsi(name: str, hash_key: str, range_key: str, include: Sequence[str] = ()) -> dict[str, Any]:
    projection: dict[str, Any] = {"ProjectionType": "INCLUDE" if include else "KEYS_ONLY"}
    if include:
        projection["NonKeyAttributes"] = list(include)
    return {
        "IndexName": name,
        "KeySchema": [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ],
        "Projection": projection,
    }


# ``vis``: ready jobs and expired leases, oldest first (the state rides along so a lease can
# re-check it). ``exp``: ended jobs with an expiry, soonest first, for the sweeper. The others
# sort by ``pk`` = "J#<id>", that is by creation time: ``list`` holds every job, ``dead`` the
# failed and cancelled ones (state projected, so listing can filter on it), ``grp`` the jobs of
# a group. All but ``grp`` are partitioned like ``vis``, by "<queue>#<shard>" (``dq`` and ``xp``
# are copied from ``lq`` inside the update that ends a job).
GSIS = (
    _gsi(VIS_INDEX, "vq", "va", include=("st",)),
    _gsi(LIST_INDEX, "lq", "pk"),
    _gsi(DEAD_INDEX, "dq", "pk", include=("st",)),
    _gsi(EXPIRY_INDEX, "xp", "x"),
    _gsi(GROUP_INDEX, "g", "pk"),
)

# --- expressions: attributes are written #name, and _names() fills ExpressionAttributeNames --

HELD = "#st = :running AND #lt = :token"
NEW_ITEM = "attribute_not_exists(#pk)"
LEASE_IF = "#st = :seen_st AND #va = :seen_va"
LEASE_SET = (
    "SET #st = :running, #at = #at + :one, #sa = :now, #lt = :token, #lw = :worker, "
    "#va = :expires, #v = #v + :one"
)
HEARTBEAT_SET = "SET #va = :until"
REQUEUE_SET = (
    "SET #st = :queued, #at = #at - :give, #ra = :ready, #va = :ready, #ft = :ft, "
    "#v = #v + :one{sets} REMOVE #lt, #lw{removes}"
)
END_SET = "SET #st = :state, #at = #at - :give, #fa = :now, #ft = :ft, #v = #v + :one"
END_REMOVE = "REMOVE #va, #vq, #lt, #lw"  # out of the visibility index
CANCEL_QUEUED_SET = (
    "SET #st = :cancelled, #fa = :now, #dq = #lq, #v = #v + :one{sets} REMOVE #va, #vq"
)
CANCEL_RUNNING_SET = "SET #cr = :true, #v = #v + :one"
CANCEL_RUNNING_IF = "#st = :running AND #cr = :false"
REDRIVE_SET = (
    "SET #st = :queued, #at = :attempts, #ra = :ready, #va = :ready, #vq = #lq, "
    "#v = #v + :one REMOVE #fa, #er, #dq, #xp, #ttl"
)
DROP_SET = "SET #rs = :dropped, #v = #v + :one"
FREE_KEY_SET = "#kf = :true"  # joins a SET: the job no longer holds its key
DROP_IF = "#st = :succeeded AND #v = :seen_v"
SWEEP_IF = "attribute_exists(#xp) AND #x <= :now"
KEY_STALE = "#j = :stale"
KEY_OURS = "#j = :id"
SHARDS_SET = "SET #ns = :ns"
SHARDS_IF = "attribute_not_exists(#ns) OR #ns < :ns"
MARK_SET = "SET #mv = :mv"
MARK_IF = "attribute_not_exists(#mv) OR #mv < :mv"
UNTOUCHED = "#v = :one AND #st = :queued"  # a job no one leased or cancelled since its submit

_NAME_RE = re.compile(r"#(\w+)")


def _names(*expressions: str) -> dict[str, str]:
    return {f"#{n}": n for e in expressions for n in _NAME_RE.findall(e)}


def _expr(
    update: str | None = None, condition: str | None = None, /, **values: Any
) -> dict[str, Any]:
    """Keyword arguments for one request: expressions, their names and their values."""
    kw: dict[str, Any] = {}
    if update is not None:
        kw["UpdateExpression"] = update
    if condition is not None:
        kw["ConditionExpression"] = condition
    names = _names(*(e for e in (update, condition) if e))
    if names:
        kw["ExpressionAttributeNames"] = names
    if values:
        kw["ExpressionAttributeValues"] = {f":{k}": v for k, v in values.items()}
    return kw


# --- the codec ------------------------------------------------------------------------------------


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    # repr() of a float round-trips exactly, so a timestamp reads back as the same float.
    return {"N": str(value) if isinstance(value, int) else repr(float(value))}


def _b(value: bool) -> dict[str, bool]:
    return {"BOOL": value}


def _j(value: Any) -> dict[str, str]:
    return {"S": msgspec.json.encode(value).decode()}


ONE, ZERO, TRUE, FALSE = _n(1), _n(0), _b(True), _b(False)


def _job_key(job_id: str) -> Item:
    return {"pk": _s(f"J#{job_id}"), "sk": _s(JOB_SK)}


def _key_key(key: str) -> Item:
    return {"pk": _s(f"K#{key}"), "sk": _s("K")}


def _partition(queue: str, shard: int) -> str:
    return f"{queue}#{shard}"


def _job_item(new: NewJob, shard: int) -> Item:
    """The item of a freshly submitted job: queued, visible at ``ready_at``, in one shard."""
    part = _s(_partition(new.queue, shard))
    item: Item = {
        **_job_key(new.id),
        "q": _s(new.queue),
        "h": _s(new.handler),
        "st": _s(State.QUEUED.value),
        "pl": _j(new.payload),
        "at": ZERO,
        "ma": _n(new.max_attempts),
        "to": _n(new.timeout),
        "ca": _n(new.created_at),
        "ra": _n(new.ready_at),
        "v": ONE,
        "cr": FALSE,
        "va": _n(new.ready_at),
        "vq": part,
        "lq": part,
    }
    optional: dict[str, dict[str, Any] | None] = {
        "k": _s(new.key) if new.key is not None else None,
        "sy": TRUE if new.sticky else None,
        "mt": _j(new.meta) if new.meta else None,
        "sp": _j(new.steps) if new.steps is not None else None,
        "g": _s(new.group_id) if new.group_id is not None else None,
        "o": _s(new.owner) if new.owner is not None else None,
        "nm": _s(new.name) if new.name is not None else None,
    }
    item.update({k: v for k, v in optional.items() if v is not None})
    return item


def _text(v: dict[str, Any]) -> Any:
    return v["S"]


def _float(v: dict[str, Any]) -> Any:
    return float(v["N"])


def _int(v: dict[str, Any]) -> Any:
    return int(v["N"])


def _json(v: dict[str, Any]) -> Any:
    return msgspec.json.decode(v["S"])


def _bool(v: dict[str, Any]) -> Any:
    return v["BOOL"]


# attribute → (Job field, decoder); the attribute names are short because they are stored (and
# paid for) in every item.
JOB_ATTRS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "q": ("queue", _text),
    "h": ("handler", _text),
    "st": ("state", _text),
    "pl": ("payload", _json),
    "k": ("key", _text),
    "sy": ("sticky", _bool),
    "mt": ("meta", _json),
    "at": ("attempts", _int),
    "ma": ("max_attempts", _int),
    "to": ("timeout", _float),
    "ca": ("created_at", _float),
    "ra": ("ready_at", _float),
    "sa": ("started_at", _float),
    "fa": ("finished_at", _float),
    "pg": ("progress", _json),
    "er": ("error", _json),
    "rs": ("result", _json),
    "sp": ("steps", _json),
    "g": ("group_id", _text),
    "o": ("owner", _text),
    "cr": ("cancel_requested", _bool),
    "v": ("version", _int),
    "x": ("expires_at", _float),
    "nm": ("name", _text),
    "cp": ("checkpoint", _json),
}


def _decode_job(item: Item) -> Job:
    fields: dict[str, Any] = {"id": item["pk"]["S"][2:]}
    for attr, (name, decode) in JOB_ATTRS.items():
        value = item.get(attr)
        if value is not None:
            fields[name] = decode(value)
    return msgspec.convert(fields, Job, strict=False)


def _state(item: Item) -> str:
    return str(item["st"]["S"])


def _holds_key(item: Item | None, now: float) -> bool:
    """Whether a job item still holds its dedupe key (the rule of the memory backend): not
    freed (``kf``), and kept (``kp``: an outcome's ``keep_key``) or not expired (``x``)."""
    if item is None or item.get("kf", FALSE)["BOOL"]:
        return False
    if item.get("kp", FALSE)["BOOL"]:
        return True
    expires = item.get("x")
    return expires is None or float(expires["N"]) > now


# --- converting a batch before its first write ----------------------------------------------------


def _item_size(item: Item) -> int:
    """At least the bytes DynamoDB counts for ``item`` (names and values in UTF-8; a number as
    its text plus one byte, more than DynamoDB's digits / 2 + 1)."""
    total = 0
    for name, value in item.items():
        total += len(name)
        ((kind, v),) = value.items()
        if kind == "S":
            total += len(v) if v.isascii() else len(v.encode())
        elif kind == "N":
            total += len(v) + 1
        else:
            total += 1
    return total


def _storable_number(text: str) -> bool:
    """Whether DynamoDB holds this number: 38 significant digits, magnitude 1E-130 to 1E+126."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return False
    if not number.is_finite():
        return False
    if number.is_zero():
        return True
    digits = len(number.normalize().as_tuple().digits)
    return digits <= NUMBER_DIGITS and -130 <= number.adjusted() <= 125


def _check_item(item: Item, what: str) -> int:
    """``item``'s size, once it is known to fit DynamoDB's limits; else :class:`Unstorable`."""
    size = _item_size(item)
    if size > ITEM_MAX:
        raise Unstorable(
            f"{what} is {size} bytes as a DynamoDB item, which holds at most 400 KB ({ITEM_MAX})"
        )
    for name, value in item.items():
        if "N" in value and not _storable_number(value["N"]):
            raise Unstorable(f"{what}: {value['N']} is not a number DynamoDB can hold ({name})")
    return size


def _group_item(record: GroupRecord) -> Item:
    return {"pk": _s(f"G#{record.id}"), "sk": _s(GROUP_SK), "rec": _j(record)}


def _group_size(group: GroupRecord, jobs: Sequence[NewJob]) -> int:
    """The size of ``group``'s item, checked: members are ids, so naming other jobs (those
    answering for members) does not change it."""
    storable_group(group, jobs)
    return _check_item(_group_item(group), "the group record")


@dataclass(frozen=True)
class _Unit:
    """One job of a batch, converted: its first record, its item, and the bytes it and its key
    item take in a transaction."""

    index: int
    new: NewJob
    job: Job
    item: Item
    size: int

    @property
    def actions(self) -> int:
        return 1 if self.new.key is None else 2

    @classmethod
    def of(cls, index: int, new: NewJob, shard: int) -> _Unit:
        job = storable_job(new)
        item = _job_item(new, shard)
        size = _check_item(item, "the job")
        if new.key is not None:
            key_item = {**_key_key(new.key), "j": _s(new.id)}
            if len(key_item["pk"]["S"].encode()) > KEY_MAX:
                raise Unstorable(f"key: at most {KEY_MAX - 2} bytes on DynamoDB")
            size += _item_size(key_item)
        return cls(index, new, job, item, size)


@dataclass
class _Batch:
    """One ``enqueue`` of several jobs: the units to store (every job, but for a key repeated
    in the batch, only its first), the group, and the units a live job answers for."""

    jobs: Sequence[NewJob]
    units: list[_Unit]
    repeats: dict[int, int]  # index of a job repeating a key → index of its first job
    group: GroupRecord | None
    held: dict[int, Enqueued] = field(default_factory=dict)

    @classmethod
    def of(cls, jobs: Sequence[NewJob], units: list[_Unit], group: GroupRecord | None) -> _Batch:
        first: dict[str, int] = {}
        repeats: dict[int, int] = {}
        own: list[_Unit] = []
        for unit in units:
            key = unit.new.key
            if key is not None and key in first:
                repeats[unit.index] = first[key]
                continue
            if key is not None:
                first[key] = unit.index
            own.append(unit)
        return cls(jobs, own, repeats, group)

    def answering(self) -> list[str]:
        """The id of the job answering for each job of the batch, as known so far."""
        ids = []
        for i in range(len(self.jobs)):
            first = self.repeats.get(i, i)
            held = self.held.get(first)
            ids.append(held.job.id if held is not None else self.jobs[first].id)
        return ids

    def answers(self, stored: dict[int, Enqueued]) -> list[Enqueued]:
        out = []
        for i in range(len(self.jobs)):
            first = self.repeats.get(i, i)
            entry = stored[first] if first in stored else self.held[first]
            out.append(entry if first == i else Enqueued(entry.job, created=False))
        return out


def _chunks(units: Sequence[_Unit]) -> list[list[_Unit]]:
    """Units in groups that each fit one transaction; a job travels with its key."""
    chunks: list[list[_Unit]] = []
    actions = size = 0
    for unit in units:
        if chunks and actions + unit.actions <= TRANSACT_MAX and size + unit.size <= TRANSACT_BYTES:
            chunks[-1].append(unit)
            actions, size = actions + unit.actions, size + unit.size
        else:
            chunks.append([unit])
            actions, size = unit.actions, unit.size
    return chunks


Refusal = tuple[str, "_Unit | None", str | None]  # ("key" | "job" | "record", unit, key holder)


def _refusals(
    reasons: list[dict[str, Any]], plan: Sequence[tuple[dict[str, Any], _Unit | None]]
) -> list[Refusal]:
    """What a cancelled transaction says about each of its actions (DynamoDB answers one reason
    per action, in order): the puts refused by their condition. A conflict with another
    transaction refuses nothing (the next try may pass); any other reason is raised."""
    refused: list[Refusal] = []
    for reason, (action, unit) in zip(reasons, plan, strict=False):
        code = reason.get("Code") or "None"
        if code in ("None", "TransactionConflict"):
            continue
        if code != "ConditionalCheckFailed":
            error = BackendUnavailable if code in THROTTLED_REASONS else BackendError
            raise error(f"dynamodb transact_write_items: {code}: {reason.get('Message', '')}")
        if unit is None:
            refused.append(("record", None, None))
        elif action["Put"]["Item"]["pk"]["S"].startswith("K#"):
            holder = (reason.get("Item") or {}).get("j")
            refused.append(("key", unit, None if holder is None else str(holder["S"])))
        else:
            refused.append(("job", unit, None))
    return refused


# --- errors ---------------------------------------------------------------------------------------

UNAVAILABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "LimitExceededException",
        "TransactionInProgressException",
    }
)
# A cancelled transaction's per-action reasons that mean "later", not "no".
THROTTLED_REASONS = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded"})


class _ConditionFailed(Exception):
    """A conditional write was refused; ``item`` is the item as it stood (if it exists)."""

    def __init__(self, item: Item | None) -> None:
        super().__init__("condition failed")
        self.item = item


class _Cancelled(Exception):
    """A transaction was refused; ``reasons`` are DynamoDB's, one per action."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons


def _refusal(op: str, answer: aws.Refusal) -> Exception | None:
    """DynamoDB's own refusals: a failed condition, a cancelled transaction, a missing table."""
    if answer.code == "ConditionalCheckFailedException":
        return _ConditionFailed(answer.response.get("Item"))
    if answer.code == "TransactionCanceledException":
        return _Cancelled(answer.response.get("CancellationReasons") or [])
    if answer.code == "ResourceNotFoundException":
        return BackendError(f"dynamodb {op}: the table does not exist (run `arqd init-aws`)")
    return None


def _translate(op: str, exc: BaseException) -> Exception:
    """Map one botocore failure to an arqd error (or an internal refusal)."""
    return aws.translate("dynamodb", op, exc, unavailable=UNAVAILABLE_CODES, refine=_refusal)


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DynamoSettings:
    """Where the table is and how to talk to it; ``stores.make_queue`` builds it from config."""

    table: str = "arqd"
    region: str | None = None
    endpoint_url: str | None = None
    shards: int = 8
    access_key_id: str | None = None  # None: botocore's usual credential chain
    secret_access_key: str | None = None
    retry_mode: str = "standard"  # botocore's: "standard" or "adaptive"
    max_attempts: int = 8  # per request, the first one included
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    create_missing: bool | None = None  # create the table on open; default: with endpoint_url


def _client_config(s: DynamoSettings, *, attempts: int | None = None, timeout: float = 0) -> Any:
    return aws.client_config(
        s, attempts=attempts, timeout=timeout, max_pool_connections=MAX_PARALLEL * 2
    )


# --- small helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grant:
    """One lease call: its token, its time and the lease expiry it writes."""

    token: str
    now: float
    expires: float
    worker: str


@dataclass(frozen=True, order=True)
class _Candidate:
    """A visible job as the ``vis`` index showed it (possibly stale)."""

    va: float
    job_id: str
    raw_va: dict[str, str] = field(compare=False)
    state: str = field(compare=False)


@dataclass(frozen=True)
class _ListPlan:
    """Where list_jobs reads: one index, its partitions, and a state to filter on."""

    index: str
    hash_attr: str
    partitions: list[str]
    state: State | None = None


class _Counts(StateCounts):
    """Per-(queue, state) changes made by this process and not yet written to the ``Q`` items."""

    def take(self) -> dict[str, dict[str, int]]:
        by_queue = self.by_queue()
        self.clear()
        return by_queue

    def give_back(self, by_queue: dict[str, dict[str, int]]) -> None:
        for queue, per in by_queue.items():
            for state, n in per.items():
                self.add(queue, state, n)


def _lease_fifo(lease: Lease) -> tuple[datetime, str]:
    return fifo(lease.job)


def _ttl(expires_at: float) -> dict[str, str]:
    return _n(math.ceil(expires_at))


# --- the backend ----------------------------------------------------------------------------------


class DynamoQueue(QueueBackend):
    """Job records in one DynamoDB table; see the module docstring and ``docs/dynamodb.md``."""

    name = "dynamodb"
    multi_host = True

    def __init__(self, settings: DynamoSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self.table = settings.table
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._ping_client: Any = None
        self._limit = asyncio.Semaphore(MAX_PARALLEL)
        self._counts = _Counts()
        self._flusher: asyncio.Task[None] | None = None
        self._registered: set[str] = set()
        self._shards: dict[str, tuple[float, int]] = {}
        # (job id, token) → the lease expiry this process last wrote: heartbeats skip rewrites
        # of fresh leases, and a retried finish is counted only once.
        self._extended: dict[tuple[str, str], float] = {}
        self._drop_cursor: dict[bool, str] = {}  # where drop_results' walk goes on, per flag
        self._ended: OrderedDict[tuple[str, str], None] = OrderedDict()  # see ENDED_MEMORY

    @property
    def identity(self) -> str:
        where = self.settings.endpoint_url or self.settings.region or "default"
        return f"dynamodb:{where}/{self.table}"

    @property
    def client(self) -> Any:
        """The aiobotocore client once open, for instrumentation (benchmarks hook its events)."""
        return self._client

    async def open(self) -> None:
        s = self.settings
        with aws.remembering_open_failure(self.identity):
            clients = await aws.open_clients(self._stack, "dynamodb", s, _client_config)
            self._client, self._ping_client = clients
            create = (
                s.create_missing if s.create_missing is not None else s.endpoint_url is not None
            )
            if create:
                await ensure_table(self._client, self.table)
        self._flusher = asyncio.create_task(self._flush_loop(), name="arqd-dynamodb-counts")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
            with contextlib.suppress(BackendError):
                await self._flush_counts()
        await self._stack.aclose()
        self._client = self._ping_client = None

    # --- requests ---------------------------------------------------------------------------------

    async def _call(self, op: str, client: Any = None, **kw: Any) -> dict[str, Any]:
        """One request (botocore retries it); failures leave as arqd errors."""
        if self._client is None:
            raise aws.not_open("the dynamodb backend", self.identity)
        try:
            async with self._limit:
                result: dict[str, Any] = await getattr(client or self._client, op)(**kw)
                return result
        except aws.driver_errors() as exc:
            raise _translate(op, exc) from exc

    async def _update_item(self, key: Item, **kw: Any) -> Item:
        """A conditional UpdateItem answering the new item; refusals carry the old one."""
        out = await self._call(
            "update_item",
            TableName=self.table,
            Key=key,
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            **kw,
        )
        return dict(out["Attributes"])

    async def _get_item(self, key: Item, *, consistent: bool = True) -> Item | None:
        out = await self._call("get_item", TableName=self.table, Key=key, ConsistentRead=consistent)
        item = out.get("Item")
        return None if item is None else dict(item)

    async def _batch_get(
        self, keys: Sequence[Item], *, consistent: bool, projection: str | None = None
    ) -> dict[str, Item]:
        """Items by ``pk`` (missing ones absent), 100 keys per request, unprocessed ones retried."""
        found: dict[str, Item] = {}
        chunks = [list(keys[i : i + 100]) for i in range(0, len(keys), 100)]

        async def fetch(chunk: list[Item]) -> None:
            request: dict[str, Any] = {"Keys": chunk, "ConsistentRead": consistent}
            if projection:
                request["ProjectionExpression"] = projection
                request["ExpressionAttributeNames"] = _names(projection)
            for attempt in range(10):
                out = await self._call("batch_get_item", RequestItems={self.table: request})
                for item in out.get("Responses", {}).get(self.table, []):
                    found[item["pk"]["S"]] = item
                rest = out.get("UnprocessedKeys", {}).get(self.table)
                if not rest:
                    return
                request = rest
                await asyncio.sleep(0.05 * 2**attempt)
            raise BackendUnavailable("dynamodb batch_get_item: keys left unprocessed")

        await asyncio.gather(*(fetch(c) for c in chunks))
        return found

    async def _query_all(self, **kw: Any) -> list[Item]:
        items: list[Item] = []
        while True:
            out = await self._call("query", TableName=self.table, **kw)
            items.extend(out.get("Items", []))
            last = out.get("LastEvaluatedKey")
            if not last:
                return items
            kw["ExclusiveStartKey"] = last

    # --- counters and the queue registry ----------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(COUNTS_FLUSH)
            with contextlib.suppress(BackendError):
                await self._flush_counts()

    async def _flush_counts(self) -> None:
        by_queue = self._counts.take()
        failed: dict[str, dict[str, int]] = {}

        async def write(queue: str, per: dict[str, int]) -> None:
            update = "ADD " + ", ".join(f"#{state} :{state}" for state in per)
            values = {state: _n(n) for state, n in per.items()}
            try:
                await self._call(
                    "update_item",
                    TableName=self.table,
                    Key={"pk": _s(QUEUES_PK), "sk": _s(queue)},
                    **_expr(update, **values),
                )
            except BackendError:
                failed[queue] = per

        await asyncio.gather(*(write(q, per) for q, per in by_queue.items()))
        self._counts.give_back(failed)
        if failed:
            raise BackendUnavailable("dynamodb: queue counters not written; kept for the next try")

    async def _register(self, queues: Iterable[str]) -> None:
        """Make each queue known to stats/list (once per process), with its shard count."""

        async def register(queue: str) -> None:
            with contextlib.suppress(_ConditionFailed):
                await self._call(
                    "update_item",
                    TableName=self.table,
                    Key={"pk": _s(QUEUES_PK), "sk": _s(queue)},
                    **_expr(SHARDS_SET, SHARDS_IF, ns=_n(self.settings.shards)),
                )
            self._registered.add(queue)

        await asyncio.gather(*(register(q) for q in set(queues) - self._registered))

    async def _shard_count(self, queue: str) -> int:
        """Shards to read for ``queue``: the most any process ever wrote to, or ours."""
        now = self.clock.time()
        cached = self._shards.get(queue)
        if cached is not None and now - cached[0] < SHARDS_REFRESH:
            return cached[1]
        item = await self._get_item({"pk": _s(QUEUES_PK), "sk": _s(queue)}, consistent=False)
        stored = int(item["ns"]["N"]) if item and "ns" in item else 0
        count = max(stored, self.settings.shards)
        self._shards[queue] = (now, count)
        return count

    async def _partitions(self, queue: str) -> list[str]:
        """Every "<queue>#<shard>" partition any process may have written ``queue``'s jobs to."""
        return [_partition(queue, s) for s in range(await self._shard_count(queue))]

    async def _queues(self) -> list[str]:
        """Every queue that ever had a job (the ``Q`` items)."""
        items = await self._query_all(
            ConsistentRead=True, KeyConditionExpression="#pk = :pk", **_pk_values(QUEUES_PK)
        )
        return [item["sk"]["S"] for item in items]

    @staticmethod
    async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
        """Run requests side by side (``_call`` bounds how many are in flight)."""
        return list(await asyncio.gather(*calls))

    # --- submit -----------------------------------------------------------------------------------

    async def _enqueue(
        self, jobs: Sequence[NewJob], group: GroupRecord | None = None
    ) -> list[Enqueued]:
        """Every item is converted and checked against DynamoDB's limits before the first
        write. One job alone is one conditional write (a transaction with its key, if any);
        a batch or a group is one ``TransactWriteItems`` while it fits one (100 items, 4 MB:
        jobs, keys and the record), else several run side by side and, should one fail, what
        the others stored is removed again (best effort: ``docs/dynamodb.md`` §3)."""
        shards = self.settings.shards
        units = convert_all(
            list(enumerate(jobs)), lambda pair: _Unit.of(*pair, random.randrange(shards))
        )
        record_size = _group_size(group, jobs) if group is not None else 0
        now = self.clock.time()
        await self._register(j.queue for j in jobs)
        if group is None and len(units) == 1:
            return [await self._put_one(units[0], now)]
        batch = _Batch.of(jobs, units, group)
        actions = sum(u.actions for u in batch.units) + (group is not None)
        size = sum(u.size for u in batch.units) + record_size
        if actions <= TRANSACT_MAX and size <= TRANSACT_BYTES:
            stored = await self._transact(batch, batch.units, now, with_record=True)
        else:
            stored = await self._store_chunked(batch, now)
        return batch.answers(stored)

    async def _put_one(self, unit: _Unit, now: float) -> Enqueued:
        if unit.new.key is not None:
            return await self._put_keyed(unit, now)
        return await self._put_plain(unit)

    def _put_job(self, unit: _Unit) -> dict[str, Any]:
        return {"TableName": self.table, "Item": unit.item, **_expr(None, NEW_ITEM)}

    async def _put_plain(self, unit: _Unit) -> Enqueued:
        try:
            await self._call("put_item", **self._put_job(unit))
        except _ConditionFailed:  # ids are unique: a retry found our own put, already counted
            return Enqueued(unit.job, created=True)
        self._counts.add(unit.new.queue, State.QUEUED.value)
        return Enqueued(unit.job, created=True)

    async def _put_keyed(self, unit: _Unit, now: float) -> Enqueued:
        """Take the key and store the job in one transaction; a live holder answers instead."""
        new = unit.new
        assert new.key is not None
        stale: str | None = None
        for _ in range(KEY_TRIES):
            key_put = self._put_key(new.key, new.id, stale)
            try:
                await self._call(
                    "transact_write_items",
                    TransactItems=[{"Put": key_put}, {"Put": self._put_job(unit)}],
                )
                self._counts.add(new.queue, State.QUEUED.value)
                return Enqueued(unit.job, created=True)
            except _Cancelled as exc:
                holder = _key_holder_id(exc.reasons)
            if holder == new.id:  # our own earlier attempt landed (its answer was lost)
                return Enqueued(unit.job, created=True)
            if holder is not None:
                item = await self._get_item(_job_key(holder))
                if _holds_key(item, now):
                    assert item is not None
                    return Enqueued(_decode_job(item), created=False)
            stale = holder
        raise BackendUnavailable(f"dedupe key {new.key!r} is contended; try again")

    async def _transact(
        self, batch: _Batch, units: Sequence[_Unit], now: float, *, with_record: bool
    ) -> dict[int, Enqueued]:
        """Store ``units`` (and, ``with_record``, the group record) in one transaction; answers
        the jobs stored, by index. A key held by a live job takes its unit out (``batch.held``)
        and the transaction is tried again without it; a key whose holder let it go is taken
        over (conditional on the holder's id). A unit found already stored was stored by an
        earlier try whose answer was lost (ids are unique)."""
        stale: dict[int, str] = {}
        landed: set[int] = set()
        record_landed = not with_record or batch.group is None
        for _ in range(TRANSACT_ROUNDS):
            todo = [u for u in units if u.index not in batch.held and u.index not in landed]
            plan = self._plan(batch, todo, stale, with_record=not record_landed)
            if not plan:
                break
            try:
                await self._call("transact_write_items", TransactItems=[a for a, _ in plan])
                break
            except _Cancelled as exc:
                refused = _refusals(exc.reasons, plan)
            holders: dict[int, str] = {}
            for kind, unit, holder in refused:
                if unit is None:
                    record_landed = True  # the record exists: written by a lost try of ours
                elif kind == "job" or holder == unit.new.id:
                    landed.add(unit.index)  # a lost try of ours stored it (ids are unique)
                elif holder is None:
                    stale.pop(unit.index, None)  # the key item is gone: take the key afresh
                else:
                    holders[unit.index] = holder
            await self._resolve_holders(batch, holders, stale, now)
        else:
            raise BackendUnavailable("dynamodb: the batch's dedupe keys changed hands; try again")
        stored = [u for u in units if u.index not in batch.held]
        for unit in stored:
            self._counts.add(unit.new.queue, State.QUEUED.value)
        return {u.index: Enqueued(u.job, created=True) for u in stored}

    def _plan(
        self, batch: _Batch, todo: Sequence[_Unit], stale: dict[int, str], *, with_record: bool
    ) -> list[tuple[dict[str, Any], _Unit | None]]:
        """The actions of one transaction, each with the unit it stores (None: the record).
        Refused puts answer the item they found (``ALL_OLD``), which says who holds a key."""
        plan: list[tuple[dict[str, Any], _Unit | None]] = []
        for unit in todo:
            if unit.new.key is not None:
                key_put = self._put_key(unit.new.key, unit.new.id, stale.get(unit.index))
                plan.append(({"Put": key_put}, unit))
            job_put = {**self._put_job(unit), "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}
            plan.append(({"Put": job_put}, unit))
        if with_record:
            plan.append(({"Put": self._put_record(batch)}, None))
        return plan

    def _put_record(self, batch: _Batch) -> dict[str, Any]:
        assert batch.group is not None
        record = group_record(batch.group, batch.answering())
        return {"TableName": self.table, "Item": _group_item(record), **_expr(None, NEW_ITEM)}

    async def _resolve_holders(
        self, batch: _Batch, holders: dict[int, str], stale: dict[int, str], now: float
    ) -> None:
        """For each unit whose key another job pointed at: that job answers for it while it
        holds the key; else the next try takes the key over from it."""
        found = await self._all(self._get_item(_job_key(h)) for h in holders.values())
        for (index, holder), item in zip(holders.items(), found, strict=True):
            if item is not None and _holds_key(item, now):
                batch.held[index] = Enqueued(_decode_job(item), created=False)
            else:
                stale[index] = holder

    async def _store_chunked(self, batch: _Batch, now: float) -> dict[int, Enqueued]:
        """A batch too large for one transaction: transactions side by side, then the record.
        If any write fails, the jobs the others stored are removed before the error is raised,
        as far as they can be (see ``_unstore``)."""
        chunks = _chunks(batch.units)
        results = await asyncio.gather(
            *(self._transact(batch, c, now, with_record=False) for c in chunks),
            return_exceptions=True,
        )
        stored: dict[int, Enqueued] = {}
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                stored.update(result)
        if failure is None and batch.group is not None:
            try:
                with contextlib.suppress(_ConditionFailed):  # a lost try of ours wrote it
                    await self._call("put_item", **self._put_record(batch))
            except Exception as exc:
                failure = exc
        if failure is not None:
            await self._unstore(batch, set(stored))
            raise failure
        return stored

    async def _unstore(self, batch: _Batch, counted: set[int]) -> None:
        """Delete what a failed batch may have stored: every job of it (those of a transaction
        whose answer was lost too, since it may have landed), each only if nothing touched it
        yet (queued, version 1: no consumer leased it, no one cancelled it), then its key; and
        the group record. A job that is not there refuses the delete's condition. Best effort:
        a job already leased, or a delete that fails, stays. ``counted``: the jobs counted as
        queued, to uncount."""

        async def undo(unit: _Unit) -> None:
            values = {"one": ONE, "queued": _s(State.QUEUED.value)}
            try:
                await self._call(
                    "delete_item",
                    TableName=self.table,
                    Key=_job_key(unit.new.id),
                    **_expr(None, UNTOUCHED, **values),
                )
            except (_ConditionFailed, BackendError):
                return
            if unit.index in counted:
                self._counts.add(unit.new.queue, State.QUEUED.value, -1)
            if unit.new.key is not None:
                await self._tidy_key(unit.new.key, unit.new.id, free=True, expires_at=None)

        async def undo_record(group: GroupRecord) -> None:
            key = {"pk": _s(f"G#{group.id}"), "sk": _s(GROUP_SK)}
            with contextlib.suppress(BackendError):
                await self._call("delete_item", TableName=self.table, Key=key)

        held = batch.held
        await self._all(undo(u) for u in batch.units if u.index not in held)
        if batch.group is not None:
            await undo_record(batch.group)

    def _put_key(self, key: str, job_id: str, stale: str | None) -> dict[str, Any]:
        """The key item pointing at ``job_id``: new, or replacing a holder that let it go."""
        put: dict[str, Any] = {
            "TableName": self.table,
            "Item": {**_key_key(key), "j": _s(job_id)},
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        if stale is None:
            put.update(_expr(None, NEW_ITEM))
        else:
            put.update(_expr(None, KEY_STALE, stale=_s(stale)))
        return put

    async def _take_key(self, key: str, job_id: str, now: float) -> bool:
        """Point ``key`` at ``job_id`` unless a live job holds it (used by redrive)."""
        stale: str | None = None
        for _ in range(KEY_TRIES):
            put = self._put_key(key, job_id, stale)
            try:
                await self._call("put_item", **put)
                return True
            except _ConditionFailed as exc:
                holder = exc.item["j"]["S"] if exc.item else None
            if holder == job_id:
                return True
            if holder is not None and _holds_key(await self._get_item(_job_key(holder)), now):
                return False
            stale = holder
        return False

    # --- leasing ----------------------------------------------------------------------------------

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        now = self.clock.time()
        grant = _Grant(new_token(), now, now + lease_for, worker)
        out: list[Lease] = []
        try:
            for queue in queues:
                if len(out) >= limit:
                    break
                out += await self._lease_queue(queue, limit - len(out), grant)
        except BackendError:
            if not out:
                raise
            # Leases already won are answered: dropping them would strand their jobs until
            # their leases expire. The failure shows again on the next call.
        for lease in out:
            self._extended[lease.job.id, grant.token] = grant.expires
        return out

    async def _lease_queue(self, queue: str, want: int, grant: _Grant) -> list[Lease]:
        shards = await self._shard_count(queue)
        start = random.randrange(shards)
        order = [(start + i) % shards for i in range(shards)]
        got: list[Lease] = []
        try:
            for first in range(0, shards, LEASE_FANOUT):
                wave = order[first : first + LEASE_FANOUT]
                await self._lease_wave(queue, wave, want, grant, got)
                if len(got) >= want:
                    break
        except BackendError:
            if not got:
                raise
        return sorted(got, key=_lease_fifo)

    async def _lease_wave(
        self, queue: str, shards: list[int], want: int, grant: _Grant, got: list[Lease]
    ) -> None:
        """Lease the oldest visible jobs of these shards into ``got`` (so a failure keeps what
        was won).

        The first round reads every shard of the wave and tries the oldest jobs. Once a race is
        lost, other consumers are taking the oldest jobs too and FIFO order is theirs to keep:
        each later round reads one random shard, wider, and tries its jobs in random order, so a
        crowd of consumers spreads out instead of colliding on the same few items. A shard that
        has nothing (more) to give is dropped from the wave."""
        pending = list(shards)
        contended = False
        for _ in range(LEASE_ROUNDS + len(shards)):
            read = [random.choice(pending)] if contended else pending
            n = want - len(got)
            candidates = await self._candidates(
                queue, read, n * (CONTENDED_SPREAD if contended else 1), grant
            )
            if contended:
                random.shuffle(candidates)
            lost = 0
            while candidates and len(got) < want and not lost:
                n = want - len(got)
                batch, candidates = candidates[:n], candidates[n:]
                won = await self._lease_batch(queue, batch, grant)
                got += won
                lost = len(batch) - len(won)
            if len(got) >= want or (not contended and not lost):
                return  # filled, or took all there was
            if lost:
                contended = True  # the rest of this read is going stale: read again
            else:
                pending.remove(read[0])  # this shard is drained
                if not pending:
                    return

    async def _candidates(
        self, queue: str, shards: list[int], want: int, grant: _Grant
    ) -> list[_Candidate]:
        """Up to ``want`` visible entries of each shard (from the eventually consistent index),
        merged oldest first."""

        async def read(shard: int) -> list[Item]:
            out = await self._call(
                "query",
                TableName=self.table,
                IndexName=VIS_INDEX,
                Limit=want,
                KeyConditionExpression="#vq = :vq AND #va <= :now",
                ExpressionAttributeNames={"#vq": "vq", "#va": "va"},
                ExpressionAttributeValues={
                    ":vq": _s(_partition(queue, shard)),
                    ":now": _n(grant.now),
                },
            )
            return list(out.get("Items", []))

        pages = await asyncio.gather(*(read(s) for s in shards))
        return sorted(
            _Candidate(float(i["va"]["N"]), i["pk"]["S"][2:], i["va"], i["st"]["S"])
            for page in pages
            for i in page
        )

    async def _lease_batch(self, queue: str, batch: list[_Candidate], grant: _Grant) -> list[Lease]:
        """Try every candidate at once; a failed request loses only its own job."""
        results = await asyncio.gather(
            *(self._lease_one(c, grant) for c in batch), return_exceptions=True
        )
        won: list[Lease] = []
        errors: list[BaseException] = []
        for cand, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(result)
            elif result is not None:
                won.append(result)
                if cand.state == State.QUEUED.value:
                    self._counts.move(queue, State.QUEUED.value, State.RUNNING.value)
        if errors and not won:
            raise errors[0]
        return won

    async def _lease_one(self, cand: _Candidate, grant: _Grant) -> Lease | None:
        values = {
            "seen_st": _s(cand.state),
            "seen_va": cand.raw_va,
            "running": _s(State.RUNNING.value),
            "one": ONE,
            "now": _n(grant.now),
            "token": _s(grant.token),
            "worker": _s(grant.worker),
            "expires": _n(grant.expires),
        }
        try:
            item = await self._update_item(
                _job_key(cand.job_id), **_expr(LEASE_SET, LEASE_IF, **values)
            )
        except _ConditionFailed as exc:
            if exc.item is None or exc.item.get("lt") != _s(grant.token):
                return None  # another consumer was first, or the index was stale
            item = exc.item  # our write landed and its answer was lost: the lease is ours
        recovered = cand.state == State.RUNNING.value  # its previous lease expired
        return Lease(_decode_job(item), grant.token, grant.expires, recovered)

    # --- while running ----------------------------------------------------------------------------

    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        now = self.clock.time()
        until = now + lease_for
        rewrite_before = now + lease_for * (1 - HEARTBEAT_REWRITE)
        replies: dict[int, HeartbeatReply] = {}
        checks: list[int] = []
        writes: list[Awaitable[HeartbeatReply]] = []
        rewrite: list[int] = []
        for i, (job_id, token) in enumerate(leases):
            if (job_id, token) in self._ended:
                replies[i] = HeartbeatReply(held=False, cancel_requested=False)
            elif self._extended.get((job_id, token), 0.0) >= rewrite_before:
                checks.append(i)
            else:
                rewrite.append(i)
                writes.append(self._extend(job_id, token, until))
        replies.update(zip(rewrite, await self._all(writes), strict=True))
        replies.update(zip(checks, await self._check([leases[i] for i in checks]), strict=True))
        return [replies[i] for i in range(len(leases))]

    async def _extend(self, job_id: str, token: str, until: float) -> HeartbeatReply:
        values = {"until": _n(until), "running": _s(State.RUNNING.value), "token": _s(token)}
        try:
            item = await self._update_item(_job_key(job_id), **_expr(HEARTBEAT_SET, HELD, **values))
        except _ConditionFailed:
            self._extended.pop((job_id, token), None)
            return HeartbeatReply(held=False, cancel_requested=False)
        self._extended[job_id, token] = until
        return HeartbeatReply(held=True, cancel_requested=bool(item.get("cr", FALSE)["BOOL"]))

    async def _check(self, leases: Sequence[tuple[str, str]]) -> list[HeartbeatReply]:
        """Answer heartbeats of fresh leases from one consistent read instead of a write."""
        if not leases:
            return []
        items = await self._batch_get(
            [_job_key(job_id) for job_id, _ in leases], consistent=True, projection="pk, st, lt, cr"
        )
        replies = []
        for job_id, token in leases:
            item = items.get(f"J#{job_id}")
            held = (
                item is not None
                and _state(item) == State.RUNNING.value
                and item.get("lt") == _s(token)
            )
            cancel = held and item is not None and bool(item.get("cr", FALSE)["BOOL"])
            replies.append(HeartbeatReply(held=held, cancel_requested=cancel))
        return replies

    async def _update(self, updates: Sequence[Update]) -> list[bool]:
        async def one(u: Update) -> bool:
            values: dict[str, Any] = {
                "one": ONE,
                "running": _s(State.RUNNING.value),
                "token": _s(u.token),
            }
            sets = ["#v = #v + :one"]
            if u.progress is not None:
                sets.append("#pg = :pg")
                values["pg"] = _j(u.progress)
            if u.steps is not None:
                sets += ["#sp = :sp", "#cp = :cp"]
                values.update(sp=_j(u.steps), cp=_j(u.checkpoint or {}))
            update = "SET " + ", ".join(sets)
            try:
                await self._update_item(_job_key(u.job_id), **_expr(update, HELD, **values))
            except _ConditionFailed:
                return False
            return True

        return await self._all(one(u) for u in updates)

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        now = self.clock.time()
        return await self._all(self._finish_one(o, now) for o in outcomes)

    async def _finish_one(self, o: Outcome, now: float) -> bool:
        job = o.job
        update, values = _finish_update(o, now)
        mark = _s(_fingerprint(o))
        values.update(running=_s(State.RUNNING.value), token=_s(o.token), ft=mark)
        fresh = True
        try:
            await self._update_item(_job_key(job.id), **_expr(update, HELD, **values))
        except _ConditionFailed as exc:
            if exc.item is None or exc.item.get("ft") != mark:
                return False  # fenced: this lease no longer holds the job
            fresh = False  # this very outcome landed earlier and its answer was lost
        # Count a transition once: a caller's retry of an applied finish must not count it again.
        if self._extended.pop((job.id, o.token), None) is not None or fresh:
            self._counts.move(job.queue, State.RUNNING.value, o.state.value)
        self._ended[job.id, o.token] = None
        if len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        if job.key is not None and o.state.terminal:
            await self._tidy_key(job.key, job.id, free=o.free_key, expires_at=o.expires_at)
        return True

    async def _tidy_key(
        self, key: str, job_id: str, *, free: bool, expires_at: float | None
    ) -> None:
        """Delete a freed key item, or give it the result's TTL. Best effort: whether a key is
        held is decided by its job, so a failure here changes no answer."""
        cond = _expr(None, KEY_OURS, id=_s(job_id))
        with contextlib.suppress(_ConditionFailed, BackendError):
            if free:
                await self._call("delete_item", TableName=self.table, Key=_key_key(key), **cond)
            elif expires_at is not None:
                kw = _expr("SET #ttl = :ttl", KEY_OURS, ttl=_ttl(expires_at), id=_s(job_id))
                await self._call("update_item", TableName=self.table, Key=_key_key(key), **kw)

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        values: dict[str, Any] = {
            "cancelled": _s(State.CANCELLED.value),
            "queued": _s(State.QUEUED.value),
            "now": _n(self.clock.time()),
            "one": ONE,
        }
        sets = ""
        if free_key:
            sets, values["true"] = f", {FREE_KEY_SET}", TRUE
        try:
            kw = _expr(CANCEL_QUEUED_SET.format(sets=sets), "#st = :queued", **values)
            item = await self._update_item(_job_key(job_id), **kw)
        except _ConditionFailed as exc:
            if exc.item is None:
                return None
            return await self._cancel_running(job_id, exc.item)
        job = _decode_job(item)
        self._counts.move(job.queue, State.QUEUED.value, State.CANCELLED.value)
        if free_key and job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _cancel_running(self, job_id: str, item: Item) -> Job:
        if _state(item) != State.RUNNING.value or item.get("cr", FALSE)["BOOL"]:
            return _decode_job(item)
        values = {"true": TRUE, "false": FALSE, "running": _s(State.RUNNING.value), "one": ONE}
        try:
            kw = _expr(CANCEL_RUNNING_SET, CANCEL_RUNNING_IF, **values)
            return _decode_job(await self._update_item(_job_key(job_id), **kw))
        except _ConditionFailed as exc:  # it ended (or was asked to) meanwhile
            return _decode_job(exc.item) if exc.item else _decode_job(item)

    async def _delete(self, job_id: str) -> Job | None:
        item = await self._get_item(_job_key(job_id))
        if item is None:
            return None
        job = _decode_job(item)
        if not job.state.terminal:
            return job
        try:
            await self._call(
                "delete_item",
                TableName=self.table,
                Key=_job_key(job_id),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **_expr(None, "#st = :seen", seen=_s(job.state.value)),
            )
        except _ConditionFailed as exc:  # redriven meanwhile: not terminal any more
            return _decode_job(exc.item) if exc.item else None
        self._counts.add(job.queue, job.state.value, -1)
        if job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _redrive(self, plan: Redrive) -> int:
        now, queue = self.clock.time(), plan.queue
        failed = await self._dead_ids(queue, State.FAILED)

        async def one(job_id: str) -> bool:
            values = {
                "queued": _s(State.QUEUED.value),
                "failed": _s(State.FAILED.value),
                "attempts": _n(plan.attempts),
                "ready": _n(plan.ready_at),
                "one": ONE,
            }
            try:
                kw = _expr(REDRIVE_SET, "#st = :failed", **values)
                item = await self._update_item(_job_key(job_id), **kw)
            except _ConditionFailed:
                return False  # deleted or redriven by someone else meanwhile
            self._counts.move(queue, State.FAILED.value, State.QUEUED.value)
            key = item.get("k") if plan.take_keys else None
            if key is not None and await self._take_key(key["S"], job_id, now):
                kw = _expr("REMOVE #kf")
                await self._call("update_item", TableName=self.table, Key=_job_key(job_id), **kw)
            return True

        return sum(await self._all(one(i) for i in failed))

    async def _dead_ids(self, queue: str, state: State) -> list[str]:
        """Ids of ``queue``'s jobs in ``state`` (failed or cancelled), from every shard."""

        async def ids(partition: str) -> list[str]:
            items = await self._query_all(
                IndexName=DEAD_INDEX,
                KeyConditionExpression="#dq = :dq",
                FilterExpression="#st = :st",
                ExpressionAttributeNames={"#dq": "dq", "#st": "st"},
                ExpressionAttributeValues={":dq": _s(partition), ":st": _s(state.value)},
            )
            return [item["pk"]["S"][2:] for item in items]

        pages = await self._all(ids(p) for p in await self._partitions(queue))
        return [i for page in pages for i in page]

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        item = await self._get_item(_job_key(job_id))
        return None if item is None else _decode_job(item)

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        items = await self._batch_get(
            [_job_key(i) for i in dict.fromkeys(job_ids)], consistent=True
        )
        return [_decode_job(items[f"J#{i}"]) if f"J#{i}" in items else None for i in job_ids]

    async def _find_by_key(self, key: str) -> Job | None:
        pointer = await self._get_item(_key_key(key))
        if pointer is None:
            return None
        item = await self._get_item(_job_key(pointer["j"]["S"]))
        if not _holds_key(item, self.clock.time()):
            return None
        assert item is not None
        return _decode_job(item)

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Newest first, merged from the partitions of one key-only index and filtered on the
        items themselves; at most ``LIST_READ_BUDGET`` index entries are read per call (then a
        short page answers with a cursor to go on from)."""
        plan = await self._list_plan(where)
        page = min(max(limit + 1, 25), 1000)
        matches: list[Job] = []
        below, examined = cursor, 0
        while True:
            ids, below, scanned = await self._newest_ids(plan, below, page)
            items = await self._batch_get([_job_key(i) for i in ids], consistent=False)
            for job_id in ids:
                item = items.get(f"J#{job_id}")
                job = None if item is None else _decode_job(item)
                if job is not None and where.matches(job):
                    matches.append(job)
                    if len(matches) > limit:
                        return matches[:limit], matches[limit - 1].id
            examined += scanned
            if below is None or examined >= LIST_READ_BUDGET:
                return matches, below

    async def _list_plan(self, where: ListFilter) -> _ListPlan:
        """The index and partitions that hold every job the filter can match."""
        if where.group_id is not None:
            return _ListPlan(GROUP_INDEX, "g", [where.group_id])
        queues = [where.queue] if where.queue is not None else await self._queues()
        parts = [p for q in queues for p in await self._partitions(q)]
        if where.state in (State.FAILED, State.CANCELLED):
            assert where.state is not None
            return _ListPlan(DEAD_INDEX, "dq", parts, state=where.state)
        return _ListPlan(LIST_INDEX, "lq", parts)

    async def _newest_ids(
        self, plan: _ListPlan, below: str | None, n: int
    ) -> tuple[list[str], str | None, int]:
        """Ids below ``below``, newest first, that every partition has been read down to; the
        id to go on below (``None``: all read); how many index entries were read."""
        cond = f"#{plan.hash_attr} = :p" + (" AND #pk < :below" if below is not None else "")
        kw: dict[str, Any] = {"IndexName": plan.index, "KeyConditionExpression": cond}
        names, values = _names(cond), {":below": _s(f"J#{below}")} if below is not None else {}
        if plan.state is not None:
            kw["FilterExpression"] = "#st = :st"
            names["#st"], values[":st"] = "st", _s(plan.state.value)

        async def read(partition: str) -> tuple[list[str], str | None, int]:
            out = await self._call(
                "query",
                TableName=self.table,
                ScanIndexForward=False,
                Limit=n,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={**values, ":p": _s(partition)},
                **kw,
            )
            ids = [item["pk"]["S"][2:] for item in out.get("Items", [])]
            last = out.get("LastEvaluatedKey")
            return ids, None if last is None else last["pk"]["S"][2:], out.get("ScannedCount", 0)

        pages = await self._all(read(p) for p in plan.partitions)
        # Below the highest point where a partition stopped reading, it may hold ids not seen
        # yet: answer only what lies above it, and go on from there.
        stops = [stop for _, stop, _ in pages if stop is not None]
        floor = max(stops) if stops else None
        ids = sorted({i for got, _, _ in pages for i in got if floor is None or i >= floor})
        return ids[::-1], floor, sum(scanned for _, _, scanned in pages)

    async def _stats(self) -> list[QueueStats]:
        await self._flush_counts()
        now = self.clock.time()
        items = await self._query_all(
            ConsistentRead=True, KeyConditionExpression="#pk = :pk", **_pk_values(QUEUES_PK)
        )
        out = []
        for item in sorted(items, key=lambda i: str(i["sk"]["S"])):
            counts = {s: max(0, int(item[s]["N"])) for s in STATES if s in item}
            if not any(counts.values()):
                continue
            queue = item["sk"]["S"]
            oldest = await self._oldest_ready(queue, now) if counts.get("queued") else None
            out.append(
                QueueStats(
                    name=queue,
                    **counts,
                    oldest_queued_seconds=None if oldest is None else now - oldest,
                )
            )
        return out

    async def _oldest_ready(self, queue: str, now: float) -> float | None:
        """The smallest ``va`` of a queued, visible job (expired leases are skipped)."""

        async def first(shard: int) -> float | None:
            kw: dict[str, Any] = {
                "IndexName": VIS_INDEX,
                "KeyConditionExpression": "#vq = :vq AND #va <= :now",
                "FilterExpression": "#st = :queued",
                "ExpressionAttributeNames": {"#vq": "vq", "#va": "va", "#st": "st"},
                "ExpressionAttributeValues": {
                    ":vq": _s(_partition(queue, shard)),
                    ":now": _n(now),
                    ":queued": _s(State.QUEUED.value),
                },
            }
            while True:
                out = await self._call("query", TableName=self.table, Limit=25, **kw)
                if out.get("Items"):
                    return float(out["Items"][0]["va"]["N"])
                if "LastEvaluatedKey" not in out:
                    return None
                kw["ExclusiveStartKey"] = out["LastEvaluatedKey"]

        found = await asyncio.gather(*(first(s) for s in range(await self._shard_count(queue))))
        present = [v for v in found if v is not None]
        return min(present) if present else None

    # --- multi-step jobs, groups, the result cache ------------------------------------------------

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        item = await self._get_item({"pk": _s(f"G#{group_id}"), "sk": _s(GROUP_SK)})
        return None if item is None else msgspec.json.decode(item["rec"]["S"], type=GroupRecord)

    async def _sweep_expired(self, limit: int) -> list[Job]:
        """Expired ended jobs (from ``exp``), each deleted by a conditional DeleteItem: of many
        sweepers racing for a job, one deletes it and answers it. Each call visits the
        partitions in random order, ``LEASE_FANOUT`` at a time, until it has ``limit``
        candidates, so the sweepers of many daemons spread out instead of all colliding on the
        soonest expiries. DynamoDB's own TTL (``ttl``) deletes whatever no sweeper reached,
        later and for free."""
        now = self.clock.time()
        parts = [p for q in await self._queues() for p in await self._partitions(q)]
        random.shuffle(parts)
        found: list[str] = []
        for first in range(0, len(parts), LEASE_FANOUT):
            wave = parts[first : first + LEASE_FANOUT]
            pages = await self._all(self._expired(p, now, limit - len(found)) for p in wave)
            found += [job_id for page in pages for job_id in page][: limit - len(found)]
            if len(found) >= limit:
                break
        swept = await self._all(self._sweep_one(job_id, now) for job_id in found)
        return [job for job in swept if job is not None]

    async def _expired(self, partition: str, now: float, limit: int) -> list[str]:
        out = await self._call(
            "query",
            TableName=self.table,
            IndexName=EXPIRY_INDEX,
            Limit=limit,
            KeyConditionExpression="#xp = :xp AND #x <= :now",
            ExpressionAttributeNames={"#xp": "xp", "#x": "x"},
            ExpressionAttributeValues={":xp": _s(partition), ":now": _n(now)},
        )
        return [item["pk"]["S"][2:] for item in out.get("Items", [])]

    async def _sweep_one(self, job_id: str, now: float) -> Job | None:
        try:
            out = await self._call(
                "delete_item",
                TableName=self.table,
                Key=_job_key(job_id),
                ReturnValues="ALL_OLD",
                **_expr(None, SWEEP_IF, now=_n(now)),
            )
        except _ConditionFailed:
            return None  # another sweeper was first (or the job was redriven meanwhile)
        job = _decode_job(out["Attributes"])
        self._counts.add(job.queue, job.state.value, -1)
        if job.key is not None:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return job

    async def _drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        """Walk the succeeded jobs (through ``list``: a purge is an operator's rare act) and drop
        the results of those with this ``sticky`` flag, each by an update conditional on the
        version seen, so concurrent purges answer each job once. The walk goes on from where
        the previous call stopped; an empty answer means it reached the end."""
        dropped: list[Job] = []
        cursor = self._drop_cursor.pop(sticky, None)
        where = ListFilter(state=State.SUCCEEDED)
        while len(dropped) < limit:
            page, after = await self._list_jobs(where, 100, cursor)
            doomed = [j for j in page if droppable(j, sticky, before)]
            doomed = doomed[: limit - len(dropped)]
            if doomed and doomed[-1] is not page[-1]:
                after = doomed[-1].id  # the batch is full: go on just below its last job
            won = await self._all(self._drop_one(j, frees_key(j)) for j in doomed)
            dropped += [j for j, ok in zip(doomed, won, strict=True) if ok]
            cursor = after
            if cursor is None:
                return dropped  # the walk reached the end
        if cursor is not None:
            self._drop_cursor[sticky] = cursor
        return dropped

    async def _drop_one(self, job: Job, free_key: bool) -> bool:
        values: dict[str, Any] = {
            "dropped": _j(ResultRef(area=DROPPED)),
            "one": ONE,
            "succeeded": _s(State.SUCCEEDED.value),
            "seen_v": _n(job.version),
        }
        update = DROP_SET
        if free_key:
            update, values["true"] = f"{DROP_SET}, {FREE_KEY_SET}", TRUE
        try:
            await self._update_item(_job_key(job.id), **_expr(update, DROP_IF, **values))
        except _ConditionFailed:
            return False  # changed (or dropped by another purge) since the walk read it
        if job.key is not None and free_key:
            await self._tidy_key(job.key, job.id, free=True, expires_at=None)
        return True

    async def _ping(self) -> None:
        await self._call(
            "get_item",
            client=self._ping_client,
            TableName=self.table,
            Key={"pk": _s("PING"), "sk": _s("PING")},
        )

    # --- the worker registry ----------------------------------------------------------------------

    async def _register_worker(self, info: WorkerInfo) -> None:
        item = {
            "pk": _s(WORKERS_PK),
            "sk": _s(info.id),
            "host": _s(info.host),
            "sa": _n(info.started_at),
            "ls": _n(info.last_seen),
            "run": _n(info.running),
            "con": _n(info.concurrency),
            "ttl": _ttl(info.last_seen + WORKER_TTL),
        }
        await self._call("put_item", TableName=self.table, Item=item)

    async def _remove_worker(self, worker_id: str) -> None:
        key = {"pk": _s(WORKERS_PK), "sk": _s(worker_id)}
        await self._call("delete_item", TableName=self.table, Key=key)

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        values = _pk_values(WORKERS_PK)
        values["ExpressionAttributeNames"]["#ls"] = "ls"
        values["ExpressionAttributeValues"][":since"] = _n(seen_since)
        items = await self._query_all(
            ConsistentRead=True,
            KeyConditionExpression="#pk = :pk",
            FilterExpression="#ls >= :since",
            **values,
        )
        return [
            WorkerInfo(
                id=i["sk"]["S"],
                host=i["host"]["S"],
                started_at=float(i["sa"]["N"]),
                last_seen=float(i["ls"]["N"]),
                running=int(i["run"]["N"]),
                concurrency=int(i["con"]["N"]),
            )
            for i in items
        ]

    # --- marks ------------------------------------------------------------------------------------

    async def _advance_mark(self, name: str, value: float) -> float | None:
        """One conditional UpdateItem on ``pk = "M#<name>"``: it raises the mark or, refused,
        answers the mark that stood (a retried request whose first try landed answers
        ``value`` itself, as if another process had set it)."""
        try:
            out = await self._call(
                "update_item",
                TableName=self.table,
                Key=_mark_key(name),
                ReturnValues="UPDATED_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **_expr(MARK_SET, MARK_IF, mv=_n(value)),
            )
        except _ConditionFailed as refused:
            return None if refused.item is None else float(refused.item["mv"]["N"])
        old = out.get("Attributes", {}).get("mv")
        return None if old is None else float(old["N"])

    async def _get_mark(self, name: str) -> float | None:
        item = await self._get_item(_mark_key(name))
        return None if item is None or "mv" not in item else float(item["mv"]["N"])


def _mark_key(name: str) -> Item:
    return {"pk": _s(f"M#{name}"), "sk": _s(MARK_SK)}


def _pk_values(pk: str) -> dict[str, Any]:
    return {"ExpressionAttributeNames": {"#pk": "pk"}, "ExpressionAttributeValues": {":pk": _s(pk)}}


def _key_holder_id(reasons: list[dict[str, Any]]) -> str | None:
    """The job id a refused key put found in the key item (the transaction's first action)."""
    if not reasons or reasons[0].get("Code") != "ConditionalCheckFailed":
        return None
    item = reasons[0].get("Item") or {}
    holder = item.get("j")
    return None if holder is None else str(holder["S"])


def _fingerprint(o: Outcome) -> str:
    """``ft``: the lease token and a digest of the outcome. A retry of the same outcome (botocore's,
    or the pool's after a BackendError) finds its own mark and answers True, so the pool never
    discards a result that was recorded; a different outcome for the same lease is refused."""
    digest = hashlib.blake2b(msgspec.json.encode(o), digest_size=8).hexdigest()
    return f"{o.token}:{digest}"


def _finish_update(o: Outcome, now: float) -> tuple[str, dict[str, Any]]:
    """The update expression and values of one outcome (back to queued, or terminal)."""
    give = _n(0 if o.count_attempt else 1)
    if o.state is State.QUEUED:
        return _requeue_update(o, now, give)
    values: dict[str, Any] = {"state": _s(o.state.value), "give": give, "now": _n(now), "one": ONE}
    sets, removes = [END_SET], [END_REMOVE]
    optional = {
        "sa": _n(o.started_at) if o.started_at is not None else None,
        "rs": _j(o.result) if o.result is not None else None,
        "er": _j(o.error) if o.error is not None else None,
        "x": _n(o.expires_at) if o.expires_at is not None else None,
        "ttl": _ttl(o.expires_at) if o.expires_at is not None else None,
    }
    for attr, value in optional.items():
        if value is None:
            removes.append(f"#{attr}")
        else:
            sets.append(f"#{attr} = :{attr}")
            values[attr] = value
    if o.expires_at is not None:
        sets.append("#xp = #lq")  # into the expiry index, for the sweeper
    else:
        removes.append("#xp")
    if o.free_key and o.job.key is not None:
        sets.append(FREE_KEY_SET)
        values["true"] = TRUE
    if o.keep_key and o.job.key is not None:
        sets.append("#kp = :true")  # held past ``x``, until the item is deleted
        values["true"] = TRUE
    else:
        removes.append("#kp")
    if o.state in (State.FAILED, State.CANCELLED):
        sets.append("#dq = #lq")  # into the dead-letter index, in the job's own shard
    return f"{', '.join(sets)} {', '.join(removes)}", values


def _requeue_update(o: Outcome, now: float, give: dict[str, str]) -> tuple[str, dict[str, Any]]:
    ready = o.ready_at if o.ready_at is not None else now
    values: dict[str, Any] = {
        "queued": _s(State.QUEUED.value),
        "give": give,
        "ready": _n(ready),
        "one": ONE,
    }
    sets, removes = "", ""
    if o.error is not None:  # else the job keeps its last error
        sets, values["er"] = ", #er = :er", _j(o.error)
    if o.started_at is None:
        removes = ", #sa"
    else:
        sets, values["sa"] = f"{sets}, #sa = :sa", _n(o.started_at)
    return REQUEUE_SET.format(sets=sets, removes=removes), values


# --- creating the table ---------------------------------------------------------------------------


def table_definition(table: str) -> dict[str, Any]:
    """CreateTable arguments: on-demand billing, the key schema and every index."""
    return {
        "TableName": table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": name, "AttributeType": kind} for name, kind in ATTRIBUTES.items()
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": list(GSIS),
    }


async def _wait_active(client: Any, table: str, index: str | None = None) -> None:
    """Poll until the table (or one of its indexes) is ACTIVE."""
    for attempt in range(600):
        desc = (await client.describe_table(TableName=table))["Table"]
        status = desc.get("TableStatus")
        if index is not None:
            gsis = {g["IndexName"]: g for g in desc.get("GlobalSecondaryIndexes", [])}
            status = gsis.get(index, {}).get("IndexStatus")
        if status == "ACTIVE":
            return
        await asyncio.sleep(min(5.0, 0.05 * 2**attempt))
    raise BackendError(f"dynamodb table {table} did not become active")


async def ensure_table(client: Any, table: str) -> list[str]:
    """Create the table, its missing indexes and its TTL; answer what was done. Idempotent."""
    try:
        return await _ensure_table(client, table)
    except aws.driver_errors() as exc:
        raise _translate("init", exc) from exc


async def _ensure_table(client: Any, table: str) -> list[str]:
    done: list[str] = []
    try:
        desc = (await client.describe_table(TableName=table))["Table"]
    except client.exceptions.ResourceNotFoundException:
        with contextlib.suppress(client.exceptions.ResourceInUseException):
            await client.create_table(**table_definition(table))
            done.append(f"created table {table} (on-demand) with indexes {_index_names()}")
        await _wait_active(client, table)
        desc = (await client.describe_table(TableName=table))["Table"]
    have = {g["IndexName"] for g in desc.get("GlobalSecondaryIndexes", [])}
    for gsi in GSIS:
        if gsi["IndexName"] in have:
            continue
        keys = {k["AttributeName"] for k in gsi["KeySchema"]}
        await client.update_table(
            TableName=table,
            AttributeDefinitions=[
                {"AttributeName": a, "AttributeType": t} for a, t in ATTRIBUTES.items() if a in keys
            ],
            GlobalSecondaryIndexUpdates=[{"Create": gsi}],
        )
        await _wait_active(client, table, gsi["IndexName"])
        done.append(f"created index {gsi['IndexName']} on {table}")
    ttl = await client.describe_time_to_live(TableName=table)
    if ttl["TimeToLiveDescription"].get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        await client.update_time_to_live(
            TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"}
        )
        done.append(f"enabled TTL on {table}.ttl")
    return done


def _index_names() -> str:
    return ", ".join(g["IndexName"] for g in GSIS)


async def init_table(settings: DynamoSettings) -> list[str]:
    """``arqd init-aws`` for the queue: create what is missing; answer what was done."""
    async with contextlib.AsyncExitStack() as stack:
        client = await aws.open_client(stack, "dynamodb", settings, _client_config(settings))
        done = await ensure_table(client, settings.table)
    return done or [f"table {settings.table} is ready (nothing to do)"]
