"""The batch summary: its states, counts that add up for any history, its JSON."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.batch import (CAUSE_CANCELLED, CAUSE_DAEMON_RESTART, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, CAUSE_SPAWN_FAILED,
                         QUEUED, RUNNING, Batch, BatchSpec)
from pmlmd.governor import Limits
from pmlmd.summary import (ENDED_STATES, STATES, BatchSummary, Counts, batch_state, from_record, summarize,
                           task_counts)

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
        "summary_version": 1, "batch": "7", "name": "nightly", "owner": {"user": "alice", "uid": 1000},
        "command": ["sleep", "30"], "priority": 5, "state": "cancelled", "tasks": 3,
        "counts": {"succeeded": 0, "failed": 0, "given_up": 0, "cancelled": 3, "running": 0, "paused": 0,
                   "queued": 0},
        "terminated_attempts": 0, "requeued_attempts": 0, "exit_status": 1,
        "created": "2023-11-14T22:13:20.000+00:00", "started": "2023-11-14T22:13:30.000+00:00",
        "ended": "2023-11-14T22:13:33.000+00:00", "elapsed_s": 13.0, "scope": "pmlm-7.scope", "freezer": None}


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
    {"owner": {"uid": "0", "user": "root"}}, {"summary_version": 2}, {"summary_version": True},
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
