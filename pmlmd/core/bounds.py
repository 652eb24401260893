"""The range of every number a batch or the daemon can be given: one table for all of pmlmd.

The control protocol (``protocol.py``, the submit request), the configuration file
(``config.py``) and pmlmctl's options (``ctl.py``) all check numbers against ``BOUNDS``, so
a value one of them accepts the others accept too, and a number that reaches the governor,
the engine or the state database is one they can compute with: sizes stay far inside both
a float's exact range and SQLite's 64-bit integers (sums of three of them still fit), times
stay finite and short enough that a deadline computed from them is a deadline, and counts stay
small enough that a batch is built, stored, restored and reported within the daemon's
watchdog interval (30 s).

Each consumer words its errors its own way (a protocol error, a config file line, an
argparse message) but takes the range, the unit and the kind from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INTEGER = "integer"  # a whole number
NUMBER = "number"  # an integer or a float, handed on as a float
SIZE = "size"  # a whole number of bytes; people write it with K, M, G or T
DURATION = "duration"  # seconds, as NUMBER; the config file also takes s, m, h or d

# 1 EiB: more memory than any Linux machine can address (x86-64 with 5-level paging: 4 PiB),
# and 2**60 keeps memory_limit + memory_gap + min_free below 2**62, exact as floats and ints alike.
MAX_SIZE = 1 << 60
# A batch's tasks cost the daemon memory and state rows only once they are taken (batch.TaskTable),
# but its report lists each one: 1,000,000 tasks that never ran make a report of about 70 MB,
# encoded in about 0.2 s (500 tasks between two turns of the loop).
MAX_TASKS = 1_000_000


@dataclass(frozen=True)
class Bound:
    kind: str
    low: int | float
    high: int | float
    unit: str = ""

    def admits(self, value: Any) -> bool:
        """True if ``value`` is of this kind and within the range; bools, nan and infinities never are.

        Python compares ints and floats exactly, so a huge int is out of range rather than
        an OverflowError, and nan compares false with everything.
        """
        if isinstance(value, bool):
            return False
        if self.kind in (NUMBER, DURATION):
            if not isinstance(value, (int, float)):
                return False
        elif not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def text(self, value: int | float) -> str:
        """A limit of the range as people write it: sizes and durations with a unit (1048576T, 3650d)."""
        if self.kind == SIZE:
            return size_text(int(value))
        if self.kind == DURATION:
            return duration_text(value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    def span(self) -> str:
        """'from LOW to HIGH', for the error messages of every consumer."""
        return f"from {self.text(self.low)} to {self.text(self.high)}"


def size_text(nbytes: int) -> str:
    """Bytes with the largest binary suffix that divides them exactly: 1 << 60 -> '1048576T'."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{suffix}"
    return str(nbytes)


def duration_text(seconds: int | float) -> str:
    """Seconds with the largest unit that divides them exactly: 315360000 -> '3650d'."""
    for suffix, unit in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % unit == 0:
            return f"{seconds // unit:g}{suffix}"
    return f"{seconds:g}s"


BOUNDS: dict[str, Bound] = {
    # What a batch runs.
    "tasks": Bound(INTEGER, 1, MAX_TASKS),
    "task_index": Bound(INTEGER, 0, MAX_TASKS - 1),
    "priority": Bound(INTEGER, -1000, 1000),
    "retries": Bound(INTEGER, 0, 1000),
    "retry_failed": Bound(INTEGER, 0, 1000),
    "max_workers": Bound(INTEGER, 1, 100_000),
    # --halt WHEN,fail=N or fail=N%: a count of failed tasks, or a share of the batch's tasks.
    "halt_fail": Bound(INTEGER, 1, MAX_TASKS),
    "halt_fail_pct": Bound(NUMBER, 1, 100, "percent"),
    # The limits.
    "cpu_limit": Bound(NUMBER, 1, 100, "percent"),
    "cpu_margin": Bound(NUMBER, 0, 99, "percentage points"),
    "memfree_limit": Bound(NUMBER, 0, 99, "percent"),
    "memory_gap": Bound(SIZE, 0, MAX_SIZE, "bytes"),
    "min_free": Bound(SIZE, 0, MAX_SIZE, "bytes"),
    # Times. The floors keep the sampling loop from spinning; the ceilings keep deadlines real.
    "interval": Bound(NUMBER, 0.01, 60, "seconds"),
    "term_grace": Bound(NUMBER, 0, 3600, "seconds"),
    "agent_timeout": Bound(NUMBER, 0.1, 3600, "seconds"),
    # How long one attempt of a task may run (--timeout): a year is as good as none.
    "timeout": Bound(NUMBER, 0.01, 365 * 86400, "seconds"),
    # What the workers take from their submitter's process (pmlmctl submit sends it, see protocol).
    "umask": Bound(INTEGER, 0, 0o777, "file mode bits"),
    # The daemon's own: how long finished batches are kept (10 years is as good as never).
    # output_limit: bytes of each task's stdout and of its stderr kept (the tail); 0 keeps none.
    "output_limit": Bound(SIZE, 0, MAX_SIZE, "bytes"),
    "prune_after": Bound(DURATION, 1, 3650 * 86400, "seconds"),
    # [quotas], per user (see config.py): tasks not yet finished over the user's active batches
    # (a hundred of the largest batches), active batches, and the shortest interval a batch may ask for.
    "tasks_queued": Bound(INTEGER, 1, 100 * MAX_TASKS),
    "batches_active": Bound(INTEGER, 1, 10_000),
    "min_interval": Bound(NUMBER, 0.01, 60, "seconds"),
    "state_bytes": Bound(SIZE, 1 << 20, MAX_SIZE, "bytes"),
    "request_bytes": Bound(SIZE, 4096, 1 << 20, "bytes"),  # at most protocol.MAX_MESSAGE_BYTES
    "output_bytes": Bound(SIZE, 1 << 20, MAX_SIZE, "bytes"),
}

# A resource limit as getrlimit(2) gives it (bytes, seconds or a count; each of submit's
# ``rlimits``). 2**60 is as good as no limit for every resource (no address space, file or
# CPU time comes near it) and stays a 64-bit integer in the state database; pmlmctl sends a
# larger finite limit as 2**60, lower rather than "unlimited".
MAX_RLIMIT = MAX_SIZE
