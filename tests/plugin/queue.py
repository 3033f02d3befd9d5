"""A third-party queue backend and result store, plugged by config:
``queue.backend = "tests.plugin.queue:PluggedQueue"``, ``results.backend =
"tests.plugin.queue:PluggedResults"``.

The smallest honest third-party backend: the public memory backend under another name, with an
option of its own (``label``, from ``[queue.options]``) so that options are seen to arrive. It
passes the contract suites because the memory backend does; what it proves is the plugging
(loading by import path, options, the contract check), not a new storage.
"""

from __future__ import annotations

from arqd.backends.memory import MemoryQueue
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.results.memory import MemoryResults


class PluggedQueue(MemoryQueue):
    name = "plugged"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, label: str = "plugged") -> None:
        super().__init__(clock=clock)
        self.label = label


class PluggedResults(MemoryResults):
    name = "plugged"

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, label: str = "plugged") -> None:
        super().__init__(clock=clock)
        self.label = label


class NotABackend:
    """A class that implements no contract: config refuses it."""
