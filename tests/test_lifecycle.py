"""The worker lifecycle (pmlmd.core.lifecycle): tables of transitions with a fake clock, and properties
that hold for any sequence of events. Pure: no process, no signal is sent, no clock is read."""

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmlmd.core import lifecycle as lc
from pmlmd.core.batch import CAUSE_CANCELLED, CAUSE_DAEMON_RESTART, CAUSE_GOVERNOR_MEMORY, CAUSE_TIMEOUT
from pmlmd.core.governor import CONTINUE, HELD, KILL, KILLED, PAUSE, PAUSED, RUNNING, TERMINATE, TERMINATING, Decision

SIGNAL = lc.Modes(grace=10.0, agent_timeout=5.0)
AGENT = lc.Modes(pause_by_agent=True, terminate_by_agent=True, grace=10.0, agent_timeout=5.0)
STOP, CONT, TERM, KILLSIG = (lc.Signal(s) for s in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTERM, signal.SIGKILL))


def run(life, *steps):
    """Apply (time, event) steps; return the last life and every effect, in order."""
    effects = []
    for now, event in steps:
        life, out = lc.handle(life, event, now)
        effects += out
    return life, effects


def signals(effects):
    return [e.sig for e in effects if isinstance(e, lc.Signal)]


# --- pause and continue ---------------------------------------------------------------------------
def test_a_signal_mode_pause_stops_the_worker_and_a_continue_starts_it_again():
    life, effects = run(lc.born(SIGNAL, 0.0), (1.0, lc.Pause("cpu", 40.0)))
    assert effects == [STOP]
    assert life.phase == lc.Paused(at=1.0, rule="cpu", cpu_at_pause=40.0, stop=lc.Stop(signal=True), clock_from=1.0)
    assert life.signal_stopped and life.state == PAUSED
    life, effects = run(life, (3.0, lc.Continue()))
    assert effects == [CONT, lc.Remeasure()]
    # It keeps the share it had when paused: the governor counts it as back before it is measured.
    assert life.phase == lc.Running(since=3.0, cpu_before=40.0) and not life.signal_stopped


def test_an_agent_mode_pause_asks_and_a_continue_asks_again():
    life, effects = run(lc.born(AGENT, 0.0), (1.0, lc.Pause("gap", None)))
    assert effects == [lc.Ask("pause")] and not life.signal_stopped
    life, effects = run(life, (2.0, lc.Continue()))
    assert effects == [lc.Ask("continue"), lc.Remeasure()]


@pytest.mark.parametrize("event", [lc.Continue(), lc.Resume(), lc.AgentAck("pause"), lc.AgentAck("terminate"),
                                   lc.AgentExpired("pause"), lc.AgentExpired("terminate"), lc.Tick(),
                                   lc.Measured(0.0, 100.0, 1e9)])
def test_an_event_that_does_not_apply_to_a_running_worker_does_nothing(event):
    life = lc.born(AGENT, 0.0)
    assert lc.handle(life, event, 5.0) == (life, [])


def test_an_unacknowledged_agent_pause_is_enforced_by_sigstop():
    life, effects = run(lc.born(AGENT, 0.0), (1.0, lc.Pause("cpu", 50.0)), (6.0, lc.AgentExpired("pause")))
    assert signals(effects) == [signal.SIGSTOP] and life.signal_stopped
    assert any(isinstance(e, lc.Log) and "did not acknowledge pause within 5s" in e.text for e in effects)
    life, effects = run(life, (7.0, lc.Continue()))
    assert effects == [lc.Ask("continue"), CONT, lc.Remeasure()]


def test_an_acknowledged_agent_pause_is_verified_after_a_grace():
    life, _ = run(lc.born(AGENT, 0.0), (1.0, lc.Pause("cpu", 50.0)), (1.5, lc.AgentAck("pause")))
    assert life.verifying and life.stop.verify_from == 1.5 + lc.AGENT_PAUSE_GRACE
    # A measurement that began before the grace ended says nothing yet.
    assert lc.handle(life, lc.Measured(2.0, 90.0, 0.0), 3.0) == (life, [])
    # One over a whole interval after it: standing still is compliance ...
    assert lc.handle(life, lc.Measured(2.5, lc.AGENT_PAUSE_MAX_CPU, lc.AGENT_PAUSE_MAX_GROWTH), 3.0) == (life, [])
    # ... working on is not: SIGSTOP, and the attempt will say so.
    stopped, effects = lc.handle(life, lc.Measured(2.5, 60.0, 0.0), 3.0)
    assert effects == [lc.Disobeyed(60.0, 0.0), STOP]  # logged first: whoever sees it stopped finds why
    assert stopped.noncompliant and stopped.signal_stopped and not stopped.verifying


def test_a_pause_request_expiring_after_the_worker_is_being_ended_sends_no_sigstop():
    modes = lc.Modes(pause_by_agent=True, grace=10.0)  # pauses through the agent, ends by signal
    life, effects = run(lc.born(modes, 0.0), (1.0, lc.Pause("gap", None)),
                        (2.0, lc.Terminate(CAUSE_GOVERNOR_MEMORY, "free memory below the limit")),
                        (6.0, lc.AgentExpired("pause")))
    assert signals(effects) == [signal.SIGTERM, signal.SIGCONT]  # never stopped again after its SIGTERM
    assert life.state == TERMINATING


# --- a user's hold --------------------------------------------------------------------------------
@pytest.mark.parametrize("modes, frozen, expected", [
    (SIGNAL, False, [STOP]),
    (SIGNAL, True, []),  # the batch's scope is frozen: no signal needed
    (AGENT, False, [lc.Ask("pause")]),
])
def test_a_hold_stops_a_running_worker_by_its_batch_mode(modes, frozen, expected):
    life, effects = run(lc.born(modes, 0.0), (1.0, lc.Hold(frozen=frozen)))
    assert effects == expected and life.state == HELD


def test_a_hold_of_a_paused_worker_keeps_it_as_it_is_and_a_resume_continues_it():
    life, _ = run(lc.born(SIGNAL, 0.0), (1.0, lc.Pause("cpu", 20.0)))
    held, effects = run(life, (2.0, lc.Hold()))
    assert effects == [] and held.phase == lc.Held(stop=lc.Stop(signal=True), clock_from=1.0, cpu_at_hold=20.0)
    resumed, effects = run(held, (4.0, lc.Resume()))
    # Back, it counts at its share when paused until it is measured again (governor.node_cpu).
    assert effects == [CONT, lc.Remeasure()] and resumed.phase == lc.Running(since=4.0, cpu_before=20.0)


def test_a_worker_held_while_it_ran_counts_at_its_measured_share_once_resumed():
    life, _ = run(lc.born(SIGNAL, 0.0), (1.0, lc.Hold(cpu=30.0)), (2.0, lc.Resume()))
    assert life.phase == lc.Running(since=2.0, cpu_before=30.0)
    assert lc.governor_fields(life)["cpu_before"] == 30.0


def test_a_resume_sends_sigcont_even_to_a_worker_held_by_the_freezer():
    life, effects = run(lc.born(SIGNAL, 0.0), (1.0, lc.Hold(frozen=True)), (2.0, lc.Resume()))
    assert effects == [CONT, lc.Remeasure()]


def test_a_held_worker_is_not_continued_by_the_governor():
    life, _ = run(lc.born(SIGNAL, 0.0), (1.0, lc.Hold()))
    assert lc.handle(life, lc.Continue(), 2.0) == (life, [])


# --- ending ---------------------------------------------------------------------------------------
def test_terminate_sends_sigterm_then_sigkill_after_the_grace():
    life, effects = run(lc.born(SIGNAL, 0.0), (1.0, lc.Terminate(CAUSE_CANCELLED, "batch cancelled")))
    assert effects == [lc.Reason("batch cancelled"), TERM, CONT]
    assert life.phase == lc.Terminating(CAUSE_CANCELLED, lc.SIGTERM_PATH, kill_at=11.0) and life.due == 11.0
    assert lc.handle(life, lc.Tick(), 10.9) == (life, [])
    life, effects = run(life, (11.0, lc.Tick()))
    assert signals(effects) == [signal.SIGKILL, signal.SIGCONT]
    assert lc.Reason("(SIGKILL after 10s grace)", append=True) in effects
    assert life.phase == lc.Killed(CAUSE_CANCELLED) and life.stop_path == lc.SIGKILL_PATH and life.due is None


def test_an_agent_terminate_escalates_to_sigterm_when_not_acknowledged():
    life, _ = run(lc.born(AGENT, 0.0), (1.0, lc.Pause("gap", None)), (1.2, lc.AgentExpired("pause")))
    assert life.signal_stopped
    life, effects = run(life, (2.0, lc.Terminate(CAUSE_GOVERNOR_MEMORY, "free below the limit")))
    assert effects == [lc.Reason("free below the limit"), lc.Ask("terminate"), CONT]  # it must run to hear it
    assert life.stop_path == lc.AGENT and life.due is None
    life, effects = run(life, (7.0, lc.AgentExpired("terminate")))
    assert signals(effects) == [signal.SIGTERM, signal.SIGCONT]
    assert lc.Reason("(no agent acknowledgement within 5s)", append=True) in effects
    assert life.stop_path == lc.SIGTERM_PATH and life.due == 17.0
    # An acknowledgement arriving late does not push the SIGKILL back.
    assert lc.handle(life, lc.AgentAck("terminate"), 8.0) == (life, [])


def test_an_acknowledged_terminate_gets_sigterm_a_grace_later_if_still_alive():
    life, _ = run(lc.born(AGENT, 0.0), (1.0, lc.Terminate(CAUSE_CANCELLED, None)), (1.5, lc.AgentAck("terminate")))
    assert life.due == 11.5
    life, effects = run(life, (11.5, lc.Tick()))
    assert signals(effects) == [signal.SIGTERM, signal.SIGCONT] and life.due == 21.5
    assert lc.Reason("(alive 10s after its acknowledgement)", append=True) in effects


def test_a_kill_keeps_the_cause_and_reason_it_was_being_ended_for():
    life, _ = run(lc.born(SIGNAL, 0.0), (1.0, lc.Terminate(CAUSE_TIMEOUT, "ran too long")))
    life, effects = run(life, (2.0, lc.Kill(CAUSE_GOVERNOR_MEMORY, "below the floor")))
    assert effects == [KILLSIG, CONT] and life.cause == CAUSE_TIMEOUT
    life, effects = run(lc.born(SIGNAL, 0.0), (2.0, lc.Kill(CAUSE_GOVERNOR_MEMORY, "below the floor")))
    assert effects == [lc.Reason("below the floor"), KILLSIG, CONT] and life.cause == CAUSE_GOVERNOR_MEMORY


def test_a_worker_being_ended_is_not_paused_held_or_terminated_again():
    life, _ = run(lc.born(SIGNAL, 0.0), (1.0, lc.Terminate(CAUSE_CANCELLED, None)))
    for event in (lc.Pause("cpu", 1.0), lc.Hold(), lc.Terminate(CAUSE_TIMEOUT, "x"), lc.Resume()):
        assert lc.handle(life, event, 2.0) == (life, [])


# --- --timeout ------------------------------------------------------------------------------------
def test_the_timeout_clock_stands_still_while_pmlmd_keeps_the_worker_stopped():
    life = lc.born(lc.Modes(timeout=10.0, grace=5.0), 0.0, timeout_at=10.0)
    life, _ = run(life, (3.0, lc.Pause("cpu", 50.0)), (8.0, lc.Continue()))  # 5 s paused
    assert life.due == 15.0
    life, _ = run(life, (9.0, lc.Hold()), (12.0, lc.Resume()))  # 3 s held
    assert life.due == 18.0
    assert lc.handle(life, lc.Tick(), 17.9) == (life, [])
    life, effects = run(life, (18.0, lc.Tick()))
    assert lc.TimedOut() in effects and signals(effects) == [signal.SIGTERM, signal.SIGCONT]
    assert lc.Reason("ran longer than --timeout 10s") in effects and life.cause == CAUSE_TIMEOUT


def test_no_timeout_while_paused():
    life = lc.born(lc.Modes(timeout=1.0), 0.0, timeout_at=1.0)
    life, _ = run(life, (0.5, lc.Pause("cpu", 50.0)))
    assert life.due is None and lc.handle(life, lc.Tick(), 100.0) == (life, [])


# --- what the governor sees -----------------------------------------------------------------------
@pytest.mark.parametrize("action, event", [(PAUSE, lc.Pause("cpu", 7.0)), (CONTINUE, lc.Continue()),
                                           (TERMINATE, lc.Terminate(CAUSE_GOVERNOR_MEMORY, "why")),
                                           (KILL, lc.Kill(CAUSE_GOVERNOR_MEMORY, "why"))])
def test_each_decision_about_a_worker_is_one_event(action, event):
    assert lc.decided(Decision(action, 1, rule="cpu", reason="why"), 7.0) == event


def test_the_governor_sees_the_pause_its_rule_and_the_running_time():
    life = lc.born(SIGNAL, 2.0)
    assert lc.governor_fields(life) == dict(state=RUNNING, paused_at=None, cpu_at_pause=None, paused_by=None,
                                            running_since=2.0, cpu_before=None)
    life, _ = run(life, (3.0, lc.Pause("gap", 12.0)))
    assert lc.governor_fields(life) == dict(state=PAUSED, paused_at=3.0, cpu_at_pause=12.0, paused_by="gap",
                                            running_since=None)
    continued, _ = run(life, (3.5, lc.Continue()))
    assert lc.governor_fields(continued) == dict(state=RUNNING, paused_at=None, cpu_at_pause=None, paused_by=None,
                                                 running_since=3.5, cpu_before=12.0)
    life, _ = run(life, (4.0, lc.Kill(CAUSE_GOVERNOR_MEMORY, None)))
    assert lc.governor_fields(life)["state"] == KILLED


# --- properties -----------------------------------------------------------------------------------
modes_st = st.builds(lc.Modes, pause_by_agent=st.booleans(), terminate_by_agent=st.booleans(),
                     grace=st.floats(0.01, 30), agent_timeout=st.floats(0.01, 30),
                     timeout=st.none() | st.floats(0.01, 100))
event_st = st.one_of(
    st.builds(lc.Pause, rule=st.sampled_from(["cpu", "gap", "turn"]), cpu=st.none() | st.floats(0, 100)),
    st.just(lc.Continue()), st.builds(lc.Hold, frozen=st.booleans()), st.just(lc.Resume()),
    st.builds(lc.Terminate, cause=st.sampled_from([CAUSE_CANCELLED, CAUSE_GOVERNOR_MEMORY]), reason=st.none()),
    st.builds(lc.Kill, cause=st.just(CAUSE_GOVERNOR_MEMORY), reason=st.none()),
    st.builds(lc.AgentAck, command=st.sampled_from(["pause", "terminate"])),
    st.builds(lc.AgentExpired, command=st.sampled_from(["pause", "terminate"])),
    st.builds(lc.Measured, start=st.floats(0, 200), one_cpu=st.floats(0, 200), growth=st.floats(0, 1e8)),
    st.just(lc.Tick()),
)
steps_st = st.lists(st.tuples(st.floats(0, 5), event_st), max_size=40)


class Process:
    """What the worker's processes would see of the effects: stopped by pmlmd's SIGSTOP or not,
    told by the agent to stand in checkpoint() or not, sent SIGTERM or SIGKILL."""

    def __init__(self):
        self.stopped = self.agent_paused = self.termed = self.killed = False

    def take(self, effects):
        for e in effects:
            if e == STOP:
                self.stopped = True
            elif e == CONT:
                self.stopped = False
            elif e == TERM:
                self.termed = True
            elif e == KILLSIG:
                self.killed = True
            elif isinstance(e, lc.Ask) and e.command in ("pause", "continue"):
                self.agent_paused = e.command == "pause"


@settings(max_examples=400, deadline=None)
@given(modes=modes_st, steps=steps_st)
def test_any_sequence_of_events_keeps_the_lifecycle_consistent(modes, steps):
    now = 0.0
    life = lc.born(modes, now, timeout_at=modes.timeout)
    process, order = Process(), ["running"]
    running_time, ended_cause = 0.0, None
    for dt, event in steps:
        if isinstance(life.phase, lc.Running):
            running_time += dt
        now += dt
        before = life
        life, effects = lc.handle(life, event, now)
        process.take(effects)
        # The processes are stopped exactly when pmlmd's lifecycle says SIGSTOP stands; a worker
        # being ended never stands stopped (it could not act on SIGTERM).
        assert process.stopped == life.signal_stopped
        if life.state in (TERMINATING, KILLED):
            assert not process.stopped
        else:  # and asked to pause through its agent exactly while its pause or hold is an agent one
            assert process.agent_paused == (life.stop is not None and life.stop.agent)
        # Being ended is for good, and for the first reason given.
        if before.cause is not None:
            assert life.cause == before.cause and life.state in (TERMINATING, KILLED)
        if isinstance(before.phase, lc.Killed):
            assert isinstance(life.phase, lc.Killed)
        if life.state == KILLED:
            assert process.killed
        if isinstance(life.phase, lc.Terminating) and life.phase.path == lc.SIGTERM_PATH:
            assert process.termed and life.due is not None
        # A tick leaves nothing due at its own time (the grace is never zero).
        if isinstance(event, lc.Tick):
            assert life.due is None or life.due > now
        # --timeout counts running time only: the termination for it comes no earlier.
        if lc.TimedOut() in effects:
            assert running_time >= modes.timeout - 1e-6
            ended_cause = life.cause
        ordered = "ended" if life.cause else "running"
        if order[-1] != ordered:
            order.append(ordered)
    assert order in (["running"], ["running", "ended"])
    if ended_cause is not None:
        assert ended_cause == CAUSE_TIMEOUT


# --- a restart: workers a previous pmlmd left --------------------------------------------------
@pytest.mark.parametrize("modes, expected", [
    (SIGNAL, [CONT]),
    (AGENT, [CONT, lc.Ask("continue")]),  # it may stand in checkpoint(), paused by the pmlmd that is gone
])
def test_an_adopted_worker_runs_whatever_it_was_left_in(modes, expected):
    life, effects = lc.adopted(lc.born(modes, 5.0), 5.0)
    assert effects == expected and life.phase == lc.Running(since=5.0)


def test_an_adopted_worker_is_ended_like_any_other_when_stranded_workers_are_terminated():
    life, effects = lc.adopted(lc.born(SIGNAL, 5.0), 5.0, terminate=True)
    assert signals(effects) == [signal.SIGCONT, signal.SIGTERM, signal.SIGCONT]
    assert life.cause == CAUSE_DAEMON_RESTART and life.due == 15.0  # and SIGKILL after the grace
    assert any(isinstance(e, lc.Reason) and "stranded" in e.text for e in effects)
    life, effects = lc.adopted(lc.born(AGENT, 5.0), 5.0, terminate=True)
    assert lc.Ask("terminate") in effects and life.stop_path == lc.AGENT
