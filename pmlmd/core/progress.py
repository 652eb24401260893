"""How long a batch still needs: the estimate the live status line shows as its ETA.

Pure code, no clock reads: the callers pass the times in. ``pmlmctl run`` feeds it the attempts'
real start and end times (Runner.progress); ``pmlmctl submit --wait`` sees only the daemon's
counts and infers task times from them (StartFinishClock).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Sequence


def eta_seconds(durations: Sequence[float], left: int, running: int,
                youngest_age: float | None = None) -> float | None:
    """Seconds until every task has finished, or None while no task has finished yet.

    The model, chosen to be explainable rather than clever:

    * every task takes T, the median wall time of the tasks finished so far (``durations``; the
      median, so one task that hung or failed at once does not swing it);
    * the tasks not finished (``left``: running, paused and queued) run in waves at the current
      concurrency c = max(``running``, 1): ceil(left / c) waves of T each;
    * the first wave is already under way. Its youngest task, started ``youngest_age`` seconds
      ago, is the one that ends last, so that much (at most T) is taken off.

    So eta = T * ceil(left / c) - min(youngest_age, T). With 9 tasks left, 3 running, T = 10 s and
    the youngest running task 4 s old: 3 waves, 30 - 4 = 26 s. Paused tasks count as left but
    not as concurrency (they hold no slot that makes progress). The estimate is wrong when task
    times differ widely or the concurrency changes (the governor admits and pauses workers); it
    is redrawn with the new numbers on every status update.
    """
    if not durations:
        return None
    if left <= 0:
        return 0.0
    task_time = max(statistics.median(durations), 0.0)
    waves = math.ceil(left / max(running, 1))
    head_start = 0.0
    if running > 0 and youngest_age is not None:
        head_start = min(max(youngest_age, 0.0), task_time)
    return task_time * waves - head_start


class StartFinishClock:
    """Task times inferred from counts alone, for ``pmlmctl submit --wait``.

    The daemon's status reply carries counts (done, queued, running), not times, and asking for
    the report (every attempt of every task) a few times a second would cost a big batch dear. So
    the client infers the times from what it polls: between two polls at t0 and t1 it sees how
    many tasks started (total - queued grew) and how many finished (done grew), and spreads each
    group evenly over (t0, t1]. Matching the k-th finish to the k-th start (first in, first out)
    gives one time per finish: the horizontal distance between the started and finished curves.
    That is exact for tasks of equal length at a steady concurrency, also for tasks much shorter
    than the poll interval (it is then Little's law: concurrency / completion rate); for tasks of
    very different lengths the single times are off, and the median that ``eta_seconds`` takes
    of the last ``window`` of them is a rough guide. Tasks that started before the first poll
    give no time (their start was not seen); a task put back in the queue takes back the newest
    start.
    """

    def __init__(self, window: int = 1000):
        self.durations: deque[float] = deque(maxlen=window)
        self.pending: deque[float | None] = deque()  # start times of started, unfinished tasks, oldest first
        self.last_time: float | None = None
        self.started = 0
        self.done = 0

    def observe(self, now: float, done: int, started: int) -> None:
        """One poll at time ``now``: ``done`` tasks finished, ``started`` = total - queued."""
        if self.last_time is None:
            self.pending.extend([None] * max(started - done, 0))
            self.last_time, self.started, self.done = now, started, done
            return
        t0, span = self.last_time, now - self.last_time
        new = started - self.started
        for k in range(new):
            self.pending.append(t0 + span * (k + 0.5) / new)
        for _ in range(min(-new, len(self.pending))):  # requeued: back in the queue
            self.pending.pop()
        finished = done - self.done
        for k in range(finished):
            start = self.pending.popleft() if self.pending else None
            if start is not None:
                self.durations.append(max(t0 + span * (k + 0.5) / finished - start, 0.0))
        self.last_time, self.started, self.done = now, started, done

    def youngest_age(self, now: float) -> float | None:
        """How long ago the newest running task started, if that start was seen."""
        if self.pending and self.pending[-1] is not None:
            return max(now - self.pending[-1], 0.0)
        return None
