"""Retry budgets, task fates, the sample summaries and the report's shape, without processes."""

import statistics
import sys

import pytest
from hypothesis import given, settings, strategies as st

from pmlmd.core.batch import (BIN_WIDTH, BINS, CAUSE_CANCELLED, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, CANCELLED,
                         EXACT_SAMPLES, FAILED, GIVEN_UP, QUEUED, SUCCEEDED, Batch, BatchSpec, Series)
from pmlmd.core.governor import Limits


def make_batch(n=2, retries=3, retry_failed=0):
    spec = BatchSpec(batch_id="b1", command=["true"], tasks=[None] * n, limits=Limits(), retries=retries,
                     retry_failed=retry_failed)
    return Batch(spec, now=1000.0)


def run_attempt(batch, cause, exit_code=None, signal=None):
    task = batch.next_task()
    attempt = batch.start_attempt(task, pid=123, now=1000.0)
    attempt.exit_code, attempt.signal = exit_code, signal
    batch.end_attempt(task, attempt, 1001.0, cause)
    return task


def test_governor_terminations_are_requeued_at_the_front_until_the_budget_is_spent():
    batch = make_batch(n=2, retries=2)
    task = run_attempt(batch, CAUSE_GOVERNOR_MEMORY, signal=15)
    assert task.status == QUEUED and batch.queue[0] is task
    run_attempt(batch, CAUSE_GOVERNOR_MEMORY, signal=15)
    run_attempt(batch, CAUSE_GOVERNOR_MEMORY, signal=9)
    assert task.status == GIVEN_UP and len(task.attempts) == 3
    assert batch.counts()["terminated"] == 3 and batch.counts()["requeued"] == 2


def test_own_failures_are_not_retried_by_default():
    batch = make_batch(n=1)
    task = run_attempt(batch, CAUSE_EXIT, exit_code=2)
    assert task.status == FAILED and batch.exit_status() == 1
    assert "exit 2" in batch.error_message()


def test_retry_failed_is_a_separate_budget():
    batch = make_batch(n=1, retries=0, retry_failed=1)
    task = run_attempt(batch, CAUSE_EXIT, exit_code=1)
    assert task.status == QUEUED
    task = run_attempt(batch, CAUSE_EXIT, exit_code=0)
    assert task.status == SUCCEEDED
    assert [a.cause for a in task.attempts] == ["exit", "exit"]


def test_cancel_marks_queued_and_running_tasks_cancelled():
    batch = make_batch(n=3)
    running = batch.next_task()
    attempt = batch.start_attempt(running, 5, 1000.0)
    batch.cancel_reason = "received SIGINT"
    batch.cancel_queued()
    batch.end_attempt(running, attempt, 1001.0, CAUSE_CANCELLED)
    assert [t.status for t in batch.tasks] == [CANCELLED] * 3
    assert batch.counts()["cancelled"] == 3


def test_report_carries_the_compatible_fields_and_the_new_ones():
    batch = make_batch(n=2)
    run_attempt(batch, CAUSE_EXIT, exit_code=0)
    run_attempt(batch, CAUSE_EXIT, exit_code=3)
    batch.record_sample(40.0, 2 << 30, 8 << 30)
    batch.record_sample(60.0, 1 << 30, 8 << 30)
    batch.finished = 1002.0
    report = batch.report()
    for key in ("error_exist", "error_message", "execution_message", "task_id", "critical_error"):
        assert key in report
    assert report["error_exist"] is True and report["critical_error"] is False
    assert report["task_id"] == "b1" and report["batch_id"] == "b1"
    assert report["counts"] == {"tasks": 2, "succeeded": 1, "failed": 1, "given_up": 0, "cancelled": 0,
                                "running": 0, "paused": 0, "queued": 0, "returned": 0, "terminated": 0,
                                "requeued": 0}
    assert report["state"] == "failed"
    assert report["lowest_free_memory_bytes"] == 1 << 30 and report["lowest_free_memory_pct"] == 12.5
    assert report["highest_cpu_pct"] == 60.0
    attempt = report["tasks"][1]["attempts"][0]
    assert attempt["exit_code"] == 3 and attempt["cause"] == "exit" and attempt["start"].endswith("+00:00")


# --- samples: bounded summaries -------------------------------------------------------------------

PERCENTAGES = st.floats(min_value=0, max_value=100, allow_nan=False)


SMALL = 20  # tests hand Series a small exact part, so that hypothesis's lists go past it


@settings(max_examples=300, deadline=None)
@given(st.lists(PERCENTAGES, min_size=1, max_size=6 * SMALL))
def test_series_summary_matches_the_exact_one(values):
    series = Series(exact_samples=SMALL)
    for value in values:
        series.add(value)
    assert series.count == len(values)
    assert series.low == min(values) and series.high == max(values)
    exact = statistics.median(values)
    if len(values) <= SMALL:
        assert series.median() == exact
    else:  # the histogram's median: the one of the samples rounded to the nearest bin
        assert abs(series.median() - exact) <= BIN_WIDTH / 2 + 1e-9
    summary = series.summary()
    assert summary["samples"] == len(values)
    assert summary["min"] == round(min(values), 1) and summary["max"] == round(max(values), 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(PERCENTAGES, min_size=SMALL + 1, max_size=4 * SMALL).filter(lambda v: len(v) % 2))
def test_series_median_is_the_bin_of_the_middle_sample(values):
    """An odd count past the exact part: the median is the middle sample's bin (clamped into min..max)."""
    series = Series(exact_samples=SMALL)
    for value in values:
        series.add(value)
    middle = sorted(values)[len(values) // 2]
    expected = min(max(round(middle / BIN_WIDTH) * BIN_WIDTH, min(values)), max(values))
    assert series.median() == pytest.approx(expected, abs=1e-9)


def test_series_memory_stays_bounded_for_a_million_samples():
    series = Series()
    for i in range(1_000_000):
        series.add((i * 7919 % 100_003) / 1000.03)  # spread over 0..100
    assert series.count == 1_000_000
    assert series.exact is None  # the samples themselves are gone
    assert len(series.bins) == BINS and sum(series.bins) == 1_000_000
    assert sys.getsizeof(series.bins) < 16 * BINS
    summary = series.summary()
    assert summary["samples"] == 1_000_000
    assert abs(summary["median"] - 50.0) <= 0.2


def test_series_keeps_values_outside_the_bins_in_min_and_max():
    series = Series()
    for value in [150.0, -5.0] + [50.0] * (EXACT_SAMPLES + 1):
        series.add(value)
    assert series.summary() == {"min": -5.0, "median": 50.0, "max": 150.0, "samples": EXACT_SAMPLES + 3}


# --- a queue batch (tasks from an AMQP queue, see pmlmd.broker.intake): open-ended, its tasks go back ----------

def make_queue_batch(retries=1, retry_failed=0):
    from pmlmd.core.batch import IntakeSpec

    spec = BatchSpec(batch_id="q1", command=["true"], tasks=[], limits=Limits(), retries=retries,
                     retry_failed=retry_failed, intake=IntakeSpec(url="amqp://u:p@broker/", queue="jobs"))
    return Batch(spec, now=1000.0)


def test_a_queue_batch_takes_tasks_as_they_come_and_numbers_them_in_order():
    batch = make_queue_batch()
    assert batch.tasks == [] and batch.done() == 0
    first = batch.add_task("a", {"message_id": "m1", "redelivered": False})
    second = batch.add_task("b", {"message_id": "m2", "redelivered": True}, governor_ends=1)
    assert (first.index, second.index, list(batch.queue)) == (0, 1, [first, second])
    assert batch.status_counts[QUEUED] == 2 and second.governor_ends == 1
    assert second.to_json()["message_id"] == "m2" and second.to_json()["redelivered"] is True


@pytest.mark.parametrize("cause, exit_code, earlier_terminations, status", [
    (CAUSE_EXIT, 0, 0, SUCCEEDED),
    (CAUSE_EXIT, 3, 0, FAILED),
    (CAUSE_GOVERNOR_MEMORY, None, 0, "returned"),  # to its queue, for any node; not run again here
    (CAUSE_GOVERNOR_MEMORY, None, 1, GIVEN_UP),  # the budget counts terminations on every node
    (CAUSE_CANCELLED, None, 0, "returned"),  # a cancelled queue batch gives its messages back
])
def test_a_queue_batch_task_ends_where_its_message_must_go(cause, exit_code, earlier_terminations, status):
    batch = make_queue_batch(retries=1)
    batch.add_task("x", governor_ends=earlier_terminations)
    task = run_attempt(batch, cause, exit_code=exit_code)
    assert task.status == status and not batch.queue
    assert batch.exit_status() == (1 if status in (FAILED, GIVEN_UP) else 0)


def test_a_cancelled_queue_batch_returns_what_it_held_and_fails_nothing():
    batch = make_queue_batch()
    for line in "abc":
        batch.add_task(line)
    batch.cancel_reason = "cancelled by uid 0"
    batch.cancel_queued()
    assert [t.status for t in batch.tasks] == ["returned"] * 3 and batch.exit_status() == 0
    assert batch.error_message() is None  # cancelling is how a consumer is ended


def test_a_message_that_is_no_task_line_fails_at_once_without_a_retry():
    batch = make_queue_batch(retry_failed=5)
    task = batch.add_task("a\0b")
    attempt = batch.fail_unrunnable(task, 1001.0, "bad-message", "holds a NUL byte")
    assert task.status == FAILED and not batch.queue and attempt.exit_code == 126 and attempt.end == 1001.0
