"""The Redis queue backend: many daemons on many hosts sharing one Redis (docs/redis.md).

Design
- Every write is one Lua script (``scripts.py``), run with EVALSHA (redis-py loads it once and
  again after a NOSCRIPT), so each call is atomic on the server and one round trip. A script
  never fails half-way: every value is converted and checked here first.
- One sorted set per queue scored by visible time (run-at while queued, the lease deadline while
  running), ties broken by id: leasing reads the lowest scores, and an expired lease is visible
  again with no sweeper. Every consumer write is fenced by the lease token inside its script.
- A finish writes a fingerprint (token:digest of the outcome) on the job, so a retried finish
  whose first answer was lost is answered as applied; a different outcome is still refused.
- Counts live in one hash the scripts update; listings walk per-queue / per-owner / per-group /
  dead-state indexes, a bounded number of entries per call; nothing scans the keyspace.
- A terminal job with an expiry also gets a key TTL a day past it: the sweeper deletes it (and
  the core its result blob) at its expiry, and Redis drops what no sweeper reached.
- Wake-ups cross hosts with pub/sub: a submit (or a requeue ready now) publishes its queue's
  channel, an ended job the done channel; one connection per backend listens and reconnects.
- Faults a retry can outlive (connection lost, timeouts, BUSY, LOADING, READONLY, OOM…) are
  :class:`BackendUnavailable`; others :class:`BackendError`. No redis exception leaves here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from arqd.backends.base import (
    Enqueued,
    HeartbeatReply,
    Lease,
    ListFilter,
    Outcome,
    QueueBackend,
    QueueStats,
    Redrive,
    Update,
    WorkerInfo,
    convert_all,
    storable_group,
    storable_job,
)
from arqd.backends.network import Heard, LeaseFailed, Lost, LostLeases
from arqd.backends.redis import scripts as s
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import REDIS_SCHEMES, redact_dsn
from arqd.errors import BackendError, BackendUnavailable
from arqd.model import (
    DROPPED,
    NAME_RE,
    GroupMember,
    GroupRecord,
    Job,
    NewJob,
    ResultRef,
    State,
    new_token,
)

log = structlog.get_logger("arqd.redis")

EXPIRY_GRACE = 86400  # seconds an expired job's record outlives its expiry before Redis drops it
LIST_SCAN = 1000  # index entries one listing call reads at most (a short page has a cursor)
STATS_SCAN = 100  # entries of a queue's set stats reads to age its oldest ready job
REDRIVE_BATCH = 500  # failed jobs one redrive script moves
WORKERS_FORGET = 86400.0  # seconds after which a silent worker's row goes
LISTEN_KEEPALIVE = 5.0  # seconds of silence before the listening connection is pinged
LISTEN_RETRY_MAX = 5.0  # seconds between attempts to reconnect it, at most
LISTEN_POLL = 1.0  # seconds between its looks at newly wanted channels
MIN_VERSION = (7, 0)  # scripts declare themselves with #!lua (Redis 7 functions of EVAL)

# Error replies a retry can outlive: a script running too long, a server loading its data set or
# a replica refusing writes (failover), a master gone, a cluster resharding, memory full, a
# failing RDB save. redis-py turns some into classes of their own (below), the rest stay replies.
UNAVAILABLE_REPLIES = frozenset({"BUSY", "MISCONF", "NOREPLICAS", "LOADING", "READONLY", "OOM"})
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (LOADING)
    rx.TimeoutError,
    rx.ReadOnlyError,
    rx.OutOfMemoryError,
    rx.ClusterDownError,  # and MasterDownError
    rx.TryAgainError,
    rx.AskError,  # and MovedError: the slot moved to another node (a failover on Cluster)
    OSError,
    TimeoutError,
)
# A password or permission refused: the configuration's fault, not the server's state.
REFUSED: tuple[type[BaseException], ...] = (rx.AuthenticationError, rx.NoPermissionError)

_decode_job = msgspec.json.Decoder(Job, strict=False).decode
_decode_group = msgspec.json.Decoder(GroupRecord).decode
_decode_worker = msgspec.json.Decoder(WorkerInfo).decode
_decode_name = msgspec.json.Decoder(str).decode
_DROPPED = s.text(ResultRef(area=DROPPED))


def _num(value: float) -> str:
    """A time or duration as the decimal text stored and compared (``repr``: exact)."""
    return repr(float(value))


_pack = msgspec.msgpack.encode  # a batch as one argument; the script reads it with cmsgpack


def _js(value: Any) -> str:
    """A value's JSON text as a ``str``: cmsgpack reads MessagePack strings, not bytes."""
    return s.text(value).decode()


def _opt(value: Any) -> str:
    return "" if value is None else _js(value)


def _job(flat: Sequence[bytes]) -> Job:
    """A record from its hash (field, value, field, value…): each value is JSON text, so the
    record is one JSON object; internal fields (``_t``, ``_f``) are left out."""
    it = iter(flat)
    parts = [b'"%s":%s' % (k, v) for k, v in zip(it, it, strict=True) if k[:1] != b"_"]
    return _decode_job(b"{" + b",".join(parts) + b"}")


def _fingerprint(o: Outcome) -> str:
    """What a finish writes on the job it applied: its token and a digest of the outcome."""
    body = msgspec.json.encode(
        (
            o.state,
            o.result,
            o.error,
            o.ready_at,
            o.count_attempt,
            o.expires_at,
            o.free_key,
            o.keep_key,
            o.started_at,
        )
    )
    return f"{o.token}:{hashlib.blake2b(body, digest_size=12).hexdigest()}"


def _finish_args(o: Outcome, now: float) -> list[Any]:
    """FINISH's 14 values of one outcome ('' for none)."""
    ready = expires = ttl = drop = ""
    if o.state is State.QUEUED:
        ready = _num(o.ready_at if o.ready_at is not None else now)
    elif o.expires_at is not None:
        expires = _num(o.expires_at)
        ttl = str(max(1, math.ceil(o.expires_at - now + EXPIRY_GRACE)))
    if o.state is State.SUCCEEDED and o.result is not None and o.result.area != DROPPED:
        drop = "1" if o.job.sticky else "0"
    return [
        o.job.id,
        o.token,
        o.state.value,
        "0" if o.count_attempt else "1",
        "" if o.started_at is None else _num(o.started_at),
        _opt(o.result) if o.state is not State.QUEUED else "",
        _opt(o.error),
        expires,
        ready,
        "1" if o.free_key else "0",
        "1" if o.keep_key else "0",
        ttl,
        drop,
        _fingerprint(o),
    ]


def _convert(new: NewJob) -> tuple[list[str], Job]:
    """The hash fields of ``new`` (field, value…) and its first record, each value checked."""
    job = storable_job(new)
    t = _js
    fields: list[str] = [
        "id", t(new.id), "queue", t(new.queue), "handler", t(new.handler),
        "state", '"queued"', "payload", t(new.payload), "attempts", "0",
        "max_attempts", t(new.max_attempts), "timeout", _num(new.timeout),
        "created_at", _num(new.created_at), "ready_at", _num(new.ready_at), "version", "1",
    ]  # fmt: skip
    optional = (
        ("key", new.key),
        ("meta", new.meta or None),
        ("steps", new.steps),
        ("group_id", new.group_id),
        ("owner", new.owner),
        ("name", new.name),
    )
    for name, value in optional:
        if value is not None:
            fields += [name, t(value)]
    if new.sticky:
        fields += ["sticky", "true"]
    return fields, job


def _translate(exc: BaseException) -> BackendError:
    """A driver's fault as the seam's error, its message never holding the URL's password."""
    text = redact_dsn(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, REFUSED):
        return BackendError(f"redis refused: {text}")
    reply = str(exc).split(" ", 1)[0] if isinstance(exc, rx.ResponseError) else ""
    if isinstance(exc, UNAVAILABLE) or reply in UNAVAILABLE_REPLIES:
        return BackendUnavailable(f"redis unavailable: {text}")
    return BackendError(f"redis failed: {text}")


def check_url(url: str) -> None:
    """``url`` names a server the way redis-py does; :class:`BackendError` saying how if not."""
    if not url.startswith(REDIS_SCHEMES):
        raise BackendError(
            f"redis url {redact_dsn(url)!r}: redis://, rediss:// (TLS) or unix:// (a socket)"
        )


class RedisQueue(QueueBackend):
    """See the module docstring."""

    name = "redis"
    multi_host = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "arqd",
        pool_size: int = 10,
        statement_timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(clock=clock)
        check_url(url)
        if not NAME_RE.match(prefix):
            raise BackendError(f"redis prefix {prefix!r}: 1 to 64 letters, digits, _ . -")
        self.url = url
        self.prefix = prefix
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self.p = s.tag(prefix)
        self._pool: ConnectionPool | None = None
        # Calls in flight, at most one per connection: a call waits here for one (up to
        # statement_timeout), as BlockingConnectionPool would make it wait, at a fifth of the
        # cost per call (PING through redis-py: 250 µs with it, 200 µs with this).
        self._slots = asyncio.Semaphore(pool_size)
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._heard = Heard()  # the cores' wake-up callbacks
        self._lost = LostLeases()  # lease calls whose answer was lost
        self._ready_prefix = f"{self.p}:ready:".encode()
        self._done = s.done_channel(self.p)
        self._consumed: set[bytes] = set()  # the queue names (as in channels) leased from
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self.listening = asyncio.Event()  # set while the listening connection is subscribed
        self.listened: set[str] = set()  # what it subscribes to (a pattern, a channel)

    def __repr__(self) -> str:
        return f"RedisQueue({redact_dsn(self.url)!r}, prefix={self.prefix!r})"

    @property
    def identity(self) -> str:
        return f"redis:{redact_dsn(self.url)}#{self.prefix}"

    # --- connections ------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        """Every connection's: time limits, and no retry of redis-py's own (a command retried
        after a lost answer could apply twice; the pool retries with the fences in place)."""
        return {
            "socket_timeout": self.statement_timeout,
            "socket_connect_timeout": self.statement_timeout,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "arqd",
        }

    async def open(self) -> None:
        try:
            self._pool = ConnectionPool.from_url(
                self.url, max_connections=self.pool_size, **self._options()
            )
            self._client = Redis(connection_pool=self._pool)
            self._scripts = {
                name: self._client.register_script(body) for name, body in s.SCRIPTS.items()
            }
            await self._check_server(self._client)
        except BackendError:
            await self._disconnect()
            raise
        except Exception as exc:
            await self._disconnect()
            raise _translate(exc) from None
        self._listener = asyncio.create_task(self._listen_loop(), name="arqd-redis-listen")

    async def _check_server(self, client: Redis) -> None:
        """Refuse a server older than the scripts need; load the scripts; say in the log when
        the server would lose jobs on a restart (docs/redis.md, "Persistence")."""
        try:
            found = str((await client.info("server")).get("redis_version", ""))
        except rx.NoPermissionError:  # an ACL may refuse INFO: the scripts' load then says
            found = ""
        version = tuple(int(x) for x in re.findall(r"\d+", found)[:2])
        if found and version < MIN_VERSION:
            raise BackendError(
                f"redis {found} is too old: arqd needs Redis 7.0 or newer (or Valkey)"
            )
        for script in self._scripts.values():
            await client.script_load(script.script)
        await self._check_persistence(client)

    async def _check_persistence(self, client: Redis) -> None:
        try:
            conf = await client.config_get("appendonly", "save", "maxmemory-policy")
        except rx.ResponseError as exc:  # CONFIG renamed away or refused by an ACL: say so
            log.warning(
                "redis.persistence_unknown",
                error=redact_dsn(str(exc)),
                hint="CONFIG GET was refused: check that the server persists (docs/redis.md)",
            )
            return
        got = {_str(k): _str(v) for k, v in conf.items()}
        policy = got.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            log.warning(
                "redis.evicts_keys",
                policy=policy,
                hint="a full server may evict jobs, queues or dedupe keys (a repeated submit"
                " then runs twice): set maxmemory-policy noeviction (docs/redis.md)",
            )
        if got.get("appendonly") == "yes":
            return
        if got.get("save", "").strip():
            log.warning(
                "redis.persistence_weak",
                save=got["save"],
                hint="RDB snapshots only: a restart loses every change since the last one;"
                " set appendonly yes (docs/redis.md)",
            )
        else:
            log.warning(
                "redis.no_persistence",
                hint="neither AOF nor RDB: a restart of redis loses every job;"
                " set appendonly yes (docs/redis.md)",
            )

    async def aclose(self) -> None:
        if self._listener is not None:
            # redis-py's PubSub.get_message can swallow a cancellation (seen under Python 3.11:
            # the task stayed "cancelling" and read on), so the loop also stops at the flag,
            # within LISTEN_POLL.
            self._closing = True
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait([self._listener], timeout=LISTEN_POLL)
            self._listener = None
        await self._disconnect()

    async def _disconnect(self) -> None:
        pool, self._pool, self._client = self._pool, None, None
        if pool is not None:
            with contextlib.suppress(Exception):  # a pool that cannot close cleanly is dropped
                await asyncio.wait_for(pool.disconnect(), 5)

    async def _run(self, name: str, args: Sequence[Any], index: str | None = None) -> Any:
        """Script ``name`` with ``args`` (``KEYS`` = the tag and ``index``), faults translated."""
        if self._client is None:
            raise BackendUnavailable("the redis backend is not open")
        keys = [self.p] if index is None else [self.p, index]
        try:
            await self._slot()
            try:
                return await self._scripts[name](keys=keys, args=args)
            finally:
                self._slots.release()
        except Exception as exc:
            raise _translate(exc) from None

    async def _slot(self) -> None:
        """Wait for a connection's turn; TimeoutError after ``statement_timeout``."""
        if self._slots.locked():
            async with asyncio.timeout(self.statement_timeout):
                await self._slots.acquire()
        else:
            await self._slots.acquire()

    async def _command(self, name: str, *args: Any) -> Any:
        """One plain command, faults translated."""
        if self._client is None:
            raise BackendUnavailable("the redis backend is not open")
        try:
            await self._slot()
            try:
                # redis-py declares execute_command without types
                return await self._client.execute_command(name, *args)  # type: ignore[no-untyped-call]
            finally:
                self._slots.release()
        except Exception as exc:
            raise _translate(exc) from None

    # --- wake-ups -------------------------------------------------------------------------------

    def on_jobs_ready(self, callback: Callable[[], None]) -> None:
        self._heard.add_ready(callback)

    def on_jobs_changed(self, callback: Callable[[Sequence[str] | None], None]) -> None:
        self._heard.add_changed(callback)  # the listener subscribes within a second

    def _on_message(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if kind == "pmessage" and isinstance(channel, bytes):
            if channel.removeprefix(self._ready_prefix) in self._consumed:
                self._heard.jobs_ready()
        elif kind == "message" and channel == self._done.encode():
            data = message.get("data")
            if isinstance(data, bytes) and data:
                self._heard.jobs_changed(data.decode().split(","))

    async def _listen_loop(self) -> None:
        """Keep one connection subscribed to the ready channels (a pattern: a message of a queue
        this backend does not lease from is dropped here) and, once a core asks, to the done
        channel; on a lost connection, reconnect with a backoff and wake the consumers and
        waits, who may have missed a message meanwhile."""
        delay = 0.1
        while not self._closing:
            client = Redis.from_url(self.url, **self._options())
            pubsub = client.pubsub()
            try:
                pattern = self._ready_prefix.decode() + "*"
                await pubsub.psubscribe(pattern)
                await self._confirmed(pubsub, "psubscribe")
                self.listened.add(pattern)
                await self._listen_done(pubsub)  # before the wake: no end slips between
                self.listening.set()
                self._heard.jobs_ready()  # anything submitted while nobody listened
                self._heard.jobs_changed(None)  # and anything that ended meanwhile
                delay = 0.1
                await self._listen_on(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("redis.listener_lost", error=redact_dsn(f"{type(exc).__name__}: {exc}"))
            finally:
                self.listening.clear()
                self.listened.clear()
                await _close(pubsub, client)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    async def _confirmed(self, pubsub: PubSub, kind: str) -> None:
        """Until the server confirms a (p)subscribe: from then on no message is missed. Messages
        read meanwhile are handed over."""
        deadline = asyncio.get_running_loop().time() + self.statement_timeout
        while asyncio.get_running_loop().time() < deadline and not self._closing:
            message = await pubsub.get_message(timeout=LISTEN_POLL)
            if message is not None and message.get("type") == kind:
                return
            if message is not None:
                self._on_message(message)
        raise BackendUnavailable(f"redis did not confirm the {kind}")

    async def _listen_on(self, pubsub: PubSub) -> None:
        """Hand messages over until the connection fails; ping it after a silence and give it
        up when the ping is not answered in time (a frozen server keeps sockets open)."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged: float | None = None
        while not self._closing:
            if await self._listen_done(pubsub):
                heard = loop.time()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_POLL)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                self._on_message(message)
            elif pinged is not None and now - pinged > self.statement_timeout:
                raise BackendUnavailable("the listening connection stopped answering")
            elif pinged is None and now - heard > LISTEN_KEEPALIVE:
                await pubsub.ping()
                pinged = now

    async def _listen_done(self, pubsub: PubSub) -> bool:
        """Subscribe to the ended-jobs channel once a core wants to hear of it; whether it did."""
        if not self._heard.changed or self._done in self.listened:
            return False
        await pubsub.subscribe(self._done)
        await self._confirmed(pubsub, "subscribe")
        self.listened.add(self._done)
        return True

    def _consume(self, queues: Sequence[str]) -> None:
        for queue in queues:
            self._consumed.add(s.queue_name(queue).encode())

    # --- writes -----------------------------------------------------------------------------------

    async def _enqueue(self, jobs: Sequence[NewJob], group: GroupRecord | None) -> list[Enqueued]:
        rows = convert_all(jobs, _convert)
        if not rows and group is None:
            return []
        gid, ghead = "", b""
        if group is not None:
            storable_group(group, jobs)
            gid = group.id
            ghead = s.text(msgspec.structs.replace(group, members=[]))[:-2]  # ...,"members":[
        packed: list[list[Any]] = []
        for i, (new, (fields, _)) in enumerate(zip(jobs, rows, strict=True)):
            member = ""
            if group is not None:
                member = _js(GroupMember(group.members[i].name, ""))[:-2]  # {..,"id":"
            packed.append(
                [
                    new.id,
                    s.queue_name(new.queue),
                    _num(new.ready_at),
                    _opt(new.key),
                    _opt(new.owner),
                    _opt(new.group_id),
                    member,
                    fields,
                ]
            )
        args = [_num(self.clock.time()), gid, ghead, _pack(packed)]
        answers = await self._run("ENQUEUE", args)
        return [
            Enqueued(_job(answer), created=False)
            if isinstance(answer, list)
            else Enqueued(job, created=True)
            for (_, job), answer in zip(rows, answers, strict=True)
        ]

    async def _lease(
        self, queues: Sequence[str], limit: int, lease_for: float, worker: str
    ) -> list[Lease]:
        self._consume(queues)
        now = self.clock.time()
        names = [s.queue_name(q) for q in queues]

        async def lease_new(n: int) -> list[Lease]:
            lost = Lost(names, new_token(), now + lease_for)
            args = [_num(now), n, lost.token, _num(lost.expires), *names]
            try:
                out = await self._run("LEASE", args)
            except BackendUnavailable as exc:  # perhaps applied, its answer lost
                raise LeaseFailed(exc, lost) from None
            it = iter(out)
            return [
                Lease(_job(flat), lost.token, lost.expires, bool(recovered))
                for recovered, flat in zip(it, it, strict=True)
            ]

        return await self._lost.lease(queues, limit, now, self._look_up, lease_new)

    async def _look_up(self, lost: Lost) -> list[Lease]:
        """The jobs a lease call whose answer was lost took, still held under its token."""
        out = await self._run("LEASE_AGAIN", [_num(lost.expires), lost.token, *lost.queues])
        return [Lease(_job(flat), lost.token, lost.expires, False) for flat in out]

    async def _heartbeat(
        self, leases: Sequence[tuple[str, str]], lease_for: float
    ) -> list[HeartbeatReply]:
        if not leases:
            return []
        args: list[Any] = [_num(self.clock.time() + lease_for)]
        for job_id, token in leases:
            args += [job_id, token]
        out = await self._run("HEARTBEAT", args)
        it = iter(out)
        return [
            HeartbeatReply(bool(held), bool(cancel)) for held, cancel in zip(it, it, strict=True)
        ]

    async def _update(self, updates: Sequence[Update]) -> list[bool]:
        if not updates:
            return []
        args: list[Any] = []
        for u in updates:
            saved = u.steps is not None
            args += [
                u.job_id,
                u.token,
                _opt(u.progress),
                _js(u.steps) if saved else "",
                _js(u.checkpoint or {}) if saved else "",
            ]
        return [bool(x) for x in await self._run("UPDATE", args)]

    async def _finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        if not outcomes:
            return []
        now = self.clock.time()
        packed = _pack([_finish_args(o, now) for o in outcomes])
        return [bool(x) for x in await self._run("FINISH", [_num(now), packed])]

    async def _cancel(self, job_id: str, *, free_key: bool) -> Job | None:
        args = [job_id, "1" if free_key else "0", _num(self.clock.time())]
        flat = await self._run("CANCEL", args)
        return None if not flat else _job(flat)

    async def _delete(self, job_id: str) -> Job | None:
        flat = await self._run("DELETE", [job_id])
        return None if not flat else _job(flat)

    async def _redrive(self, plan: Redrive) -> int:
        """In batches of ``REDRIVE_BATCH`` (each atomic), until the queue has no failed job."""
        total = 0
        while True:
            args = [
                s.queue_name(plan.queue),
                _num(plan.ready_at),
                plan.attempts,
                "1" if plan.take_keys else "0",
                _num(self.clock.time()),
                REDRIVE_BATCH,
            ]
            done, read = await self._run("REDRIVE", args)
            total += int(done)
            if int(read) < REDRIVE_BATCH:
                return total

    # --- reads ------------------------------------------------------------------------------------

    async def _get(self, job_id: str) -> Job | None:
        return (await self._get_many([job_id]))[0]

    async def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        out = await self._run("GET_MANY", list(job_ids))
        return [_job(flat) if flat else None for flat in out]

    async def _versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        if not job_ids:
            return {}
        out = await self._run("VERSIONS", list(job_ids))
        return {i: int(v) for i, v in zip(job_ids, out, strict=True) if v is not None}

    async def _find_by_key(self, key: str) -> Job | None:
        flat = await self._run("KEY_HOLDER", [s.text(key), _num(self.clock.time())])
        return None if not flat else _job(flat)

    async def _list_jobs(
        self, where: ListFilter, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        state = None if where.state is None else where.state.value
        index = s.list_index(
            self.p, queue=where.queue, state=state, group_id=where.group_id, owner=where.owner
        )
        wanted = (where.queue, state, where.handler, where.group_id, where.owner)
        args = [cursor or "", limit, max(LIST_SCAN, limit + 1), *(_opt(w) for w in wanted)]
        records, last, ended = await self._run("LIST", args, index)
        jobs = [_job(flat) for flat in records]
        if len(jobs) > limit:
            return jobs[:limit], jobs[limit - 1].id
        if ended or not last:
            return jobs, None
        return jobs, last.decode()  # the read budget ran out: a short page, and where to go on

    async def _stats(self) -> list[QueueStats]:
        now = self.clock.time()
        flat, oldest = await self._run("STATS", [_num(now), STATS_SCAN])
        counts: dict[str, dict[str, int]] = {}
        it = iter(flat)
        for field, n in zip(it, it, strict=True):
            state, _, name = field.partition(b":")
            if int(n) > 0:
                counts.setdefault(_decode_name(b'"' + name + b'"'), {})[state.decode()] = int(n)
        ages: dict[str, float] = {}
        it = iter(oldest)
        for name, score in zip(it, it, strict=True):
            ages[_decode_name(b'"' + name + b'"')] = now - float(score)
        return [
            QueueStats(name=queue, **per, oldest_queued_seconds=ages.get(queue))
            for queue, per in sorted(counts.items())
        ]

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        text = await self._command("GET", f"{self.p}:g:{group_id}")
        return None if text is None else _decode_group(text)

    # --- maintenance ------------------------------------------------------------------------------

    async def _sweep_expired(self, limit: int) -> list[Job]:
        out = await self._run("SWEEP", [_num(self.clock.time()), limit])
        return [_job(flat) for flat in out]

    async def _drop_results(
        self,
        sticky: bool,
        limit: int,
        before: float | None = None,
        *,
        frees_key: Callable[[Job], bool],
    ) -> list[Job]:
        """Read a batch of droppable results, ask the core which keys go, drop them: each job is
        dropped by one caller (the one whose script took it out of the index)."""
        index = f"{self.p}:r:{'1' if sticky else '0'}"
        until = "+inf" if before is None else _num(before)
        while True:
            jobs = [_job(flat) for flat in await self._run("DROPPABLE", [until, limit], index)]
            if not jobs:
                return []
            args: list[Any] = [_DROPPED]
            for job in jobs:
                args += [job.id, "1" if job.key is not None and frees_key(job) else "0"]
            flags = await self._run("DROP", args, index)
            dropped = [job for job, flag in zip(jobs, flags, strict=True) if flag]
            if dropped:
                return dropped

    # --- the registry, marks, ping --------------------------------------------------------------

    async def _register_worker(self, info: WorkerInfo) -> None:
        args = [info.id, _num(info.last_seen), s.text(info), _num(info.last_seen - WORKERS_FORGET)]
        await self._run("WORKER_PUT", args)

    async def _remove_worker(self, worker_id: str) -> None:
        await self._run("WORKER_REMOVE", [worker_id])

    async def _list_workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = await self._run("WORKERS_SEEN", [_num(seen_since)])
        return sorted((_decode_worker(r) for r in rows if r is not None), key=lambda w: w.id)

    async def _advance_mark(self, name: str, value: float) -> float | None:
        old = await self._run("MARK_ADVANCE", [name, _num(value)])
        return None if old is None else float(old)

    async def _get_mark(self, name: str) -> float | None:
        value = await self._command("HGET", f"{self.p}:m", name)
        return None if value is None else float(value)

    async def _ping(self) -> None:
        await self._command("PING")


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close(pubsub: PubSub, client: Redis) -> None:
    with contextlib.suppress(Exception):  # a connection that cannot close cleanly is dropped
        # redis-py declares PubSub.aclose without types
        await asyncio.wait_for(pubsub.aclose(), 5)  # type: ignore[no-untyped-call]
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.aclose(), 5)
