"""What happens to batches and workers, one typed body per kind: what ``events`` streams.

The engine (and, for queue batches, the intake) makes these and hands them to whoever runs it
(Engine.on_event): the daemon writes the state from them and sends them to ``events`` readers;
``pmlmctl run`` learns its task times from them. On the wire (protocol.py, "Events") an event is
``wire()``: {"event": KIND, then its fields}, with ``time`` (seconds since the epoch, wall
clock, 3 decimals) added by the daemon and every field that is None left out. ``pmlmctl
events`` prints each as a line (ctl.describe_event).

Units: ``*_pct`` are percent (a CPU figure of all the node's CPUs together), ``free`` is bytes,
``latency_ms`` milliseconds; ``task`` is the task's index in its batch (from 0, as
$PMLM_TASK_INDEX), ``attempt`` its attempt's number (from 1, as $PMLM_ATTEMPT), ``pid`` the
worker's process id (its process group's and session's too).

Adding a field is compatible (readers ignore what they do not know); renaming or removing one
is a new protocol version (protocol.PROTOCOL_VERSION).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Event:
    KIND: ClassVar[str] = ""

    def wire(self) -> dict:
        """The event as it goes out: {"event": KIND, field: value, ...} in the fields' order."""
        return {"event": self.KIND, **vars(self)}


@dataclass
class Sample(Event):
    """The governor sampled the node (not sent to readers: several a second)."""

    KIND: ClassVar[str] = "sample"
    cpu_pct: float | None  # the node's CPU use over the last window; None before a second reading
    free: int  # free memory by the limit's metric (MemAvailable or MemFree), bytes
    free_pct: float  # the same, in percent of MemTotal
    running: int  # workers running
    paused: int  # workers paused by the governor


@dataclass
class Decision(Event):
    """A governor decision (spawn, pause, continue, terminate, kill) and why."""

    KIND: ClassVar[str] = "decision"
    decision: str  # governor.SPAWN, PAUSE, CONTINUE, TERMINATE or KILL
    count: int | None  # how many workers a spawn admits; None for a decision about one worker
    batch: str | None
    pid: int | None  # the worker decided about
    task: int | None
    rule: str  # the rule that decided (governor: floor, memory, gap, cpu, calm, ...)
    reason: str
    cpu_pct: float | None  # the sample's node CPU
    free_pct: float  # the sample's free memory
    latency_ms: float  # from the sample to this decision carried out


@dataclass
class Start(Event):
    """An attempt started: its worker runs."""

    KIND: ClassVar[str] = "start"
    batch: str
    task: int
    attempt: int
    pid: int
    start_ticks: int | None  # the worker's start time in clock ticks after boot (proc(5) starttime)


@dataclass
class End(Event):
    """An attempt ended: its worker exited, or it never ran (a message that is no task line)."""

    KIND: ClassVar[str] = "end"
    batch: str
    task: int
    attempt: int
    pid: int | None  # None when no worker ran
    exit_code: int | None  # its exit status, when it exited
    signal: int | None  # the signal that ended it, when one did
    cause: str  # batch.CAUSE_*: exit, memory, timeout, cancelled, daemon-restart, ...
    status: str  # the task's status after it: succeeded, failed, queued (requeued), ...
    reason: str | None  # why pmlmd ended it, in words


@dataclass
class Deferred(Event):
    """A worker could not be started for want of a resource (descriptors, processes): its task waits."""

    KIND: ClassVar[str] = "deferred"
    batch: str
    task: int
    cause: str
    reason: str


@dataclass
class Timeout(Event):
    """An attempt ran past the batch's --timeout and is being terminated."""

    KIND: ClassVar[str] = "timeout"
    batch: str
    task: int
    pid: int


@dataclass
class Noncompliant(Event):
    """A worker acknowledged an agent pause but kept working: it is stopped by SIGSTOP."""

    KIND: ClassVar[str] = "noncompliant"
    batch: str
    task: int
    pid: int
    cpu_pct: float  # what it used after its acknowledgement, percent of one CPU


@dataclass
class Held(Event):
    """The batch's owner (or root) paused the batch: its workers stop, none start."""

    KIND: ClassVar[str] = "held"
    batch: str


@dataclass
class Released(Event):
    """The batch was resumed after a hold."""

    KIND: ClassVar[str] = "released"
    batch: str


@dataclass
class Finished(Event):
    """Every task of the batch has ended."""

    KIND: ClassVar[str] = "finished"
    batch: str
    exit_status: int  # as pmlmctl run exits for it (0: every task succeeded)
    summary: str  # one line for people


@dataclass
class Halted(Event):
    """The batch's --halt condition was met: no more tasks start."""

    KIND: ClassVar[str] = "halted"
    batch: str
    reason: str


@dataclass
class Intake(Event):
    """A queue batch's link to its broker changed state (intake.py: consuming, waiting for
    broker, refused by broker, ...)."""

    KIND: ClassVar[str] = "intake"
    batch: str
    state: str
    detail: str | None


@dataclass
class Settled(Event):
    """A queue batch's task's message was settled with the broker (acked, sent back, dead-lettered, ...)."""

    KIND: ClassVar[str] = "settled"
    batch: str
    task: int
    settled: str
    reason: str | None


@dataclass
class Added(Event):
    """A queue batch took a task from its queue."""

    KIND: ClassVar[str] = "added"
    batch: str
    task: int


@dataclass
class Returned(Event):
    """A queue batch's task went back to its queue unrun."""

    KIND: ClassVar[str] = "returned"
    batch: str
    task: int
    reason: str


@dataclass
class Dropped(Event):
    """This reader did not keep up: ``count`` events of its stream were left out here (outbox.py)."""

    KIND: ClassVar[str] = "dropped"
    count: int


KINDS: dict[str, type[Event]] = {cls.KIND: cls for cls in (
    Sample, Decision, Start, End, Deferred, Timeout, Noncompliant, Held, Released, Finished, Halted, Intake,
    Settled, Added, Returned, Dropped)}
STREAMED = tuple(kind for kind in KINDS if kind != Sample.KIND)  # what ``events`` may send (and filter by)
