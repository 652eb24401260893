"""A batch: its tasks, their attempts, the retry rules and the execution report.

No processes and no I/O here; the runner feeds attempts in and reads decisions out.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from array import array
from collections import Counter, deque
from dataclasses import dataclass, fields
from datetime import datetime, timezone

from .governor import Limits

REPORT_VERSION = 1

# Task states
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
GIVEN_UP = "given-up"
CANCELLED = "cancelled"
RETURNED = "returned"  # a queue batch's task whose message went back to its queue (see intake), for any node
FINISHED = (SUCCEEDED, FAILED, GIVEN_UP, CANCELLED, RETURNED)

# Why an attempt ended
CAUSE_EXIT = "exit"  # the worker ended on its own (any status, or a signal pmlmd did not send)
CAUSE_GOVERNOR_MEMORY = "governor-memory"  # terminated by the governor to keep memory free
CAUSE_CANCELLED = "cancelled"  # the batch was cancelled (Ctrl-C, SIGTERM)
CAUSE_SPAWN_FAILED = "spawn-failed"  # the command could not be executed
CAUSE_CWD = "cwd"  # the working directory could not be entered as the worker's user
CAUSE_DAEMON_RESTART = "daemon-restart"  # pmlmd restarted and the worker was gone, or ended unseen
CAUSE_TIMEOUT = "timeout"  # it ran longer than --timeout: terminated, and a failure of the task
CAUSE_BAD_MESSAGE = "bad-message"  # a queue message that cannot be a task line (a NUL, too long): failed unrun

# --halt: when a batch stops once enough of its tasks have failed
HALT_SOON = "soon"  # start no more tasks, let the running ones finish
HALT_NOW = "now"  # and terminate the running ones too
HALT_WHEN = (HALT_SOON, HALT_NOW)


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Attempt:
    number: int  # 1-based
    pid: int | None
    start: float  # wall-clock seconds
    end: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    cause: str | None = None
    reason: str | None = None
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    pauses: int = 0
    stop_path: str | None = None  # how pmlmd ended it: agent, sigterm or sigkill (None: it ended by itself)

    def to_json(self) -> dict:
        # Every field is a plain value: a shallow copy (asdict's deep one cost a report of many
        # tiny tasks a tenth of the daemon's time).
        data = {name: getattr(self, name) for name in _ATTEMPT_FIELDS}
        data["start"], data["end"] = iso(self.start), iso(self.end)
        data["cpu_seconds"] = round(self.cpu_seconds, 3)
        return data


_ATTEMPT_FIELDS = tuple(f.name for f in fields(Attempt))


class Task:
    """One task of a batch: its line, where it stands, its attempts and its two retry budgets.

    Its batch counts its tasks by status as they change (``counts``, see Batch.status_counts),
    so that a summary of a batch of any size costs no walk over its tasks. A plain class with
    slots, made as the batch takes its tasks (see TaskTable).
    """

    __slots__ = ("index", "line", "_status", "attempts", "governor_ends", "failures", "counts", "message")

    def __init__(self, index: int, line: str | None, status: str = QUEUED, attempts: list[Attempt] | None = None,
                 governor_ends: int = 0, failures: int = 0, message: dict | None = None):
        self.index = index
        self.line = line
        self._status = status
        self.attempts: list[Attempt] = [] if attempts is None else attempts
        self.governor_ends = governor_ends  # attempts ended by the governor (budget: --retries)
        self.failures = failures  # attempts that failed on their own (budget: --retry-failed)
        self.counts: Counter | None = None  # its batch's status_counts, once it belongs to one
        # A queue batch's task: what its message said ({"message_id": str | None, "redelivered": bool}).
        self.message = message

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        counts = self.counts
        if counts is not None:
            counts[self._status] -= 1
            counts[value] += 1
        self._status = value

    def _fields(self) -> tuple:
        return (self.index, self.line, self._status, self.attempts, self.governor_ends, self.failures)

    def __eq__(self, other) -> bool:
        return isinstance(other, Task) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return (f"Task(index={self.index!r}, line={self.line!r}, status={self._status!r}, "
                f"attempts={self.attempts!r}, governor_ends={self.governor_ends!r}, failures={self.failures!r})")

    def to_json(self) -> dict:
        data = {"index": self.index, "task": self.line, "status": self.status,
                "attempts": [a.to_json() for a in self.attempts]}
        if self.message is not None:
            data.update(self.message)
        return data


class Blank:
    """The task lines of a batch of N tasks without a line (``-n N``): N times None, in O(1) memory."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [None] * len(range(*index.indices(self.size)))
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return None

    def __iter__(self):
        return itertools.repeat(None, self.size)

    def __eq__(self, other) -> bool:
        return (len(other) == self.size and all(line is None for line in other)) if isinstance(other, (list, Blank)) \
            else NotImplemented

    def __repr__(self) -> str:
        return f"Blank({self.size})"


class TaskTable:
    """A batch's tasks by index, in memory that grows with the tasks taken, not with all of them.

    Tasks are taken in index order (a requeued one goes back to the front of the queue, see
    TaskQueue), so those taken so far are the Task objects ``made`` (indices 0 .. len(made) - 1)
    and every later one stands where ``rest`` says (queued at first; cancelled, say, once the
    queue was cancelled) with its line from ``lines``. A later task read by index or iteration is
    a fresh Task each time, not counted in its batch: only ``take`` makes one that is. A batch of
    1,000,000 ``-n`` tasks thus costs a few objects until its tasks run.
    """

    __slots__ = ("lines", "made", "rest", "size", "counts")

    def __init__(self, lines, counts: Counter, made: list[Task] | None = None, rest: str = QUEUED):
        self.lines = lines  # a sequence of str | None (list, or Blank)
        self.made: list[Task] = [] if made is None else made
        self.rest = rest
        self.size = max(len(lines), len(self.made))
        self.counts = counts

    @property
    def untaken(self) -> int:
        """How many tasks have no Task object yet (they all stand at ``rest``)."""
        return self.size - len(self.made)

    def take(self) -> Task:
        """The first untaken task, as a Task of its batch from now on (IndexError: none left)."""
        index = len(self.made)
        if index >= self.size:
            raise IndexError("no untaken task")
        task = Task(index, self.lines[index], self.rest)
        task.counts = self.counts
        self.made.append(task)
        return task

    def add(self, task: Task) -> None:
        """A queue batch's new task, numbered after the last (it has no untaken ones)."""
        if self.untaken:
            raise ValueError("a batch with untaken tasks takes no new ones")
        self.made.append(task)
        self.size += 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        made = self.made
        if index < 0:
            index += self.size
        if 0 <= index < len(made):
            return made[index]
        if not len(made) <= index < self.size:
            raise IndexError(index)
        return Task(index, self.lines[index], self.rest)

    def __iter__(self):
        yield from self.made
        lines, rest = self.lines, self.rest
        for index in range(len(self.made), self.size):
            yield Task(index, lines[index], rest)

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, TaskTable)) else NotImplemented

    def encode(self, start: int, end: int) -> str:
        """Tasks ``start`` .. ``end`` - 1 as their report entries: ``json.dumps(task.to_json())``
        of each, joined by ", " (ASCII). Untaken tasks differ only in index and line, so theirs
        are filled into one template (a million in about a second, not a Task object each)."""
        made = self.made
        parts = [json.dumps(t.to_json()) for t in made[start:min(end, len(made))]]
        first = max(start, len(made))
        if first < end:
            status, lines = json.dumps(self.rest), self.lines
            if isinstance(lines, Blank):
                tail = f', "task": null, "status": {status}, "attempts": []}}'
                parts.extend(f'{{"index": {i}{tail}' for i in range(first, end))
            else:
                tail = f', "status": {status}, "attempts": []}}'
                parts.extend(f'{{"index": {i}, "task": {json.dumps(lines[i])}{tail}' for i in range(first, end))
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"TaskTable({len(self.made)} taken of {self.size}, rest {self.rest})"


class TaskQueue:
    """A batch's queued tasks in the order they start: ``front`` (requeued and deferred tasks,
    then a queue batch's new ones), then the untaken tasks while they stand queued.

    Has what the batch and the engine use of a deque: len, truth, popleft, appendleft, append,
    remove, iteration, and [0] (which takes the first untaken task when the front is empty).
    """

    __slots__ = ("table", "front")

    def __init__(self, table: TaskTable, front=()):
        self.table = table
        self.front: deque[Task] = deque(front)

    def _fresh(self) -> int:
        return self.table.untaken if self.table.rest == QUEUED else 0

    def __len__(self) -> int:
        return len(self.front) + self._fresh()

    def __bool__(self) -> bool:
        return bool(self.front) or self._fresh() > 0

    def popleft(self) -> Task:
        if self.front:
            return self.front.popleft()
        if self._fresh():
            return self.table.take()
        raise IndexError("pop from an empty queue")

    def appendleft(self, task: Task) -> None:
        self.front.appendleft(task)

    def append(self, task: Task) -> None:
        if self._fresh():
            raise ValueError("a batch with untaken tasks takes no new ones")
        self.front.append(task)

    def remove(self, task: Task) -> None:
        self.front.remove(task)

    def __getitem__(self, index: int) -> Task:
        if index != 0:
            raise IndexError("only the first queued task can be looked at")
        if not self.front:
            self.front.append(self.popleft())
        return self.front[0]

    def __iter__(self):
        yield from self.front
        if self._fresh():
            yield from itertools.islice(self.table, len(self.table.made), None)

    def __repr__(self) -> str:
        return f"TaskQueue({len(self.front)} in front, {self._fresh()} untaken)"


@dataclass(frozen=True)
class IntakeSpec:
    """Where a queue batch takes its tasks from (see intake): each message body is a task line."""

    url: str  # amqp://USER:PASSWORD@HOST:PORT/VHOST
    queue: str
    until_empty: bool = False  # end once the queue is empty and nothing is in flight; else run until cancelled
    dead_letter: str | None = None  # exchange for tasks that failed or were given up; None: nack, no requeue

    def to_json(self) -> dict:
        return {"amqp": self.url, "queue": self.queue, "until_empty": self.until_empty,
                "dead_letter": self.dead_letter}


@dataclass
class BatchSpec:
    """Everything a batch needs to run; validated by the CLI before it gets here."""

    batch_id: str
    command: list[str]
    tasks: list[str | None] | Blank  # each task's line (None: no line), by index
    limits: Limits
    shell: bool = False
    term_grace: float = 10.0
    retries: int = 3
    retry_failed: int = 0
    task_id: str | None = None
    term_mode: str = "signal"  # or "agent": ask through the agent channel first
    pause_mode: str = "signal"
    agent_timeout: float = 5.0
    timeout: float | None = None  # seconds an attempt may run, not counting time pmlmd held it paused
    halt: str | None = None  # HALT_SOON or HALT_NOW, with one of:
    halt_fail: int | None = None  # ... once this many tasks have failed
    halt_fail_pct: float | None = None  # ... once this share (percent) of the tasks has failed
    append: bool = False  # a task line is the last argument when the command has no {}
    intake: IntakeSpec | None = None  # the tasks come from an AMQP queue: an open-ended batch

    @property
    def open_ended(self) -> bool:
        return self.intake is not None

    @property
    def uses_agent(self) -> bool:
        return "agent" in (self.term_mode, self.pause_mode)

    @property
    def halt_text(self) -> str | None:
        """--halt as given: "soon,fail=2", "now,fail=10%"; None without."""
        if self.halt is None:
            return None
        if self.halt_fail_pct is not None:
            return f"{self.halt},fail={self.halt_fail_pct:g}%"
        return f"{self.halt},fail={self.halt_fail}"


# Series keeps its samples as they came up to EXACT_SAMPLES (the median is exact), then a histogram
# of BINS counters over 0..100 percent in steps of BIN_WIDTH: the median is then the one of the samples
# rounded to the nearest 0.1 point, within 0.05 points of the exact one, and the memory stays the same
# however long the batch lives (a sample every 0.1 s for a month is 26 million samples).
EXACT_SAMPLES = 1000
BIN_WIDTH = 0.1
BINS = 1001  # 0.0, 0.1, ... 100.0


class Series:
    """Min / max / count of a sampled percentage, and its median: exact up to EXACT_SAMPLES samples,
    within BIN_WIDTH / 2 after (for values in 0..100; one outside counts in the nearest end bin)."""

    __slots__ = ("count", "low", "high", "exact", "bins", "exact_samples")

    def __init__(self, exact_samples: int = EXACT_SAMPLES):
        self.exact_samples = exact_samples
        self.count = 0
        self.low = math.inf
        self.high = -math.inf
        self.exact: list[float] | None = []  # None once the histogram took over
        self.bins: array | None = None

    def add(self, value: float) -> None:
        self.count += 1
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        if self.exact is not None:
            self.exact.append(value)
            if len(self.exact) <= self.exact_samples:
                return
            self.bins = array("q", bytes(8 * BINS))
            for kept in self.exact:
                self._count(kept)
            self.exact = None
            return
        self._count(value)

    def _count(self, value: float) -> None:
        self.bins[min(max(round(value / BIN_WIDTH), 0), BINS - 1)] += 1

    def median(self) -> float:
        if self.exact is not None:
            return statistics.median(self.exact)
        # The middle sample (two for an even count, averaged as statistics.median does).
        wanted = ((self.count - 1) // 2, self.count // 2)
        found: list[float] = []
        seen = 0
        for index, n in enumerate(self.bins):
            seen += n
            while len(found) < 2 and seen > wanted[len(found)]:
                found.append(index * BIN_WIDTH)
            if len(found) == 2:
                break
        return min(max((found[0] + found[1]) / 2, self.low), self.high)

    def summary(self, digits: int = 1) -> dict | None:
        if not self.count:
            return None
        return {"min": round(self.low, digits), "median": round(self.median(), digits),
                "max": round(self.high, digits), "samples": self.count}


class Batch:
    """The batch's bookkeeping: which task runs next and how each attempt's end counts."""

    def __init__(self, spec: BatchSpec, now: float, tasks: list[Task] | None = None, rest: str = QUEUED):
        """A new batch, or with ``tasks`` one restored from the state database: those of its tasks
        that were taken (by index, with gaps; every one past the last of them and every gap
        stands at ``rest``, with its line from ``spec.tasks``)."""
        self.spec = spec
        self.started = now
        self.finished: float | None = None
        # Kept up to date as tasks change (Task.status) and attempts end: read in O(1).
        self.status_counts: Counter[str] = Counter()
        if tasks is None:  # new: every task queued, nothing to add up
            self.tasks = TaskTable(spec.tasks, self.status_counts)
            self.queue = TaskQueue(self.tasks)
            self.status_counts[QUEUED] = len(self.tasks)
            self.requeued, self.terminated, self.first_start, self.failed_tasks = 0, 0, None, 0
        else:
            made: list[Task] = []
            for task in tasks:
                while len(made) < task.index:  # a gap: a task taken and put back, or never written
                    made.append(Task(len(made), spec.tasks[len(made)], rest))
                made.append(task)
            self.tasks = TaskTable(spec.tasks, self.status_counts, made, rest)
            self.queue = TaskQueue(self.tasks, (t for t in made if t.status == QUEUED))
            self.status_counts.update(t.status for t in made)
            self.status_counts[rest] += self.tasks.untaken
            # Every attempt but a finished or running task's last one ended in a requeue.
            self.requeued = sum(len(t.attempts) - (bool(t.attempts) and (t.status in FINISHED or t.status == RUNNING))
                                for t in made)
            self.terminated = sum(1 for t in made for a in t.attempts if a.cause == CAUSE_GOVERNOR_MEMORY)
            self.first_start: float | None = min((a.start for t in made for a in t.attempts), default=None)
            # Tasks that ended failed or given up; once --halt's count is reached, halt_reason says so.
            self.failed_tasks = sum(1 for t in made if t.status in (FAILED, GIVEN_UP)) + \
                (self.tasks.untaken if rest in (FAILED, GIVEN_UP) else 0)
        for task in self.tasks.made:
            task.counts = self.status_counts
        self.critical_reason: str | None = None
        self.cancel_reason: str | None = None
        self.halt_reason: str | None = None
        self._check_halt()  # a restored batch that had halted stays halted
        self.cpu = Series()
        self.free_pct = Series()
        self.lowest_free: int | None = None

    # --- tasks -------------------------------------------------------------------
    def next_task(self) -> Task:
        task = self.queue.popleft()
        task.status = RUNNING
        return task

    def start_attempt(self, task: Task, pid: int | None, now: float) -> Attempt:
        attempt = Attempt(number=len(task.attempts) + 1, pid=pid, start=now)
        if self.first_start is None or now < self.first_start:
            self.first_start = now
        task.attempts.append(attempt)
        return attempt

    def end_attempt(self, task: Task, attempt: Attempt, now: float, cause: str) -> None:
        """Record the end and decide the task's fate: done, failed, or queued again."""
        attempt.end = now
        attempt.cause = cause
        if cause == CAUSE_GOVERNOR_MEMORY:
            self.terminated += 1
        open_ended = self.spec.open_ended
        if cause == CAUSE_GOVERNOR_MEMORY:
            task.governor_ends += 1
            if task.governor_ends <= self.spec.retries and (open_ended or self._may_requeue()):
                # A queue batch's task goes back to its queue, for whichever node has room.
                self._requeue(task, RETURNED if open_ended else QUEUED)
            else:
                task.status = GIVEN_UP
                self._failed(task)
        elif cause == CAUSE_CANCELLED:
            task.status = RETURNED if open_ended else CANCELLED
        elif cause == CAUSE_DAEMON_RESTART:
            # Not the task's fault and its outcome is unknown: run it again, on no budget.
            if open_ended or self._may_requeue():
                self._requeue(task, RETURNED if open_ended else QUEUED)
            else:
                task.status = CANCELLED
        elif attempt.exit_code == 0 and cause != CAUSE_TIMEOUT:
            task.status = SUCCEEDED
        else:
            # A timeout fails the attempt whatever the worker exited with once it was told to stop.
            task.failures += 1
            if task.failures <= self.spec.retry_failed and self._may_requeue():
                self._requeue(task)
            else:
                task.status = FAILED
                self._failed(task)

    def _may_requeue(self) -> bool:
        """Whether a task may run again: not once the batch is cancelled or has halted."""
        return self.cancel_reason is None and self.halt_reason is None

    def _failed(self, task: Task) -> None:
        self.failed_tasks += 1
        self._check_halt()

    def _check_halt(self) -> None:
        """--halt: once enough tasks have failed, no more start (the engine ends the running ones
        for ``now``). GNU parallel's rule: fail=N halts at N failed tasks, fail=P% once the failed
        tasks are at least P% of all tasks."""
        spec = self.spec
        if spec.halt is None or self.halt_reason is not None or not self.failed_tasks:
            return
        if spec.halt_fail_pct is not None:
            due = self.failed_tasks * 100 >= spec.halt_fail_pct * len(self.tasks)
        else:
            due = spec.halt_fail is not None and self.failed_tasks >= spec.halt_fail
        if not due:
            return
        plural = "" if self.failed_tasks == 1 else "s"
        self.halt_reason = f"halted after {self.failed_tasks} failed task{plural} (--halt {spec.halt_text})"
        self.cancel_queued()

    def _requeue(self, task: Task, status: str = QUEUED) -> None:
        # Back to the front: it has waited longest, and what it needs is known now.
        task.status = status
        if status == QUEUED:
            self.queue.appendleft(task)
        self.requeued += 1

    def cancel_queued(self) -> None:
        """No queued task starts: cancelled, or for a queue batch, returned to its queue."""
        status = RETURNED if self.spec.open_ended else CANCELLED
        queue = self.queue
        while queue.front:
            queue.front.popleft().status = status
        table = self.tasks
        if table.rest == QUEUED and table.untaken:  # the untaken ones, in one go
            self.status_counts[QUEUED] -= table.untaken
            self.status_counts[status] += table.untaken
            table.rest = status

    def fail_unrunnable(self, task: Task, now: float, cause: str, reason: str) -> Attempt:
        """A queued task that no attempt could run (a queue message that is no task line): failed
        at once, on no retry budget."""
        self.queue.remove(task)
        attempt = self.start_attempt(task, None, now)
        attempt.end, attempt.cause, attempt.exit_code, attempt.reason = now, cause, 126, reason
        task.status = FAILED
        self._failed(task)
        return attempt

    def add_task(self, line: str | None, message: dict | None = None, governor_ends: int = 0) -> Task:
        """A queue batch's new task, queued: numbered after the ones it has."""
        task = Task(len(self.tasks), line, governor_ends=governor_ends, message=message)
        self.tasks.add(task)
        self.queue.append(task)
        task.counts = self.status_counts
        self.status_counts[QUEUED] += 1
        return task

    # --- samples -------------------------------------------------------------------
    def record_sample(self, cpu_pct: float | None, free: int, total: int) -> None:
        if cpu_pct is not None:
            self.cpu.add(cpu_pct)
        self.free_pct.add(100.0 * free / total)
        if self.lowest_free is None or free < self.lowest_free:
            self.lowest_free = free

    # --- outcome -------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        statuses = self.status_counts
        return {
            "tasks": len(self.tasks),
            "succeeded": statuses[SUCCEEDED],
            "failed": statuses[FAILED],
            "given_up": statuses[GIVEN_UP],
            "cancelled": statuses[CANCELLED],
            "returned": statuses[RETURNED],
            "terminated": self.terminated,
            "requeued": self.requeued,
        }

    def done(self) -> int:
        return sum(self.status_counts[status] for status in FINISHED)

    def exit_status(self) -> int:
        """0 all succeeded, 1 some task did not, 3 critical finish."""
        if self.critical_reason:
            return 3
        # A queue batch's returned tasks are its queue's again: not a failure of this batch.
        fine = self.status_counts[SUCCEEDED] + self.status_counts[RETURNED]
        return 0 if fine == len(self.tasks) else 1

    def error_message(self) -> str | None:
        if self.critical_reason:
            return f"critical finish: {self.critical_reason}"
        if self.cancel_reason and not self.spec.open_ended:  # a queue batch is cancelled to end it, as a rule
            return f"cancelled: {self.cancel_reason}"
        # While the batch runs, a task still queued or running has not failed (yet).
        ended = self.finished is not None
        fine = (SUCCEEDED, RETURNED)
        count = (len(self.tasks) - sum(self.status_counts[status] for status in fine) if ended else
                 sum(self.status_counts[status] for status in FINISHED if status not in fine))
        if not count:
            return None
        # The first five by index; counted from status_counts, so a batch with none costs no walk.
        bad = []
        for t in self.tasks:
            if t.status not in fine and (ended or t.status in FINISHED):
                bad.append(t)
                if len(bad) == 5:
                    break
        shown = ", ".join(f"{t.index} ({describe_end(t, self.spec)})" for t in bad)
        more = f" and {count - 5} more" if count > 5 else ""
        halted = f"{self.halt_reason}: " if self.halt_reason else ""
        return f"{halted}{count} of {len(self.tasks)} tasks did not succeed: {shown}{more}"

    def summary_line(self) -> str:
        c = self.counts()
        took = (self.finished or self.started) - self.started
        parts = [f"{c['succeeded']} succeeded"]
        parts += [f"{c[k]} {k.replace('_', ' ')}" for k in ("failed", "given_up", "cancelled", "returned", "terminated", "requeued")
                  if c[k]]
        tasks = f"{c['tasks']} task" + ("" if c["tasks"] == 1 else "s")
        return f"batch {self.spec.batch_id}: {tasks}, {', '.join(parts)} in {took:.1f}s"

    def report(self, now: float | None = None, summary=None, with_tasks: bool = True) -> dict:
        """The execution report. For a batch still running, ``now`` (wall-clock seconds) gives its
        duration so far; its state is a live one (``running``, say), its exit_status is None and
        only tasks that ended count as not succeeded.

        ``state`` and ``counts`` are those of the batch's summary (summary.BatchSummary): the
        daemon passes the one it shows, which knows paused workers and a user's pause; without
        one they come from the bookkeeping alone. Without ``with_tasks`` the report has no
        ``tasks`` (the daemon encodes those a slice at a time, see its ReportJob).
        """
        from .summary import summarize  # it builds on this module

        spec, limits = self.spec, self.spec.limits
        error = self.error_message()
        running = self.finished is None
        end = self.finished if not running else (now if now is not None else self.started)
        if summary is None:
            summary = summarize(self, now=end)
        return {
            "report_version": REPORT_VERSION,
            "batch_id": spec.batch_id,
            "task_id": spec.task_id or spec.batch_id,
            "command": spec.command,
            "shell": spec.shell,
            "state": summary.state,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "duration_s": round(max(end - self.started, 0.0), 3),
            "error_exist": error is not None,
            "error_message": error,
            "critical_error": self.critical_reason is not None,
            "execution_message": self.summary_line(),
            "exit_status": None if running else self.exit_status(),
            "limits": {
                "cpu_limit_pct": limits.cpu_limit,
                "memfree_limit_pct": limits.memfree_limit,
                "memory_metric": limits.memory_metric,
                "memory_gap_bytes": limits.memory_gap,
                "min_free_bytes": limits.min_free,
                "victim": limits.victim,
                "max_workers": limits.max_workers,
                "cpu_margin_pct": limits.cpu_margin,
                "interval_s": limits.interval,
                "term_grace_s": spec.term_grace,
                "retries": spec.retries,
                "retry_failed": spec.retry_failed,
                "term_mode": spec.term_mode,
                "pause_mode": spec.pause_mode,
                "agent_timeout_s": spec.agent_timeout,
                "timeout_s": spec.timeout,
                "halt": spec.halt_text,
                "append": spec.append,
            },
            # The counts that add up to the tasks, and those of attempts (terminated, requeued).
            "counts": {"tasks": summary.tasks, **summary.counts.to_json(),
                       "terminated": summary.terminated_attempts, "requeued": summary.requeued_attempts},
            "lowest_free_memory_bytes": self.lowest_free,
            "lowest_free_memory_pct": self.free_pct.summary()["min"] if self.free_pct.count else None,
            "highest_cpu_pct": self.cpu.summary()["max"] if self.cpu.count else None,
            "cpu_pct": self.cpu.summary(),
            "free_memory_pct": self.free_pct.summary(),
            **({"tasks": [t.to_json() for t in self.tasks]} if with_tasks else {}),
        }


def describe_end(task: Task, spec: BatchSpec) -> str:
    """How a task that did not succeed ended, in a few words: "exit 3", "given up after 4 terminations"."""
    if task.status == GIVEN_UP:
        return f"given up after {task.governor_ends} terminations"
    if task.status == CANCELLED:
        return "cancelled"
    last = task.attempts[-1] if task.attempts else None
    if last is None:
        return task.status
    if last.cause == CAUSE_TIMEOUT:
        return f"timed out after {spec.timeout:g}s" if spec.timeout is not None else "timed out"
    if last.cause in (CAUSE_SPAWN_FAILED, CAUSE_CWD, CAUSE_BAD_MESSAGE):
        return last.reason or "could not start"
    if last.signal is not None:
        return f"killed by signal {last.signal}"
    return f"exit {last.exit_code}"
