"""The ETA of the live status line (pmlmd/core/progress.py): the estimate, and the task times
pmlmctl submit --wait infers from the daemon's counts."""

from __future__ import annotations

import pytest

from pmlmd.core.progress import StartFinishClock, eta_seconds


@pytest.mark.parametrize("durations, left, running, youngest, expected", [
    ([], 10, 2, None, None),  # nothing finished: no estimate
    ([], 10, 2, 3.0, None),
    ([2.0], 0, 0, None, 0.0),  # nothing left
    ([2.0], 1, 1, None, 2.0),  # one task left, its age unknown: one task time
    ([2.0], 1, 1, 0.5, 1.5),  # ... 0.5 s under way
    ([2.0], 1, 1, 5.0, 0.0),  # ... running longer than usual: at most one task time is taken off
    ([2.0], 9, 3, None, 6.0),  # three waves of three
    ([2.0], 10, 3, None, 8.0),  # a fourth wave for the one left over
    ([2.0], 9, 3, 0.5, 5.5),
    ([2.0], 9, 0, None, 18.0),  # nothing running (all paused or queued): one at a time
    ([1.0, 2.0, 30.0], 4, 2, None, 4.0),  # the median, not the mean: one slow task does not swing it
    ([1.0, 2.0, 3.0, 4.0], 2, 2, None, 2.5),
    ([0.0], 5, 1, None, 0.0),
    ([10.0], 9, 3, 4.0, 26.0),  # the docstring's example
])
def test_eta(durations, left, running, youngest, expected):
    assert eta_seconds(durations, left, running, youngest) == expected


def test_eta_example_from_the_issue():
    # -n 20 of 1 s tasks, the first done 1.2 s in with 8 running: the old estimate said
    # 1.2 * 19 / 1 = 22.8 s; this one says 3 waves of 1 s, less what the youngest has run.
    assert eta_seconds([1.0], 19, 8, 0.2) == pytest.approx(2.8)


def clock_run(polls):
    clock = StartFinishClock()
    for now, done, started in polls:
        clock.observe(now, done, started)
    return clock


@pytest.mark.parametrize("polls, durations", [
    # one 1 s task at a time, polled every 0.5 s: starts and finishes spread over the poll interval
    ([(0.0, 0, 0), (0.5, 0, 1), (1.0, 0, 1), (1.5, 1, 2), (2.0, 1, 2), (2.5, 2, 3)], [1.0, 1.0]),
    # tiny tasks, 10 finishing per 0.25 s at a steady 2 running: Little's law, 2 / (40 per s) =
    # 0.05 s each (the two running at the first poll give no time)
    ([(0.0, 0, 2), (0.25, 10, 12), (0.5, 20, 22), (0.75, 30, 32)], [0.05] * 28),
    # nothing seen start: tasks running at the first poll give no time when they finish
    ([(0.0, 0, 3), (1.0, 3, 3)], []),
    # starts at 0.25 and 0.75; one is put back in the queue, taking back the newest start; the
    # other finishes, seen at 3.0, so at 2.5
    ([(0.0, 0, 0), (1.0, 0, 2), (2.0, 0, 1), (3.0, 1, 1)], [2.25]),
])
def test_task_times_inferred_from_counts(polls, durations):
    assert list(clock_run(polls).durations) == pytest.approx(durations)


def test_youngest_age_from_counts():
    clock = clock_run([(0.0, 0, 0), (1.0, 0, 2)])  # two starts spread over (0, 1]: at 0.25 and 0.75
    assert clock.youngest_age(2.0) == pytest.approx(1.25)
    assert clock_run([(0.0, 0, 3)]).youngest_age(1.0) is None  # started before the first poll
    assert clock_run([]).youngest_age(1.0) is None


def test_the_inferred_times_feed_the_same_estimate():
    # 20 tasks of 1 s, 4 at a time, polled every 0.25 s: the first 4 are seen started at 0.25,
    # finished (and 4 more started) at 1.25. About 4 waves, less what the newest have run, are left.
    clock = clock_run([(0.0, 0, 0), (0.25, 0, 4), (0.5, 0, 4), (0.75, 0, 4), (1.0, 0, 4), (1.25, 4, 8)])
    assert list(clock.durations) == pytest.approx([1.0] * 4)
    assert eta_seconds(clock.durations, 20 - 4, 4, clock.youngest_age(1.25)) == pytest.approx(4 - 0.03125)
