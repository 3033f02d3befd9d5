"""The systems of ``python -m benchmarks.compare``: one module per system, each run as
``python -m benchmarks.peers.<name>_bench --workload noop|sleep|rtt|recovery ...`` and printing
one JSON line of figures; ``common`` (standard library only, for both environments) holds the
command line, the figures, worker processes and the crash-recovery procedure, ``services`` the
Redis and PostgreSQL started for a run. ``arqd_bench`` runs with arqd's interpreter, every other
module with ``.venv-peers/bin/python``.

Fairness: every system gets its documented fastest settings for each workload, and every
choice is written here and in the module's docstring.

- Brokers: Redis 7 with no persistence (no RDB, no AOF); PostgreSQL 15 with
  ``synchronous_commit = off`` (fsync on). arqd's sqlite runs at its default
  ``synchronous = NORMAL`` (nothing committed is lost when a process dies), so arqd keeps the
  strongest durability of the table.
- Concurrency: 100 jobs at once in the sleep workload everywhere; the async peers also run
  noop with 100 (no difference measured for SAQ at 10, 20, 100, nor arq at 10, 100, 300),
  huey with one thread
  (its default; more threads only contend for the GIL), RQ with its single job at a time.
- Enqueue: each system's bulk call where it has one (arqd ``submit_many`` / ``POST
  /v1/jobs/batch``, RQ ``enqueue_many``, procrastinate ``batch_defer_async``); SAQ and arq have
  none and enqueue 500 at a time concurrently; huey enqueues one by one (synchronous).
- Waiting for a result (rtt): arqd ``Client.wait`` (in-process wake-up) or an HTTP long-poll;
  SAQ ``apply(poll_interval=0.001)``; arq ``Job.result(poll_delay=0.001)`` with a worker
  ``poll_delay`` of 1 ms (default 0.5 s); huey ``notify_result=True`` (BLPOP); RQ
  ``latest_result(timeout=...)`` (blocking XREAD); procrastinate has no results, so the job's
  status row is read every millisecond.
- Recovery (``--job-seconds`` 30, SIGKILL one second in, a fresh worker at once): arqd
  ``visibility_timeout = "5s"``; SAQ ``heartbeat=5`` with ``job.update()`` every second and a
  1 s sweep; arq ``job_timeout`` = job + 5 s (no heartbeat: the job's "in progress" key must
  expire, timeout + 10 s); RQ's forking worker with 1 s job monitoring and maintenance and
  ``Retry(max=3)`` (a started job's registry entry outlives its last heartbeat by 60 s, a
  constant); procrastinate's documented ``retry_stalled_jobs`` periodic task every second with
  1 s heartbeats and 5 s to stalled; huey has no acknowledgement or lease: the job is lost.
"""
