"""The hub's hints of other processes' changes: what the follower reads between its rounds."""

from __future__ import annotations

import asyncio

from arqd.hub import Hub


async def test_only_watched_jobs_are_hinted_and_the_follower_gets_them_at_once():
    """Ids another process names are kept only while a wait watches them (the hints stay
    bounded by the waits, not by the traffic of the cluster), and a waiting follower is handed
    them at once."""
    hub = Hub()
    fut = hub.watch("watched", version=3)
    hub.others_changed(["elsewhere", "nobody-waits"])
    assert await hub.wait_others(0.01) is None  # nothing watched was named: a plain round
    follower = asyncio.create_task(hub.wait_others(60))
    await asyncio.sleep(0)
    hub.others_changed(["elsewhere", "watched"])
    assert await asyncio.wait_for(follower, 5) == {"watched"}
    hub.unwatch("watched", fut)


async def test_unnamed_changes_make_the_follower_read_everything():
    """A change the backend cannot name (a listener that reconnected and may have missed
    notifications) makes the follower read every watched job, as a round does."""
    hub = Hub()
    hub.watch("a", version=1)
    hub.others_changed(["a"])
    hub.others_changed(None)
    assert await hub.wait_others(60) is None
    hub.others_changed(["a"])
    assert await hub.wait_others(60) == {"a"}
