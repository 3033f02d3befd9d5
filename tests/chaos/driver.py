"""The chaos driver, shared by the pytest tests and ``python -m tests.chaos``: start three daemons
on one backend, submit mixed jobs while dealing chaos, then stop the chaos, wait for every job to
end, read every record and result back, and hand it all to :func:`analysis.analyse`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet

import arqd
from arqd.backends.base import ListFilter, QueueBackend
from arqd.model import Job
from arqd.results.base import ResultStore
from tests.servers import PostgresServer, RedisServer

from .analysis import Disruption, Report, Run, analyse, read_executions, read_lines, read_stalls
from .cluster import AWS_KEY, AWS_REGION, SERVER_STOPS, Backend, Chaos, Cluster, ServerChaos
from .workload import Group, Remote, Workload

SUBMIT_LIMIT = 60.0  # a submit is retried (same key) on errors for this long
SUBMIT_TIMEOUT = 15.0
SUBMITS_IN_FLIGHT = 4

DatabaseServer = PostgresServer | RedisServer


def redis_for_chaos() -> RedisServer:
    """The redis run's server (not started): AOF with ``appendfsync always``, so a crash loses
    nothing the server acknowledged and "none lost" checks arqd, not the server's settings. With
    ``everysec`` a crash may lose up to a second of acknowledged writes (a power loss; a kill -9
    only while a slow fsync holds writes back, so a kill of the process rarely shows it)."""
    return RedisServer(aof=True, settings={"appendfsync": "always"})


@dataclass
class Settings:
    """One chaos run. ``rate`` is submits per second; ``gap`` the bounds of the random wait
    between two chaos actions; ``settle_seconds`` how long jobs get to end once chaos stops;
    ``server`` the running server a postgres run makes its database on (a redis run its keys,
    under a prefix of its own), and restarts."""

    backend: str
    workdir: Path
    seed: int
    chaos_seconds: float = 30.0
    settle_seconds: float = 60.0
    rate: float = 10.0
    gap: tuple[float, float] = (0.5, 2.0)
    moto_url: str = ""
    visibility_timeout: float = 2.0
    server: DatabaseServer | None = None

    @classmethod
    def of(
        cls,
        backend: str,
        workdir: Path,
        seed: int,
        chaos_seconds: float,
        moto_url: str = "",
        server: DatabaseServer | None = None,
    ) -> Settings:
        """The settings the CI tests and the soak use: on moto (one process serving three
        daemons, on a 2-core machine) fewer submits and a longer visibility timeout."""
        moto = backend == "dynamodb"
        return cls(
            backend,
            workdir,
            seed,
            chaos_seconds=chaos_seconds,
            rate=3.0 if moto else 12.0,
            moto_url=moto_url,
            visibility_timeout=4.0 if moto else 2.0,
            server=server,
        )


class Submitter:
    """Submits the workload to the daemons that are up, retrying a submit (same key) until a
    daemon answers it."""

    def __init__(self, cluster: Cluster, workload: Workload, rng: random.Random) -> None:
        self.cluster = cluster
        self.workload = workload
        self.rng = rng
        self.problems: list[str] = []
        self._pick = random.Random(rng.random())  # which daemon: drawn as tasks interleave

    async def run(self, seconds: float, rate: float) -> None:
        until = time.monotonic() + seconds
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(SUBMITS_IN_FLIGHT)
        sizes = (1, 1, 1, 2, 3, 5)
        mean = sum(sizes) / len(sizes)
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.expovariate(rate / mean))
            groups = self.workload.next_specs(self.rng.choice(sizes))
            task = asyncio.create_task(self._submit(groups, limit))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))

    async def _submit(self, groups: list[Group], limit: asyncio.Semaphore) -> None:
        async with limit:
            deadline = time.monotonic() + SUBMIT_LIMIT
            for g in groups:
                g.submits += 1
            while True:
                up = self.cluster.up()
                error: Exception | None = None
                if up:
                    try:
                        ids = await _send(self._pick.choice(up).url, [g.spec for g in groups])
                    except arqd.ArqdError as exc:
                        if exc.status < 500:
                            self.problems.append(f"submit refused: {exc} ({groups[0].spec})")
                            return
                        error = exc
                    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                        error = exc
                    else:
                        for g, job_id in zip(groups, ids, strict=True):
                            g.acked.add(job_id)
                        return
                if time.monotonic() > deadline:
                    self.problems.append(f"submit never answered in {SUBMIT_LIMIT}s: {error}")
                    return
                for g in groups:
                    g.retried += 1
                await asyncio.sleep(0.2)


async def _send(url: str, specs: list[dict[str, Any]]) -> list[str]:
    async with arqd.HttpClient(url, timeout=SUBMIT_TIMEOUT) as client:
        if len(specs) == 1:
            return [(await client.request_json("POST", "/v1/jobs", specs[0]))["id"]]
        answer = await client.request_json("POST", "/v1/jobs/batch", {"jobs": specs})
        return [j["id"] for j in answer["jobs"]]


# --- the run --------------------------------------------------------------------------------------


async def run_chaos(settings: Settings) -> Report:
    """One chaos run; prints its seed first and its summary line last."""
    rng = random.Random(settings.seed)
    run_id = f"{settings.backend[:2]}{settings.seed}"
    print(f"chaos: backend={settings.backend} seed={settings.seed} dir={settings.workdir}")
    server = None
    if settings.backend in SERVER_STOPS:
        assert settings.server is not None, f"a {settings.backend} run needs its server"
        server = ServerChaos(settings.server, settings.backend)
    backend = _backend(settings)
    if backend.kind == "dynamodb":
        await _init_aws(backend)
    if isinstance(settings.server, PostgresServer):
        await _create_database(settings.server, backend.name)
    remote = Remote(lambda: cluster.pids())
    await remote.start()
    cluster = Cluster(backend, remote.port, Fernet.generate_key().decode(), server=server)
    chaos: Chaos | None = None
    try:
        await cluster.start(settings.seed)
        workload = Workload(random.Random(rng.random()), run_id, remote.url)
        chaos = Chaos(cluster, random.Random(rng.random()), settings.gap)
        submitter = Submitter(cluster, workload, random.Random(rng.random()))
        await asyncio.gather(
            chaos.run(settings.chaos_seconds),
            submitter.run(settings.chaos_seconds, settings.rate),
        )
        problems = await cluster.calm() + chaos.problems + submitter.problems
        async with _verifier(backend) as client:
            stored = await _settle(client, workload.groups.values(), settings.settle_seconds)
            results = await _read_results(cluster, stored.values())
        await cluster.stop()
        run = _gather(settings, cluster, chaos, workload, remote, stored, results, problems)
        _keep(settings.workdir / "chaos.json", run, chaos.log)
        report = analyse(run)
        _print(report, chaos.log)
        return report
    finally:
        if chaos is not None:
            await chaos.abort()
        cluster.kill_all()
        await cluster.stop()
        await remote.stop()
        if server is not None:  # a shared server: up and healthy whatever happened
            await asyncio.to_thread(server.restore)
            await _drop_storage(settings.server, backend)


def _backend(settings: Settings) -> Backend:
    """Storage of the run's own: a fresh table and bucket, sqlite file, postgres database, or
    redis prefix."""
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    url = ""
    if isinstance(settings.server, PostgresServer):
        name = name.replace("-", "_")  # a database's and schema's name
        url = _database(settings.server, name)
    elif isinstance(settings.server, RedisServer):
        url = settings.server.url
    return Backend(
        settings.backend,
        settings.workdir,
        name=name,
        moto_url=settings.moto_url,
        url=url,
        visibility_timeout=settings.visibility_timeout,
        poll_max="500ms" if settings.backend == "dynamodb" else "100ms",
    )


def _gather(
    settings: Settings,
    cluster: Cluster,
    chaos: Chaos,
    workload: Workload,
    remote: Remote,
    stored: dict[str, Job],
    results: dict[str, Any],
    problems: list[str],
) -> Run:
    """Everything the verdict needs, from the driver's memory and the work directory."""
    lines = []
    slots: dict[int, int] = {}
    ended: dict[int, tuple[str, float]] = {}
    for slot in cluster.slots:
        for inc in slot.incarnations:
            lines += read_lines(inc.daemon.log_path, inc.pid)
            slots[inc.pid] = slot.index
            if inc.ended is not None:
                ended[inc.pid] = inc.ended
    least = settings.visibility_timeout / 2  # a shorter stall cannot cost a lease by itself
    stalls = read_stalls(Path(f"{cluster.record_path}.stalls"), slots, least)
    return Run(
        backend=settings.backend,
        visibility_timeout=settings.visibility_timeout,
        groups=workload.groups,
        stored=stored,
        results=results,
        executions=read_executions(cluster.record_path),
        lines=lines,
        disruptions=[*chaos.disruptions, *stalls, *_slow_requests(cluster, least)],
        calls=remote.calls,
        slots=slots,
        ended=ended,
        reloads=chaos.reloads,
        bad_reloads=chaos.bad_reloads,
        faults=cluster.faults(),
        problems=problems,
    )


def _keep(path: Path, run: Run, log: list[str]) -> None:
    """What the verdict cannot re-read from the work directory, for a post-mortem."""
    kept = {
        "actions": log,
        "disruptions": [dataclasses.asdict(d) for d in run.disruptions],
        "ended": run.ended,
        "slots": run.slots,
        "problems": list(run.problems),
    }
    path.write_text(json.dumps(kept, indent=1))


def _slow_requests(cluster: Cluster, least: float) -> list[Disruption]:
    """Backend requests that hung at least ``least`` seconds in a slot's proxy (moto shares the
    driver's process and this machine's cores: under load it can stall a daemon's heartbeats)."""
    return [
        Disruption("slow", slot.index, None, start, start + took)
        for slot in cluster.slots
        if slot.proxy is not None
        for start, took, _ in slot.proxy.slow
        if took >= least
    ]


def _print(report: Report, log: list[str]) -> None:
    for line in report.stale[:10]:
        print(f"chaos stale run: {line}")
    for line in report.violations[:30]:
        print(f"chaos violation: {line}")
    if len(report.violations) > 30:
        print(f"chaos: ... and {len(report.violations) - 30} more violations")
    if report.violations:
        print("chaos actions:\n  " + "\n  ".join(log))
    print(report.details())
    print(report.summary(), flush=True)


def _database(server: PostgresServer, name: str) -> str:
    """The DSN of database ``name`` on ``server``."""
    return f"{server.dsn.rpartition('/')[0]}/{name}"


async def _create_database(server: PostgresServer, name: str) -> None:
    """A database of the run's own on the server. Committed writes there outlive an immediate
    shutdown: the test cluster runs with ``synchronous_commit = off`` (fast, and safe against
    everything but a crash of the server), so this database turns it back on."""
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        await conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = on")
    finally:
        await conn.close()


async def _drop_storage(server: DatabaseServer | None, backend: Backend) -> None:
    """The run's database, or its keys, off the shared server."""
    if isinstance(server, RedisServer):
        from tests.conftest import drop_redis_prefix

        await drop_redis_prefix(backend.url, backend.name)
        return
    assert server is not None
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {backend.name} WITH (FORCE)")
    finally:
        await conn.close()


async def _init_aws(backend: Backend) -> None:
    from arqd.backends.dynamodb import init_table
    from arqd.results.s3 import init_bucket

    await init_table(_dynamo_settings(backend))
    await init_bucket(_s3_settings(backend), temporary_ttl=24 * 3600)


def _dynamo_settings(backend: Backend) -> Any:
    from arqd.backends.dynamodb import DynamoSettings

    return DynamoSettings(
        table=backend.name,
        region=AWS_REGION,
        endpoint_url=backend.moto_url,
        shards=1,
        access_key_id=AWS_KEY,
        secret_access_key=AWS_KEY,
    )


def _s3_settings(backend: Backend) -> Any:
    from arqd.results.s3 import S3Settings

    return S3Settings(
        bucket=backend.name,
        region=AWS_REGION,
        endpoint_url=backend.moto_url,
        access_key_id=AWS_KEY,
        secret_access_key=AWS_KEY,
    )


@contextlib.asynccontextmanager
async def _verifier(backend: Backend) -> AsyncIterator[arqd.Client]:
    """An in-process client straight on the backend (for dynamodb: moto without the proxy)."""
    results: ResultStore
    if backend.kind == "dynamodb":
        from arqd.results.s3 import S3Results

        results = S3Results(_s3_settings(backend))
    else:
        from arqd.results.files import FileResults

        results = FileResults(str(backend.workdir / "results"))
    queue = _queue(backend)
    async with queue, results, arqd.Client(queue=queue, results=results) as client:
        yield client


def _queue(backend: Backend) -> QueueBackend:
    if backend.kind == "sqlite":
        from arqd.backends.sqlite import SqliteQueue

        return SqliteQueue(str(backend.workdir / "q.sqlite3"))
    if backend.kind == "postgres":
        from arqd.backends.postgres import PostgresQueue

        return PostgresQueue(backend.url, schema=backend.name)
    if backend.kind == "redis":
        from arqd.backends.redis import RedisQueue

        return RedisQueue(backend.url, prefix=backend.name)
    from arqd.backends.dynamodb import DynamoQueue

    return DynamoQueue(_dynamo_settings(backend))


async def _settle(client: arqd.Client, groups: Iterable[Group], limit: float) -> dict[str, Job]:
    """Every stored job, once every acknowledged job (and every other stored job) is terminal
    or ``limit`` seconds passed (the verdict counts the rest as lost)."""
    deadline = time.monotonic() + limit
    await _wait_terminal(client, {job_id for g in groups for job_id in g.acked}, deadline)
    stored = await _list_all(client)
    others = {job.id for job in stored.values() if not job.state.terminal}
    if others:
        await _wait_terminal(client, others, deadline)
        stored = await _list_all(client)
    return stored


async def _wait_terminal(client: arqd.Client, ids: Iterable[str], deadline: float) -> None:
    pending = sorted(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for i in range(0, len(pending), 100):
            chunk = pending[i : i + 100]
            for job_id, job in zip(chunk, await client.core.queue.get_many(chunk), strict=True):
                if job is None or not job.state.terminal:
                    still.append(job_id)
        pending = still
        if pending:
            await asyncio.sleep(0.5)


async def _list_all(client: arqd.Client) -> dict[str, Job]:
    """Every stored record (not the clients' view: the verdict checks whose blob a result is)."""
    stored: dict[str, Job] = {}
    cursor = None
    while True:
        jobs, cursor = await client.core.queue.list_jobs(ListFilter(), 1000, cursor)
        stored.update((j.id, j) for j in jobs)
        if cursor is None:
            return stored


async def _read_results(cluster: Cluster, jobs: Iterable[Job]) -> dict[str, Any]:
    """Every succeeded job's result, read over HTTP from the daemons in turn."""
    out: dict[str, Any] = {}
    done = [j for j in jobs if j.state == "succeeded"]
    limit = asyncio.Semaphore(8)
    clients = [arqd.HttpClient(s.url, timeout=30) for s in cluster.slots]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)

        async def read(i: int, job: Job) -> None:
            async with limit:
                for attempt in range(5):
                    try:
                        out[job.id] = await clients[(i + attempt) % len(clients)].result(job.id)
                        return
                    except (arqd.BackendUnavailable, aiohttp.ClientError, TimeoutError):
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(read(i, j) for i, j in enumerate(done)))
    return out
