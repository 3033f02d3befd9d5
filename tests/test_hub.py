"""The hub's handling of other processes' changes, as a backend that hears of them reports
them (postgres: a NOTIFY naming the jobs that ended)."""

from __future__ import annotations

import asyncio

from arqd.hub import Hub


async def test_named_changes_wake_every_waiter_of_those_jobs_at_once():
    """A job another process names wakes its waiters now, to read it again: one waiting on a
    version, and one still reading it (a guard), whose change would otherwise be lost until
    the follower's next round. Jobs nobody waits on cost nothing."""
    hub = Hub()
    waiting = hub.watch("a", version=3)
    reading = hub.watch("a")  # a read in flight: no version yet
    other = hub.watch("b", version=1)
    hub.others_changed(["a", "nobody-waits"])
    assert waiting.done() and waiting.result() is None
    assert reading.done() and reading.result() is None
    assert not other.done()
    assert hub.watched() == {"b": 1}


async def test_unnamed_changes_start_the_followers_round_at_once():
    """A change the backend cannot name (a listener that reconnected and may have missed
    notifications) starts the follower's round of every watched job now, not after its
    interval; a round is otherwise a full interval apart."""
    hub = Hub()
    follower = asyncio.create_task(hub.next_round(3600))
    await asyncio.sleep(0)
    hub.others_changed(None)
    await asyncio.wait_for(follower, 5)
    waited = asyncio.create_task(hub.next_round(3600))
    await asyncio.sleep(0.05)
    assert not waited.done()
    waited.cancel()
