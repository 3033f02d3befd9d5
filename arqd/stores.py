"""Where config picks the queue backend and the result store; the only core module that
imports them.

``queue.backend`` and ``results.backend`` name a built-in (``memory``, ``sqlite``, ``dynamodb``;
``memory``, ``files``, ``s3``) or a class by import path (``"package.module:Class"``), which
must subclass the contract (``QueueBackend``, ``ResultStore``). Both kinds are made the same
way, ``cls(clock=clock, **arguments)``: a built-in's arguments come from its typed settings
(``path``, ``table``…), a plugged class's from its ``options`` table (``docs/design.md``).

Each module is imported only when config names it, so optional drivers (aioboto3 for
``dynamodb`` and ``s3``, extra ``arqd[aws]``; asyncpg for ``postgres``, extra
``arqd[postgres]``; redis-py for ``redis``, extra ``arqd[redis]``) are needed only by those who
use them;
``tests/test_stores.py`` pins it for the result stores.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from arqd.backends.base import QueueBackend
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.config import Config, QueueConfig, ResultsConfig
from arqd.errors import ConfigError
from arqd.results.base import ResultStore

if TYPE_CHECKING:  # the AWS backends are imported only when config names them
    from arqd.backends.dynamodb import DynamoSettings
    from arqd.results.s3 import S3Settings

# The built-ins by config name: the class each name stands for.
QUEUES = {
    "memory": "arqd.backends.memory:MemoryQueue",
    "sqlite": "arqd.backends.sqlite:SqliteQueue",
    "dynamodb": "arqd.backends.dynamodb:DynamoQueue",
    "postgres": "arqd.backends.postgres:PostgresQueue",
    "redis": "arqd.backends.redis:RedisQueue",
}
RESULTS = {
    "memory": "arqd.results.memory:MemoryResults",
    "files": "arqd.results.files:FileResults",
    "s3": "arqd.results.s3:S3Results",
}


def load_class(path: str, contract: type) -> type[Any]:
    """The class at ``"module:Class"``, checked to implement ``contract``; :class:`ConfigError`
    saying why not (no such module, no such attribute, a module that fails to import, not a
    subclass)."""
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a plugin's module may raise anything while it loads; say which
        raise ConfigError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not (isinstance(target, type) and issubclass(target, contract)):
        raise ConfigError(
            f"{path!r} is not a subclass of {contract.__module__}.{contract.__qualname__}"
        )
    if inspect.isabstract(target):
        missing = ", ".join(sorted(getattr(target, "__abstractmethods__", ())))
        raise ConfigError(f"{path!r} does not implement {missing}")
    return target


def queue_class(backend: str) -> type[QueueBackend]:
    """The class ``queue.backend`` names, without making one (for what it declares, such as
    ``multi_host``); :class:`ConfigError` if it does not load."""
    cls: type[QueueBackend] = load_class(QUEUES.get(backend, backend), QueueBackend)
    return cls


def results_class(backend: str) -> type[ResultStore]:
    """The class ``results.backend`` names, without making one."""
    cls: type[ResultStore] = load_class(RESULTS.get(backend, backend), ResultStore)
    return cls


def queue_arguments(cfg: QueueConfig) -> dict[str, Any]:
    """What the queue class is made with besides the clock."""
    if cfg.backend == "sqlite":
        return {"path": cfg.path, "synchronous": cfg.synchronous}
    if cfg.backend == "dynamodb":
        return {"settings": dynamo_settings(cfg)}
    if cfg.backend == "postgres":
        return {
            "dsn": cfg.dsn,
            "schema": cfg.schema,
            "pool_size": cfg.pool_size,
            "statement_timeout": float(cfg.statement_timeout),
            "migrate": cfg.migrate,
        }
    if cfg.backend == "redis":
        return {
            "url": cfg.url,
            "prefix": cfg.prefix,
            "pool_size": cfg.pool_size,
            "statement_timeout": float(cfg.statement_timeout),
        }
    return dict(cfg.options)  # memory takes none (config refuses options for a built-in)


def results_arguments(cfg: ResultsConfig) -> dict[str, Any]:
    """What the result store class is made with besides the clock."""
    if cfg.backend == "files":
        return {"path": cfg.path}
    if cfg.backend == "s3":
        return {"settings": s3_settings(cfg)}
    return dict(cfg.options)


def make_queue(cfg: QueueConfig, clock: Clock = SYSTEM_CLOCK) -> QueueBackend:
    return queue_class(cfg.backend)(clock=clock, **queue_arguments(cfg))


def make_results(cfg: ResultsConfig, clock: Clock = SYSTEM_CLOCK) -> ResultStore:
    """The store ``results.backend`` names, from its own module (``arqd/results/``)."""
    return results_class(cfg.backend)(clock=clock, **results_arguments(cfg))


def check_backends(config: Config) -> None:
    """Both classes load, implement their contract, and take the ``options`` given: a start
    check (``arqd.daemon.PREFLIGHT``), so start, reload and ``arqd check-config`` refuse a plugged
    backend that would not run, naming the setting. Nothing is made or opened."""
    problems: list[str] = []
    sections: list[tuple[str, QueueConfig | ResultsConfig]] = [
        ("queue", config.queue),
        ("results", config.results),
    ]
    for name, section in sections:
        try:
            if isinstance(section, QueueConfig):
                cls: type[Any] = queue_class(section.backend)
                arguments = queue_arguments(section)
            else:
                cls = results_class(section.backend)
                arguments = results_arguments(section)
        except ConfigError as exc:
            problems.append(config.problem(f"{name}.backend", str(exc)))
            continue
        try:
            inspect.signature(cls).bind(clock=SYSTEM_CLOCK, **arguments)
        except TypeError as exc:  # "unexpected keyword argument 'x'", "missing ... 'dsn'"
            problems.append(config.problem(f"{name}.options", f"{section.backend}: {exc}"))
    if problems:
        raise ConfigError("\n".join(problems))


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


async def init_db(queue: QueueConfig) -> list[str]:
    """``arqd init-db``: create or migrate the postgres schema the config names (under an
    advisory lock; refused when the schema is newer than this arqd). Answers one line per
    migration applied; other backends are left alone."""
    if queue.backend != "postgres":
        return []
    from arqd.backends.postgres import PostgresQueue

    backend = PostgresQueue(**queue_arguments(queue) | {"migrate": False})
    return await backend.init_db()
