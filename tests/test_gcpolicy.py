"""The daemon's collector policy: survivors frozen often, everything collected rarely."""

from __future__ import annotations

import asyncio
import gc
import weakref

from arqd.gcpolicy import CollectorPolicy

from .util import eventually


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


async def test_frozen_cycles_wait_for_the_thaw_and_stopping_thaws_all():
    """A cycle alive at a freeze is not walked by ordinary collections, so once garbage it waits;
    the full collection of the thaw frees it; stopping the policy unfreezes everything."""
    policy = CollectorPolicy(freeze=0.01, thaw=3600)
    task = asyncio.create_task(policy.run())
    try:
        node = Node()
        ref = weakref.ref(node)
        frozen = gc.get_freeze_count()
        await eventually(lambda: gc.get_freeze_count() > frozen)  # a freeze while it is alive
        del node  # now garbage, but frozen
        gc.collect()
        assert ref() is not None  # frozen: an ordinary full collection does not walk it
        policy.collect_all()
        assert ref() is None and policy.full_collections == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert gc.get_freeze_count() == 0
