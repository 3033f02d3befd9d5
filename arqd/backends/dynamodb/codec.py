"""Items ↔ jobs, and the expressions of every request: DynamoDB's wire format (``{"S": ...}``)
stays in this package; what leaves it is a :class:`~arqd.model.Job`. Every item is checked
against DynamoDB's limits here before its first write (a value beyond them is the client's)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from arqd.backends.base import storable_group
from arqd.backends.dynamodb.schema import GROUP_SK, JOB_SK, MARK_SK
from arqd.backends.dynamodb.settings import ITEM_MAX, NUMBER_DIGITS
from arqd.errors import Unstorable
from arqd.model import GroupRecord, Job, NewJob, State

Item = dict[str, Any]  # a DynamoDB item in wire format: {"attr": {"S": "..."}}


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


# --- sizes and limits -----------------------------------------------------------------------------


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


def _ttl(expires_at: float) -> dict[str, str]:
    return _n(math.ceil(expires_at))


def _mark_key(name: str) -> Item:
    return {"pk": _s(f"M#{name}"), "sk": _s(MARK_SK)}


def _pk_values(pk: str) -> dict[str, Any]:
    return {"ExpressionAttributeNames": {"#pk": "pk"}, "ExpressionAttributeValues": {":pk": _s(pk)}}
