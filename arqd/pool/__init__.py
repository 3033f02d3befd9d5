"""The consumer pool: lease jobs, run their handlers, store results, report outcomes.

Its parts, each in its module (each loop runs under a :class:`~arqd.supervise.Supervisor`: a loop
that crashes is logged and restarted):

- ``pool.py``, the lifecycle: the **fetcher** leases batches while the pool has room (a job for
  every free consumer, plus a prefetch sized so a buffered job waits about ``TARGET_WAIT`` at the
  recent pace of attempts: none while attempts are long or not yet timed, at most
  ``min(batch, concurrency)``), into a local buffer; when nothing is ready it sleeps until a
  local submit wakes it or an adaptive poll interval passes. **Consumers** (``concurrency``
  coroutines) take leases from the buffer and run one attempt each; the **deadline** sweep
  interrupts attempts past their timeout; ``stop()`` releases what it cannot finish.
- ``leases.py``, the bookkeeping: one ``Held`` per lease this process holds (token, expiry as last
  known, its attempt, whether its outcome is being written); the **heartbeat** extends every held
  lease in one call, and learns of lost leases (the handler is interrupted, its output discarded)
  and of cancel requests from other processes.
- ``attempt.py``, the attempt: one job on one consumer (context, deadline, interruption, result);
  the **progress** writer writes coalesced progress at most a few times per second per job.
- ``completer.py``, the **completer**: writes outcomes in batches (one backend call for all that
  piled up while the previous call ran), so throughput grows with load instead of collapsing.

The pool decides nothing about a job's fate: refusals, failures and their retries, where a result
goes and the outcome of an interruption are the core's (``Core.outcomes``: ``refuse``,
``failure``...; ``Core.resultio.store``). It reports what happens to an
:class:`~arqd.observe.Observer`.

A :class:`~arqd.supervise.LoopWatch` thread reports the event loop's timers running late and
repairs the timer heap when a handler broke it (``asyncio.sleep(nan)``).
"""

from arqd.pool.pool import Pool

__all__ = ["Pool"]
