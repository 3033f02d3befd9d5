"""Fixtures shared by the suites: an injectable clock and every backend, parametrized.

Adding a backend here puts it under the whole contract suite (``test_contract_*.py``).
The AWS backends (``dynamodb``, ``s3``) talk HTTP to one moto server per session, started on
first use; each test gets a table and a bucket of its own. PostgreSQL and Redis run as
throw-away servers (``tests/servers.py``), one per session: each test gets a schema, or a key
prefix, of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from arqd.backends.base import QueueBackend
from arqd.backends.memory import MemoryQueue
from arqd.backends.postgres import PostgresQueue as PostgresQueueType
from arqd.backends.redis import RedisQueue
from arqd.backends.sqlite import SqliteQueue
from arqd.clock import ManualClock
from arqd.config import QueueConfig, ResultsConfig
from arqd.results.base import ResultStore
from arqd.results.files import FileResults
from arqd.results.memory import MemoryResults
from arqd.stores import make_queue, make_results

from .daemons import Daemons
from .servers import PostgresServer, RedisServer, ServerMissing

if TYPE_CHECKING:
    from arqd.backends.dynamodb import DynamoSettings
    from arqd.results.s3 import S3Settings

QueueFactory = Callable[[ManualClock], QueueBackend]


def _queue_factories(tmp_path: Path) -> dict[str, QueueFactory]:
    return {
        "memory": lambda clock: MemoryQueue(clock=clock),
        "sqlite": lambda clock: SqliteQueue(str(tmp_path / "q.sqlite3"), clock=clock),
        "plugged": lambda clock: make_queue(
            QueueConfig(backend=PLUGGED_QUEUE, options={"label": "contract"}), clock
        ),
    }


# A third-party backend and store (tests/plugin/queue.py), made through the config loader as a
# daemon would make them: the contract suites run over a plugged class too.
PLUGGED_QUEUE = "tests.plugin.queue:PluggedQueue"
PLUGGED_RESULTS = "tests.plugin.queue:PluggedResults"
QUEUE_BACKENDS = ["memory", "sqlite", "dynamodb", "postgres", "redis", "plugged"]
RESULT_STORES = ["memory", "files", "s3", "plugged"]

AWS_REGION = "us-east-1"
AWS_FAKE_KEY = "testing"  # moto accepts any credentials; these never leave the machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _OneAtATime:
    """A WSGI app that lets one request in at a time.

    Moto checks a write's condition and then applies it, in request threads that can interleave,
    so two conditional updates of one item can both succeed; DynamoDB applies each conditional
    write atomically, and the race tests of the contract rely on it. Serialising requests gives
    moto that atomicity (at no real cost: moto runs under the GIL anyway)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


def start_moto(port: int) -> Any:
    """A ThreadedMotoServer on 127.0.0.1:``port`` whose requests are applied one at a time."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _OneAtATime(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, threaded=True)
            self._server_ready_event.set()
            self._server.serve_forever()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = SerialMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL cluster for the whole session; the suite fails (never skips)
    when it cannot start, saying how to install the server."""
    try:
        server = PostgresServer().start()
    except ServerMissing as exc:
        pytest.fail(str(exc))
    yield server
    server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.dsn


def postgres_schema() -> str:
    """A fresh schema name: each test gets its own tables (created in ~20 ms) on the one server."""
    return f"t_{uuid.uuid4().hex[:16]}"


async def drop_postgres_schema(dsn: str, schema: str) -> None:
    import asyncpg

    from arqd.backends.postgres import queries

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(queries.drop_schema(schema))
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throw-away redis-server for the whole session; the suite fails (never skips) when it
    cannot start, saying how to install it."""
    try:
        server = RedisServer().start()
    except ServerMissing as exc:
        pytest.fail(str(exc))
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def redis_prefix() -> str:
    """A fresh key prefix: each test gets a keyspace (and hash tag) of its own on the one server."""
    return f"t{uuid.uuid4().hex[:16]}"


async def drop_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key of ``prefix`` (a test's own clean-up may scan; arqd never does)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto server (DynamoDB and S3 over HTTP) for the whole session."""
    port = free_port()
    server = start_moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def dynamo_settings(endpoint: str, **overrides: object) -> DynamoSettings:
    """Settings for a fresh table on ``endpoint`` (moto, or a fault proxy in front of it)."""
    from arqd.backends.dynamodb import DynamoSettings

    fields: dict[str, object] = {
        "table": f"arqd-{uuid.uuid4().hex[:12]}",
        "region": AWS_REGION,
        "endpoint_url": endpoint,
        "access_key_id": AWS_FAKE_KEY,
        "secret_access_key": AWS_FAKE_KEY,
    }
    fields.update(overrides)
    return DynamoSettings(**fields)  # type: ignore[arg-type]


def s3_settings(endpoint: str, **overrides: object) -> S3Settings:
    """Settings for a fresh bucket on ``endpoint``."""
    from arqd.results.s3 import S3Settings

    fields: dict[str, object] = {
        "bucket": f"arqd-{uuid.uuid4().hex[:12]}",
        "region": AWS_REGION,
        "endpoint_url": endpoint,
        "access_key_id": AWS_FAKE_KEY,
        "secret_access_key": AWS_FAKE_KEY,
    }
    fields.update(overrides)
    return S3Settings(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=QUEUE_BACKENDS)
async def queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[QueueBackend]:
    if request.param == "dynamodb":
        from arqd.backends.dynamodb import DynamoQueue

        backend: QueueBackend = DynamoQueue(
            dynamo_settings(request.getfixturevalue("moto_url")), clock=clock
        )
    elif request.param == "postgres":
        from arqd.backends.postgres import PostgresQueue

        dsn = request.getfixturevalue("postgres_dsn")
        backend = PostgresQueue(dsn, schema=postgres_schema(), clock=clock)
    elif request.param == "redis":
        backend = RedisQueue(
            request.getfixturevalue("redis_url"), prefix=redis_prefix(), clock=clock
        )
    else:
        backend = _queue_factories(tmp_path)[request.param](clock)
    async with backend:
        yield backend
        if isinstance(backend, PostgresQueueType):
            await drop_postgres_schema(backend.dsn, backend.schema)
        if isinstance(backend, RedisQueue):
            await drop_redis_prefix(backend.url, backend.prefix)
        if backend.name == "dynamodb":  # keep moto's memory small across the session
            await backend.client.delete_table(TableName=backend.table)  # type: ignore[attr-defined]


@pytest.fixture
def queue_factory(tmp_path: Path, queue: QueueBackend) -> Callable[[ManualClock], QueueBackend]:
    """Another handle on the same storage as ``queue`` (for sqlite: a second connection set;
    for dynamodb: a second client on the same table)."""

    def make(clock: ManualClock) -> QueueBackend:
        if isinstance(queue, SqliteQueue):
            return SqliteQueue(queue.path, clock=clock)
        if isinstance(queue, PostgresQueueType):
            return PostgresQueueType(queue.dsn, schema=queue.schema, clock=clock)
        if isinstance(queue, RedisQueue):
            return RedisQueue(queue.url, prefix=queue.prefix, clock=clock)
        if queue.name == "dynamodb":
            from arqd.backends.dynamodb import DynamoQueue

            assert isinstance(queue, DynamoQueue)
            return DynamoQueue(queue.settings, clock=clock)
        return queue

    return make


@pytest.fixture(params=RESULT_STORES)
async def results(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[ResultStore]:
    store: ResultStore
    if request.param == "memory":
        store = MemoryResults(clock=clock)
    elif request.param == "plugged":
        store = make_results(ResultsConfig(backend=PLUGGED_RESULTS), clock)
    elif request.param == "s3":
        from arqd.results.s3 import S3Results

        store = S3Results(s3_settings(request.getfixturevalue("moto_url")), clock=clock)
    else:
        store = FileResults(str(tmp_path / "results"), clock=clock)
    async with store:
        yield store


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("ARQD_TEST", "1")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Start ``arqd serve`` processes; every one still running is killed after the test."""
    pool = Daemons(tmp_path)
    yield pool
    pool.stop_all()
