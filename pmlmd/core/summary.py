"""One batch summary: what ``status`` and ``list`` say of a batch, live or finished.

``summarize`` builds it, and nothing else does, from the batch's bookkeeping (``batch.Batch``)
and the few facts only the daemon knows: its owner, priority, whether a user paused it, how
many of its workers stand paused. The daemon stores it with a finished batch, so that the
batch reads the same after it has left memory and after a restart (``from_json``); a batch
stored without one (by an older pmlmd, or marked failed because its record was damaged) is
summarized from what its record holds (``from_record``). No I/O here.

The counts say where each task stands, once: they add up to the number of tasks.

==============  ==============================================================================
``succeeded``   ended with exit status 0
``failed``      failed on its own (and its --retry-failed budget was spent), or could not start
``given_up``    terminated by the governor more than --retries times
``cancelled``   cancelled before or while it ran
``returned``    a queue batch's task whose message went back to its queue, for any node: the
                governor ended it (within --retries), or the batch was cancelled or restarted
``running``     its worker is alive (also while pmlmd ends it) and not paused
``paused``      its worker is alive and paused, by the governor or by ``pmlmctl pause``
``queued``      waiting for a worker: not started yet, or between attempts (requeued)
==============  ==============================================================================

The batch's state follows from them, and from the batch's own flags:

===============  =============================================================================
``queued``       no task runs (yet, or for now): every unfinished task waits in the queue
``running``      some task runs
``paused``       held by its owner with ``pmlmctl pause``
``finishing``    cancelled (or its queue dropped): no task starts any more, workers still end
``finished``     every task succeeded
``cancelled``    ended with cancelled tasks and none failed
``failed``       ended with a task failed or given up, by a critical finish, or marked failed
===============  =============================================================================

The first four are a live batch's, the last three an ended one's: a batch has ended exactly
when no task is running, paused or queued.
"""

from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass, replace
from typing import Any, Iterable, Mapping

from .batch import CANCELLED, FAILED, GIVEN_UP, QUEUED, RETURNED, RUNNING, SUCCEEDED, Batch, iso

# 2 added the count ``returned`` and ``intake``; a stored version 1 reads as having neither.
SUMMARY_VERSION = 2

# Batch states
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_PAUSED = "paused"
STATE_FINISHING = "finishing"
STATE_FINISHED = "finished"
STATE_CANCELLED = "cancelled"
STATE_FAILED = "failed"
LIVE_STATES = (STATE_QUEUED, STATE_RUNNING, STATE_PAUSED, STATE_FINISHING)
ENDED_STATES = (STATE_FINISHED, STATE_CANCELLED, STATE_FAILED)
STATES = LIVE_STATES + ENDED_STATES


@dataclass(frozen=True)
class Counts:
    """Every task counted once, by where it stands; the fields add up to the number of tasks."""

    succeeded: int = 0
    failed: int = 0
    given_up: int = 0
    cancelled: int = 0
    running: int = 0
    paused: int = 0
    queued: int = 0
    returned: int = 0

    @property
    def total(self) -> int:
        return sum(astuple(self))

    @property
    def pending(self) -> int:
        """Tasks not ended yet: running, paused or queued."""
        return self.running + self.paused + self.queued

    def to_json(self) -> dict[str, int]:
        return asdict(self)


COUNT_FIELDS = tuple(Counts.__dataclass_fields__)
COUNT_FIELDS_V1 = tuple(name for name in COUNT_FIELDS if name != "returned")


@dataclass(frozen=True)
class IntakeStatus:
    """A queue batch's intake (see intake): where from, how it stands, what it did so far."""

    broker: str  # host:port/vhost (never the URL's user or password)
    queue: str
    state: str  # connecting, consuming, paused by a limit, waiting for broker, closed
    detail: str | None  # why it waits for the broker
    consumed: int  # messages taken
    acked: int  # acknowledged (the broker has the ack): their task succeeded
    returned: int  # given or sent back to the queue
    dead_lettered: int  # failed or given up: published to the dead-letter exchange
    rejected: int  # failed or given up: nacked without requeue (the queue's own dead-letter exchange, if any)
    lost: int  # settlements that never reached the broker (connection lost): the broker gave those out again
    in_flight: int  # held unacknowledged now: running or about to
    until_empty: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> IntakeStatus | None:
        if data is None:
            return None
        names = tuple(cls.__dataclass_fields__)
        _check(isinstance(data, dict) and set(data) == set(names), "intake", data)
        for key in ("consumed", "acked", "returned", "dead_lettered", "rejected", "lost", "in_flight"):
            _check(_is_int(data[key]) and data[key] >= 0, f"intake {key}", data[key])
        for key in ("broker", "queue", "state"):
            _check(isinstance(data[key], str), f"intake {key}", data[key])
        _check(_opt_str(data["detail"]) and isinstance(data["until_empty"], bool), "intake", data)
        return cls(**data)


@dataclass(frozen=True)
class Owner:
    uid: int | None
    user: str | None  # the user name; the uid as text when it has none


@dataclass(frozen=True)
class BatchSummary:
    batch: str
    name: str | None
    owner: Owner
    command: tuple[str, ...] | None
    priority: int | None
    state: str
    counts: Counts
    terminated_attempts: int  # attempts the governor ended (each requeued, or its task given up)
    requeued_attempts: int  # attempts that ended with their task queued again
    exit_status: int | None  # as pmlmctl submit --wait exits; None while the batch is live
    created: str | None  # ISO 8601, UTC: when it was submitted
    started: str | None  # when its first worker started
    ended: str | None  # when it ended; None while it is live
    elapsed_s: float | None  # from created to ended, or to now while it is live
    scope: str | None = None  # its systemd scope, if it runs in one
    # the scope's FreezerState while the batch is live, as pmlmd knows it: "running", "freezing",
    # "frozen" or "thawing" (systemd's names); None without a scope
    freezer: str | None = None
    intake: IntakeStatus | None = None  # a queue batch's

    @property
    def tasks(self) -> int:
        return self.counts.total

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def with_user(self, user: str | None) -> BatchSummary:
        return replace(self, owner=Owner(self.owner.uid, user))

    def to_json(self) -> dict[str, Any]:
        return {"summary_version": SUMMARY_VERSION, "batch": self.batch, "name": self.name,
                "owner": {"user": self.owner.user, "uid": self.owner.uid},
                "command": None if self.command is None else list(self.command), "priority": self.priority,
                "state": self.state, "tasks": self.tasks, "counts": self.counts.to_json(),
                "terminated_attempts": self.terminated_attempts, "requeued_attempts": self.requeued_attempts,
                "exit_status": self.exit_status, "created": self.created, "started": self.started,
                "ended": self.ended, "elapsed_s": self.elapsed_s, "scope": self.scope, "freezer": self.freezer,
                "intake": None if self.intake is None else self.intake.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> BatchSummary:
        """A summary as ``to_json`` wrote it; ValueError, saying what is wrong, for anything else."""
        _check(isinstance(data, dict) and data.get("summary_version") in (1, SUMMARY_VERSION)
               and _is_int(data["summary_version"]), "its version", data.get("summary_version") if
               isinstance(data, dict) else data)
        version = data["summary_version"]
        keys, count_fields = (_JSON_KEYS_V1, COUNT_FIELDS_V1) if version == 1 else (_JSON_KEYS, COUNT_FIELDS)
        _check(set(data) == set(keys), "its keys", data)
        _check(isinstance(data["batch"], str), "its batch id", data["batch"])
        owner = data["owner"]
        _check(isinstance(owner, dict) and set(owner) == {"user", "uid"} and _opt_int(owner["uid"])
               and _opt_str(owner["user"]), "its owner", owner)
        command = data["command"]
        _check(command is None or (isinstance(command, list) and all(isinstance(w, str) for w in command)),
               "its command", command)
        _check(data["state"] in STATES, "its state", data["state"])
        counts = data["counts"]
        _check(isinstance(counts, dict) and set(counts) == set(count_fields)
               and all(_is_int(v) and v >= 0 for v in counts.values()), "its counts", counts)
        counts = Counts(**counts)
        _check(data["tasks"] == counts.total and _is_int(data["tasks"]), "its number of tasks", data["tasks"])
        # A live queue batch may have no task pending: its intake waits for messages.
        _check((counts.pending == 0) == (data["state"] in ENDED_STATES) or
               (data.get("intake") is not None and data["state"] in LIVE_STATES), "its state for its counts",
               data["state"])
        for key in ("terminated_attempts", "requeued_attempts"):
            _check(_is_int(data[key]) and data[key] >= 0, key, data[key])
        for key in ("priority", "exit_status"):
            _check(_opt_int(data[key]), key, data[key])
        for key in ("name", "created", "started", "ended", "scope", "freezer"):
            _check(_opt_str(data[key]), key, data[key])
        elapsed = data["elapsed_s"]
        _check(elapsed is None or (isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
                                   and math.isfinite(elapsed)), "elapsed_s", elapsed)
        return cls(batch=data["batch"], name=data["name"], owner=Owner(owner["uid"], owner["user"]),
                   command=None if command is None else tuple(command), priority=data["priority"],
                   state=data["state"], counts=counts, terminated_attempts=data["terminated_attempts"],
                   requeued_attempts=data["requeued_attempts"], exit_status=data["exit_status"],
                   created=data["created"], started=data["started"], ended=data["ended"],
                   elapsed_s=None if elapsed is None else float(elapsed), scope=data["scope"],
                   freezer=data["freezer"], intake=IntakeStatus.from_json(data.get("intake")))


_JSON_KEYS = ("summary_version", "batch", "name", "owner", "command", "priority", "state", "tasks", "counts",
              "terminated_attempts", "requeued_attempts", "exit_status", "created", "started", "ended", "elapsed_s",
              "scope", "freezer", "intake")
_JSON_KEYS_V1 = _JSON_KEYS[:-1]


def task_counts(statuses: Iterable[str], paused_workers: int = 0) -> Counts:
    """Where the tasks stand, from their statuses (batch.Task.status) and how many of the batch's
    workers stand paused (by the governor or a user); a status the bookkeeping does not know
    counts as failed, as it does in a record marked failed."""
    found = {SUCCEEDED: 0, FAILED: 0, GIVEN_UP: 0, CANCELLED: 0, RETURNED: 0, RUNNING: 0, QUEUED: 0}
    other = 0
    # A mapping of status -> count (Batch.status_counts), or the statuses one by one.
    pairs = statuses.items() if isinstance(statuses, Mapping) else ((status, 1) for status in statuses)
    for status, number in pairs:
        if status in found:
            found[status] += number
        else:
            other += number
    paused = min(max(paused_workers, 0), found[RUNNING])
    return Counts(succeeded=found[SUCCEEDED], failed=found[FAILED] + other, given_up=found[GIVEN_UP],
                  cancelled=found[CANCELLED], running=found[RUNNING] - paused, paused=paused, queued=found[QUEUED],
                  returned=found[RETURNED])


def batch_state(counts: Counts, *, held: bool = False, stopping: bool = False, critical: bool = False,
                marked_failed: bool = False, intake_open: bool = False) -> str:
    """The batch's state (see the module's docstring).

    ``held``: paused by a user; ``stopping``: cancelled, no task starts any more; ``critical``:
    a critical finish; ``marked_failed``: the batch failed whatever its tasks say (its record
    could not be restored); ``intake_open``: a queue batch that may still take tasks.
    """
    if counts.pending == 0 and not intake_open:
        if critical or marked_failed or counts.failed or counts.given_up:
            return STATE_FAILED
        return STATE_CANCELLED if counts.cancelled else STATE_FINISHED
    if stopping or critical or counts.cancelled:
        return STATE_FINISHING
    if held:
        return STATE_PAUSED
    return STATE_QUEUED if counts.running + counts.paused == 0 else STATE_RUNNING


def summarize(batch: Batch, *, now: float, owner_uid: int | None = None, owner_user: str | None = None,
              priority: int | None = None, held: bool = False, paused_workers: int = 0, scope: str | None = None,
              freezer: str | None = None, intake: IntakeStatus | None = None) -> BatchSummary:
    """The summary of a batch, live or ended, at wall-clock time ``now``.

    ``paused_workers``: how many of its workers stand paused (the engine's PAUSED and HELD);
    ``held``: a user paused the batch. The rest is what the daemon knows of it.
    """
    counts = task_counts(batch.status_counts, paused_workers)
    ended = batch.finished
    until = ended if ended is not None else now
    return BatchSummary(
        batch=batch.spec.batch_id, name=batch.spec.task_id, owner=Owner(owner_uid, owner_user),
        command=tuple(batch.spec.command), priority=priority,
        # A queue batch ends by a cancel as a rule: then it is cancelled, whatever its tasks did.
        state=STATE_CANCELLED if (ended is not None and batch.spec.open_ended and batch.cancel_reason is not None
                                  and not (counts.failed or counts.given_up)) else batch_state(counts, held=held,
                          stopping=batch.cancel_reason is not None or batch.halt_reason is not None,
                          critical=batch.critical_reason is not None,
                          intake_open=ended is None and batch.spec.open_ended),
        counts=counts,
        terminated_attempts=batch.terminated,
        requeued_attempts=batch.requeued,
        exit_status=batch.exit_status() if ended is not None else None,
        created=iso(batch.started), started=iso(batch.first_start), ended=iso(ended),
        elapsed_s=round(max(until - batch.started, 0.0), 3), scope=scope, freezer=freezer if ended is None else None,
        intake=intake)


def from_record(batch_id: str, *, name: str | None, owner_uid: int | None, owner_user: str | None,
                priority: int | None, created: float | None, finished: float | None, report: dict) -> BatchSummary:
    """The summary of a finished batch stored without one: from its record's columns and its
    execution report, whatever they hold (values that cannot be used count as unknown).

    The batch has ended, so a task the report does not place, or places as still pending,
    counts as failed, as a batch marked failed counts its unfinished tasks.
    """
    raw = report.get("counts")
    raw = raw if isinstance(raw, dict) else {}
    found = {key: raw.get(key) if _is_int(raw.get(key)) and raw.get(key) >= 0 else 0 for key in COUNT_FIELDS}
    pending = found["running"] + found["paused"] + found["queued"]
    total = raw.get("tasks")
    unplaced = total - sum(found.values()) if _is_int(total) and total > sum(found.values()) else 0
    counts = Counts(**{**found, "failed": found["failed"] + pending + unplaced, "running": 0, "paused": 0,
                       "queued": 0})
    exit_status = report.get("exit_status") if _is_int(report.get("exit_status")) else None
    # Marked failed: so the report says (its record could not be restored), so its exit status says, or
    # the report is not there to say how its tasks ended.
    marked = (report.get("state") == STATE_FAILED or not isinstance(report.get("counts"), dict)
              or (exit_status not in (None, 0) and counts.succeeded == counts.total))
    command = report.get("command")
    command = tuple(command) if isinstance(command, list) and all(isinstance(w, str) for w in command) else None
    starts = [a.get("start") for t in _list(report.get("tasks")) if isinstance(t, dict)
              for a in _list(t.get("attempts")) if isinstance(a, dict)]
    starts = [s for s in starts if isinstance(s, str)]
    if _finite(created) and _finite(finished) and finished >= created:
        elapsed = round(finished - created, 3)
    else:
        elapsed = float(report["duration_s"]) if _finite(report.get("duration_s")) else None
    extra = {key: raw[key] if _is_int(raw.get(key)) and raw[key] >= 0 else 0 for key in ("terminated", "requeued")}
    return BatchSummary(
        batch=batch_id, name=name, owner=Owner(owner_uid, owner_user), command=command, priority=priority,
        state=batch_state(counts, critical=report.get("critical_error") is True, marked_failed=marked),
        counts=counts, terminated_attempts=extra["terminated"], requeued_attempts=extra["requeued"],
        exit_status=exit_status, created=iso(created) if _finite(created) else None,
        started=min(starts) if starts else None,
        ended=iso(finished) if _finite(finished) else (report["finished"] if isinstance(report.get("finished"), str)
                                                       else None),
        elapsed_s=elapsed)


def _check(ok: bool, what: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        raise ValueError(f"the stored summary's {what} is {shown if len(shown) <= 60 else shown[:60] + '...'}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(value: Any) -> bool:
    return value is None or _is_int(value)


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        0 <= value <= 253402300799.0  # what iso() can show


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
