"""Where config picks the queue backend and the result store by name; the only core module that
imports them.

Each backend's or store's module is imported only when config names it, so optional drivers
(aioboto3 for ``dynamodb`` and ``s3``, extra ``arqd[aws]``) are needed only by those who use
them; ``tests/test_stores.py`` pins it for the result stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arqd.backends.base import QueueBackend
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import QueueConfig, ResultsConfig
from arqd.errors import ConfigError
from arqd.results.base import ResultStore

if TYPE_CHECKING:  # the AWS backends are imported only when config names them
    from arqd.backends.dynamodb import DynamoSettings
    from arqd.results.s3 import S3Settings


def make_queue(cfg: QueueConfig, clock: Clock = SYSTEM_CLOCK) -> QueueBackend:
    if cfg.backend == "memory":
        from arqd.backends.memory import MemoryQueue

        return MemoryQueue(clock=clock)
    if cfg.backend == "sqlite":
        from arqd.backends.sqlite import SqliteQueue

        return SqliteQueue(cfg.path, clock=clock, synchronous=cfg.synchronous)
    if cfg.backend == "dynamodb":
        from arqd.backends.dynamodb import DynamoQueue

        return DynamoQueue(dynamo_settings(cfg), clock=clock)
    raise ConfigError(f"queue.backend: {cfg.backend!r} is not available in this build")


def queue_class(backend: str) -> type[QueueBackend]:
    """The class of a queue backend by its config name, without making one (for what it
    declares, such as ``multi_host``)."""
    if backend == "memory":
        from arqd.backends.memory import MemoryQueue

        return MemoryQueue
    if backend == "sqlite":
        from arqd.backends.sqlite import SqliteQueue

        return SqliteQueue
    if backend == "dynamodb":
        from arqd.backends.dynamodb import DynamoQueue

        return DynamoQueue
    raise ConfigError(f"queue.backend: {backend!r} is not available in this build")


def make_results(cfg: ResultsConfig, clock: Clock = SYSTEM_CLOCK) -> ResultStore:
    """The store ``results.backend`` names, from its own module (``arqd/results/``)."""
    if cfg.backend == "memory":
        from arqd.results.memory import MemoryResults

        return MemoryResults(clock=clock)
    if cfg.backend == "files":
        from arqd.results.files import FileResults

        return FileResults(cfg.path, clock=clock)
    if cfg.backend == "s3":
        from arqd.results.s3 import S3Results

        return S3Results(s3_settings(cfg), clock=clock)
    raise ConfigError(f"results.backend: {cfg.backend!r} is not available in this build")


def dynamo_settings(cfg: QueueConfig) -> DynamoSettings:
    from arqd.backends.dynamodb import DynamoSettings

    return DynamoSettings(
        table=cfg.table, region=cfg.region, endpoint_url=cfg.endpoint_url, shards=cfg.shards
    )


def s3_settings(cfg: ResultsConfig) -> S3Settings:
    from arqd.results.s3 import S3Settings

    return S3Settings(
        bucket=cfg.bucket, prefix=cfg.prefix, region=cfg.region, endpoint_url=cfg.endpoint_url
    )


async def init_aws(queue: QueueConfig, results: ResultsConfig) -> list[str]:
    """``arqd init-aws``: create the DynamoDB table (on-demand, indexes, TTL) and the S3 bucket
    (lifecycle rule expiring ``temporary/``) that the config names, when missing. Safe to run
    again; answers one line per thing done. Backends other than dynamodb/s3 are left alone."""
    done: list[str] = []
    if queue.backend == "dynamodb":
        from arqd.backends.dynamodb import init_table

        done += await init_table(dynamo_settings(queue))
    if results.backend == "s3":
        from arqd.results.s3 import init_bucket

        done += await init_bucket(s3_settings(results), temporary_ttl=results.temporary_ttl)
    return done
