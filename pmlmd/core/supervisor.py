"""The supervisor: every worker's lifecycle, kept together. Events in, effects out; no I/O.

The executor (engine.Engine) keeps one record per worker (its process, its measurements) under a
key (its pid); the record's ``life`` (lifecycle.Life) is its state. ``handle(key, event, now)``
moves a worker's lifecycle on (lifecycle.handle) and returns the effects (lifecycle.Effect) the
executor carries out; the count of workers in each state (``tally``: governor.RUNNING, PAUSED,
HELD, TERMINATING, KILLED) and the index of the workers with a deadline (Life.due: the grace, an
agent's acknowledgement, ``--timeout``) follow every transition here, so the executor neither
counts nor scans. ``due(now)`` names the workers whose deadline has come, to be handed a
lifecycle.Tick; ``next_deadline()`` says when the next one comes. Times are monotonic seconds
handed in: the supervisor reads no clock.
"""

from __future__ import annotations

import collections
import math
from typing import Generic, Hashable, Protocol, TypeVar

from . import lifecycle
from .lifecycle import Effect, Event, Life


class Supervised(Protocol):
    life: Life


R = TypeVar("R", bound=Supervised)


class Supervisor(Generic[R]):
    """The workers being supervised (``records``: key -> the executor's record of each)."""

    def __init__(self):
        self.records: dict[Hashable, R] = {}
        self.tally: collections.Counter[str] = collections.Counter()  # state -> how many workers are in it
        self._timed: dict[Hashable, R] = {}  # the records whose Life has a deadline (Life.due)

    def add(self, key: Hashable, record: R) -> None:
        """Supervise ``record`` (its ``life`` set: lifecycle.born) under ``key``."""
        self.records[key] = record
        self.tally[record.life.state] += 1
        if record.life.due is not None:
            self._timed[key] = record

    def remove(self, key: Hashable) -> R:
        """Stop supervising the worker (it has been reaped, or is let go); its record."""
        record = self.records.pop(key)
        self.tally[record.life.state] -= 1
        self._timed.pop(key, None)
        return record

    def clear(self) -> None:
        self.records.clear()
        self.tally.clear()
        self._timed.clear()

    def handle(self, key: Hashable, record: R, event: Event, now: float) -> list[Effect]:
        """``event`` for the worker ``record`` (kept under ``key``) at ``now``: its next state, and
        what is to be done (lifecycle.handle). A record not supervised (any more) changes all the
        same, but is counted nowhere."""
        life, effects = lifecycle.handle(record.life, event, now)
        self._moved(key, record, life)
        return effects

    def adopt(self, key: Hashable, record: R, now: float, terminate: bool = False) -> list[Effect]:
        """A worker found alive at a restart, added with ``add``: it runs from now on, and with
        ``terminate`` is ended as any other (lifecycle.adopted)."""
        life, effects = lifecycle.adopted(record.life, now, terminate)
        self._moved(key, record, life)
        return effects

    def _moved(self, key: Hashable, record: R, life: Life) -> None:
        before, record.life = record.life, life
        if self.records.get(key) is not record:
            return
        if before.state != life.state:
            self.tally[before.state] -= 1
            self.tally[life.state] += 1
        if life.due is not None:
            self._timed[key] = record
        else:
            self._timed.pop(key, None)

    def next_deadline(self) -> float:
        """The first deadline of any worker (monotonic seconds; inf: none)."""
        return min((record.life.due for record in self._timed.values()), default=math.inf)

    def due(self, now: float) -> list[Hashable]:
        """The keys of the workers whose deadline has come by ``now``."""
        return [key for key, record in self._timed.items() if now >= record.life.due]
