"""The DynamoDB queue backend: one table shared by every host, fenced writes, no lease sweeper.

Design (the full reasoning, the request sequence of every operation and its cost are in
``docs/dynamodb.md``):

- **One table**, key ``(pk, sk)``. A job is the item ``pk = "J#<id>", sk = "J"``; a dedupe key
  is ``"K#<key>"``; per-queue counters live under ``pk = "Q"`` and worker rows under ``pk = "W"``;
  a named mark (``advance_mark``) is ``"M#<name>"``, raised by one conditional UpdateItem.
- **Visibility**, as in SQLite: a live job carries ``va`` (visible at: ``ready_at`` while queued,
  the lease expiry while running) and ``vq = "<queue>#<shard>"``. The sparse GSI ``vis`` on
  ``(vq, va)`` lists ready jobs and expired leases alike, oldest first; terminal jobs drop both
  attributes and leave the index. The shard is chosen at random on submit (``shards`` per queue),
  so no index partition is hot; consumers read the shards from a random start, in waves of
  ``LEASE_FANOUT`` parallel queries, and merge each wave oldest first.
- **Leasing** is a conditional ``UpdateItem`` on the base item: ``st`` and ``va`` must still be
  what the index showed. Every lease and heartbeat moves ``va``, so a stale index entry (GSI lag)
  can only cost a failed conditional write, never a second lease. The lease writes a fresh token
  ``lt``; heartbeat, progress and finish are conditional on ``st = running AND lt = <token>``.
- **Unknown outcomes**: botocore retries a write whose response was lost. A retried lease or
  finish that finds its own work already done (``lt`` equal to its token, or ``ft`` equal to the
  fingerprint of the same outcome, returned with the failed condition) counts as applied, so a
  lost response never burns an attempt nor refuses (and discards) a finish that happened.
- **Dedupe keys**: ``K#<key>`` points at the job holding it, written with the job in one
  ``TransactWriteItems`` (only for keyed jobs). Whether the key is *held* is read from that job:
  it exists, has not freed its key (``kf``), and its ``expires_at`` has not passed. So expiry
  needs no write, and the key item is only tidied afterwards (best effort).
- **Listing and stats** never scan: ``list`` (``lq``, by id), ``dead`` (failed and cancelled
  jobs) and ``grp`` (group id) are key-only GSIs; per-queue per-state counters are the ``Q``
  items, written from per-process deltas at most once a second (``COUNTS_FLUSH``).
- **Expiry**: an ended job with an expiry enters ``exp`` (``(xp, x)``); ``sweep_expired``
  deletes expired jobs by conditional DeleteItems, one sweeper per job; DynamoDB's TTL on
  ``ttl`` is the free backstop for whatever no sweeper reached.
- Errors: botocore retries throttling, 5xx and connection errors (``retry_mode``); what is left
  becomes :class:`BackendUnavailable` or :class:`BackendError` in the AWS toolkit
  (``arqd.backends.aws.translate``), never a botocore exception; this module only reads
  DynamoDB's own refusals first (a failed condition, a cancelled transaction, a missing table).

Sessions, clients and their config come from the toolkit too, which imports ``aioboto3`` when
the backend opens, so the core never needs it (extra ``arqd[aws]``).

The package, by concern (no module imports one listed after it):

- ``settings``: :class:`DynamoSettings` and the tuning constants.
- ``refusals``: DynamoDB's own refusals, read before the AWS toolkit maps the rest.
- ``schema``: item keys, the indexes, creating the table (``init_table``, ``ensure_table``).
- ``codec``: items ↔ jobs, request expressions, DynamoDB's size and number limits.
- ``table``: ``_Table``, the base: clients, requests, counters, shard counts.
- ``submit``, ``leasing``: the job store's writes (``enqueue``; lease, heartbeat, update,
  finish), as mixins on ``_Table``.
- ``catalog``, ``maintenance``: the other two contracts, as mixins on ``_Table``.
- ``queue``: :class:`DynamoQueue`, the three assembled, with cancel, delete, redrive and reads.
"""

from arqd.backends.dynamodb.leasing import _Grant
from arqd.backends.dynamodb.queue import DynamoQueue
from arqd.backends.dynamodb.schema import GSIS, ensure_table, init_table, table_definition
from arqd.backends.dynamodb.settings import DynamoSettings

__all__ = [
    "GSIS",
    "DynamoQueue",
    "DynamoSettings",
    "_Grant",  # tests build a lease call by hand to stage a stale index entry
    "ensure_table",
    "init_table",
    "table_definition",
]
