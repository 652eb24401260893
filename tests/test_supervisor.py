"""The supervisor (pmlmd.core.supervisor): every worker's lifecycle together, with the count in
each state and the deadlines kept by each transition. Pure: a fake clock (the times handed in),
records that are plain objects; no process runs."""

import collections
import math
import signal
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from pmlmd.core import lifecycle as lc
from pmlmd.core.batch import CAUSE_DAEMON_RESTART, CAUSE_GOVERNOR_MEMORY
from pmlmd.core.governor import KILLED, PAUSED, RUNNING, TERMINATING
from pmlmd.core.supervisor import Supervisor
from test_lifecycle import event_st, modes_st

SIGNAL = lc.Modes(grace=10.0, agent_timeout=5.0, timeout=None)


@dataclass
class Record:
    life: lc.Life


def supervised(*keys, now=0.0, modes=SIGNAL):
    sup = Supervisor()
    for key in keys:
        sup.add(key, Record(lc.born(modes, now)))
    return sup


def test_the_tally_follows_each_transition_and_each_worker_that_comes_and_goes():
    sup = supervised(1, 2)
    assert sup.tally[RUNNING] == 2
    effects = sup.handle(1, sup.records[1], lc.Pause("cpu", 50.0), 1.0)
    assert effects == [lc.Signal(signal.SIGSTOP)]
    assert (sup.tally[RUNNING], sup.tally[PAUSED]) == (1, 1)
    sup.handle(2, sup.records[2], lc.Terminate(CAUSE_GOVERNOR_MEMORY, None), 2.0)
    assert (sup.tally[RUNNING], sup.tally[PAUSED], sup.tally[TERMINATING]) == (0, 1, 1)
    sup.remove(2)
    assert +sup.tally == collections.Counter({PAUSED: 1})


def test_a_grace_is_a_deadline_until_it_has_been_acted_on():
    sup = supervised(1, 2)
    assert sup.next_deadline() == math.inf and sup.due(100.0) == []
    sup.handle(1, sup.records[1], lc.Terminate(CAUSE_GOVERNOR_MEMORY, None), 3.0)  # SIGTERM, SIGKILL at 13
    assert sup.next_deadline() == 13.0
    assert sup.due(12.9) == [] and sup.due(13.0) == [1]
    effects = sup.handle(1, sup.records[1], lc.Tick(), 13.0)
    assert lc.Signal(signal.SIGKILL) in effects and sup.tally[KILLED] == 1
    assert sup.next_deadline() == math.inf and sup.due(20.0) == []


def test_a_worker_no_longer_supervised_still_changes_but_is_counted_nowhere():
    sup = supervised(1)
    record = sup.remove(1)
    sup.handle(1, record, lc.Terminate(CAUSE_GOVERNOR_MEMORY, None), 1.0)
    assert record.life.state == TERMINATING
    assert +sup.tally == collections.Counter() and sup.next_deadline() == math.inf


def test_an_adopted_worker_is_continued_and_with_terminate_ended_with_a_deadline():
    sup = supervised(7)
    assert sup.adopt(7, sup.records[7], 5.0) == [lc.Signal(signal.SIGCONT)]
    assert sup.tally[RUNNING] == 1
    sup = supervised(8)
    effects = sup.adopt(8, sup.records[8], 5.0, terminate=True)
    assert [e.sig for e in effects if isinstance(e, lc.Signal)] == [signal.SIGCONT, signal.SIGTERM, signal.SIGCONT]
    assert sup.records[8].life.cause == CAUSE_DAEMON_RESTART and sup.next_deadline() == 15.0


@settings(max_examples=300, deadline=None)
@given(modes=modes_st, steps=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5), event_st | st.just("gone")),
                                      max_size=60))
def test_the_tally_and_the_deadlines_always_agree_with_the_workers_lives(modes, steps):
    """Whatever happens to four workers, in any order: the tally counts exactly the supervised
    workers in each state, and the deadlines are exactly theirs."""
    sup = supervised(0, 1, 2, 3, modes=modes)
    now = 0.0
    for key, dt, event in steps:
        now += dt
        if key not in sup.records:
            continue
        if event == "gone":
            sup.remove(key)
        else:
            sup.handle(key, sup.records[key], event, now)
        assert +sup.tally == collections.Counter(r.life.state for r in sup.records.values())
        dues = [r.life.due for r in sup.records.values() if r.life.due is not None]
        assert sup.next_deadline() == min(dues, default=math.inf)
        assert sorted(sup.due(now)) == sorted(k for k, r in sup.records.items()
                                              if r.life.due is not None and now >= r.life.due)
