"""The redis backend beyond the contract suites: pub/sub wake-ups across backend objects, the
lost-answer finish, expiry by key TTLs and lazily tidied indexes, bounded listings, faults (a
dropped connection, a restart, a frozen server, BUSY, READONLY), the persistence warning, the
password kept out of errors, reprs and logs, and a daemon started while Redis is down. Always on
a real server (tests/servers.py), never a mock."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from structlog.testing import capture_logs

import arqd
from arqd import follow
from arqd.backends.base import ListFilter, Outcome, Redrive
from arqd.backends.redis import RedisQueue, scripts
from arqd.backends.redis.queue import EXPIRY_GRACE, LIST_SCAN, _translate
from arqd.clock import ManualClock
from arqd.config import QueueConfig, load_config
from arqd.core import Core
from arqd.errors import BackendError, BackendUnavailable
from arqd.model import ErrorInfo, NewJob, State, new_job_id
from arqd.results.memory import MemoryResults

from .conftest import drop_redis_prefix, redis_prefix
from .daemons import ROOT, Daemons, sqlite_config
from .servers import RedisServer, ServerMissing, free_port
from .util import eventually

STEPS_KEY = "YXJxZC10ZXN0cy1zdGVwcy1rZXktbm90LXNlY3JldCE="  # a Fernet key, for tests only
VT = 30.0


def new_job(queue: str = "q", key: str | None = None, at: float = 1_000.0) -> NewJob:
    return NewJob(
        id=new_job_id(), queue=queue, handler="h", payload={"n": 1}, key=key, sticky=False,
        meta={}, max_attempts=3, timeout=10.0, created_at=at, ready_at=at,
    )  # fmt: skip


@pytest.fixture
async def rq(redis_url: str) -> AsyncIterator[RedisQueue]:
    backend = RedisQueue(redis_url, prefix=redis_prefix(), clock=ManualClock(1_000.0))
    async with backend:
        yield backend
    await drop_redis_prefix(redis_url, backend.prefix)


def start(**kw: object) -> RedisServer:
    try:
        return RedisServer(**kw).start()  # type: ignore[arg-type]
    except ServerMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def own_server() -> Iterator[RedisServer]:
    """A server of this module's own, with AOF on, which the fault tests kill, restart, freeze,
    keep busy and make a replica."""
    server = start(aof=True, settings={"busy-reply-threshold": "100"})
    yield server
    server.close()


@pytest.fixture
async def faulty(own_server: RedisServer) -> AsyncIterator[RedisQueue]:
    own_server.restore()
    backend = RedisQueue(own_server.url, prefix=redis_prefix(), statement_timeout=1.0)
    async with backend:
        yield backend


async def admin(url: str, *command: object) -> object:
    """One command on a connection of the test's own."""
    client = Redis.from_url(url)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def works(backend: RedisQueue) -> bool:
    """Whether a call goes through; a fault must surface as BackendUnavailable, nothing else."""
    try:
        await backend.ping()
    except BackendUnavailable:
        return False
    return True


# --- wake-ups -------------------------------------------------------------------------------------


async def test_a_submit_wakes_another_backend_leasing_from_its_queue(rq: RedisQueue):
    """Another backend object (another host) leasing from a queue is woken by a submit to it,
    through pub/sub; a submit to a queue it does not lease from wakes nobody."""
    wakes: list[int] = []
    other = RedisQueue(rq.url, prefix=rq.prefix)
    other.on_jobs_ready(lambda: wakes.append(1))
    async with other:
        await other.lease(["q"], 1, VT, "w")  # wakes only for the queues it leases from
        await asyncio.wait_for(other.listening.wait(), 10)
        wakes.clear()
        await rq.enqueue([new_job("elsewhere")])
        await rq.enqueue([new_job("q")])
        await eventually(lambda: wakes == [1], 10)  # one connection: in order, so never [1, 1]
        await asyncio.sleep(0)
        assert wakes == [1]


async def test_a_notification_wakes_the_cores_consumers(rq: RedisQueue):
    """The core hears the backend's wake-ups: a job stored by another process (another backend
    object) wakes the consumers waiting on this core's hub."""
    core = Core(rq, MemoryResults(), arqd.Config(), None)
    await rq.lease(["q"], 1, VT, "w")
    await asyncio.wait_for(rq.listening.wait(), 10)
    seen = core.hub.ready_seq
    async with RedisQueue(rq.url, prefix=rq.prefix) as other:
        await other.enqueue([new_job("q")])
    await eventually(lambda: core.hub.ready_seq > seen, 10)


async def test_jobs_ended_by_another_backend_are_named_to_its_listeners(rq: RedisQueue):
    """Another backend hears the ids of the jobs this one finished, cancelled and deleted, so its
    waits on them wake without polling; a retry ends nothing."""
    heard: list[list[str] | None] = []
    other = RedisQueue(rq.url, prefix=rq.prefix)
    other.on_jobs_changed(lambda ids: heard.append(None if ids is None else list(ids)))
    async with other:
        await eventually(lambda: scripts.done_channel(rq.p) in other.listened, 20)
        heard.clear()
        done, retried, cancelled = new_job(), new_job(), new_job("elsewhere")
        await rq.enqueue([done, retried, cancelled])
        leases = {lease.job.id: lease for lease in await rq.lease(["q"], 2, VT, "w")}
        outcomes = [
            Outcome(job=leases[done.id].job, token=leases[done.id].token, state=State.SUCCEEDED),
            Outcome(job=leases[retried.id].job, token=leases[retried.id].token, state=State.QUEUED),
        ]
        assert await rq.finish(outcomes) == [True, True]
        await eventually(lambda: [done.id] in heard, 10)
        await rq.cancel(cancelled.id, free_key=True)
        await eventually(lambda: [cancelled.id] in heard, 10)
        await rq.delete(done.id)
        await eventually(lambda: heard.count([done.id]) == 2, 10)
        assert all(retried.id not in (ids or ()) for ids in heard)


async def test_the_listener_reconnects_after_its_connection_drops(rq: RedisQueue):
    """When the listening connection is killed, the backend wakes its consumers (they may have
    missed a message), subscribes again, and a submit wakes it again."""
    woken = asyncio.Event()
    rq.on_jobs_ready(woken.set)
    await rq.lease(["q"], 1, VT, "w")
    await asyncio.wait_for(rq.listening.wait(), 10)
    killed = await admin(rq.url, "CLIENT", "KILL", "TYPE", "pubsub")
    assert isinstance(killed, int) and killed >= 1
    await eventually(lambda: not rq.listening.is_set(), 10)
    await asyncio.wait_for(rq.listening.wait(), 20)
    woken.clear()
    await rq.enqueue([new_job("q")])
    await asyncio.wait_for(woken.wait(), 10)


async def test_a_wait_wakes_when_a_job_ends_in_another_process(
    tmp_path: Path, daemons: Daemons, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    """A client waiting on a job a daemon (another process) runs learns it ended from the
    daemon's message on the done channel: with the follower's rounds an hour apart, the wait
    still ends."""
    prefix = redis_prefix()
    config = redis_config(tmp_path, prefix)
    env = {"ARQD_QUEUE_URL": redis_url}
    await asyncio.to_thread(daemons.start, config, "runner", env, "daemon.ready")
    monkeypatch.setattr(follow, "FOLLOW_INTERVAL", 3600.0)
    try:
        queue = RedisQueue(redis_url, prefix=prefix)
        async with queue, arqd.Client(queue, MemoryResults()) as client:
            for _ in range(3):
                job = await client.submit("echo", {"back": True})
                assert (await client.wait(job.id, timeout=60)).state == "succeeded"
    finally:
        await drop_redis_prefix(redis_url, prefix)


# --- lost answers, expiry, listings ---------------------------------------------------------------


async def test_a_finish_repeated_after_a_lost_answer_is_answered_as_applied(rq: RedisQueue):
    """The pool repeats a whole finish batch when its answer was lost: an outcome that had
    landed is answered True again (its fingerprint is on the job) and changes nothing more; a
    different outcome for the same lease is still refused."""
    await rq.enqueue([new_job(), new_job()])
    first, second = await rq.lease(["q"], 2, VT, "w")
    landed = Outcome(job=first.job, token=first.token, state=State.SUCCEEDED)
    assert await rq.finish([landed]) == [True]
    before = await rq.get(first.job.id)
    later = Outcome(job=second.job, token=second.token, state=State.SUCCEEDED)
    assert await rq.finish([landed, later]) == [True, True]
    assert await rq.get(first.job.id) == before
    other = Outcome(job=first.job, token=first.token, state=State.FAILED)
    assert await rq.finish([other]) == [False]
    stats = await rq.stats()
    assert [(s.succeeded, s.failed) for s in stats] == [(2, 0)]


async def test_jobs_leased_by_a_call_whose_answer_was_lost_are_handed_out_next(
    rq: RedisQueue, monkeypatch: pytest.MonkeyPatch
):
    """A lease script that ran but whose answer was lost (a connection dropped right after) is
    found by the next lease call, with its token: the jobs run now instead of waiting out the
    lease and losing an attempt (with one attempt allowed, the job failed without running); also
    when that call's own lease fails."""
    job = new_job()
    await rq.enqueue([job])
    run = rq._run

    async def ran_then_lost(name: str, args: Any, index: str | None = None) -> Any:
        monkeypatch.setattr(rq, "_run", run)
        await run(name, args, index)
        raise BackendUnavailable("connection lost (test)")

    monkeypatch.setattr(rq, "_run", ran_then_lost)
    with pytest.raises(BackendUnavailable):
        await rq.lease(["q"], 10, VT, "w")
    later = new_job()
    await rq.enqueue([later])

    async def lease_fails(name: str, args: Any, index: str | None = None) -> Any:
        if name == "LEASE":  # the look-up succeeds, the new lease fails
            monkeypatch.setattr(rq, "_run", run)
            raise BackendUnavailable("connection lost (test)")
        return await run(name, args, index)

    monkeypatch.setattr(rq, "_run", lease_fails)
    (lease,) = await rq.lease(["q"], 10, VT, "w")
    assert lease.job.id == job.id and lease.job.attempts == 1 and not lease.recovered
    done = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
    assert await rq.finish([done]) == [True]
    (fresh,) = await rq.lease(["q"], 10, VT, "w")
    assert fresh.job.id == later.id


async def test_an_expiring_record_gets_a_ttl_and_a_redriven_one_loses_it(rq: RedisQueue):
    """A terminal job with an expiry gets a key TTL a day past it, on its record and its key
    (Redis drops what no sweeper reached); a failed job redriven to the queue loses its TTL, so
    a live job never vanishes."""
    clock = rq.clock
    assert isinstance(clock, ManualClock)
    await rq.enqueue([new_job(key="k"), new_job()])
    done, failed = await rq.lease(["q"], 2, VT, "w")
    now = clock.time()
    error = ErrorInfo(type="E", message="no", attempt=1)
    outcomes = [
        Outcome(job=done.job, token=done.token, state=State.SUCCEEDED, expires_at=now + 60),
        Outcome(
            job=failed.job, token=failed.token, state=State.FAILED, error=error, expires_at=now + 5
        ),
    ]
    assert await rq.finish(outcomes) == [True, True]
    ttl = await admin(rq.url, "TTL", f"{rq.p}:j:{done.job.id}")
    assert isinstance(ttl, int) and 60 + EXPIRY_GRACE - 5 <= ttl <= 60 + EXPIRY_GRACE
    assert await admin(rq.url, "TTL", f"{rq.p}:k:{scripts.text('k').decode()}") == ttl
    assert await rq.redrive(Redrive(queue="q", ready_at=now, attempts=0, take_keys=True)) == 1
    assert await admin(rq.url, "TTL", f"{rq.p}:j:{failed.job.id}") == -1  # no TTL
    clock.advance(61)
    assert [j.id for j in await rq.sweep_expired(10)] == [done.job.id]


async def test_a_record_redis_expired_is_tidied_from_indexes_and_counts(rq: RedisQueue):
    """A record dropped by its TTL (here: deleted, as Redis would) leaves index entries behind:
    a listing takes them out as it meets them, and the sweep takes its count back."""
    clock = rq.clock
    assert isinstance(clock, ManualClock)
    kept, gone = new_job(), new_job()
    await rq.enqueue([kept, gone])
    leases = await rq.lease(["q"], 2, VT, "w")
    expires = clock.time() + 60
    outcomes = [
        Outcome(job=le.job, token=le.token, state=State.SUCCEEDED, expires_at=expires)
        for le in leases
    ]
    assert await rq.finish(outcomes) == [True, True]
    await admin(rq.url, "DEL", f"{rq.p}:j:{gone.id}")
    listed, _ = await rq.list_jobs(ListFilter(queue="q"), 10, None)
    assert [j.id for j in listed] == [kept.id]
    assert await admin(rq.url, "ZSCORE", f"{rq.p}:l:q:q", gone.id) is None
    clock.advance(61)
    assert [j.id for j in await rq.sweep_expired(10)] == [kept.id]
    assert [s.succeeded for s in await rq.stats()] in ([], [0])


async def test_a_listing_reads_a_bounded_number_of_entries_per_call(rq: RedisQueue):
    """A filter no index narrows (the one queued job, older than many finished ones) reads at
    most LIST_SCAN entries per call: a short page with a cursor, and the next call goes on
    from there to the job and the end."""
    (target,) = [e.job for e in await rq.enqueue([new_job("other")])]
    batch = [new_job() for _ in range(LIST_SCAN + 200)]
    for start in range(0, len(batch), 500):
        await rq.enqueue(batch[start : start + 500])
    leases = await rq.lease(["q"], len(batch), VT, "w")
    done = [Outcome(job=le.job, token=le.token, state=State.SUCCEEDED) for le in leases]
    assert await rq.finish(done) == [True] * len(batch)
    page, cursor = await rq.list_jobs(ListFilter(state=State.SUCCEEDED), 5, None)
    assert [j.id for j in page] == [j.id for j in reversed(batch)][:5] and cursor == page[-1].id
    first, cursor = await rq.list_jobs(ListFilter(state=State.QUEUED), 5, None)
    assert first == [] and cursor is not None  # the budget ran out among finished jobs
    more, cursor = await rq.list_jobs(ListFilter(state=State.QUEUED), 5, cursor)
    assert [j.id for j in more] == [target.id] and cursor is None


def test_no_script_reads_the_keyspace_or_a_whole_set():
    """No script calls KEYS or SCAN or reads a set or a hash of jobs whole (ranges are bounded:
    by score up to now, by a LIMIT, or by a batch); docs/redis.md states each one's cost."""
    for name, body in scripts.SCRIPTS.items():
        calls = re.findall(r"redis\.call\('([A-Z]+)'(.*)", body)  # the rest of its line
        for command, args in calls:
            assert command not in ("KEYS", "SCAN", "SMEMBERS", "HKEYS", "HVALS", "FLUSHDB"), name
            if command.startswith("Z") and "RANGE" in command:
                assert "LIMIT" in args or "- 1" in args or name == "WORKERS_SEEN", (name, args)
            if command == "HGETALL":
                assert re.match(r", (jk\(|key\)|P \.\. ':n')", args), (name, args)  # a job, counts


async def test_a_redis_cluster_node_runs_every_script():
    """On Redis Cluster (here one node holding every slot) every key of a deployment is in the
    slot of its hash tag, so the scripts run, keys and counts hold, and pub/sub wakes another
    backend (docs/redis.md, "Redis Cluster and Valkey")."""
    cluster = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf"}
    cluster["cluster-port"] = str(free_port())  # else port + 10000, which may not exist
    with RedisServer(settings=cluster) as s:
        assert await admin(s.url, "CLUSTER", "ADDSLOTSRANGE", 0, 16383) == b"OK"

        async def cluster_ok() -> bool:
            info = await admin(s.url, "CLUSTER", "INFO")
            return isinstance(info, bytes) and b"cluster_state:ok" in info

        await eventually(cluster_ok, 20)
        woken = asyncio.Event()
        async with RedisQueue(s.url, prefix="c") as q, RedisQueue(s.url, prefix="c") as other:
            other.on_jobs_ready(woken.set)
            await other.lease(["q"], 1, VT, "w")
            await asyncio.wait_for(other.listening.wait(), 10)
            woken.clear()
            out = await q.enqueue([new_job(key="k"), new_job(key="k")])
            assert [e.created for e in out] == [True, False]
            await asyncio.wait_for(woken.wait(), 10)
            (lease,) = await q.lease(["q"], 5, VT, "w")
            done = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
            assert await q.finish([done]) == [True]
            assert [s.succeeded for s in await q.stats()] == [1]
            holder = await q.find_by_key("k")
            assert holder is not None and holder.id == lease.job.id


# --- faults ------------------------------------------------------------------------------------


def test_every_fault_a_retry_can_outlive_is_unavailable():
    """Error replies of a server that is loading, busy with a script, a replica, out of memory,
    failing over or resharding become BackendUnavailable (retried by the pool); a refused
    password or command and a script's own error are BackendError. No redis exception leaves."""
    for reply in (
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "READONLY You can't write against a read only replica.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    ):
        assert type(_translate(BaseParser.parse_error(reply))) is BackendUnavailable, reply
    for reply in ("WRONGPASS invalid username-password pair", "NOPERM no permissions", "ERR x"):
        assert type(_translate(BaseParser.parse_error(reply))) is BackendError, reply


async def test_dropped_connections_are_unavailable_then_recover(faulty: RedisQueue):
    """Every connection of the pool killed by the server: a call fails as BackendUnavailable
    (which the pool retries), never another error, and the next calls work on new ones."""
    await faulty.enqueue([new_job()])
    await asyncio.gather(*(faulty.ping() for _ in range(4)))  # a few pooled connections
    await admin(faulty.url, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    failures: list[BackendUnavailable] = []

    async def counts_again() -> bool:
        try:
            return [s.queued for s in await faulty.stats()] == [1]
        except BackendUnavailable as exc:  # any other error fails the test
            failures.append(exc)
            return False

    await eventually(counts_again, 30)
    assert len(failures) <= 4, failures  # one per dead connection, not a failing backend


async def test_a_restart_is_unavailable_then_recovers_with_nothing_lost(
    faulty: RedisQueue, own_server: RedisServer
):
    """While the server is down every call is BackendUnavailable; after a restart (AOF on) the
    same backend object works again and the job submitted before is still there."""
    (job,) = [e.job for e in await faulty.enqueue([new_job()])]
    own_server.stop()
    with pytest.raises(BackendUnavailable):
        await faulty.lease(["q"], 10, VT, "w")
    with pytest.raises(BackendUnavailable):
        await faulty.ping()
    own_server.start()
    await eventually(lambda: works(faulty), 30)
    assert [lease.job.id for lease in await faulty.lease(["q"], 10, VT, "w")] == [job.id]


async def test_a_frozen_server_is_unavailable_then_recovers(
    faulty: RedisQueue, own_server: RedisServer
):
    """A server frozen (SIGSTOP) past the command time limit makes a call BackendUnavailable
    within that limit, not a hang. The server runs the script once it resumes, so the job may
    be leased under a token nobody holds: it is leased again when that lease expires."""
    await faulty.enqueue([new_job()])
    own_server.pause()
    try:
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(faulty.lease(["q"], 10, 2.0, "w"), 15)
    finally:
        own_server.resume()

    async def leases_it() -> bool:
        try:
            return len(await faulty.lease(["q"], 10, VT, "w")) == 1
        except BackendUnavailable:
            return False

    await eventually(leases_it, 30)


async def test_a_server_busy_with_a_script_is_unavailable(faulty: RedisQueue):
    """A script running past busy-reply-threshold makes the server answer BUSY: the call is
    BackendUnavailable; once the script is killed, calls work."""
    hog = Redis.from_url(faulty.url)
    spin = asyncio.ensure_future(hog.eval("while true do end", 0))
    try:

        async def busy() -> bool:
            try:
                await faulty.stats()
            except BackendUnavailable as exc:
                return "BUSY" in str(exc)
            return False

        await eventually(busy, 20)
    finally:
        await admin(faulty.url, "SCRIPT", "KILL")
        await asyncio.gather(spin, return_exceptions=True)
        await hog.aclose()
    await eventually(lambda: works(faulty), 20)


async def test_a_replica_refusing_writes_is_unavailable(
    faulty: RedisQueue, own_server: RedisServer
):
    """A server turned into a replica (a failover) answers READONLY to a write: the call is
    BackendUnavailable and changes nothing; promoted again, it takes writes."""
    (job,) = [e.job for e in await faulty.enqueue([new_job()])]
    nowhere = free_port()  # the master it follows is never reached
    await admin(faulty.url, "REPLICAOF", "127.0.0.1", nowhere)
    try:
        with pytest.raises(BackendUnavailable, match="read only replica"):
            await faulty.lease(["q"], 10, VT, "w")
        assert (await faulty.get(job.id)) == job  # reads still answer
    finally:
        await admin(faulty.url, "REPLICAOF", "NO", "ONE")
    assert len(await faulty.lease(["q"], 10, VT, "w")) == 1


async def test_scripts_flushed_from_the_server_are_loaded_again(rq: RedisQueue):
    """After SCRIPT FLUSH (as after a restart without the script cache) the next call loads its
    script again (NOSCRIPT) and works."""
    await admin(rq.url, "SCRIPT", "FLUSH")
    assert len(await rq.enqueue([new_job()])) == 1


# --- persistence, secrets ----------------------------------------------------------------------


async def test_a_server_without_persistence_is_named_in_the_log(redis_url: str):
    """Opening on a server with neither AOF nor RDB logs a warning saying a restart loses every
    job; on an AOF server, nothing; with snapshots only, a weaker warning."""
    with capture_logs() as logs:
        async with RedisQueue(redis_url, prefix=redis_prefix()):
            pass
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.no_persistence"]
    with RedisServer(aof=True) as aof, capture_logs() as logs:
        async with RedisQueue(aof.url, prefix=redis_prefix()):
            pass
    assert [e for e in logs if e["log_level"] == "warning"] == []
    with RedisServer(settings={"save": "900 1"}) as rdb, capture_logs() as logs:
        async with RedisQueue(rdb.url, prefix=redis_prefix()):
            pass
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.persistence_weak"]


async def test_a_server_that_evicts_keys_is_named_in_the_log():
    """A server whose maxmemory-policy may evict keys (allkeys-*, volatile-*: the dedupe keys
    with a TTL go first) logs a warning at open: a full server would drop jobs or let a
    repeated submit run twice. With noeviction (the default), nothing."""
    settings = {"maxmemory-policy": "volatile-lru"}
    with RedisServer(aof=True, settings=settings) as lru, capture_logs() as logs:
        async with RedisQueue(lru.url, prefix=redis_prefix()):
            pass
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["policy"]) for e in warned] == [("redis.evicts_keys", "volatile-lru")]


async def test_a_full_server_still_heartbeats_and_deletes():
    """Out of memory, Redis refuses scripts that may grow it: a submit is unavailable. Those
    that keep running leases alive or free memory still run (they were refused too: every
    lease expired and nothing was freed until the key TTLs fired, a day later)."""
    with RedisServer(aof=True) as full:
        queue = RedisQueue(full.url, prefix=redis_prefix(), clock=ManualClock(1_000.0))
        async with queue:
            await queue.enqueue([new_job(), new_job()])
            running, ending = await queue.lease(["q"], 2, VT, "w")
            ended = Outcome(job=ending.job, token=ending.token, state=State.SUCCEEDED)
            assert await queue.finish([ended]) == [True]
            assert await admin(full.url, "CONFIG", "SET", "maxmemory", "1") == b"OK"
            with pytest.raises(BackendUnavailable):
                await queue.enqueue([new_job()])
            (reply,) = await queue.heartbeat([(running.job.id, running.token)], VT)
            assert reply.held
            assert (await queue.delete(ending.job.id)) is not None
            assert await queue.get(ending.job.id) is None


async def test_a_refused_config_get_is_said_not_fatal(redis_url: str):
    """A user whose ACL refuses CONFIG opens the backend all the same, and the log says the
    persistence could not be read."""
    user = f"u{new_job_id()[:8]}"
    await admin(
        redis_url, "ACL", "SETUSER", user, "on", ">pw-of-test", "~*", "&*", "+@all", "-config"
    )
    url = redis_url.replace("redis://", f"redis://{user}:pw-of-test@")
    try:
        with capture_logs() as logs:
            async with RedisQueue(url, prefix=redis_prefix()) as q:
                await q.ping()
        warned = [e for e in logs if e["log_level"] == "warning"]
        assert [e["event"] for e in warned] == ["redis.persistence_unknown"]
        assert "pw-of-test" not in str(warned)
    finally:
        await admin(redis_url, "ACL", "DELUSER", user)


async def test_the_password_never_appears_in_errors_or_reprs():
    """The URL's password is redacted from the config's repr, the backend's repr and identity,
    and the errors of a refused password and of an unreachable server."""
    with RedisServer(settings={"requirepass": "right-secret"}) as server:
        wrong = server.url.replace("right-secret", "hunter2secret")
        assert "hunter2secret" not in repr(QueueConfig(backend="redis", url=wrong))
        backend = RedisQueue(wrong, statement_timeout=2)
        assert "hunter2secret" not in repr(backend) + backend.identity
        with pytest.raises(BackendError) as refused:
            await backend.open()
        assert "hunter2secret" not in str(refused.value)
        down = wrong.replace(f":{server.port}/", f":{server.port + 1}/")
        with pytest.raises(BackendUnavailable) as unreachable:
            await RedisQueue(down, statement_timeout=2).open()
        assert "hunter2secret" not in str(unreachable.value)


def test_the_redis_backend_needs_a_url_it_can_use():
    """A redis queue without a URL, or with another scheme, is a config error naming the
    setting, not a failed start; ARQD_QUEUE_URL gives it, and the repr hides its password."""
    with pytest.raises(ValueError, match="url"):
        QueueConfig(backend="redis")
    with pytest.raises(ValueError, match="unix://") as caught:
        QueueConfig(backend="redis", url="http://:secret-x@host")
    assert "secret-x" not in str(caught.value)
    env = {"ARQD_QUEUE_BACKEND": "redis", "ARQD_QUEUE_URL": "rediss://:secret-y@h:6380/2"}
    config = load_config(None, environ=env)
    assert config.queue.url == env["ARQD_QUEUE_URL"] and "secret-y" not in repr(config.queue)


def test_redis_py_is_imported_only_when_configured():
    """A daemon on another queue backend never imports redis-py (an optional extra); one on
    redis imports the backend from its own module when config names it."""
    probe = (
        "import sys; from arqd.config import QueueConfig; from arqd.stores import queue_class\n"
        "queue_class(sys.argv[1]); print(sorted(m for m in sys.modules if m.startswith"
        "(('redis', 'hiredis', 'arqd.backends.redis'))))"
    )
    for backend, expect in (("sqlite", False), ("redis", True)):
        done = subprocess.run(
            [sys.executable, "-c", probe, backend],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        loaded = done.stdout
        assert ("'redis'" in loaded) is expect and ("arqd.backends.redis" in loaded) is expect


# --- the daemon ---------------------------------------------------------------------------------


def redis_config(tmp_path: Path, prefix: str, workers: str = "") -> str:
    base = sqlite_config(tmp_path, workers=workers, extra=f'[http_steps]\nkey = "{STEPS_KEY}"\n')
    head, _, rest = base.partition("[queue]")
    _, _, rest = rest.partition("[results]")
    return head + f'[queue]\nbackend = "redis"\nprefix = "{prefix}"\n\n[results]' + rest


async def test_a_daemon_started_while_redis_is_down_becomes_ready(tmp_path: Path, daemons: Daemons):
    """The daemon stays up while Redis is down (/healthz 200, /readyz 503) and becomes ready by
    itself when the server starts, then runs jobs. The URL comes from ARQD_QUEUE_URL, its
    password is in no log line, and the log says the server does not persist."""
    server = RedisServer(settings={"requirepass": "pw-not-logged"})
    try:
        config = redis_config(tmp_path, redis_prefix())
        env = {"ARQD_QUEUE_URL": server.url}
        d = await asyncio.to_thread(daemons.start, config, "patient", env, "daemon.listening")
        await asyncio.to_thread(d.wait_log, "daemon.backend_unavailable", 60)
        async with aiohttp.ClientSession(d.url) as http:
            async with http.get("/healthz") as r:
                assert r.status == 200
            async with http.get("/readyz") as r:
                assert r.status == 503
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(d.wait_log, "daemon.ready", 90)
        async with arqd.HttpClient(d.url) as client:
            job = await client.submit("echo", {"back": True})
            assert (await client.wait(job.id, timeout=60)).state == "succeeded"
        assert d.events("redis.no_persistence")
        assert "pw-not-logged" not in d.log_path.read_text()
    finally:
        await asyncio.to_thread(server.close)
