"""The DynamoDB backend's settings, and its tuning constants (each says what it bounds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arqd.backends import aws

# --- tuning constants -----------------------------------------------------------------------------

# Shards read in parallel by one lease call before it looks at the next ones. The default
# ``queue.shards`` (8) fits in one wave, so a lease call then sees every shard and leases the
# oldest jobs of the whole queue; with more shards, later waves are read only when the first did
# not fill the request.
LEASE_FANOUT = 8
# Query-and-lease rounds in one wave (plus one per shard) while other consumers keep winning the
# races: each lost race means another consumer made progress, so a few rounds drain the queue.
LEASE_ROUNDS = 8
# Once a lease call has lost a race it reads this many times more candidates from one random
# shard and tries them in random order, so concurrent consumers spread over the queue instead of
# colliding on its oldest jobs (a failed conditional write still costs a write unit).
CONTENDED_SPREAD = 4
# A heartbeat rewrites a lease only once a quarter of ``lease_for`` has passed since this process
# last wrote it; otherwise it answers from a consistent read (1 RRU instead of ~3 WRU).
HEARTBEAT_REWRITE = 0.25
# Leases this process ended, remembered so that a heartbeat racing the finish (the pool beats
# every lease it holds until the outcome is written) is answered without a refused write.
ENDED_MEMORY = 10_000
# Requests one call keeps in flight (the connection pool is sized to match).
MAX_PARALLEL = 32
# Per-state counter deltas are written at most this often (seconds), and on stats() and close.
COUNTS_FLUSH = 1.0
# How long a process trusts its cached shard count of a queue (seconds).
SHARDS_REFRESH = 60.0
# list_jobs reads at most this many index entries per call before it answers a short page with
# a cursor, so a filter that matches nothing never reads the whole table in one request.
LIST_READ_BUDGET = 5000
# Conditional attempts to take a dedupe key whose holder is gone, before giving up.
KEY_TRIES = 4
# Transactions one batch tries while the keys it carries turn out held, or let go, by others.
TRANSACT_ROUNDS = 8
# DynamoDB's limits, checked before a batch's first write (a value beyond them is the client's,
# answered 422, and nothing is stored): items per TransactWriteItems, its bytes (4 MB, with some
# room for our estimate), bytes of an item, of a partition key, digits of a number.
TRANSACT_MAX = 100
TRANSACT_BYTES = 4_000_000
ITEM_MAX = 400 * 1024
KEY_MAX = 2048
NUMBER_DIGITS = 38
# Worker rows of daemons gone for a day are deleted by DynamoDB's TTL.
WORKER_TTL = 86400


@dataclass(frozen=True, kw_only=True)
class DynamoSettings:
    """Where the table is and how to talk to it; ``stores.make_queue`` builds it from config."""

    table: str = "arqd"
    region: str | None = None
    endpoint_url: str | None = None
    shards: int = 8
    access_key_id: str | None = None  # None: botocore's usual credential chain
    secret_access_key: str | None = None
    retry_mode: str = "standard"  # botocore's: "standard" or "adaptive"
    max_attempts: int = 8  # per request, the first one included
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    create_missing: bool | None = None  # create the table on open; default: with endpoint_url


def _client_config(s: DynamoSettings, *, attempts: int | None = None, timeout: float = 0) -> Any:
    return aws.client_config(
        s, attempts=attempts, timeout=timeout, max_pool_connections=MAX_PARALLEL * 2
    )
