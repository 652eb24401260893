"""The batch summary: its states, counts that add up for any history, its JSON, the store and pmlmctl's lines."""

import copy
import json
import os
import sqlite3
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.client import ctl
from pmlmd.core.batch import (CAUSE_CANCELLED, CAUSE_DAEMON_RESTART, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, CAUSE_SPAWN_FAILED,
                         QUEUED, RUNNING, Batch, BatchSpec, Task)
from pmlmd.daemon.service import unrestorable_report
from pmlmd.core.governor import Limits
from pmlmd.daemon.store import SCHEMA_VERSION, Store, StoreError
from pmlmd.core.summary import (ENDED_STATES, LIVE_STATES, STATES, BatchSummary, Counts, Owner, batch_state, from_record,
                           summarize, task_counts)

T0 = 1_700_000_000.0


def make_batch(n=3, retries=1, retry_failed=0, name=None):
    spec = BatchSpec(batch_id="7", command=["sleep", "30"], tasks=[None] * n, limits=Limits(), retries=retries,
                     retry_failed=retry_failed, task_id=name)
    return Batch(spec, now=T0)


def start(batch, now):
    task = batch.next_task()
    return task, batch.start_attempt(task, pid=1000 + task.index, now=now)


def end(batch, task, attempt, now, cause, exit_code=None):
    attempt.exit_code = exit_code
    batch.end_attempt(task, attempt, now, cause)


# --- the states, by table ---------------------------------------------------------------------------

@pytest.mark.parametrize("counts,flags,state", [
    (Counts(queued=3), {}, "queued"),
    (Counts(succeeded=1, queued=2), {}, "queued"),  # waits for a worker again (say, a requeued task)
    (Counts(running=1, queued=2), {}, "running"),
    (Counts(paused=2), {}, "running"),  # paused by the governor, not by a user
    (Counts(running=1, paused=1, queued=2), {"held": True}, "paused"),
    (Counts(queued=3), {"held": True}, "paused"),
    (Counts(running=1, cancelled=2), {"stopping": True}, "finishing"),
    (Counts(running=1, cancelled=2), {}, "finishing"),  # its queue was dropped (owner left the group)
    (Counts(running=1), {"critical": True}, "finishing"),
    (Counts(succeeded=6), {}, "finished"),
    (Counts(succeeded=4, cancelled=2), {"stopping": True}, "cancelled"),
    (Counts(cancelled=6), {}, "cancelled"),
    (Counts(succeeded=4, failed=1, cancelled=1), {"stopping": True}, "failed"),
    (Counts(succeeded=5, given_up=1), {}, "failed"),
    (Counts(succeeded=6), {"critical": True}, "failed"),
    (Counts(succeeded=6), {"marked_failed": True}, "failed"),
    (Counts(), {"marked_failed": True}, "failed"),  # a damaged record with no readable task
    (Counts(succeeded=6), {"held": True}, "finished"),  # held or not, a batch with nothing left has ended
])
def test_the_state_names(counts, flags, state):
    assert batch_state(counts, **flags) == state


def test_paused_workers_split_the_running_tasks_and_never_outnumber_them():
    statuses = [RUNNING, RUNNING, RUNNING, QUEUED, "succeeded", "cancelled"]
    assert task_counts(statuses, paused_workers=1) == Counts(succeeded=1, cancelled=1, running=2, paused=1, queued=1)
    assert task_counts(statuses, paused_workers=9).paused == 3
    assert task_counts(["exploded"]) == Counts(failed=1)  # a status the bookkeeping does not know


# --- any history -----------------------------------------------------------------------------------------

OPS = ("start", "start", "exit", "exit", "governor", "restart", "spawn-failed", "cancel", "critical", "restore")
EXIT_CODES = st.sampled_from([0, 0, 0, 1, 2, -1])  # -1: killed by a signal (no exit code)


@st.composite
def histories(draw):
    return (draw(st.integers(1, 8)), draw(st.integers(0, 2)), draw(st.integers(0, 2)),
            draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10 ** 6), EXIT_CODES), max_size=60)),
            draw(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), min_size=1, max_size=8)),
            draw(st.booleans()))


def check(batch: Batch, now: float, held: bool, paused_workers: int) -> BatchSummary:
    summary = summarize(batch, now=now, owner_uid=1000, owner_user="alice", priority=0, held=held,
                        paused_workers=paused_workers)
    c = summary.counts
    assert min(c.to_json().values()) >= 0
    assert c.total == summary.tasks == len(batch.tasks)
    assert c.running + c.paused == sum(t.status == RUNNING for t in batch.tasks)
    assert c.queued == len(batch.queue) == sum(t.status == QUEUED for t in batch.tasks)
    assert summary.state in STATES
    assert (summary.state in ENDED_STATES) == (c.pending == 0)
    if summary.state == "finished":
        assert c.succeeded == c.total and batch.critical_reason is None
    if summary.state == "cancelled":
        assert c.cancelled and not (c.failed or c.given_up) and batch.critical_reason is None
    if summary.state == "failed":
        assert c.failed or c.given_up or batch.critical_reason is not None
    if summary.state == "paused":
        assert held
    if summary.state == "finishing":
        assert batch.cancel_reason or batch.critical_reason or c.cancelled
    if summary.state == "queued":
        assert c.running + c.paused == 0 and c.queued
    if summary.state == "running":
        assert c.running + c.paused
    if batch.finished is not None:
        assert summary.exit_status == batch.exit_status()
        assert (summary.exit_status == 0) == (summary.state == "finished")
        assert summary.ended is not None and summary.state in ENDED_STATES
    else:
        assert summary.exit_status is None and summary.ended is None
    assert summary.elapsed_s >= 0
    assert summary.terminated_attempts == sum(a.cause == CAUSE_GOVERNOR_MEMORY for t in batch.tasks for a in t.attempts)
    # The report carries the same state and counts; the JSON reads back as the same summary.
    report = batch.report(now, summary=summary)
    assert report["state"] == summary.state
    assert report["counts"] == {"tasks": summary.tasks, **c.to_json(), "terminated": summary.terminated_attempts,
                                "requeued": summary.requeued_attempts}
    assert BatchSummary.from_json(json.loads(json.dumps(summary.to_json()))) == summary
    return summary


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_counts_add_up_and_the_state_fits_them_for_any_history(history):
    n, retries, retry_failed, ops, views, cancel_at_the_end = history
    batch = make_batch(n, retries, retry_failed)
    running = []  # (task, attempt) of the workers alive
    now = T0
    for step, (op, pick, code) in enumerate(ops):
        now += 1.0
        if op == "start" and batch.queue and batch.cancel_reason is None and batch.critical_reason is None:
            running.append(start(batch, now))
        elif op in ("exit", "governor", "restart", "spawn-failed") and running:
            task, attempt = running.pop(pick % len(running))
            cause = {"exit": CAUSE_EXIT, "governor": CAUSE_GOVERNOR_MEMORY, "restart": CAUSE_DAEMON_RESTART,
                     "spawn-failed": CAUSE_SPAWN_FAILED}[op]
            # Ended by the cancel: as the engine ends them once a batch is cancelled.
            if batch.cancel_reason is not None and op == "governor":
                cause = CAUSE_CANCELLED
            end(batch, task, attempt, now, cause, exit_code=None if op == "spawn-failed" or code < 0 else code)
        elif op == "cancel":
            batch.cancel_reason = batch.cancel_reason or "cancelled by uid 1000"
            batch.cancel_queued()
        elif op == "critical" and batch.critical_reason is None:
            batch.critical_reason = "free memory below the floor"
            batch.cancel_queued()
        elif op == "restore":
            # A restart: the bookkeeping rebuilt from the tasks as stored; a worker gone meanwhile is
            # ended as the daemon ends it, the others are adopted.
            restored = Batch(batch.spec, T0, tasks=copy.deepcopy(batch.tasks))
            restored.cancel_reason, restored.critical_reason = batch.cancel_reason, batch.critical_reason
            by_index = {t.index: t for t in restored.tasks}
            adopted = []
            for keep, (task, _) in enumerate(running):
                task = by_index[task.index]
                if (pick >> keep) & 1:
                    adopted.append((task, task.attempts[-1]))
                else:
                    end(restored, task, task.attempts[-1], now, CAUSE_DAEMON_RESTART)
            batch, running = restored, adopted
        held, paused = views[step % len(views)]
        check(batch, now, held, paused)
    # The batch runs to its end: cancelled, or every task left runs (again) and succeeds.
    if cancel_at_the_end:
        batch.cancel_reason = batch.cancel_reason or "the test ends"
        batch.cancel_queued()
    for task, attempt in running:
        end(batch, task, attempt, now + 1, CAUSE_CANCELLED if cancel_at_the_end else CAUSE_EXIT, exit_code=0)
    while batch.queue:
        task, attempt = start(batch, now + 1)
        end(batch, task, attempt, now + 1, CAUSE_EXIT, exit_code=0)
    batch.finished = now + 2
    summary = check(batch, now + 3, False, 0)
    assert summary.state in ENDED_STATES and summary.elapsed_s == round(batch.finished - T0, 3)


# --- one batch, step by step ------------------------------------------------------------------------------

def test_a_batch_from_queued_to_cancelled():
    batch = make_batch(n=3, name="nightly")
    s = summarize(batch, now=T0 + 5, owner_uid=1000, owner_user="alice", priority=5)
    assert (s.state, s.counts, s.started, s.elapsed_s) == ("queued", Counts(queued=3), None, 5.0)
    task, attempt = start(batch, T0 + 10)
    s = summarize(batch, now=T0 + 11, owner_uid=1000, owner_user="alice", priority=5, paused_workers=1, held=True)
    assert (s.state, s.counts) == ("paused", Counts(paused=1, queued=2))
    batch.cancel_reason = "cancelled by uid 1000"
    batch.cancel_queued()
    s = summarize(batch, now=T0 + 12)
    assert (s.state, s.counts) == ("finishing", Counts(running=1, cancelled=2))
    end(batch, task, attempt, T0 + 13, CAUSE_CANCELLED)
    batch.finished = T0 + 13
    s = summarize(batch, now=T0 + 99, owner_uid=1000, owner_user="alice", priority=5, scope="pmlm-7.scope",
                  freezer="running")
    assert (s.state, s.counts, s.exit_status) == ("cancelled", Counts(cancelled=3), 1)
    assert s.to_json() == {
        "summary_version": 2, "batch": "7", "name": "nightly", "owner": {"user": "alice", "uid": 1000},
        "command": ["sleep", "30"], "priority": 5, "state": "cancelled", "tasks": 3,
        "counts": {"succeeded": 0, "failed": 0, "given_up": 0, "cancelled": 3, "running": 0, "paused": 0,
                   "queued": 0, "returned": 0},
        "terminated_attempts": 0, "requeued_attempts": 0, "exit_status": 1,
        "created": "2023-11-14T22:13:20.000+00:00", "started": "2023-11-14T22:13:30.000+00:00",
        "ended": "2023-11-14T22:13:33.000+00:00", "elapsed_s": 13.0, "scope": "pmlm-7.scope", "freezer": None,
        "intake": None}


def test_a_task_between_attempts_counts_as_queued_and_its_attempts_apart():
    batch = make_batch(n=2, retries=1)
    task, attempt = start(batch, T0 + 1)
    end(batch, task, attempt, T0 + 2, CAUSE_GOVERNOR_MEMORY, exit_code=None)
    s = summarize(batch, now=T0 + 3)
    assert (s.state, s.counts) == ("queued", Counts(queued=2))
    assert (s.terminated_attempts, s.requeued_attempts) == (1, 1)
    assert batch.report(T0 + 3, summary=s)["counts"]["terminated"] == 1


def test_the_report_of_pmlmctl_run_has_the_summary_state_without_a_daemon():
    batch = make_batch(n=2)
    task, attempt = start(batch, T0 + 1)
    assert batch.report(T0 + 2)["state"] == "running"
    end(batch, task, attempt, T0 + 2, CAUSE_EXIT, exit_code=0)
    task, attempt = start(batch, T0 + 3)
    end(batch, task, attempt, T0 + 4, CAUSE_EXIT, exit_code=2)
    batch.finished = T0 + 4
    report = batch.report()
    assert report["state"] == "failed" and report["exit_status"] == 1
    assert report["counts"]["succeeded"] + report["counts"]["failed"] == report["counts"]["tasks"] == 2


# --- JSON, and summaries of records stored without one ---------------------------------------------------

def a_summary(**changes) -> BatchSummary:
    batch = make_batch(n=1)
    task, attempt = start(batch, T0 + 1)
    end(batch, task, attempt, T0 + 2, CAUSE_EXIT, exit_code=0)
    batch.finished = T0 + 2
    summary = summarize(batch, now=T0 + 2, owner_uid=0, owner_user="root", priority=0)
    return BatchSummary.from_json({**summary.to_json(), **changes}) if changes else summary


@pytest.mark.parametrize("changes", [
    {"state": "exploded"}, {"state": "running"},  # not a state; a live state with nothing left to run
    {"tasks": 2}, {"counts": {"succeeded": 1}}, {"counts": {"succeeded": -1, "failed": 2, "given_up": 0,
                                                            "cancelled": 0, "running": 0, "paused": 0, "queued": 0}},
    {"owner": {"uid": "0", "user": "root"}}, {"summary_version": 3}, {"summary_version": True},
    {"elapsed_s": "long"}, {"command": "sleep 30"}, {"surprise": 1},
])
def test_a_stored_summary_that_does_not_fit_is_refused(changes):
    with pytest.raises(ValueError, match="the stored summary's"):
        a_summary(**changes)


def test_from_record_reads_the_report_of_an_older_pmlmd():
    # As the pmlmd before summaries wrote it for a cancelled batch: "finished", no running/paused/queued.
    report = {"state": "finished", "command": ["sleep", "30"], "exit_status": 1, "critical_error": False,
              "counts": {"tasks": 3, "succeeded": 1, "failed": 0, "given_up": 0, "cancelled": 2, "terminated": 1,
                         "requeued": 1},
              "tasks": [{"attempts": [{"start": "2023-11-14T22:13:25.000+00:00"}]},
                        {"attempts": [{"start": "2023-11-14T22:13:21.500+00:00"}]}, {"attempts": []}]}
    s = from_record("7", name="nightly", owner_uid=1000, owner_user=None, priority=3, created=T0, finished=T0 + 30,
                    report=report)
    assert (s.state, s.counts, s.tasks) == ("cancelled", Counts(succeeded=1, cancelled=2), 3)
    assert (s.started, s.ended, s.elapsed_s) == ("2023-11-14T22:13:21.500+00:00", "2023-11-14T22:13:50.000+00:00", 30.0)
    assert (s.command, s.priority, s.terminated_attempts, s.requeued_attempts) == (("sleep", "30"), 3, 1, 1)


def test_from_record_of_a_batch_marked_failed_says_failed_whatever_its_tasks_did():
    for report in (unrestorable_report("9", "its priority is 'high'", ["succeeded", "cancelled"]),
                   {**unrestorable_report("9", "x", ["succeeded"]), "state": None},  # as the older pmlmd wrote it
                   {}, {"counts": "garbage", "exit_status": 1e400}):
        s = from_record("9", name=None, owner_uid=None, owner_user=None, priority=None, created=None, finished=None,
                        report=report)
        assert s.state == "failed" and s.counts.pending == 0, (report, s)


# --- the store -------------------------------------------------------------------------------------------

# The state database as the pmlmd before summaries made it (schema version 1), word for word.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    owner_groups TEXT NOT NULL,      -- JSON list of gids
    priority INTEGER NOT NULL,
    submission TEXT NOT NULL,        -- JSON: what the batch was submitted with
    state TEXT NOT NULL,             -- active | finished
    held INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL,
    cancel_reason TEXT,
    critical_reason TEXT,
    report TEXT                      -- JSON execution report, once finished
);
CREATE TABLE IF NOT EXISTS tasks (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    line TEXT,                       -- a BLOB of its bytes when they are not UTF-8 (kept as one)
    status TEXT NOT NULL,
    governor_ends INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    number INTEGER NOT NULL,
    pid INTEGER,
    start_ticks INTEGER,
    start REAL NOT NULL,
    end REAL,
    exit_code INTEGER,
    signal INTEGER,
    cause TEXT,
    reason TEXT,
    peak_rss INTEGER NOT NULL DEFAULT 0,
    cpu_seconds REAL NOT NULL DEFAULT 0,
    pauses INTEGER NOT NULL DEFAULT 0,
    stop_path TEXT,
    PRIMARY KEY (batch_id, idx, number)
);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state, finished);
"""

# A cancelled batch's report as the pmlmd before summaries wrote it (the fields from_record reads, and some).
REPORT_V1 = {"report_version": 1, "batch_id": "1", "task_id": "old", "command": ["sleep", "30"], "shell": False,
             "state": "finished", "started": "2023-11-14T22:13:20.000+00:00",
             "finished": "2023-11-14T22:13:26.000+00:00", "duration_s": 6.0, "error_exist": True,
             "error_message": "cancelled: cancelled by uid 0", "critical_error": False,
             "execution_message": "batch 1: 3 tasks, 0 succeeded, 3 cancelled in 6.0s", "exit_status": 1,
             "counts": {"tasks": 3, "succeeded": 0, "failed": 0, "given_up": 0, "cancelled": 3, "terminated": 0,
                        "requeued": 0},
             "tasks": [{"index": 0, "task": None, "status": "cancelled",
                        "attempts": [{"number": 1, "start": "2023-11-14T22:13:21.000+00:00"}]},
                       {"index": 1, "task": None, "status": "cancelled", "attempts": []},
                       {"index": 2, "task": None, "status": "cancelled", "attempts": []}]}


def write_v1_state(state_dir, created: float = T0) -> None:
    """A state.db as the pmlmd before summaries left it: one finished (cancelled) batch, one active."""
    os.makedirs(state_dir)
    db = sqlite3.connect(os.path.join(state_dir, "state.db"))
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO meta VALUES ('last_seq', '2')")
    def submission(name):
        return json.dumps({"command": ["/bin/true"], "cwd": "/tmp", "tasks": 2, "env": {}, "name": name})
    db.execute("INSERT INTO batches (id, seq, name, owner_uid, owner_gid, owner_groups, priority, submission, state, "
               "created, finished, cancel_reason, report) VALUES ('1', 1, 'old', 0, 0, '[0]', 4, ?, 'finished', ?, ?, "
               "'cancelled by uid 0', ?)", (submission("old"), created, created + 6, json.dumps(REPORT_V1)))
    db.execute("INSERT INTO batches (id, seq, name, owner_uid, owner_gid, owner_groups, priority, submission, state, "
               "created) VALUES ('2', 2, 'waiting', 0, 0, '[0]', 0, ?, 'active', ?)",
               (submission("waiting"), created + 10))
    db.executemany("INSERT INTO tasks (batch_id, idx, line, status) VALUES (?, ?, NULL, ?)",
                   [("1", 0, "cancelled"), ("1", 1, "cancelled"), ("1", 2, "cancelled"), ("2", 0, "succeeded"),
                    ("2", 1, "queued")])
    db.commit()
    db.close()


def test_a_state_db_of_schema_1_opens_migrated_and_its_batches_read_as_summaries(tmp_path):
    state = str(tmp_path / "state")
    write_v1_state(state)
    store = Store(state)
    try:
        version = store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),) and SCHEMA_VERSION == 4
        # Each migration ran: version 2's summary column, version 3's task message.
        assert store.db.execute("SELECT count(message) FROM tasks").fetchone() == (0,)
        (old,) = store.finished_batches()
        assert store.finished_summary("1") == old
        assert (old.batch, old.name, old.owner, old.priority, old.state) == ("1", "old", Owner(0, None), 4, "cancelled")
        assert (old.counts, old.tasks, old.exit_status) == (Counts(cancelled=3), 3, 1)
        assert (old.created, old.started, old.ended, old.elapsed_s) == (
            "2023-11-14T22:13:20.000+00:00", "2023-11-14T22:13:21.000+00:00", "2023-11-14T22:13:26.000+00:00", 6.0)
        (active,) = store.active_batches()  # the active batch is restored as before
        assert active.problem is None and [t.status for t in active.tasks] == ["succeeded", "queued"]
        assert active.task_count == 2  # version 4's count: the rows of an older batch, one per task
    finally:
        store.close()
    Store(state).close()  # and opens again, migrated once


def test_a_state_db_of_a_newer_schema_is_refused(tmp_path):
    Store(str(tmp_path)).close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, this pmlmd knows {SCHEMA_VERSION}"):
        Store(str(tmp_path))


def test_the_stored_summary_is_read_back_as_it_was_and_a_damaged_one_falls_back_to_the_record(tmp_path):
    store = Store(str(tmp_path))
    try:
        summary = a_summary()
        store.add_batch("7", store.next_seq(), None, (0, 0, [0]), 0, {}, T0, 1)
        store.finish("7", T0 + 2, make_batch(n=1).report(), summary.to_json())
        assert store.finished_summary("7") == summary and store.finished_batches() == [summary]
        store.db.execute("UPDATE batches SET summary = '{\"state\": \"finished\"}'")
        derived = store.finished_summary("7")
        assert derived.batch == "7" and derived.state in ENDED_STATES
        assert store.finished_summary("8") is None
    finally:
        store.close()


def test_a_batch_marked_failed_lists_as_failed(tmp_path):
    store = Store(str(tmp_path))
    try:
        store.add_batch("3", store.next_seq(), "broken", (1000, 1000, [1000]), 0, {}, T0, 2)
        store.tasks_changed("3", [Task(0, None, "succeeded")])
        (stored,) = store.active_batches()
        store.fail_batch(stored.rowid, T0 + 1, unrestorable_report("3", "its priority is 'high'",
                                                                   store.task_statuses(stored.rowid)))
        (listed,) = store.finished_batches()
        assert (listed.batch, listed.name, listed.owner, listed.state) == ("3", "broken", Owner(1000, None), "failed")
        assert listed.counts == Counts(succeeded=1, failed=1) and listed.exit_status == 1
    finally:
        store.close()


# --- pmlmctl's lines ---------------------------------------------------------------------------------------

def test_pmlmctl_shows_the_owner_state_counts_created_and_elapsed():
    b = a_summary().to_json()
    b.update(batch="12", name="nightly", state="running", counts={**b["counts"], "succeeded": 4, "running": 3,
                                                                   "paused": 1, "queued": 10}, tasks=18,
             elapsed_s=3725.5, command=["echo", "two words", "\udcff"], requeued_attempts=2, exit_status=None,
             ended=None)
    line = ctl._batch_line(b)
    created = datetime.fromisoformat(b["created"]).astimezone().strftime("%Y-%m-%d %H:%M")
    assert line.split() == ["12", "nightly", "root", "0", "running", *created.split(), "1:02:05", "18", "tasks:",
                            "4", "succeeded,", "3", "running,", "1", "paused,", "10", "queued"]
    assert ctl.BATCH_HEADER.split() == ["ID", "NAME", "OWNER", "PRIO", "STATE", "CREATED", "ELAPSED", "TASKS"]
    assert line.index("running") == ctl.BATCH_HEADER.index("STATE")
    assert line.index(created) == ctl.BATCH_HEADER.index("CREATED")
    details = "\n".join(ctl._batch_details(b))
    assert "owner     root (uid 0)" in details and "state     running\n" in details
    assert "command   echo 'two words' '\\udcff'" in details  # a byte that is not UTF-8 shown, not fatal
    assert "tasks     18 tasks: 4 succeeded, 3 running, 1 paused, 10 queued" in details
    assert "attempts  2 requeued" in details and "elapsed   1:02:05" in details
    assert "ended     -" in details
    assert ctl._tasks_text({"tasks": 1, "counts": {"succeeded": 1}}) == "1 task: 1 succeeded"
    ended = a_summary().to_json()
    assert "state     finished, exit status 0" in "\n".join(ctl._batch_details(ended))
    assert ctl._batch_line({**ended, "owner": {"user": None, "uid": None}, "priority": None}).split()[2:4] == ["-", "-"]


def test_every_state_name_fits_its_column():
    assert set(STATES) == set(LIVE_STATES) | set(ENDED_STATES)
    width = ctl.BATCH_HEADER.index("CREATED") - ctl.BATCH_HEADER.index("STATE") - 2
    assert max(map(len, STATES)) <= width


def test_a_summary_stored_by_the_pmlmd_before_queue_batches_still_reads():
    """summary_version 1: no ``returned`` count and no ``intake``."""
    data = a_summary().to_json()
    data["summary_version"] = 1
    del data["intake"]
    del data["counts"]["returned"]
    old = BatchSummary.from_json(data)
    assert old.counts == Counts(succeeded=1) and old.intake is None and old.tasks == 1


def test_a_live_queue_batch_waiting_for_messages_is_live_with_nothing_pending():
    from pmlmd.core.batch import IntakeSpec
    from pmlmd.core.summary import IntakeStatus

    spec = BatchSpec(batch_id="q", command=["true"], tasks=[], limits=Limits(),
                     intake=IntakeSpec(url="amqp://u:p@b/", queue="jobs"))
    batch = Batch(spec, now=T0)
    intake = IntakeStatus(broker="b:5672/%2F", queue="jobs", state="consuming", detail=None, consumed=0, acked=0,
                          returned=0, dead_lettered=0, rejected=0, lost=0, in_flight=0, until_empty=False)
    s = summarize(batch, now=T0 + 1, intake=intake)
    assert s.state == "queued" and s.live and s.tasks == 0
    assert BatchSummary.from_json(s.to_json()) == s
    batch.cancel_reason = "cancelled by uid 0"
    batch.finished = T0 + 2
    assert summarize(batch, now=T0 + 2).state == "cancelled"
