"""Table tests for the governor: one situation per test, the decision the rules require."""

import dataclasses

import pytest

from pmlmd.core.governor import (CONTINUE, CRITICAL, HELD, KILL, PAUSE, PAUSED, RUNNING, SPAWN, TERMINATE, TERMINATING,
                                 GIVE_BACK_AFTER, Decision, Limits, NodeSample, RATE_SPAN, SHORTEST_INTERVAL, WorkerView,
                                 Workload, decide, decide_batches, give_back, held_back, intake_credit, next_interval, node_cpu, quiet, rate_reference,
                                 sampling_pace, within_backlog)

MiB = 1 << 20
GiB = 1 << 30
TOTAL = 16 * GiB
LIMITS = Limits(cpu_limit=80.0, memfree_limit=20.0, memory_gap=200 * MiB, min_free=300 * MiB, max_workers=8,
                cpu_margin=10.0, interval=0.5)
LIMIT = LIMITS.memory_limit_bytes(TOTAL)  # 3.2 GiB
NOW = 100.0


def node(free=8 * GiB, cpu=20.0, t=NOW, mem_free=None):
    return NodeSample(time=t, cpu_pct=cpu, mem_total=TOTAL, mem_available=free,
                      mem_free=free if mem_free is None else mem_free)


def worker(pid, started=None, state=RUNNING, rss=100 * MiB, growth=0.0, cpu=10.0, paused_at=None, cpu_at_pause=None,
           priority=0, paused_by=None, running_since=None, cpu_before=None):
    return WorkerView(key=pid, started=float(pid) if started is None else started, state=state, rss=rss,
                      rss_growth=growth, cpu=cpu, paused_at=paused_at, cpu_at_pause=cpu_at_pause, priority=priority,
                      paused_by=paused_by, running_since=running_since, cpu_before=cpu_before)


def paused(pid, since=1.0, cpu_at_pause=40.0, **kw):
    return worker(pid, state=PAUSED, paused_at=NOW - since, cpu_at_pause=cpu_at_pause, cpu=0.0, **kw)


def actions(decisions):
    return [(d.action, d.worker) for d in decisions]


WORK = Workload(queued=5, avg_rss=100 * MiB, avg_cpu=10.0)


# --- 1. floor ------------------------------------------------------------------------------
def test_floor_kills_newest_until_projection_clears_the_limit():
    workers = [worker(1, rss=2 * GiB), worker(2, rss=2 * GiB), worker(3, rss=2 * GiB)]
    out = decide(node(free=200 * MiB), workers, WORK, LIMITS)
    # 200M + 2G < 3.2G, + 2G more clears it: the two newest pay, the oldest runs on.
    assert actions(out) == [(KILL, 3), (KILL, 2)]
    assert all(d.rule == "floor" for d in out)


def test_floor_escalates_workers_already_told_to_stop():
    workers = [worker(1, rss=1 * GiB), worker(2, state=TERMINATING, rss=4 * GiB)]
    out = decide(node(free=200 * MiB), workers, WORK, LIMITS)
    assert actions(out) == [(KILL, 2)]  # its 4G clear the limit: nobody else pays


def test_floor_kills_paused_workers_too():
    out = decide(node(free=100 * MiB), [paused(1, rss=4 * GiB)], WORK, LIMITS)
    assert actions(out) == [(KILL, 1)]


def test_floor_with_nothing_left_to_terminate_is_critical():
    out = decide(node(free=100 * MiB), [], WORK, LIMITS)
    assert [d.action for d in out] == [CRITICAL]
    assert "floor" in out[0].reason


def test_floor_with_no_work_left_is_not_critical():
    assert decide(node(free=100 * MiB), [], Workload(queued=0), LIMITS) == []


# --- 2. memory limit ----------------------------------------------------------------------------
def test_below_limit_terminates_newest_until_projection_clears_it():
    workers = [worker(1, rss=1 * GiB), worker(2, rss=300 * MiB), worker(3, rss=300 * MiB)]
    out = decide(node(free=LIMIT - 500 * MiB), workers, WORK, LIMITS)
    assert actions(out) == [(TERMINATE, 3), (TERMINATE, 2)]
    assert all(d.rule == "memory" for d in out)


def test_below_limit_counts_memory_already_being_released():
    workers = [worker(1, rss=1 * GiB), worker(2, state=TERMINATING, rss=600 * MiB)]
    assert decide(node(free=LIMIT - 500 * MiB), workers, WORK, LIMITS) == []


@pytest.mark.parametrize("policy,expected", [("newest", 3), ("oldest", 1), ("largest", 2)])
def test_victim_policy_picks_who_pays_first(policy, expected):
    workers = [worker(1, rss=1 * GiB), worker(2, rss=3 * GiB), worker(3, rss=1 * GiB)]
    out = decide(node(free=LIMIT - 10 * MiB), workers, WORK, dataclasses.replace(LIMITS, victim=policy))
    assert actions(out)[0] == (TERMINATE, expected)


def test_lower_priority_pays_before_the_policy_applies():
    workers = [worker(1, priority=0), worker(2, priority=5)]
    out = decide(node(free=LIMIT - 10 * MiB), workers, WORK, LIMITS)
    assert actions(out) == [(TERMINATE, 1)]


def test_below_limit_admits_nothing():
    out = decide(node(free=LIMIT - 10 * MiB), [], WORK, LIMITS)
    assert out == []


# --- 3. gap ------------------------------------------------------------------------------
def test_gap_pauses_growing_workers_only_and_admits_nothing():
    workers = [worker(1, growth=0.0), worker(2, growth=50 * MiB), worker(3, growth=-5 * MiB)]
    out = decide(node(free=LIMIT + 100 * MiB), workers, WORK, LIMITS)
    assert actions(out) == [(PAUSE, 2)]
    assert out[0].rule == "gap"


def test_gap_with_a_lone_worker_paused_for_cpu_continues_it_after_an_interval():
    out = decide(node(free=LIMIT + 100 * MiB), [paused(1, since=0.6, paused_by="cpu")], WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 1)]


def test_gap_keeps_a_lone_worker_paused_for_growing_stopped_then_terminates_it():
    grower = paused(1, since=0.2, paused_by="gap")
    assert decide(node(free=LIMIT + 100 * MiB), [grower], WORK, LIMITS) == []  # within its interval: stays stopped
    out = decide(node(free=LIMIT + 100 * MiB), [paused(1, since=0.6, paused_by="gap")], WORK, LIMITS)
    assert actions(out) == [(TERMINATE, 1)] and "paused for growing" in out[0].reason
    # Headroom back: continued, not terminated.
    out = decide(node(free=LIMIT + 400 * MiB), [paused(1, since=0.6, paused_by="gap")], WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 1)]


def test_gap_with_several_paused_workers_makes_room_by_terminating_the_first_victim():
    out = decide(node(free=LIMIT + 100 * MiB), [paused(1, since=2), paused(2, since=2)], WORK, LIMITS)
    assert actions(out) == [(TERMINATE, 2)]


def test_gap_waits_while_a_pause_is_younger_than_an_interval():
    out = decide(node(free=LIMIT + 100 * MiB), [paused(1, since=2), paused(2, since=0.1)], WORK, LIMITS)
    assert out == []


# --- 4. cpu --------------------------------------------------------------------------------
def test_cpu_over_limit_pauses_newest_burners_until_the_excess_is_covered():
    workers = [worker(1, cpu=30), worker(2, cpu=30), worker(3, cpu=30), worker(4, cpu=0.2)]
    out = decide(node(cpu=95.0), workers, WORK, LIMITS)
    # excess 15: one burner covers it; the idle worker 4 would not help.
    assert actions(out) == [(PAUSE, 3)]
    assert out[0].rule == "cpu"


def test_cpu_pauses_several_when_one_is_not_enough():
    workers = [worker(1, cpu=25), worker(2, cpu=25), worker(3, cpu=25), worker(4, cpu=25)]
    out = decide(node(cpu=100.0), workers, WORK, LIMITS)
    assert actions(out) == [(PAUSE, 4)]
    out = decide(node(cpu=100.0), workers, WORK, dataclasses.replace(LIMITS, cpu_limit=50.0))
    assert actions(out) == [(PAUSE, 4), (PAUSE, 3)]


# --- 5. turns: equal burners share the CPU -------------------------------------------------------
HALF = dataclasses.replace(LIMITS, cpu_limit=50.0)


def burner(pid, running_for, cpu=50.0):
    return worker(pid, cpu=cpu, started=NOW - 10, running_since=NOW - running_for)


def waiting(pid, since, paused_by="cpu"):
    return paused(pid, since=since, cpu_at_pause=50.0, paused_by=paused_by)


def test_a_burner_that_has_run_an_interval_makes_way_for_the_worker_paused_longest():
    out = decide(node(cpu=50.0), [burner(1, running_for=0.6), waiting(2, since=1.2), waiting(3, since=0.7)], WORK,
                 HALF)
    assert actions(out) == [(PAUSE, 1), (CONTINUE, 2)] and {d.rule for d in out} == {"turn"}


def test_the_more_wait_for_a_turn_the_shorter_each_turn():
    """Three waiting for one place: a turn is half an interval (TURN_SHARE / 4), so none waits much
    longer than two intervals in all."""
    three = [waiting(2, since=1.2), waiting(3, since=0.9), waiting(4, since=0.6)]
    out = decide(node(cpu=50.0), [burner(1, running_for=0.3), *three], WORK, HALF)
    assert actions(out) == [(PAUSE, 1), (CONTINUE, 2)]
    assert decide(node(cpu=50.0), [burner(1, running_for=0.2), *three], WORK, HALF) == []


def test_a_turn_is_taken_when_tick_noise_puts_the_node_just_over_the_limit():
    """A lone burner reads a little over the limit now and then (pmlmd's own CPU, tick noise):
    it is kept, and still owes its turn; well over the limit, nobody is continued."""
    pair = [burner(1, running_for=0.6), waiting(2, since=1.2)]
    out = decide(node(cpu=52.0), pair, WORK, HALF)
    assert actions(out) == [(PAUSE, 1), (CONTINUE, 2)] and {d.rule for d in out} == {"turn"}
    assert decide(node(cpu=58.0), pair, WORK, HALF) == []


@pytest.mark.parametrize("workers, cpu, why", [
    ([burner(1, running_for=0.3), waiting(2, since=1.2)], 50.0, "it has not run an interval yet"),
    ([burner(1, running_for=0.6), waiting(2, since=0.3)], 50.0, "nobody has waited an interval"),
    ([burner(1, running_for=0.6), waiting(2, since=1.2, paused_by="gap")], 50.0, "a grower waits for memory"),
    ([burner(1, running_for=0.6, cpu=0.1), waiting(2, since=1.2)], 50.0, "an idle worker is no burner"),
])
def test_no_turn_when_it_would_not_share_anything(workers, cpu, why):
    assert [d for d in decide(node(cpu=cpu), workers, WORK, HALF) if d.rule == "turn"] == [], why


def test_over_the_limit_pausing_comes_before_turns():
    out = decide(node(cpu=95.0), [burner(1, running_for=5), burner(2, running_for=5), waiting(3, since=2)], WORK,
                 HALF)
    assert all(d.rule == "cpu" for d in out) and out


def test_cpu_keeps_the_last_runner_when_it_fits_the_limit_alone():
    out = decide(node(cpu=81.0), [worker(1, cpu=80.5)], WORK, LIMITS)
    assert out == []


def test_cpu_pauses_the_last_runner_when_the_rest_of_the_node_is_over_the_limit():
    out = decide(node(cpu=99.0), [worker(1, cpu=10.0)], WORK, LIMITS)
    assert actions(out) == [(PAUSE, 1)]


def test_cpu_pauses_the_last_runner_when_it_alone_exceeds_the_limit():
    out = decide(node(cpu=100.0), [worker(1, cpu=100.0)], WORK, LIMITS)
    assert actions(out) == [(PAUSE, 1)]


def test_cpu_a_figure_that_still_holds_a_just_paused_worker_pauses_no_second_one():
    # The node's CPU was measured over the last 0.4 s; worker 1 (40 %) was paused 0.1 s ago, so
    # three quarters of its share are still in the 92 %: the node uses about 62 % now, and
    # worker 2 (40 %) is the rest of it, 22 % without it: it is kept under a 50 % limit.
    limits = dataclasses.replace(LIMITS, cpu_limit=50.0)
    sample = dataclasses.replace(node(cpu=92.0), cpu_from=NOW - 0.4, cpu_to=NOW)
    workers = [paused(1, since=0.1, cpu_at_pause=40.0), worker(2, cpu=40.0)]
    assert decide(sample, workers, WORK, limits) == []
    # Without the span the figure is taken as it is: worker 2 pays for worker 1's CPU.
    assert actions(decide(node(cpu=92.0), workers, WORK, limits)) == [(PAUSE, 2)]
    # A worker paused before the span began is not in the figure at all: nothing is taken out.
    sample = dataclasses.replace(node(cpu=92.0), cpu_from=NOW - 0.05, cpu_to=NOW)
    assert actions(decide(sample, workers, WORK, limits)) == [(PAUSE, 2)]


def test_right_after_a_turn_the_worker_just_continued_keeps_its_room():
    # A turn 0.01 s ago: worker 1 (50 %) paused, worker 2 (50 % when it was paused) continued. The
    # node's figure, taken over the last 0.05 s, is worker 1's share for the 0.04 s it still ran;
    # worker 2 had not run yet. Worker 2 is back at its 50 % now: worker 3 must not go into its room.
    sample = dataclasses.replace(node(cpu=39.0), cpu_from=NOW - 0.05, cpu_to=NOW)
    workers = [paused(1, since=0.01, cpu_at_pause=50.0), paused(3, since=0.6, cpu_at_pause=50.0),
               worker(2, cpu=None, running_since=NOW - 0.01, cpu_before=50.0)]
    assert decide(sample, workers, WORK, HALF) == []
    assert node_cpu(sample, workers) == pytest.approx(39.0)
    # Counted without worker 2's share the node would read 0 %: worker 3 went on, and at the next
    # sample two burners were over the limit.
    alone = workers[:2] + [worker(2, cpu=None, running_since=NOW - 0.01)]
    assert node_cpu(sample, alone) == pytest.approx(0.0, abs=1e-6)
    assert actions(decide(sample, alone, WORK, HALF)) == [(CONTINUE, 3)]
    # A worker continued before the span began is in the figure already: nothing is added.
    earlier = workers[:2] + [worker(2, cpu=50.0, running_since=NOW - 0.2, cpu_before=50.0)]
    assert node_cpu(sample, earlier) == pytest.approx(0.0, abs=1e-6)


def test_the_node_figure_with_a_worker_just_continued_is_at_most_100():
    # The node is at 95 % and a worker (60 % when paused) was continued 0.1 s into the 0.5 s
    # span: counted at its old share it would make 107 %. It can only take from the others.
    sample = dataclasses.replace(node(cpu=95.0), cpu_from=NOW - 0.5, cpu_to=NOW)
    workers = [worker(1, cpu=95.0), worker(2, cpu=None, running_since=NOW - 0.4, cpu_before=60.0)]
    assert node_cpu(sample, workers) == 100.0
    (pause,) = decide(sample, workers, WORK, HALF)
    assert (pause.action, pause.worker) == (PAUSE, 1) and pause.reason.startswith("cpu 100% > limit 50%"), pause


STRICT = dataclasses.replace(LIMITS, cpu_limit=50.0)  # a batch that asked for --cpu-limit 50


@pytest.mark.parametrize("sample, batch, others_run, profiled, says", [
    (node(cpu=20.0), LIMITS, 8, False, "the node has as many workers as it may (max_workers 8)"),
    (node(free=200 * MiB), LIMITS, False, False, "available memory 200MiB is below the batch's floor 300MiB"),
    (node(free=2 * GiB), LIMITS, False, False,
     "below the batch's memory limit 3277MiB (memfree_limit 20% of 16384MiB)"),
    (node(free=LIMIT + 100 * MiB), LIMITS, False, False, "leaves less than the gap 200MiB above"),
    (node(free=LIMIT + 100 * MiB), LIMITS, False, True, None),  # packed by its profile in the gap
    (node(cpu=95.0), LIMITS, False, False, "cpu 95% is above the node's cpu limit 80%"),  # others' load
    (node(cpu=60.0), STRICT, False, False, "cpu 60% is above the batch's cpu limit 50%"),
    (node(cpu=45.0), STRICT, True, False, None),  # the node's calm line (70 %) is the one for others
    (node(cpu=75.0), LIMITS, True, False, "cpu 75% is above the node's cpu limit less its margin (70%)"),
    (node(cpu=75.0), LIMITS, False, False, None),  # nothing else runs: one worker may always try
    (node(), LIMITS, True, False, None),
])
def test_held_back_says_why_a_batch_of_which_nothing_runs_waits_as_decide_has_it(sample, batch, others_run,
                                                                                  profiled, says):
    # others_run: how many workers of another batch run (True: one).
    workers = [dataclasses.replace(worker(9 + i, cpu=40.0 / int(others_run)), batch="other")
               for i in range(int(others_run))]
    reason = held_back(sample, sample.cpu_pct, LIMITS, batch, bool(others_run), profiled, len(workers))
    assert reason == says if says is None else says in reason, reason
    # decide_batches agrees: the batch (nothing of it runs) is admitted exactly when nothing holds it back.
    new = Workload(queued=3, key="new", peak_rss=50 * MiB if profiled else None)
    stricter = {"new": (batch, new)} if batch != LIMITS else {}
    admitted = [d for d in decide_batches(sample, workers, [Workload(queued=0, key="other"), new], LIMITS, stricter)
                if d.action == SPAWN and d.count > 0]
    assert bool(admitted) == (says is None), admitted


def test_a_margin_above_a_low_limit_still_leaves_room_below_it():
    # --cpu-limit 8 (5 cores of a 64-core node) with the default margin of 10 points: 8 - 10 is
    # below zero, and a second worker would never have been admitted beside the first. The margin
    # is at most half the limit: below 4 % more are admitted, above it none.
    low = dataclasses.replace(LIMITS, cpu_limit=8.0, cpu_margin=10.0)
    assert low.margin == 4.0 and LIMITS.margin == LIMITS.cpu_margin
    running, light = [worker(1, cpu=1.0)], dataclasses.replace(WORK, avg_cpu=1.0)
    assert [d.action for d in decide(node(cpu=3.0), running, light, low)] == [SPAWN]
    assert decide(node(cpu=5.0), running, light, low) == []


def test_cpu_over_limit_admits_nothing():
    assert decide(node(cpu=90.0), [], WORK, LIMITS) == []


# --- 5. calm: continue first, then admit ------------------------------------------------------
def test_continue_oldest_paused_first_one_per_step():
    workers = [worker(5, cpu=20), paused(2, cpu_at_pause=20), paused(1, cpu_at_pause=20)]
    out = decide(node(cpu=30.0), workers, WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 1)]


def test_no_continue_in_the_interval_of_the_pause():
    workers = [worker(5), paused(1, since=0.2, cpu_at_pause=10)]
    assert decide(node(cpu=10.0), workers, WORK, LIMITS) == []


def test_no_continue_when_its_cpu_would_not_fit_while_others_run():
    workers = [worker(5, cpu=50), paused(1, cpu_at_pause=40)]
    assert decide(node(cpu=60.0), workers, WORK, LIMITS) == []


def test_continue_within_hysteresis_only():
    workers = [worker(5, cpu=20), paused(1, cpu_at_pause=5)]
    assert decide(node(cpu=75.0), workers, WORK, LIMITS) == []  # 75 > 80 - 10
    assert actions(decide(node(cpu=65.0), workers, WORK, LIMITS)) == [(CONTINUE, 1)]


def test_continue_when_nothing_runs_even_if_its_share_exceeds_the_headroom():
    out = decide(node(cpu=5.0), [paused(1, cpu_at_pause=100)], WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 1)]


def test_continue_when_the_others_that_run_are_idle_even_if_its_share_exceeds_the_headroom():
    # A sleeping worker runs beside a paused burner: the node is idle, the burner goes on (and is
    # paused again if it takes the node over the limit: it takes turns instead of starving).
    workers = [worker(5, cpu=0.1), paused(1, cpu_at_pause=100)]
    out = decide(node(cpu=2.0), workers, WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 1)]
    assert "nothing else uses the CPU" in out[0].reason
    # A runner not yet measured may be busy: it still counts.
    assert decide(node(cpu=2.0), [worker(5, cpu=None), paused(1, cpu_at_pause=100)], WORK, LIMITS) == []


def test_higher_priority_is_continued_first():
    out = decide(node(cpu=5.0), [paused(1), paused(2, priority=3)], WORK, LIMITS)
    assert actions(out) == [(CONTINUE, 2)]


def test_paused_workers_block_admission():
    workers = [worker(5), paused(1, since=0.1)]
    assert decide(node(cpu=10.0), workers, WORK, LIMITS) == []


def spawned(decisions):
    assert all(d.action == SPAWN for d in decisions)
    return sum(d.count for d in decisions)


def test_admission_ramps_up_while_nothing_is_measured():
    unknown = Workload(queued=50)
    assert spawned(decide(node(), [], unknown, LIMITS)) == 1
    assert spawned(decide(node(), [worker(1, cpu=None), worker(2, cpu=None)], unknown, LIMITS)) == 2


def test_admission_bounded_by_memory_usage_plus_two_averages_plus_gap():
    """No worker of the batch has finished (no profile): the average so far, and the gap kept."""
    work = Workload(queued=50, avg_rss=1 * GiB, avg_cpu=1.0)
    # headroom above limit + gap is 3.5G: 3 averages fit, the rule keeps one in reserve.
    free = LIMIT + 200 * MiB + int(3.5 * GiB)
    assert spawned(decide(node(free=free), [worker(1, cpu=1.0)], work, LIMITS)) == 2


def test_without_a_profile_a_new_worker_counts_as_at_least_the_gap_for_an_interval():
    """Workers may allocate after they start, and steps follow each other within milliseconds:
    until a worker of the batch has finished, one started within an interval is taken to reach at
    least the gap G (200 MiB here), whatever it shows so far."""
    work = Workload(queued=50, avg_rss=10 * MiB, avg_cpu=1.0)
    free = LIMIT + 200 * MiB + 1000 * MiB  # five gaps above L + G
    assert spawned(decide(node(free=free), [], work, LIMITS)) == 4  # one in reserve
    just_started = [worker(pid, started=NOW - 0.1, rss=10 * MiB, cpu=None) for pid in (1, 2)]
    assert spawned(decide(node(free=free), just_started, work, LIMITS)) == 2  # 2 x 190 MiB may still come
    settled = [worker(pid, rss=10 * MiB, cpu=1.0) for pid in (1, 2)]
    assert spawned(decide(node(free=free), settled, work, LIMITS)) == 4


def test_admission_bounded_by_cpu_headroom():
    work = Workload(queued=50, avg_rss=1 * MiB, avg_cpu=20.0, peak_rss=1 * MiB)
    assert spawned(decide(node(cpu=30.0), [worker(1, cpu=20)], work, LIMITS)) == 2  # 30 + 2 x 20 <= 80


# --- memory profiles: packing by the peak of finished workers ----------------------------------
PROFILED = Workload(queued=20, avg_rss=100 * MiB, avg_cpu=1.0, peak_rss=128 * MiB)


def test_a_profiled_batch_is_packed_by_its_peak_down_to_the_limit():
    """The peak of finished workers is what each new one may reach: 400 MiB above L fit three of
    128 MiB (the gap is not held in reserve for them; growing past the peak is paused there)."""
    assert spawned(decide(node(free=LIMIT + 400 * MiB, cpu=1.0), [], PROFILED, LIMITS)) == 3


def test_what_running_workers_may_still_add_to_their_peak_is_counted():
    young = [worker(1, rss=28 * MiB, cpu=1.0)]  # 100 MiB still to come
    assert spawned(decide(node(free=LIMIT + 400 * MiB, cpu=1.0), young, PROFILED, LIMITS)) == 2


def test_a_profiled_batch_is_admitted_inside_the_gap_when_its_peak_fits():
    out = decide(node(free=LIMIT + 150 * MiB, cpu=1.0), [worker(1, rss=128 * MiB, cpu=1.0)], PROFILED, LIMITS)
    assert spawned(out) == 1 and out[0].rule == "gap"


def test_no_admission_inside_the_gap_without_a_profile():
    unprofiled = dataclasses.replace(PROFILED, peak_rss=None)
    assert decide(node(free=LIMIT + 150 * MiB, cpu=1.0), [worker(1, rss=128 * MiB, cpu=1.0)], unprofiled, LIMITS) == []


def test_a_worker_growing_toward_its_batchs_peak_runs_on_in_the_gap():
    growing = [worker(1, rss=64 * MiB, growth=200.0 * MiB), worker(2, rss=128 * MiB)]
    # 64 MiB still to come, 150 MiB above L: on course, and nothing new fits beside it.
    assert decide(node(free=LIMIT + 150 * MiB, cpu=1.0), growing, PROFILED, LIMITS) == []


def test_growing_past_the_peak_or_without_a_profile_is_paused_in_the_gap():
    past = [worker(1, rss=200 * MiB, growth=50.0 * MiB)]
    assert actions(decide(node(free=LIMIT + 150 * MiB, cpu=1.0), past, PROFILED, LIMITS)) == [(PAUSE, 1)]
    unprofiled = dataclasses.replace(PROFILED, peak_rss=None)
    young = [worker(1, rss=64 * MiB, growth=50.0 * MiB)]
    assert actions(decide(node(free=LIMIT + 150 * MiB, cpu=1.0), young, unprofiled, LIMITS)) == [(PAUSE, 1)]


def test_on_course_workers_whose_peaks_would_cross_the_limit_are_paused_until_the_rest_fit():
    growing = [worker(1, rss=28 * MiB, growth=50.0 * MiB), worker(2, rss=28 * MiB, growth=50.0 * MiB)]
    # 2 x 100 MiB still to come against 150 MiB above L: the newest waits, the other goes on.
    out = decide(node(free=LIMIT + 150 * MiB, cpu=1.0), growing, PROFILED, LIMITS)
    assert actions(out) == [(PAUSE, 2)] and out[0].rule == "gap"


def test_a_worker_paused_on_course_goes_on_in_the_gap_once_its_rest_fits():
    waiting = paused(2, since=0.6, rss=28 * MiB, paused_by="gap")  # 100 MiB still to come
    done = [waiting, worker(1, rss=128 * MiB)]
    out = decide(node(free=LIMIT + 150 * MiB, cpu=1.0), done, PROFILED, LIMITS)
    assert actions(out) == [(CONTINUE, 2)] and out[0].rule == "gap"
    # Not while the running one may still add 100 MiB of its own, nor within the interval it was paused in.
    busy = [waiting, worker(1, rss=28 * MiB)]
    assert decide(node(free=LIMIT + 150 * MiB, cpu=1.0), busy, PROFILED, LIMITS) == []
    fresh = [dataclasses.replace(waiting, paused_at=NOW - 0.1), worker(1, rss=128 * MiB)]
    assert decide(node(free=LIMIT + 150 * MiB, cpu=1.0), fresh, PROFILED, LIMITS) == []


def test_a_cpu_limit_of_100_percent_bounds_no_admission():
    """Tiny tasks measure a high CPU share over their short lives: under a real limit that admits
    them one or two at a time, but at 100 % the node cannot use more however many run."""
    work = Workload(queued=50, avg_rss=1 * MiB, avg_cpu=50.0, peak_rss=1 * MiB)
    off = dataclasses.replace(LIMITS, cpu_limit=100.0, cpu_margin=0.0)
    assert spawned(decide(node(cpu=95.0), [worker(1, cpu=50)], work, off)) == 7  # the cap of 8
    almost = dataclasses.replace(off, cpu_limit=99.0)
    assert decide(node(cpu=95.0), [worker(1, cpu=50)], work, almost) == []


def test_admission_counts_unmeasured_young_workers_at_the_average():
    work = Workload(queued=50, avg_rss=1 * MiB, avg_cpu=20.0)
    young = [worker(1, cpu=20), worker(2, cpu=None), worker(3, cpu=None)]
    # 30 + 2 young x 20 = 70: one more would reach 90 > 80.
    assert decide(node(cpu=30.0), young, work, LIMITS) == []


def test_admission_bounded_by_cap_and_queue():
    work = Workload(queued=3, avg_rss=1 * MiB, avg_cpu=0.1, peak_rss=1 * MiB)
    assert spawned(decide(node(cpu=1.0), [worker(1, cpu=0.1)], work, LIMITS)) == 3
    work = Workload(queued=50, avg_rss=1 * MiB, avg_cpu=0.1, peak_rss=1 * MiB)
    assert spawned(decide(node(cpu=1.0), [worker(1, cpu=0.1)], work, LIMITS)) == 7  # cap 8


def test_no_admission_in_the_cpu_hysteresis_band_while_workers_run():
    assert decide(node(cpu=75.0), [worker(1, cpu=30)], WORK, LIMITS) == []


def test_one_admission_when_nothing_runs_even_without_headroom():
    work = Workload(queued=5, avg_rss=1 * MiB, avg_cpu=50.0)
    assert spawned(decide(node(cpu=75.0), [], work, LIMITS)) == 1


def test_no_admission_without_the_memory_gap():
    assert decide(node(free=LIMIT + 100 * MiB), [], WORK, LIMITS) == []


def test_memory_metric_free_reads_memfree():
    limits = dataclasses.replace(LIMITS, memory_metric="free")
    out = decide(node(free=8 * GiB, mem_free=LIMIT - 10 * MiB), [worker(1)], WORK, limits)
    assert actions(out) == [(TERMINATE, 1)]
    # MemAvailable below the limit does not matter when the metric is MemFree.
    assert spawned(decide(node(free=LIMIT - 10 * MiB, mem_free=8 * GiB), [], PROFILED, limits)) == 8  # the cap


def test_decisions_carry_reasons():
    out = decide(node(free=LIMIT - 10 * MiB), [worker(1)], WORK, LIMITS)
    assert "limit" in out[0].reason and out[0].rule == "memory"


# --- sampling interval ---------------------------------------------------------------------
def test_interval_is_the_base_far_from_the_limits():
    assert next_interval(node(t=0), node(t=0.5), LIMITS) == 0.5


def test_interval_shrinks_when_memory_falls_fast():
    before, now = node(free=6 * GiB, t=0.0), node(free=5 * GiB, t=0.5)  # 2 GiB/s, 1.6 GiB above the gap
    assert next_interval(before, now, LIMITS) < 0.5
    fast_before, fast_now = node(free=LIMIT + 300 * MiB, t=0.0), node(free=LIMIT + 250 * MiB, t=0.01)
    assert next_interval(fast_before, fast_now, LIMITS) == pytest.approx(SHORTEST_INTERVAL)


@pytest.mark.parametrize("fall_mib, expected", [
    (0, 2 * SHORTEST_INTERVAL),  # a node that sits just above the gap's edge: the steady shortest wait
    (1, 2 * SHORTEST_INTERVAL),  # 20 MiB/s: the drift of an idle node, not a grower
    (10, SHORTEST_INTERVAL),  # 200 MiB/s: seen within the shortest wait of crossing
])
def test_shortest_wait_only_while_free_memory_falls_fast(fall_mib, expected):
    # 20 MiB above the gap's edge: the fastest fill would cross it in 3.3 ms, so the shortest wait rules.
    before = node(free=LIMIT + LIMITS.memory_gap + 20 * MiB + fall_mib * MiB, t=0.0)
    now = node(free=LIMIT + LIMITS.memory_gap + 20 * MiB, t=0.05)
    assert next_interval(before, now, LIMITS) == pytest.approx(expected)


def test_a_fall_is_measured_over_the_rate_span_not_between_the_last_two_samples():
    # MemAvailable moves in steps: the last two samples may read the same figure while memory falls.
    stepped = [node(free=GiB + 8 * MiB, t=0.0), node(free=GiB, t=0.02), node(free=GiB, t=0.04)]
    assert rate_reference(stepped, 0.06) is stepped[0]  # the newest at least RATE_SPAN old
    assert rate_reference(stepped, 0.07) is stepped[1]
    assert rate_reference(stepped[2:], 0.06) is stepped[2]  # none that old: the oldest there is
    assert rate_reference(stepped[2:], 0.041) is None  # a sample right after another carries no rate
    assert rate_reference([], 0.06) is None
    assert RATE_SPAN >= 4 * SHORTEST_INTERVAL  # several samples per span while memory falls fast


def test_interval_never_lets_the_fastest_fill_cross_the_next_threshold_unseen():
    from pmlmd.core.governor import FILL_RATE_MAX

    # Two samples that read the same free memory (no rate seen) 300 MiB above the gap edge.
    before, now = node(free=LIMIT + 500 * MiB, t=0.0), node(free=LIMIT + 500 * MiB, t=0.02)
    interval = next_interval(before, now, LIMITS)
    assert interval <= 300 * MiB / FILL_RATE_MAX and interval * FILL_RATE_MAX <= 300 * MiB
    # Inside the gap: the limit is the next threshold, 100 MiB away.
    assert next_interval(None, node(free=LIMIT + 100 * MiB), LIMITS) <= 100 * MiB / FILL_RATE_MAX
    # With no worker to watch there is nothing to fill it: the base (or its fifth near the gap).
    assert next_interval(before, now, LIMITS, watching=False) == 0.5
    # Far from every threshold the base interval holds.
    assert next_interval(node(t=0), node(t=0.5), LIMITS) == 0.5


def test_interval_stretches_while_nothing_moves_within_the_same_memory_bounds():
    from pmlmd.core.governor import FILL_RATE_MAX, STILL_STRETCH

    # Every worker still, none paused, none to admit: up to STILL_STRETCH intervals apart ...
    far = node(free=TOTAL, cpu=2.0)
    assert next_interval(far, far, LIMITS, still=True) == STILL_STRETCH * LIMITS.interval
    assert next_interval(far, far, LIMITS) == LIMITS.interval
    # ... but never longer than the fastest fill needs to reach the gap's edge ...
    nearer = node(free=8 * GiB, cpu=2.0)
    stretched = next_interval(nearer, nearer, LIMITS, still=True)
    assert LIMITS.interval < stretched <= (8 * GiB - LIMIT - LIMITS.memory_gap) / FILL_RATE_MAX
    # ... and as short as ever near the CPU limit or in the gap.
    busy = node(free=TOTAL, cpu=75.0)
    assert next_interval(busy, busy, LIMITS, still=True) == LIMITS.interval / 4
    assert next_interval(None, node(free=LIMIT + 100 * MiB), LIMITS, still=True) <= 100 * MiB / FILL_RATE_MAX


def test_interval_shrinks_near_the_limits():
    assert next_interval(None, node(free=LIMIT + 50 * MiB), LIMITS) < 0.5
    assert next_interval(None, node(cpu=75.0), LIMITS) <= 0.25


# --- several batches --------------------------------------------------------------------------
def test_admissions_go_to_the_first_batch_then_the_next():
    high = Workload(queued=2, avg_rss=1 * MiB, avg_cpu=0.1, key="high", peak_rss=1 * MiB)
    low = Workload(queued=10, avg_rss=1 * MiB, avg_cpu=0.1, key="low", peak_rss=1 * MiB)
    out = decide(node(cpu=1.0), [worker(1, cpu=0.1)], [high, low], LIMITS)
    assert [(d.batch, d.count) for d in out] == [("high", 2), ("low", 5)]  # cap 8 - 1 running


def test_a_batch_that_does_not_fit_blocks_those_after_it():
    big = Workload(queued=5, avg_rss=6 * GiB, avg_cpu=1.0, key="big")
    small = Workload(queued=5, avg_rss=1 * MiB, avg_cpu=1.0, key="small")
    assert decide(node(free=8 * GiB), [worker(1, cpu=1.0)], [big, small], LIMITS) == []


def test_a_batch_at_its_own_cap_lets_the_next_one_in():
    capped = Workload(queued=5, avg_rss=1 * MiB, avg_cpu=0.1, key="capped", room=0)
    other = Workload(queued=1, avg_rss=1 * MiB, avg_cpu=0.1, key="other")
    out = decide(node(cpu=1.0), [worker(1, cpu=0.1)], [capped, other], LIMITS)
    assert [(d.batch, d.count) for d in out] == [("other", 1)]


def test_held_workers_are_never_continued_and_do_not_block_admission():
    held = dataclasses.replace(paused(1), state=HELD)
    out = decide(node(cpu=1.0), [held], Workload(queued=1, avg_rss=1 * MiB, avg_cpu=0.1), LIMITS)
    assert [d.action for d in out] == [SPAWN]


def test_held_workers_are_still_memory_victims():
    held = dataclasses.replace(paused(1, rss=2 * GiB), state=HELD)
    out = decide(node(free=LIMIT - 10 * MiB), [held, worker(2, rss=5 * MiB)], WORK, LIMITS)
    assert actions(out) == [(TERMINATE, 2), (TERMINATE, 1)]


def test_a_batch_can_only_tighten_the_node_limits():
    from pmlmd.core.options import tighten
    out = tighten(LIMITS, cpu_limit=95.0, memfree_limit=30.0, min_free=None, victim="largest", interval=0.1)
    assert out.cpu_limit == 80.0  # looser ask held to the node's
    assert out.memfree_limit == 30.0 and out.min_free == LIMITS.min_free
    assert out.victim == "largest" and out.interval == 0.1
    assert tighten(LIMITS) is LIMITS


def test_quiet_only_far_from_every_limit_with_nothing_paused_or_waiting():
    assert quiet(node(cpu=20.0), LIMITS, paused=False, queued=False)
    assert not quiet(node(cpu=20.0), LIMITS, paused=True, queued=False)
    assert not quiet(node(cpu=20.0), LIMITS, paused=False, queued=True)
    assert not quiet(node(free=LIMIT + 100 * MiB), LIMITS, paused=False, queued=False)  # in the gap
    assert not quiet(node(cpu=85.0), LIMITS, paused=False, queued=False)  # over the CPU limit


# --- batches with stricter limits (decide_batches) ------------------------------------------------
def test_a_batch_with_a_stricter_cpu_limit_is_admitted_no_more_than_its_own_limit_allows():
    from pmlmd.core.governor import decide_batches
    strict = dataclasses.replace(LIMITS, cpu_limit=30.0)
    work = dataclasses.replace(WORK, key="b")
    sample = node(cpu=50.0)  # within the node's 80 %, over the batch's 30 %
    assert [d.count for d in decide(sample, [], work, LIMITS) if d.action == SPAWN] != []  # the node alone admits
    assert decide_batches(sample, [], [work], LIMITS, {"b": (strict, work)}) == []
    # Other batches keep what the node admits them.
    other = Workload(queued=3, avg_rss=100 * MiB, avg_cpu=10.0, key="a")
    out = decide_batches(sample, [], [other, work], LIMITS, {"b": (strict, work)})
    assert {d.batch for d in out if d.action == SPAWN} == {"a"}


def test_of_two_verdicts_on_a_worker_the_stricter_stands_and_a_continue_needs_both():
    from pmlmd.core.governor import decide_batches
    strict = dataclasses.replace(LIMITS, cpu_limit=30.0)
    mine = dataclasses.replace(worker(1, cpu=45.0), batch="b")
    waiting = dataclasses.replace(paused(2, since=2.0, cpu_at_pause=5.0), batch="b")
    work = Workload(queued=0, key="b")
    sample = node(cpu=50.0)
    node_only = decide(sample, [mine, waiting], [work], LIMITS)
    assert (PAUSE, 1) not in actions(node_only)  # the node's limit is not reached
    out = decide_batches(sample, [mine, waiting], [work], LIMITS, {"b": (strict, work)})
    assert (PAUSE, 1) in actions(out)  # the batch's own 30 % is
    assert (CONTINUE, 2) not in actions(out)


def test_without_stricter_batches_decide_batches_is_decide():
    from pmlmd.core.governor import decide_batches
    workers = [worker(1), paused(2)]
    assert decide_batches(node(), workers, [WORK], LIMITS, {}) == decide(node(), workers, [WORK], LIMITS)


# --- when workers are measured, and what a batch's profile is ---------------------------------------
@pytest.mark.parametrize("free, cpu, paused, since, due", [
    (8 * GiB, 20.0, False, 0.5, True),  # every interval
    (8 * GiB, 20.0, False, 0.4, False),
    (LIMIT + 100 * MiB, 20.0, False, 0.05, True),  # in the gap: every FAST_REFRESH
    (LIMIT + 100 * MiB, 20.0, False, 0.04, False),
    (8 * GiB, 75.0, True, 0.125, True),  # turns near the CPU limit: every quarter interval
    (8 * GiB, 75.0, False, 0.125, False),  # nobody paused: no turns to take
    (8 * GiB, 60.0, True, 0.125, False),  # below the limit less its margin: no turns either
])
def test_workers_are_measured_more_often_near_a_limit(free, cpu, paused, since, due):
    from pmlmd.core.governor import refresh_due
    assert refresh_due(node(free=free, cpu=cpu), LIMITS, since, paused) is due


def test_a_batch_profile_averages_finished_and_live_workers_and_peaks_over_the_finished():
    from pmlmd.core.governor import Finished, workload
    finished = Finished()
    assert workload("b", 3, None, finished, [], []) == Workload(queued=3, key="b")  # nothing measured yet
    finished.add(100 * MiB, 30.0)
    finished.add(300 * MiB, 10.0)
    w = workload("b", 3, 2, finished, [200 * MiB], [50.0])
    assert (w.avg_rss, w.avg_cpu, w.peak_rss, w.room) == (200 * MiB, 30.0, 300 * MiB, 2)


# --- queue batches: intake credit and give-back -----------------------------------------------
@pytest.mark.parametrize("held, taking, running, admitted, holding, credit", [
    (False, True, 3, 2, 9, 5),  # what runs plus what this step admitted
    (False, True, 0, 0, 4, 0),  # nothing admitted: nothing more is taken
    (False, False, 3, 2, 9, 0),  # no longer taking (cancelled, halted, closing): none
    (True, True, 3, 2, 9, 9),  # held by a user: keeps what it holds, takes no more
    (True, False, 0, 0, 2, 2),
])
def test_intake_credit(held, taking, running, admitted, holding, credit):
    assert intake_credit(held, taking, running, admitted, holding) == credit


def test_give_back_returns_the_newest_that_waited_long_enough_up_to_the_excess():
    now = 100.0
    old, fresh = now - GIVE_BACK_AFTER, now - GIVE_BACK_AFTER / 2
    queued = [(0, old), (1, None), (2, old), (3, fresh), (4, old)]
    assert give_back(queued, 2, now) == [4, 2]  # from the back; 3 waited too little, 1 holds no delivery
    assert give_back(queued, 5, now) == [4, 2, 0]
    assert give_back(queued, 0, now) == []


# --- the step after one cut short; the pace of sampling -----------------------------------------

@pytest.mark.parametrize("asked, backlog, by_credit, started", [
    ({"a": 8}, {"a": 3}, set(), {"a": 3}),  # never more than the cut step left over: the ramp holds
    ({"a": 2}, {"a": 3}, set(), {"a": 2}),  # fewer if this step admits fewer
    ({"a": 4, "b": 4}, {"a": 3}, set(), {"a": 3}),  # a batch the cut step did not reach waits its turn
    ({"q": 8}, {}, {"q"}, {"q": 8}),  # a queue batch starts what its credit admits
])
def test_a_step_after_a_cut_one_starts_no_more_than_was_left(asked, backlog, by_credit, started):
    decisions = [Decision(SPAWN, count=n, batch=b) for b, n in asked.items()] + [Decision(PAUSE, worker=7)]
    out = within_backlog(decisions, backlog, by_credit)
    assert {d.batch: d.count for d in out if d.action == SPAWN} == started
    assert Decision(PAUSE, worker=7) in out  # pauses and the rest are not touched


def test_samples_come_at_the_shortest_interval_any_batch_asks_for():
    node = Limits(interval=0.5)
    assert sampling_pace(node, []) is node
    assert sampling_pace(node, [0.5, 1.0]) is node  # a longer ask is held to the node's
    assert sampling_pace(node, [0.5, 0.1]) == dataclasses.replace(node, interval=0.1)
