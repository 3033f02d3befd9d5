"""The PostgreSQL queue backend (``queue.backend = "postgres"``, extra ``arqd[postgres]``):
``queue`` holds the Python, ``queries`` every statement. docs/postgres.md describes both."""

from arqd.backends.postgres.queue import PostgresQueue, migrate
from arqd.config import redact_dsn

__all__ = ["PostgresQueue", "migrate", "redact_dsn"]
