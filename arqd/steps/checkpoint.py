"""A multi-step job's progress: each step's phase and the outcomes of the steps that succeeded.

The runner hands a :class:`Checkpoint` to its ``save`` after every attempt (the pool makes that a
write fenced by the lease); a job resumed from one skips the steps that already succeeded, and a
step resumed while ``running`` continues its attempt count.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from arqd.model import StepState
from arqd.stepmodel import StepSpec

__all__ = ["Checkpoint", "StepPhase"]


class StepPhase(enum.StrEnum):
    """``StepState.state`` of a step."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class Checkpoint:
    """What the worker persists after every step attempt and gives back on resume.

    ``outcomes`` maps each succeeded step to ``{"status": int, "body": ...}`` (plus
    ``"truncated": true`` for a cut body); ``states`` is the job JSON's ``steps`` list.
    Neither ever holds a secret.
    """

    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: list[StepState] = field(default_factory=list)

    @classmethod
    def start(cls, steps: Iterable[StepSpec]) -> Checkpoint:
        """A fresh job's checkpoint: every step pending."""
        return cls({}, [StepState(name=s.name, state=StepPhase.PENDING) for s in steps])

    def copy(self) -> Checkpoint:
        return Checkpoint(dict(self.outcomes), list(self.states))

    def resume(self, steps: list[StepSpec]) -> Checkpoint:
        """The checkpoint made consistent with ``steps``: succeeded means an outcome is recorded."""
        previous = {s.name: s for s in self.states}
        outcomes = {s.name: self.outcomes[s.name] for s in steps if s.name in self.outcomes}
        states = []
        for step in steps:
            prev = previous.get(step.name)
            if step.name in outcomes:
                attempts = prev.attempts if prev is not None else 1
                status = outcomes[step.name].get("status")
                states.append(StepState(step.name, StepPhase.SUCCEEDED, status, attempts))
            elif prev is not None and prev.state == StepPhase.RUNNING:
                states.append(prev)  # interrupted mid-step: its attempt count goes on
            else:
                states.append(StepState(name=step.name, state=StepPhase.PENDING))
        return Checkpoint(outcomes, states)
