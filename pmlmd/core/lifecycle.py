"""A worker's lifecycle as pure transitions: an event and the time in, the next state and the
effects to carry out. No I/O, no clock reads: the engine reads the clock, hands the time in and
carries the effects out (signals, agent requests, notes on the attempt, log lines).

The state is one value, ``Life``, whose ``phase`` is one of five variants, each carrying its own
data (the way pueue's TaskStatus does)::

    Running ──Pause──> Paused ──Continue──> Running
       │  └────Hold──> Held <──Hold── Paused        Held ──Resume──> Running
       │
       └─(any of the three)──Terminate──> Terminating ──Kill / grace over──> Killed
                                          (agent: Ask terminate; signal: SIGTERM, SIGCONT)

Times are monotonic seconds (time.monotonic, or a fake clock in tests). The signals are the
worker's: the engine sends each to its process group and escaped processes, or to its cgroup
(SIGSTOP freezes a cgroup, SIGCONT thaws it).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from typing import ClassVar, Union

from .batch import CAUSE_DAEMON_RESTART, CAUSE_GOVERNOR_MEMORY, CAUSE_TIMEOUT
from .governor import CONTINUE, HELD, KILL, KILLED, PAUSE, PAUSED, RUNNING, TERMINATE, TERMINATING, Decision

# An acknowledged agent pause is checked from this many seconds after the ack on: a worker that
# still uses more than AGENT_PAUSE_MAX_CPU percent of one CPU or grows by more than
# AGENT_PAUSE_MAX_GROWTH bytes/s over a whole measurement interval did not comply.
AGENT_PAUSE_GRACE = 1.0
AGENT_PAUSE_MAX_CPU = 10.0
AGENT_PAUSE_MAX_GROWTH = 4 << 20

AGENT = "agent"  # Terminating.path: asked through the agent channel
SIGTERM_PATH = "sigterm"  # Terminating.path: SIGTERM sent, SIGKILL after the grace
SIGKILL_PATH = "sigkill"  # how a Killed worker was ended (Attempt.stop_path)


# --- how a worker stops: its settings -------------------------------------------------------------
@dataclass(frozen=True)
class Modes:
    """How one worker is paused and ended, from its batch's settings (BatchSpec)."""

    pause_by_agent: bool = False  # --pause-mode agent, with an agent channel open
    terminate_by_agent: bool = False  # --term-mode agent, with an agent channel open
    grace: float = 10.0  # seconds: --term-grace, from SIGTERM (or an acknowledged terminate) to escalation
    agent_timeout: float = 5.0  # seconds: --agent-timeout, for an acknowledgement
    timeout: float | None = None  # seconds: --timeout, of the attempt's running time


# --- the phases ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stop:
    """How a paused or held worker is kept from running (both may hold: an agent pause nobody
    acknowledged, or one that was not kept, is enforced by SIGSTOP)."""

    signal: bool = False  # SIGSTOP sent (its cgroup frozen)
    agent: bool = False  # asked to pause through the agent channel
    verify_from: float | None = None  # it acknowledged: from then on it must stand still (Measured)


@dataclass(frozen=True)
class Running:
    STATE: ClassVar[str] = RUNNING
    since: float  # started, continued or resumed then
    cpu_before: float | None = None  # continued from a pause or a hold: its share of the node then


@dataclass(frozen=True)
class Paused:
    """Paused by the governor."""

    STATE: ClassVar[str] = PAUSED
    at: float
    rule: str  # the governor rule that paused it ("gap", "cpu", "turn", ...; WorkerView.paused_by)
    cpu_at_pause: float | None  # percent of the node, as last measured
    stop: Stop
    clock_from: float  # its --timeout stands still from then on (a pause is not the task's doing)


@dataclass(frozen=True)
class Held:
    """Its batch was paused by a user (pmlmctl pause). ``stop`` is empty when the batch's scope is
    frozen by its cgroup freezer instead."""

    STATE: ClassVar[str] = HELD
    stop: Stop
    clock_from: float
    cpu_at_hold: float | None = None  # percent of the node, as last measured (or at its pause)


@dataclass(frozen=True)
class Terminating:
    STATE: ClassVar[str] = TERMINATING
    cause: str  # batch.CAUSE_*: why its attempt ends
    path: str  # AGENT or SIGTERM_PATH
    kill_at: float | None = None  # SIGTERM_PATH: SIGKILL then
    escalate_at: float | None = None  # AGENT, acknowledged: SIGTERM then


@dataclass(frozen=True)
class Killed:
    STATE: ClassVar[str] = KILLED
    cause: str


Phase = Union[Running, Paused, Held, Terminating, Killed]


@dataclass(frozen=True)
class Life:
    """A worker's lifecycle state."""

    phase: Phase
    modes: Modes
    timeout_at: float | None = None  # --timeout deadline, pushed back by the time pmlmd kept it stopped
    noncompliant: bool = False  # it acknowledged an agent pause and kept working: stopped by signal instead
    due: float | None = field(init=False, compare=False)  # the next deadline Tick acts on, if any

    def __post_init__(self):
        phase = self.phase
        due = None
        if isinstance(phase, Running):
            due = self.timeout_at
        elif isinstance(phase, Terminating):
            due = phase.kill_at if phase.kill_at is not None else phase.escalate_at
        object.__setattr__(self, "due", due)

    @property
    def state(self) -> str:
        """The governor's name of the phase (governor.RUNNING, PAUSED, HELD, TERMINATING, KILLED)."""
        return self.phase.STATE

    @property
    def stop(self) -> Stop | None:
        return self.phase.stop if isinstance(self.phase, (Paused, Held)) else None

    @property
    def signal_stopped(self) -> bool:
        """SIGSTOP stands: a process that joins the worker must be stopped too."""
        stop = self.stop
        return stop is not None and stop.signal

    @property
    def verifying(self) -> bool:
        """An acknowledged agent pause is being checked (Measured)."""
        stop = self.stop
        return stop is not None and stop.verify_from is not None

    @property
    def awaiting_pause_ack(self) -> bool:
        """Asked to pause through the agent, not acknowledged yet (and not stopped by signal)."""
        stop = self.stop
        return stop is not None and stop.agent and not stop.signal

    @property
    def awaiting_terminate_ack(self) -> bool:
        """Asked to terminate through the agent, not acknowledged yet."""
        phase = self.phase
        return isinstance(phase, Terminating) and phase.path == AGENT and phase.escalate_at is None

    @property
    def cause(self) -> str | None:
        """Why pmlmd is ending it (batch.CAUSE_*); None while it is not being ended."""
        return self.phase.cause if isinstance(self.phase, (Terminating, Killed)) else None

    @property
    def stop_path(self) -> str | None:
        """How pmlmd is ending it: AGENT, SIGTERM_PATH or SIGKILL_PATH (Attempt.stop_path)."""
        if isinstance(self.phase, Terminating):
            return self.phase.path
        return SIGKILL_PATH if isinstance(self.phase, Killed) else None


def born(modes: Modes, now: float, timeout_at: float | None = None) -> Life:
    """A worker that was just started (or adopted) at ``now``."""
    return Life(Running(since=now), modes, timeout_at=timeout_at)


def adopted(life: Life, now: float, terminate: bool = False) -> tuple[Life, list[Effect]]:
    """A worker that a previous pmlmd started, found alive at a restart (``life``: as born).
    Whatever that pmlmd left it in, it runs from now on: SIGCONT (which thaws a frozen cgroup),
    and in agent pause mode the agent's continue, for it may stand in checkpoint(). With
    ``terminate`` (pmlmd.toml stranded = "terminate") it is then ended as any worker is (SIGTERM,
    SIGKILL after the grace; or the agent's terminate), its attempt with cause daemon-restart."""
    effects: list[Effect] = [Signal(signal.SIGCONT)]
    if life.modes.pause_by_agent:
        effects.append(Ask("continue"))
    if terminate:
        life, more = handle(life, Terminate(CAUSE_DAEMON_RESTART, 'left running by the pmlmd before a restart '
                                            '(stranded = "terminate")'), now)
        effects += more
    return life, effects


def governor_fields(life: Life) -> dict:
    """What the governor sees of a worker's phase: the WorkerView fields state, paused_at,
    cpu_at_pause, paused_by, running_since and cpu_before."""
    phase = life.phase
    if isinstance(phase, Paused):
        return dict(state=PAUSED, paused_at=phase.at, cpu_at_pause=phase.cpu_at_pause, paused_by=phase.rule,
                    running_since=None)
    if isinstance(phase, Running):
        return dict(state=RUNNING, paused_at=None, cpu_at_pause=None, paused_by=None, running_since=phase.since,
                    cpu_before=phase.cpu_before)
    return dict(state=phase.STATE, paused_at=None, cpu_at_pause=None, paused_by=None, running_since=None)


# --- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pause:
    """The governor pauses it (governor.PAUSE)."""

    rule: str
    cpu: float | None  # its CPU share as last measured


@dataclass(frozen=True)
class Continue:
    """The governor continues it (governor.CONTINUE)."""


@dataclass(frozen=True)
class Hold:
    """A user paused its batch. ``frozen``: the batch's scope is frozen, no signal is needed.
    ``cpu``: the worker's share of the node as last measured (None: not yet)."""

    frozen: bool = False
    cpu: float | None = None


@dataclass(frozen=True)
class Resume:
    """A user resumed its batch; also how pmlmd leaves a worker when it stops watching it."""


@dataclass(frozen=True)
class Terminate:
    cause: str
    reason: str | None


@dataclass(frozen=True)
class Kill:
    cause: str
    reason: str | None


@dataclass(frozen=True)
class AgentAck:
    command: str  # "pause" or "terminate" (a "continue" needs nothing)


@dataclass(frozen=True)
class AgentExpired:
    command: str  # a request that was not acknowledged within Modes.agent_timeout


@dataclass(frozen=True)
class Measured:
    """A measurement over ``start`` .. now: ``one_cpu`` percent of one CPU, ``growth`` bytes/s."""

    start: float
    one_cpu: float
    growth: float


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines (--timeout, the grace, an acknowledged terminate) that are due act."""


Event = Union[Pause, Continue, Hold, Resume, Terminate, Kill, AgentAck, AgentExpired, Measured, Tick]


def decided(decision: Decision, cpu: float | None) -> Event:
    """The event a governor decision about one worker is (PAUSE, CONTINUE, TERMINATE or KILL);
    ``cpu``: the worker's CPU share as last measured. Ended by the governor, an attempt ends with
    batch.CAUSE_GOVERNOR_MEMORY (the only rules that end workers are the memory rules)."""
    action = decision.action
    if action == PAUSE:
        return Pause(decision.rule, cpu)
    if action == CONTINUE:
        return Continue()
    if action == TERMINATE:
        return Terminate(CAUSE_GOVERNOR_MEMORY, decision.reason)
    if action == KILL:
        return Kill(CAUSE_GOVERNOR_MEMORY, decision.reason)
    raise ValueError(f"not a decision about one worker: {action}")


# --- effects -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signal:
    sig: int  # signal.SIG*: to every process of the worker


@dataclass(frozen=True)
class Ask:
    command: str  # through the agent channel: "pause", "continue" or "terminate"


@dataclass(frozen=True)
class Remeasure:
    """Its last reading covers time it stood still: measure it afresh."""


@dataclass(frozen=True)
class Reason:
    """Set the attempt's reason (``append``: add to it, in parentheses style, as written)."""

    text: str | None
    append: bool = False


@dataclass(frozen=True)
class Log:
    """A line for the journal about the worker (the engine names the worker)."""

    text: str


@dataclass(frozen=True)
class TimedOut:
    """Its --timeout passed: it is being terminated (the engine reports a "timeout" event)."""


@dataclass(frozen=True)
class Disobeyed:
    """It acknowledged an agent pause and kept working: SIGSTOP was sent (a "noncompliant" event)."""

    one_cpu: float
    growth: float


Effect = Union[Signal, Ask, Remeasure, Reason, Log, TimedOut, Disobeyed]


# --- transitions ---------------------------------------------------------------------------------
def handle(life: Life, event: Event, now: float) -> tuple[Life, list[Effect]]:
    """The state after ``event`` at ``now``, and what to do. An event that does not apply to the
    phase (a Continue of a running worker, an ack of a request that no longer stands) changes
    nothing and does nothing."""
    return _HANDLERS[type(event)](life, event, now)


def _stopping(by_agent: bool) -> tuple[Stop, list[Effect]]:
    if by_agent:
        return Stop(agent=True), [Ask("pause")]
    return Stop(signal=True), [Signal(signal.SIGSTOP)]


def _pause(life: Life, event: Pause, now: float):
    if not isinstance(life.phase, Running):
        return life, []
    stop, effects = _stopping(life.modes.pause_by_agent)
    return replace(life, phase=Paused(now, event.rule, event.cpu, stop, clock_from=now)), effects


def _run_again(life: Life, now: float, always_sigcont: bool):
    stop, clock_from = life.phase.stop, life.phase.clock_from
    effects: list[Effect] = []
    if stop.agent:
        effects.append(Ask("continue"))
    if stop.signal or always_sigcont:
        effects.append(Signal(signal.SIGCONT))
    effects.append(Remeasure())
    timeout_at = life.timeout_at
    if timeout_at is not None:
        timeout_at += max(0.0, now - clock_from)
    cpu_before = life.phase.cpu_at_pause if isinstance(life.phase, Paused) else life.phase.cpu_at_hold
    return replace(life, phase=Running(since=now, cpu_before=cpu_before), timeout_at=timeout_at), effects


def _continue(life: Life, event: Continue, now: float):
    if not isinstance(life.phase, Paused):
        return life, []
    return _run_again(life, now, always_sigcont=False)


def _hold(life: Life, event: Hold, now: float):
    phase = life.phase
    if isinstance(phase, Paused):  # already stopped: it stays as it is, its clock stopped since its pause
        return replace(life, phase=Held(phase.stop, phase.clock_from, phase.cpu_at_pause)), []
    if not isinstance(phase, Running):
        return life, []
    if event.frozen and not life.modes.pause_by_agent:
        return replace(life, phase=Held(Stop(), clock_from=now, cpu_at_hold=event.cpu)), []
    stop, effects = _stopping(life.modes.pause_by_agent)
    return replace(life, phase=Held(stop, clock_from=now, cpu_at_hold=event.cpu)), effects


def _resume(life: Life, event: Resume, now: float):
    if isinstance(life.phase, (Held, Paused)):
        # SIGCONT whatever it holds: a thaw of its batch's scope, a pause of the governor's before
        # the hold, or a stop by anyone else all end here.
        return _run_again(life, now, always_sigcont=True)
    return life, []


def _signal_terminate(life: Life, cause: str, now: float) -> tuple[Life, list[Effect]]:
    # A stopped process cannot act on SIGTERM; it may be paused by pmlmd or stopped by anyone.
    phase = Terminating(cause, SIGTERM_PATH, kill_at=now + life.modes.grace)
    return replace(life, phase=phase), [Signal(signal.SIGTERM), Signal(signal.SIGCONT)]


def _terminate(life: Life, event: Terminate, now: float):
    if isinstance(life.phase, (Terminating, Killed)):
        return life, []
    if life.modes.terminate_by_agent:
        # Ask first; SIGTERM follows if it does not acknowledge in time, or is alive a grace after.
        effects: list[Effect] = [Reason(event.reason), Ask("terminate")]
        if life.signal_stopped:
            effects.append(Signal(signal.SIGCONT))  # it must run to hear the request
        return replace(life, phase=Terminating(event.cause, AGENT)), effects
    life, effects = _signal_terminate(life, event.cause, now)
    return life, [Reason(event.reason)] + effects


def _kill(life: Life, event: Kill, now: float):
    effects: list[Effect] = [Signal(signal.SIGKILL), Signal(signal.SIGCONT)]
    cause = life.cause
    if cause is None:  # a worker already being ended keeps the cause and reason it was ended for
        cause = event.cause
        effects.insert(0, Reason(event.reason))
    return replace(life, phase=Killed(cause)), effects


def _agent_ack(life: Life, event: AgentAck, now: float):
    phase = life.phase
    if event.command == "terminate" and life.awaiting_terminate_ack:
        return replace(life, phase=replace(phase, escalate_at=now + life.modes.grace)), []
    if event.command == "pause" and life.awaiting_pause_ack:
        # Trust, but verify: from a short grace on, it must stand still (Measured).
        verified = replace(phase.stop, verify_from=now + AGENT_PAUSE_GRACE)
        return replace(life, phase=replace(phase, stop=verified)), []
    return life, []


def _agent_expired(life: Life, event: AgentExpired, now: float):
    phase, timeout = life.phase, life.modes.agent_timeout
    if event.command == "terminate" and life.awaiting_terminate_ack:
        life, effects = _signal_terminate(life, phase.cause, now)
        return life, [Log(f"did not acknowledge terminate within {timeout:g}s: SIGTERM"),
                      Reason(f"(no agent acknowledgement within {timeout:g}s)", append=True)] + effects
    if event.command == "pause" and life.awaiting_pause_ack:
        stopped = replace(phase, stop=replace(phase.stop, signal=True, verify_from=None))
        return replace(life, phase=stopped), [Log(f"did not acknowledge pause within {timeout:g}s: SIGSTOP"),
                                              Signal(signal.SIGSTOP)]
    return life, []


def _measured(life: Life, event: Measured, now: float):
    stop = life.stop
    if stop is None or stop.verify_from is None or event.start < stop.verify_from:
        return life, []
    if event.one_cpu <= AGENT_PAUSE_MAX_CPU and event.growth <= AGENT_PAUSE_MAX_GROWTH:
        return life, []
    stopped = replace(life.phase, stop=replace(stop, signal=True, verify_from=None))
    # Said before it is done: whoever sees the worker stopped finds the reason logged.
    return replace(life, phase=stopped, noncompliant=True), [Disobeyed(event.one_cpu, event.growth),
                                                             Signal(signal.SIGSTOP)]


def _tick(life: Life, event: Tick, now: float):
    phase, grace = life.phase, life.modes.grace
    if life.due is None or now < life.due:
        return life, []
    if isinstance(phase, Running):
        timeout = life.modes.timeout
        life, effects = _terminate(life, Terminate(CAUSE_TIMEOUT, f"ran longer than --timeout {timeout:g}s"), now)
        return life, [Log(f"ran longer than its timeout of {timeout:g}s: terminating it"), TimedOut()] + effects
    if phase.path == AGENT:  # it acknowledged terminate and is still alive a grace later
        life, effects = _signal_terminate(life, phase.cause, now)
        return life, [Log(f"still alive {grace:g}s after acknowledging terminate: SIGTERM"),
                      Reason(f"(alive {grace:g}s after its acknowledgement)", append=True)] + effects
    life, effects = _kill(life, Kill(phase.cause, None), now)
    return life, [Log(f"still alive {grace:g}s after SIGTERM: SIGKILL")] + effects + [
        Reason(f"(SIGKILL after {grace:g}s grace)", append=True)]


_HANDLERS = {Pause: _pause, Continue: _continue, Hold: _hold, Resume: _resume, Terminate: _terminate,
             Kill: _kill, AgentAck: _agent_ack, AgentExpired: _agent_expired, Measured: _measured, Tick: _tick}
