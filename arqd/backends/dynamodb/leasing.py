"""The fenced writes of a lease's life: leasing from the ``vis`` index (a conditional update
on what the index showed), heartbeats (rewritten only when due), progress and steps, and
the finish, each conditional on the lease's token; a retried write that finds its own work
done counts as applied."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from arqd.backends.base import HeartbeatReply, Lease, Outcome, Update, fifo
from arqd.backends.dynamodb.codec import (
    END_REMOVE,
    END_SET,
    FALSE,
    FREE_KEY_SET,
    HEARTBEAT_SET,
    HELD,
    LEASE_IF,
    LEASE_SET,
    ONE,
    REQUEUE_SET,
    TRUE,
    Item,
    _decode_job,
    _expr,
    _j,
    _job_key,
    _n,
    _partition,
    _s,
    _state,
    _ttl,
)
from arqd.backends.dynamodb.refusals import _ConditionFailed
from arqd.backends.dynamodb.schema import VIS_INDEX
from arqd.backends.dynamodb.settings import (
    CONTENDED_SPREAD,
    ENDED_MEMORY,
    HEARTBEAT_REWRITE,
    LEASE_FANOUT,
    LEASE_ROUNDS,
)
from arqd.backends.dynamodb.table import _Table
from arqd.errors import BackendError
from arqd.model import State, new_token


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


class _Leasing(_Table):
    """``lease``, ``heartbeat``, ``update`` and ``finish`` of the job store contract."""

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
        return sorted(got, key=lambda lease: fifo(lease.job))

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

    # --- the outcome ------------------------------------------------------------------------------

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
            # A kept key (a schedule tick's) has no TTL: it goes only with its record.
            expiry = None if o.keep_key else o.expires_at
            await self._tidy_key(job.key, job.id, free=o.free_key, expires_at=expiry)
        return True


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
        # No TTL backstop for a record whose key is kept: DynamoDB deleting it would skip the
        # core's sweep, which raises the schedule's mark as the record goes (Core._retire_ticks).
        "ttl": _ttl(o.expires_at) if o.expires_at is not None and not o.keep_key else None,
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
