"""A batch of many identical tasks costs memory, state rows and time by the tasks that ran, not by
how many it has (batch.TaskTable, store's task rows). Pure bookkeeping, a real SQLite file, and a
real daemon with a batch of a million tasks."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import tracemalloc

from pmlmd.core.batch import (CANCELLED, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, QUEUED, RUNNING, SUCCEEDED, Batch, BatchSpec,
                         Blank)
from pmlmd.core.bounds import MAX_TASKS
from pmlmd.core.governor import Limits
from pmlmd.daemon.store import Store

from support import wait_for

MILLION = 1_000_000


def _spec(tasks) -> BatchSpec:
    return BatchSpec(batch_id="1", command=["true"], tasks=tasks, limits=Limits())


def _run(batch: Batch, cause: str = CAUSE_EXIT, exit_code: int | None = 0):
    task = batch.next_task()
    attempt = batch.start_attempt(task, 4242, 1001.0)
    attempt.exit_code = exit_code
    batch.end_attempt(task, attempt, 1002.0, cause)
    return task


def test_a_million_tasks_cost_no_memory_until_they_are_taken():
    assert MAX_TASKS >= MILLION
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        batch = Batch(_spec(Blank(MILLION)), now=1000.0)
        made = tracemalloc.get_traced_memory()[0] - before
        batch.cancel_queued()
        cancelled = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A list of a million Task objects alone would take over 100 MB.
    assert made < 64 << 10 and cancelled < 64 << 10, (made, cancelled)
    assert batch.status_counts[CANCELLED] == MILLION and batch.status_counts[QUEUED] == 0 and not batch.queue
    assert len(batch.tasks) == MILLION and batch.tasks[MILLION - 1].status == CANCELLED
    assert batch.exit_status() == 1 and batch.error_message().startswith(f"{MILLION} of {MILLION} tasks did not")


def test_tasks_are_taken_in_order_and_a_requeued_one_goes_first():
    batch = Batch(_spec(Blank(MILLION)), now=1000.0)
    first = _run(batch)
    second = _run(batch, CAUSE_GOVERNOR_MEMORY, None)  # terminated for memory: back to the front
    assert (first.status, second.status) == (SUCCEEDED, QUEUED)
    assert len(batch.tasks.made) == 2 and len(batch.queue) == MILLION - 1
    assert batch.next_task() is second and batch.next_task().index == 2
    assert batch.status_counts[RUNNING] == 2 and batch.status_counts[QUEUED] == MILLION - 3


def test_the_report_entries_of_untaken_tasks_are_those_of_task_objects():
    lines = ['caf\udce9', None, 'say "hi"\n', '\\', 'x' * 100]
    batch = Batch(_spec(lines), now=1000.0)
    _run(batch)
    for rest in (QUEUED, CANCELLED):
        if rest == CANCELLED:
            batch.cancel_queued()
        encoded = batch.tasks.encode(0, len(lines))
        assert encoded == ", ".join(json.dumps(t.to_json()) for t in batch.tasks)
        assert [t["status"] for t in json.loads(f"[{encoded}]")] == [SUCCEEDED] + [rest] * 4
    blank = Batch(_spec(Blank(3)), now=1000.0)
    assert json.loads(f"[{blank.tasks.encode(1, 3)}]") == [t.to_json() for t in blank.tasks[1:3]]


def test_the_state_holds_rows_of_taken_tasks_only_and_a_restore_rebuilds_the_rest(tmp_path):
    store = Store(str(tmp_path))
    try:
        submission = {"command": ["true"], "cwd": "/tmp", "tasks": MILLION}
        store.add_batch("1", store.next_seq(), None, (0, 0, [0]), 0, submission, 1000.0, MILLION)
        batch = Batch(_spec(Blank(MILLION)), now=1000.0)
        done = _run(batch)
        store.attempt_ended("1", done, done.attempts[-1])
        # Task 1 was taken and put back without a start (a deferral), task 2 runs: rows for 0 and 2 only.
        deferred = batch.next_task()
        running = batch.next_task()
        deferred.status = QUEUED
        batch.queue.appendleft(deferred)
        store.attempt_started("1", running, batch.start_attempt(running, 4243, 1003.0), 77)
        assert store.db.execute("SELECT idx FROM tasks ORDER BY idx").fetchall() == [(0,), (2,)]
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        (stored,) = store.active_batches()
        assert stored.problem is None and (stored.task_count, stored.rest) == (MILLION, QUEUED)
        restored = Batch(_spec(Blank(MILLION)), now=1000.0, tasks=stored.tasks, rest=stored.rest)
        assert restored.status_counts == {SUCCEEDED: 1, RUNNING: 1, QUEUED: MILLION - 2}
        assert len(restored.tasks.made) == 3 and restored.next_task().index == 1 and restored.next_task().index == 3
        assert [a.pid for a in restored.tasks[2].attempts] == [4243] and stored.open_attempts[0][2] == 77
        store.queue_cancelled("1")
        statuses = store.task_statuses(stored.rowid)
        assert len(statuses) == MILLION and statuses[:3] == [SUCCEEDED, CANCELLED, RUNNING]
        assert statuses[-1] == CANCELLED and store.task_count("1") == MILLION
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        (stored,) = store.active_batches()
        assert stored.rest == CANCELLED
    finally:
        store.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_daemon_takes_a_million_tasks_keeps_them_over_a_restart_and_cancels_them(daemon_factory):
    daemon = daemon_factory().start()
    rss = _rss_kib(daemon.proc.pid)
    submitted = daemon.ctl("submit", "-n", str(MILLION), "-j", "2", "--", "sleep", "60")
    assert submitted.returncode == 0, submitted.stderr
    batch = submitted.stdout.strip()
    wait_for(lambda: len(daemon.worker_pids()) == 2, timeout=30, what="two workers recorded")
    status = json.loads(daemon.ctl("status", "--json", batch).stdout)
    assert status["tasks"] == MILLION and status["counts"]["queued"] == MILLION - 2
    assert _rss_kib(daemon.proc.pid) - rss < 16 << 10, "the daemon grew by more than 16 MiB"
    with sqlite3.connect(os.path.join(daemon.state_dir, "state.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone() == (2,)
    db.close()

    daemon.stop(signal.SIGKILL)
    daemon.start()
    rss = _rss_kib(daemon.proc.pid)
    status = json.loads(daemon.ctl("status", "--json", batch).stdout)
    assert status["tasks"] == MILLION and status["counts"]["queued"] == MILLION - 2
    assert status["counts"]["running"] + status["counts"]["paused"] == 2

    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["ended"] is not None, timeout=60,
             what="the batch to end")
    status = json.loads(daemon.ctl("status", "--json", batch).stdout)
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == MILLION

    def stored() -> bool:
        with sqlite3.connect(os.path.join(daemon.state_dir, "state.db")) as db:
            row = db.execute("SELECT length(report) FROM batches WHERE id=? AND state='finished'", (batch,)).fetchone()
        db.close()
        return row is not None and row[0] is not None

    wait_for(stored, timeout=60, what="the report of a million tasks stored")
    # Its report (about 70 MB, every task listed) went to the state without staying in the daemon
    # (the row is visible a moment before the daemon has let its pieces go).
    wait_for(lambda: _rss_kib(daemon.proc.pid) - rss < 24 << 10, timeout=10,
             what="the daemon back within 24 MiB of its size before, the report stored")


def test_grouped_attempt_ends_wait_for_the_flush_and_land_in_one_transaction(tmp_path):
    store = Store(str(tmp_path))
    other = sqlite3.connect(str(tmp_path / "state.db"))  # another reader: sees committed rows only
    try:
        store.add_batch("1", store.next_seq(), None, (0, 0, [0]), 0, {"command": ["true"], "tasks": 5}, 1000.0, 5)
        store.grouping = True
        batch = Batch(_spec(Blank(5)), now=1000.0)
        first, second = batch.next_task(), batch.next_task()
        # Starts are written at once: a restarted pmlmd adopts a running worker by its row.
        store.attempt_started("1", first, batch.start_attempt(first, 4242, 1001.0), 1)
        store.attempt_started("1", second, batch.start_attempt(second, 4243, 1001.0), 2)
        assert other.execute("SELECT COUNT(*) FROM attempts WHERE end IS NULL").fetchone() == (2,)
        for task, end in ((first, 1002.0), (second, 1003.0)):
            batch.end_attempt(task, task.attempts[-1], end, CAUSE_EXIT)
            store.attempt_ended("1", task, task.attempts[-1])
        assert other.execute("SELECT COUNT(*) FROM attempts WHERE end IS NULL").fetchone() == (2,)
        assert len(store.grouped) == 2
        changes = store.db.total_changes
        store.flush()
        assert other.execute("SELECT idx, pid, end FROM attempts ORDER BY idx").fetchall() == \
            [(0, 4242, 1002.0), (1, 4243, 1003.0)]
        assert store.db.total_changes - changes == 4  # two attempt rows, two task rows
        # Any other write first writes what waits, so writes keep their order.
        third = batch.next_task()
        store.attempt_started("1", third, batch.start_attempt(third, 4244, 1004.0), 3)
        batch.end_attempt(third, third.attempts[-1], 1005.0, CAUSE_EXIT)
        store.attempt_ended("1", third, third.attempts[-1])
        assert other.execute("SELECT COUNT(*) FROM attempts WHERE end IS NULL").fetchone() == (1,)
        store.queue_cancelled("1")
        assert other.execute("SELECT COUNT(*) FROM attempts WHERE end IS NULL").fetchone() == (0,)
        assert store.grouped == {}
        # Not grouped (a queue batch's ends): at once.
        fourth = batch.next_task()
        store.attempt_started("1", fourth, batch.start_attempt(fourth, 4245, 1006.0), 4)
        batch.end_attempt(fourth, fourth.attempts[-1], 1007.0, CAUSE_EXIT)
        store.attempt_ended("1", fourth, fourth.attempts[-1], group=False)
        assert other.execute("SELECT end FROM attempts WHERE pid=4245").fetchone() == (1007.0,)
    finally:
        other.close()
        store.close()
