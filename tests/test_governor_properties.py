"""Properties the governor keeps for every input hypothesis can think of."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from pmlmd.core import lifecycle as lc
from pmlmd.core.batch import CAUSE_GOVERNOR_MEMORY
from pmlmd.core.governor import (CONTINUE, CRITICAL, KILL, KILLED, PAUSE, PAUSED, RUNNING, SPAWN, TERMINATE,
                            SHORTEST_INTERVAL, TERMINATING, Limits, NodeSample, WorkerView, Workload, decide, free_bytes,
                            next_interval, quiet)

MiB = 1 << 20
TOTAL = 8 << 30
NOW = 1000.0

limits_st = st.builds(
    Limits,
    cpu_limit=st.floats(1, 100),
    memfree_limit=st.floats(0, 90),
    memory_metric=st.sampled_from(["available", "free"]),
    memory_gap=st.integers(0, 1 << 30),
    min_free=st.integers(0, 1 << 30),
    victim=st.sampled_from(["newest", "oldest", "largest"]),
    max_workers=st.integers(1, 64),
    cpu_margin=st.floats(0, 30),
    interval=st.floats(0.01, 5),
)

sample_st = st.builds(
    NodeSample,
    time=st.just(NOW),
    cpu_pct=st.none() | st.floats(0, 100),
    mem_total=st.just(TOTAL),
    mem_available=st.integers(0, TOTAL),
    mem_free=st.integers(0, TOTAL),
)


@st.composite
def worker_st(draw, pid):
    state = draw(st.sampled_from([RUNNING, RUNNING, PAUSED, TERMINATING, KILLED]))
    return WorkerView(
        key=pid,
        started=draw(st.floats(0, NOW)),
        state=state,
        rss=draw(st.integers(0, 4 << 30)),
        rss_growth=draw(st.none() | st.floats(-1e9, 1e9)),
        cpu=draw(st.none() | st.floats(0, 100)),
        paused_at=draw(st.floats(NOW - 10, NOW)) if state == PAUSED else None,
        cpu_at_pause=draw(st.none() | st.floats(0, 100)) if state == PAUSED else None,
        priority=draw(st.integers(-2, 2)),
        paused_by=draw(st.sampled_from(["cpu", "gap"])) if state == PAUSED else None,
        running_since=draw(st.none() | st.floats(NOW - 10, NOW)) if state == RUNNING else None,
    )


@st.composite
def table_st(draw):
    n = draw(st.integers(0, 12))
    return [draw(worker_st(pid)) for pid in range(100, 100 + n)]


workload_st = st.builds(Workload, queued=st.integers(0, 100), avg_rss=st.none() | st.floats(1, 2 << 30),
                        avg_cpu=st.none() | st.floats(0, 100), peak_rss=st.none() | st.floats(1, 2 << 30))

situation = dict(sample=sample_st, workers=table_st(), workload=workload_st, limits=limits_st)


@settings(max_examples=300, deadline=None)
@given(**situation)
def test_never_admits_beyond_what_the_memory_limit_leaves(sample, workers, workload, limits):
    """Without a memory profile, admission needs the gap above the limit; with one (the peak of
    finished workers), every admitted worker and every running one may reach that peak and free
    memory stays at or above the limit."""
    decisions = decide(sample, workers, workload, limits)
    count = sum(d.count for d in decisions if d.action == SPAWN)
    if not count:
        return
    free, limit = free_bytes(sample, limits), limits.memory_limit_bytes(sample.mem_total)
    if workload.peak_rss is None:
        assert free >= limit + limits.memory_gap
    elif count > 1 or any(w.state == RUNNING for w in workers):  # else: one may always try (liveness)
        rest = sum(max(0.0, workload.peak_rss - w.rss) for w in workers if w.state == RUNNING)
        assert free - rest - count * workload.peak_rss >= limit


@settings(max_examples=300, deadline=None)
@given(**situation)
def test_never_admits_or_continues_over_the_cpu_limit(sample, workers, workload, limits):
    """Except a turn, which pauses a burner for each worker it continues: then within half the
    margin above the limit (tick noise)."""
    decisions = decide(sample, workers, workload, limits)
    turn = any(d.rule == "turn" for d in decisions)
    if turn:
        assert sorted(d.action for d in decisions) == [CONTINUE, PAUSE]
    for d in decisions:
        if d.action in (SPAWN, CONTINUE):
            slack = limits.cpu_margin / 2 if turn else 0.0
            assert sample.cpu_pct is None or sample.cpu_pct <= limits.cpu_limit + slack


@settings(max_examples=300, deadline=None)
@given(**situation)
def test_below_the_floor_someone_is_killed_or_the_batch_ends(sample, workers, workload, limits):
    if free_bytes(sample, limits) >= limits.min_free:
        return
    actions = {d.action for d in decide(sample, workers, workload, limits)}
    being_killed = sum(w.rss for w in workers if w.state == KILLED)
    target = max(limits.memory_limit_bytes(sample.mem_total), limits.min_free)
    if any(w.state == TERMINATING for w in workers):
        assert KILL in actions  # no more grace below the floor
    elif any(w.state in (RUNNING, PAUSED) for w in workers) and free_bytes(sample, limits) + being_killed < target:
        assert KILL in actions
    elif not workers and workload.queued:
        assert actions == {CRITICAL}
    assert SPAWN not in actions and CONTINUE not in actions


@settings(max_examples=300, deadline=None)
@given(**situation)
def test_decisions_name_known_workers_once_and_respect_cap_and_queue(sample, workers, workload, limits):
    decisions = decide(sample, workers, workload, limits)
    named = [d.worker for d in decisions if d.action != SPAWN and d.action != CRITICAL]
    assert set(named) <= {w.key for w in workers}
    assert len(named) == len(set(named))
    spawned = sum(d.count for d in decisions if d.action == SPAWN)
    assert spawned <= max(0, min(workload.queued, limits.max_workers - len(workers)))
    states = {w.key: w.state for w in workers}
    for d in decisions:
        if d.action == PAUSE:
            assert states[d.worker] == RUNNING
        elif d.action == CONTINUE:
            assert states[d.worker] == PAUSED
        elif d.action == TERMINATE:
            assert states[d.worker] in (RUNNING, PAUSED)
        elif d.action == KILL:
            assert states[d.worker] in (RUNNING, PAUSED, TERMINATING)


def life_of(w):
    """The lifecycle state a WorkerView shows (a paused one stopped by SIGSTOP)."""
    if w.state == RUNNING:
        phase = lc.Running(since=w.running_since if w.running_since is not None else w.started)
    elif w.state == PAUSED:
        phase = lc.Paused(at=w.paused_at, rule=w.paused_by, cpu_at_pause=w.cpu_at_pause, stop=lc.Stop(signal=True),
                          clock_from=w.paused_at)
    elif w.state == TERMINATING:
        phase = lc.Terminating(CAUSE_GOVERNOR_MEMORY, lc.SIGTERM_PATH, kill_at=NOW + 10)
    else:
        phase = lc.Killed(CAUSE_GOVERNOR_MEMORY)
    return lc.Life(phase, lc.Modes())


def applied(workers, decisions, now):
    """The worker table after the decisions are carried out by the engine's own transitions
    (lifecycle.decided, lifecycle.handle; a Remeasure forgets the CPU reading)."""
    by_key = {d.worker: d for d in decisions if d.worker is not None}
    out = []
    for w in workers:
        d = by_key.get(w.key)
        if d is None:
            out.append(w)
            continue
        life, effects = lc.handle(life_of(w), lc.decided(d, w.cpu), now)
        cpu = None if lc.Remeasure() in effects else w.cpu
        out.append(dataclasses.replace(w, cpu=cpu, **lc.governor_fields(life)))
    return out


@settings(max_examples=300, deadline=None)
@given(**situation)
def test_a_steady_sample_gives_a_steady_decision(sample, workers, workload, limits):
    first = decide(sample, workers, workload, limits)
    assert decide(sample, workers, workload, limits) == first  # pure: same input, same output
    # Carried out, the decisions do not undo themselves on the same sample.
    paused_now = {d.worker for d in first if d.action == PAUSE}
    continued_now = {d.worker for d in first if d.action == CONTINUE}
    second = decide(sample, applied(workers, first, sample.time), workload, limits)
    assert not any(d.action == CONTINUE and d.worker in paused_now for d in second)
    assert not any(d.action == PAUSE and d.worker in continued_now for d in second)


@settings(max_examples=200, deadline=None)
@given(previous=sample_st, sample=sample_st, limits=limits_st, dt=st.floats(0.001, 10))
def test_interval_stays_between_the_floor_and_the_base(previous, sample, limits, dt):
    previous = dataclasses.replace(previous, time=NOW - dt)
    interval = next_interval(previous, sample, limits)
    assert min(SHORTEST_INTERVAL, limits.interval) <= interval <= max(2 * SHORTEST_INTERVAL, limits.interval)


@settings(max_examples=500, deadline=None)
@given(**situation)
def test_quiet_means_decide_would_decide_nothing(sample, workers, workload, limits):
    """The engine skips building the worker table when ``quiet`` holds: decide must agree."""
    if quiet(sample, limits, any(w.state == PAUSED for w in workers), workload.queued > 0):
        assert decide(sample, workers, workload, limits) == []
