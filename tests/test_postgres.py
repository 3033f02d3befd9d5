"""The postgres backend beyond the contract suites: its schema migrations, transactional submit,
LISTEN/NOTIFY wake-ups across connections, faults (a dropped connection, a restarted server, a
frozen server, a statement timeout) and a daemon started while PostgreSQL is down. Always on a
real server (tests/servers.py), never a mock."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import arqd
from arqd import follow
from arqd.backends.base import Outcome, QueueBackend
from arqd.backends.memory import MemoryQueue
from arqd.backends.postgres import PostgresQueue, queries
from arqd.clock import ManualClock
from arqd.config import Config, QueueConfig
from arqd.core import Core
from arqd.errors import BackendError, BackendUnavailable, InvalidRequest
from arqd.model import NewJob, State, new_job_id
from arqd.results.memory import MemoryResults

from .conftest import drop_postgres_schema, postgres_schema
from .daemons import ROOT, Daemons, sqlite_config
from .servers import PostgresServer, ServerMissing
from .util import eventually

STEPS_KEY = "YXJxZC10ZXN0cy1zdGVwcy1rZXktbm90LXNlY3JldCE="  # a Fernet key, for tests only


def new_job(queue: str = "q", key: str | None = None) -> NewJob:
    now = 1_000.0
    return NewJob(
        id=new_job_id(), queue=queue, handler="h", payload={"n": 1}, key=key, sticky=False,
        meta={}, max_attempts=3, timeout=10.0, created_at=now, ready_at=now,
    )  # fmt: skip


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PostgresQueue]:
    backend = PostgresQueue(postgres_dsn, schema=postgres_schema(), clock=ManualClock(1_000.0))
    async with backend:
        yield backend
    await drop_postgres_schema(postgres_dsn, backend.schema)


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, which the fault tests stop, restart and freeze."""
    try:
        server = PostgresServer().start()
    except ServerMissing as exc:
        pytest.fail(str(exc))
    yield server
    server.close()


# --- migrations -----------------------------------------------------------------------------------


async def test_daemons_starting_together_migrate_once(postgres_dsn: str):
    """Several backends opening a fresh schema at once all open (the advisory lock lets one
    migrate while the others wait), and the schema is at this arqd's version, once."""
    schema = postgres_schema()
    backends = [PostgresQueue(postgres_dsn, schema=schema) for _ in range(4)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        conn = await asyncpg.connect(postgres_dsn)
        try:
            rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_version')
        finally:
            await conn.close()
        assert [r[0] for r in rows] == list(range(1, queries.SCHEMA_VERSION + 1))
    finally:
        await asyncio.gather(*(b.aclose() for b in backends))
        await drop_postgres_schema(postgres_dsn, schema)


async def test_a_newer_schema_is_refused(pg: PostgresQueue, postgres_dsn: str):
    """A daemon never runs against a schema a newer arqd migrated: it refuses to open, saying so."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'INSERT INTO "{pg.schema}".schema_version VALUES (999)')
    finally:
        await conn.close()
    with pytest.raises(BackendError, match="newer than this arqd"):
        async with PostgresQueue(postgres_dsn, schema=pg.schema):
            pass


async def test_without_migrate_an_unmigrated_schema_is_refused(postgres_dsn: str):
    """With ``migrate = false`` a daemon on a schema nobody created says to run init-db."""
    with pytest.raises(BackendError, match="init-db"):
        async with PostgresQueue(postgres_dsn, schema=postgres_schema(), migrate=False):
            pass


# --- transactional submit -------------------------------------------------------------------------


async def test_transactional_submit_exists_iff_the_transaction_commits(
    pg: PostgresQueue, postgres_dsn: str
):
    """A job submitted with ``connection=`` inside the caller's transaction exists after its
    commit, and never after its rollback; the caller's search_path is left as it was."""
    client = arqd.Client(queue=pg, results=MemoryResults())
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            kept = await client.submit("h", {"a": 1}, connection=conn)
            assert await conn.fetchval("SHOW search_path") == '"$user", public'
        assert (await client.get(kept.id)).state == "queued"

        lost: list[str] = []
        with pytest.raises(RuntimeError, match="caller fails"):
            await _submit_then_fail(client, conn, lost)
        with pytest.raises(arqd.JobNotFound):
            await client.get(lost[0])
        assert [s.queued for s in await client.queues()] == [1]  # counts rolled back too
    finally:
        await conn.close()


async def _submit_then_fail(client: arqd.Client, conn: asyncpg.Connection, ids: list[str]) -> None:
    async with conn.transaction():
        ids.append((await client.submit("h", {"a": 2}, connection=conn)).id)
        raise RuntimeError("caller fails")


async def test_transactional_submit_needs_an_open_transaction(pg: PostgresQueue, postgres_dsn: str):
    """A connection outside a transaction is refused with a clear InvalidRequest, nothing stored."""
    client = arqd.Client(queue=pg, results=MemoryResults())
    conn = await asyncpg.connect(postgres_dsn)
    try:
        with pytest.raises(InvalidRequest, match="transaction"):
            await client.submit("h", connection=conn)
        with pytest.raises(InvalidRequest, match="asyncpg connection"):
            await client.submit("h", connection=object())
    finally:
        await conn.close()
    assert [q.queued for q in await client.queues()] in ([], [0])


async def test_other_backends_refuse_a_connection():
    """A backend that cannot join a caller's transaction refuses ``connection=`` (4xx class),
    and so does the HTTP client, before sending anything."""
    queue: QueueBackend = MemoryQueue()
    with pytest.raises(InvalidRequest, match="postgres can"):
        await queue.enqueue([new_job()], connection=object())
    async with arqd.HttpClient("http://127.0.0.1:9") as http:
        with pytest.raises(InvalidRequest, match="in-process"):
            await http.submit("h", connection=object())
        with pytest.raises(InvalidRequest, match="in-process"):
            await http.submit_many([{"handler": "h"}], connection=object())


# --- LISTEN/NOTIFY ----------------------------------------------------------------------------


async def test_a_submit_on_one_connection_wakes_a_listener_on_another(
    pg: PostgresQueue, postgres_dsn: str
):
    """Another backend (another host) leasing from a queue is woken by a submit to it through
    NOTIFY, not by polling; a submit to a queue it does not lease from wakes nobody."""
    other = PostgresQueue(postgres_dsn, schema=pg.schema)
    woken = asyncio.Event()
    other.on_jobs_ready(woken.set)
    async with other:
        await other.lease(["q"], 1, 30, "w")  # listens to the queues it leases from
        await asyncio.wait_for(_listening(other, "q"), 10)
        woken.clear()
        await pg.enqueue([new_job("elsewhere")])
        await pg.enqueue([new_job("q")])
        await asyncio.wait_for(woken.wait(), 10)


async def test_a_notification_wakes_the_cores_consumers(pg: PostgresQueue, postgres_dsn: str):
    """The core hears the backend's wake-ups: a job stored by another process (another backend
    object, no core of ours involved) wakes the consumers waiting on this core's hub."""
    core = Core(pg, MemoryResults(), Config(), None)
    await pg.lease(["q"], 1, 30, "w")
    await _listening(pg, "q")
    seen = core.hub.ready_seq
    async with PostgresQueue(postgres_dsn, schema=pg.schema) as other:
        await other.enqueue([new_job("q")])
    await eventually(lambda: core.hub.ready_seq > seen, 10)


async def test_jobs_ended_by_another_backend_are_named_to_its_listeners(
    pg: PostgresQueue, postgres_dsn: str
):
    """Another backend (another host) hears the ids of the jobs this one finished, cancelled
    and deleted, so its waits on them wake without polling; a retry ends nothing."""
    heard: list[list[str] | None] = []
    other = PostgresQueue(postgres_dsn, schema=pg.schema)
    other.on_jobs_changed(lambda ids: heard.append(None if ids is None else list(ids)))
    async with other:
        await eventually(lambda: queries.done_channel(pg.schema) in other.listened, 20)
        heard.clear()
        done, retried, cancelled = new_job(), new_job(), new_job("elsewhere")
        await pg.enqueue([done, retried, cancelled])
        leases = {lease.job.id: lease for lease in await pg.lease(["q"], 2, 30, "w")}
        finished = await pg.finish(
            [
                Outcome(
                    job=leases[done.id].job, token=leases[done.id].token, state=State.SUCCEEDED
                ),
                Outcome(
                    job=leases[retried.id].job, token=leases[retried.id].token, state=State.QUEUED
                ),
            ]
        )
        assert finished == [True, True]
        await eventually(lambda: [done.id] in heard, 10)
        await pg.cancel(cancelled.id, free_key=True)
        await eventually(lambda: [cancelled.id] in heard, 10)
        await pg.delete(done.id)
        await eventually(lambda: heard.count([done.id]) == 2, 10)
        assert all(retried.id not in (ids or ()) for ids in heard)


def test_ended_jobs_are_named_in_payloads_postgres_takes():
    """However many jobs end in one transaction, each notification's payload stays under
    PostgreSQL's 8,000 bytes and together they name every job once."""
    ids = [new_job_id() for _ in range(2_000)]
    payloads = queries.payloads(ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= queries.PAYLOAD_MAX for p in payloads)
    assert [i for p in payloads for i in p.split(",")] == ids
    assert queries.payloads([]) == []


async def test_a_wait_wakes_when_a_job_ends_in_another_process(
    tmp_path: Path, daemons: Daemons, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    """A client waiting on a job a daemon (another process) runs learns it ended from the
    daemon's NOTIFY: with the follower's rounds an hour apart, the wait still ends."""
    schema = postgres_schema()
    config = postgres_config(tmp_path, postgres_dsn, schema)
    await asyncio.to_thread(
        daemons.start, config, "runner", {"ARQD_QUEUE_DSN": postgres_dsn}, "daemon.ready"
    )
    monkeypatch.setattr(follow, "FOLLOW_INTERVAL", 3600.0)
    try:
        queue = PostgresQueue(postgres_dsn, schema=schema)
        async with queue, arqd.Client(queue, MemoryResults()) as client:
            for _ in range(3):
                job = await client.submit("echo", {"back": True})
                assert (await client.wait(job.id, timeout=60)).state == "succeeded"
    finally:
        await drop_postgres_schema(postgres_dsn, schema)


async def _listening(backend: PostgresQueue, queue: str) -> None:
    """Until the backend's listening connection has LISTENed to ``queue``'s channel."""
    channel = queries.channel(backend.schema, queue)
    await eventually(lambda: channel in backend.listened, 20)


async def test_the_listener_reconnects_after_its_connection_drops(
    pg: PostgresQueue, postgres_dsn: str
):
    """When the listening connection is killed, the backend wakes its consumers (they may have
    missed a notification), reconnects, and NOTIFY wakes it again."""
    woken = asyncio.Event()
    pg.on_jobs_ready(woken.set)
    await pg.lease(["q"], 1, 30, "w")
    await asyncio.wait_for(_listening(pg, "q"), 10)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'arqd-listen' AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
    finally:
        await conn.close()
    await eventually(lambda: not pg.listening.is_set(), 10)
    await asyncio.wait_for(_listening(pg, "q"), 20)
    woken.clear()
    await pg.enqueue([new_job("q")])
    await asyncio.wait_for(woken.wait(), 10)


# --- lost answers ------------------------------------------------------------------------------


def lose_next_answer(backend: PostgresQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next call reaches the server and is applied, but its answer is lost on the way back
    (as when a connection drops right after the commit): it raises BackendUnavailable."""
    call = backend._call

    async def applied_then_lost(body: Any) -> Any:
        monkeypatch.setattr(backend, "_call", call)
        await call(body)
        raise BackendUnavailable("connection lost (test)")

    monkeypatch.setattr(backend, "_call", applied_then_lost)


def fail_second_call(backend: PostgresQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next call goes through; the one after fails before reaching the server."""
    call = backend._call
    calls = [0]

    async def second_fails(body: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            monkeypatch.setattr(backend, "_call", call)
            raise BackendUnavailable("connection lost (test)")
        return await call(body)

    monkeypatch.setattr(backend, "_call", second_fails)


async def test_a_finish_sent_again_after_its_answer_was_lost_is_applied_once(
    pg: PostgresQueue, monkeypatch: pytest.MonkeyPatch
):
    """The pool sends a finish again after a backend error; when the first one was applied
    and only its answer lost, the retry answers True (the pool took it for a lost lease and
    deleted the result of a job stored as succeeded), counted once; another outcome of the
    same lease is still refused."""
    await pg.enqueue([new_job()])
    (lease,) = await pg.lease(["q"], 1, 30, "w")
    outcome = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
    lose_next_answer(pg, monkeypatch)
    with pytest.raises(BackendUnavailable):
        await pg.finish([outcome])
    assert await pg.finish([outcome]) == [True]
    failed = Outcome(job=lease.job, token=lease.token, state=State.FAILED)
    assert await pg.finish([failed]) == [False]
    (stats,) = await pg.stats()
    assert (stats.succeeded, stats.running, stats.failed) == (1, 0, 0)


async def test_jobs_leased_by_a_call_whose_answer_was_lost_are_handed_out_next(
    pg: PostgresQueue, monkeypatch: pytest.MonkeyPatch
):
    """A lease applied whose answer was lost is found by the next lease call, with its token:
    the jobs run now instead of waiting out the lease and losing an attempt (with one attempt
    allowed, the job failed without ever running); also when that call's own lease fails."""
    job, later = new_job(), new_job()
    await pg.enqueue([job])
    lose_next_answer(pg, monkeypatch)
    with pytest.raises(BackendUnavailable):
        await pg.lease(["q"], 10, 30, "w")
    await pg.enqueue([later])
    fail_second_call(pg, monkeypatch)  # the look-up succeeds, the new lease fails
    (lease,) = await pg.lease(["q"], 10, 30, "w")
    assert lease.job.id == job.id and lease.job.attempts == 1 and not lease.recovered
    (fresh,) = await pg.lease(["q"], 10, 30, "w")
    assert fresh.job.id == later.id
    done = Outcome(job=lease.job, token=lease.token, state=State.SUCCEEDED)
    assert await pg.finish([done]) == [True]
    assert await pg.lease(["q"], 10, 30, "w") == []


# --- faults -------------------------------------------------------------------------------------


@pytest.fixture
async def faulty(own_server: PostgresServer) -> AsyncIterator[PostgresQueue]:
    if own_server.proc is None:
        own_server.start()
    backend = PostgresQueue(own_server.dsn, schema=postgres_schema(), statement_timeout=1.0)
    async with backend:
        yield backend


async def test_a_dropped_connection_is_unavailable_then_recovers(faulty: PostgresQueue):
    """Every pooled connection killed by the server: a call fails as BackendUnavailable (which
    the pool retries), never another error, and the next calls work on fresh connections."""
    await faulty.enqueue([new_job()])
    conn = await asyncpg.connect(faulty.dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'arqd%' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    failures: list[BackendUnavailable] = []

    async def counts_again() -> bool:
        try:
            return [s.queued for s in await faulty.stats()] == [1]
        except BackendUnavailable as exc:  # any other error fails the test
            failures.append(exc)
            return False

    await eventually(counts_again, 30)
    assert len(failures) <= 2, failures  # one per dead connection, not a failing backend


async def test_a_restarted_server_is_unavailable_then_recovers(
    faulty: PostgresQueue, own_server: PostgresServer
):
    """While the server is down every call is BackendUnavailable; once it is back the same
    backend object works again, with nothing lost."""
    await faulty.enqueue([new_job()])
    own_server.stop()
    with pytest.raises(BackendUnavailable):
        await faulty.lease(["q"], 10, 30, "w")
    with pytest.raises(BackendUnavailable):
        await faulty.ping()
    own_server.start()

    async def works() -> bool:
        try:
            await faulty.ping()
        except BackendUnavailable:
            return False
        return True

    await eventually(works, 30)
    leases = await faulty.lease(["q"], 10, 30, "w")
    assert len(leases) == 1


async def test_a_frozen_server_is_unavailable_then_recovers(
    faulty: PostgresQueue, own_server: PostgresServer
):
    """A failover-like pause (the server frozen for longer than the statement timeout) makes a
    call BackendUnavailable within its time limit, not a hang; after it, calls work."""
    await faulty.enqueue([new_job()])
    own_server.pause()
    try:
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(faulty.lease(["q"], 10, 30, "w"), 15)
    finally:
        own_server.resume()

    async def works() -> bool:
        try:
            return len(await faulty.lease(["q"], 10, 30, "w")) == 1
        except BackendUnavailable:
            return False

    await eventually(works, 30)


async def test_a_statement_timeout_is_unavailable(faulty: PostgresQueue):
    """A statement stuck behind another session's lock ends at ``statement_timeout`` as
    BackendUnavailable (retryable), and releases nothing it should not."""
    await faulty.enqueue([new_job()])
    conn = await asyncpg.connect(faulty.dsn)
    try:
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{faulty.schema}".jobs IN ACCESS EXCLUSIVE MODE')
            with pytest.raises(BackendUnavailable, match=r"statement timeout|canceling"):
                await faulty.lease(["q"], 10, 30, "w")
    finally:
        await conn.close()
    assert len(await faulty.lease(["q"], 10, 30, "w")) == 1


async def test_the_password_never_appears_in_errors_or_reprs(own_server: PostgresServer):
    """The DSN's password is redacted from the config's repr, the backend's, and the error of a
    failed connection."""
    dsn = f"postgresql://postgres:hunter2secret@127.0.0.1:{own_server.port + 1}/postgres"
    assert "hunter2secret" not in repr(QueueConfig(backend="postgres", dsn=dsn))
    backend = PostgresQueue(dsn, statement_timeout=2)
    assert "hunter2secret" not in repr(backend) + backend.identity
    with pytest.raises(BackendUnavailable) as caught:
        await backend.open()
    assert "hunter2secret" not in str(caught.value)


# --- the daemon ---------------------------------------------------------------------------------


def postgres_config(tmp_path: Path, dsn: str, schema: str, workers: str = "") -> str:
    base = sqlite_config(tmp_path, workers=workers, extra=f'[http_steps]\nkey = "{STEPS_KEY}"\n')
    head, _, rest = base.partition("[queue]")
    _, _, rest = rest.partition("[results]")
    return head + f'[queue]\nbackend = "postgres"\nschema = "{schema}"\n\n[results]' + rest


async def test_a_daemon_started_while_postgres_is_down_becomes_ready(
    tmp_path: Path, daemons: Daemons
):
    """The daemon stays up while PostgreSQL is down (/healthz 200, /readyz 503) and becomes
    ready by itself when the server starts, then runs jobs. The DSN comes from ARQD_QUEUE_DSN
    and its password is in no log line."""
    server = PostgresServer()
    try:
        dsn = f"postgresql://postgres:pw-not-logged@127.0.0.1:{server.port}/postgres"
        config = postgres_config(tmp_path, dsn, "daemon_down")
        env = {"ARQD_QUEUE_DSN": dsn}
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
        assert "pw-not-logged" not in d.log_path.read_text()
    finally:
        await asyncio.to_thread(server.close)


def test_init_db_migrates_once_and_then_has_nothing_to_do(tmp_path: Path, postgres_dsn: str):
    """``arqd init-db`` creates the schema the config names (DSN from ARQD_QUEUE_DSN), then
    finds nothing to do on a second run."""
    schema = postgres_schema()
    config = tmp_path / "arqd.toml"
    config.write_text(f'[queue]\nbackend = "postgres"\nschema = "{schema}"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARQD_QUEUE_DSN": postgres_dsn}
    cmd = [sys.executable, "-m", "arqd", "init-db", "-c", str(config)]
    try:
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        assert first.returncode == 0, first.stderr
        assert f"schema {schema!r}: migrated to version 1" in first.stdout
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    finally:
        asyncio.run(drop_postgres_schema(postgres_dsn, schema))


def test_the_postgres_backend_needs_a_dsn():
    """A postgres queue without a DSN is a config error naming the setting, not a failed start."""
    with pytest.raises(ValueError, match="dsn"):
        QueueConfig(backend="postgres")
