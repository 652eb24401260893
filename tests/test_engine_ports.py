"""The engine driven through its ports only: a fake clock (engine.Clock), fake process control
(procctl.Processes: spawn hands out pids and eventfds for pidfds, signals are recorded, exits are
handed in) and a /proc laid out in a directory (sampler.ProcReader's root). No worker process
runs and no signal is sent: what a sample becomes is checked signal by signal, at the times the
fake clock says.

Mocked here, and why: process control and the clock, which the other engine tests exercise for
real; the point is to pin the sequence and timing of signals, which real processes and real time
make loose."""

import contextlib
import os
import resource
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from pmlmd.node import procctl
from pmlmd.core.batch import CAUSE_GOVERNOR_MEMORY, CAUSE_TIMEOUT, QUEUED, Batch, BatchSpec
from pmlmd.engine import BatchRun, Engine
from pmlmd.node.loop import Loop
from pmlmd.core.events import End, Event, Held, Released, Timeout
from pmlmd.core.governor import RATE_SPAN, SHORTEST_INTERVAL, Limits
from pmlmd.node.sampler import PAGE_SIZE, ProcReader
from pmlmd.node.scopes import NoScopes

MiB = 1 << 20
GiB = 1 << 30
TOTAL = 16 * GiB
LIMITS = Limits(cpu_limit=80.0, memfree_limit=20.0, memory_gap=200 * MiB, min_free=300 * MiB, max_workers=2,
                cpu_margin=10.0, interval=0.5)
LIMIT = LIMITS.memory_limit_bytes(TOTAL)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


class FakeProc:
    """A /proc tree in a directory: the node's meminfo and stat, and each fake worker's stat,
    schedstat and children (written in place, so descriptors pmlmd keeps read what is new)."""

    def __init__(self, root: Path):
        self.root = root
        self.busy = self.total = 0
        self.available = 8 * GiB
        me = root / str(os.getpid()) / "task" / str(os.getpid())
        me.mkdir(parents=True)
        (me / "children").write_text("")  # the kernel keeps children lists (walk trees)
        self.node(cpu=10.0, seconds=0.0)

    def _write(self, relpath: str, text: str) -> None:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def node(self, cpu: float, seconds: float, available: int | None = None) -> None:
        """``seconds`` more of the node at ``cpu`` percent busy; free memory ``available``."""
        ticks = round(seconds * 100 * 2)  # two CPUs at 100 ticks a second
        self.busy += round(ticks * cpu / 100)
        self.total += ticks
        if available is not None:
            self.available = available
        idle = self.total - self.busy
        self._write("stat", f"cpu  {self.busy} 0 0 {idle} 0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\n")
        kib = self.available // 1024
        self._write("meminfo", f"MemTotal: {TOTAL // 1024} kB\nMemFree: {kib} kB\nMemAvailable: {kib} kB\n")

    def worker(self, pid: int, rss: int, ran_ns: int, state: str = "S") -> None:
        fields = [state, "1", str(pid)] + ["0"] * 8 + [str(ran_ns // 10_000_000), "0", "0", "0"] + ["0"] * 4 + \
                 ["4242", "0", str(rss // PAGE_SIZE)] + ["0"] * 20
        self._write(f"{pid}/stat", f"{pid} (work) " + " ".join(fields) + "\n")
        self._write(f"{pid}/task/{pid}/schedstat", f"{ran_ns} 0 0\n")
        self._write(f"{pid}/task/{pid}/children", "")


class FakeProcesses(procctl.Processes):
    """Workers that are pids and eventfds: spawn records the command, signals are recorded, an
    exit is handed in with ``exit`` and read by ``reap``."""

    def __init__(self, clock: FakeClock, proc: FakeProc):
        self.clock, self.proc = clock, proc
        self.next_pid = 40000
        self.spawned: list[int] = []
        self.commands: list[tuple[list, dict]] = []  # (argv, keywords) of each spawn
        self.signals: list[tuple[int, int]] = []  # (pgid, signal), in order
        self.exits: dict[int, procctl.Exit] = {}
        self.pidfds: dict[int, int] = {}

    def spawn(self, argv, env, **kw):
        self.commands.append((argv, kw))
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.proc.worker(pid, rss=50 * MiB, ran_ns=0)
        self.pidfds[pid] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.spawned.append(pid)
        return procctl.Child(pid=pid, start_ticks=4242, pidfd=self.pidfds[pid], started=self.clock.monotonic())

    def signal_group(self, pgid, sig):
        self.signals.append((pgid, sig))
        return pgid not in self.exits

    def group_alive(self, pgid):
        return False  # nothing of an ended worker is left

    def reap(self, child):
        return self.exits.pop(child.pid, None)

    def exit(self, pid: int, exit_code: int | None = None, sig: int | None = None) -> None:
        self.exits[pid] = procctl.Exit(exit_code=exit_code, signal=sig, cpu_seconds=0.0, max_rss=0)
        os.eventfd_write(self.pidfds[pid], 1)

    def of(self, pid: int) -> list[int]:
        return [sig for p, sig in self.signals if p == pid]


class FakeScopes(NoScopes):
    """A scope backend whose freezer works and answers when the test says (``answer``), as
    SystemdScopes answers from off the loop: each call in the order asked (``calls``), and the
    batches frozen now (``frozen``). With ``deferred`` False it answers at once. ``outcomes``:
    what the next calls answer (True done, False refused, None no answer in time: systemd may
    still carry a FreezeUnit out, ``frozen`` says what it did); True once they run out."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.waiting: list[tuple[str, str, object]] = []
        self.frozen: set[str] = set()
        self.deferred = False
        self.outcomes: list[bool | None] = []

    def freeze_later(self, batch_id, done):
        self._later("FreezeUnit", batch_id, done)

    def thaw_later(self, batch_id, done=None):
        self._later("ThawUnit", batch_id, done)

    def _later(self, member, batch_id, done):
        self.calls.append((member, batch_id))
        self.waiting.append((member, batch_id, done))
        if not self.deferred:
            self.answer()

    def answer(self, calls: int | None = None):
        """Answer the calls waiting, those their answers ask for included (or the first ``calls``)."""
        while self.waiting and (calls is None or calls > 0):
            calls = None if calls is None else calls - 1
            member, batch_id, done = self.waiting.pop(0)
            outcome = self.outcomes.pop(0) if self.outcomes else True
            if outcome is True or (outcome is None and member == "FreezeUnit"):
                (self.frozen.add if member == "FreezeUnit" else self.frozen.discard)(batch_id)
            if done is not None:
                done(outcome)


class FakeAgent:
    """The agent channel as a port (node.agentchannel.AgentChannels): each request kept with its
    deadline on the fake clock; the test acknowledges one (``ack``) or lets it expire."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.requests: list[SimpleNamespace] = []
        self.asked: list[tuple[int, str]] = []  # (pid, command), in order

    def environment(self, worker_id, uid):
        return {"PMLM_AGENT_ENDPOINT": "fake"}

    def request(self, worker_id, pid, command, timeout, owner_uid, context=None):
        request = SimpleNamespace(worker_id=worker_id, pid=pid, command=command, deadline=self.clock.now + timeout,
                                  context=context)
        self.requests.append(request)
        self.asked.append((pid, command))
        return request

    def worker_gone(self, worker_id, uid):
        pass

    def next_deadline(self):
        return min((r.deadline for r in self.requests), default=float("inf"))

    def expired(self, now):
        gone = [r for r in self.requests if r.deadline <= now]
        self.requests = [r for r in self.requests if r.deadline > now]
        return gone

    def ack(self, engine, pid, command):
        (request,) = [r for r in self.requests if r.pid == pid and r.command == command]
        self.requests.remove(request)
        engine.on_agent_ack(request)


@contextlib.contextmanager
def rigged(tmp_path, **engine_kw):
    """(engine, clock, proc, processes, loop, events): an engine with fake ports (``engine_kw``:
    more of Engine's), ended with the ``with``."""
    clock = FakeClock()
    proc = FakeProc(tmp_path)
    processes = FakeProcesses(clock, proc)
    loop = Loop()
    events: list[Event] = []
    engine = Engine(LIMITS, loop, proc=ProcReader(str(tmp_path)), clock=clock, processes=processes,
                    on_event=events.append, scopes=FakeScopes(), **engine_kw)
    try:
        yield engine, clock, proc, processes, loop, events
    finally:
        engine.close()
        loop.close()
        for fd in processes.pidfds.values():
            try:
                os.close(fd)
            except OSError:
                pass  # closed by the engine when it reaped the worker


@pytest.fixture
def rig(tmp_path):
    with rigged(tmp_path) as parts:
        yield parts


def submit(engine, tasks=2, **spec):
    spec = BatchSpec(batch_id="b", command=["work"], tasks=[None] * tasks, limits=engine.limits, **spec)
    return engine.add(BatchRun(batch=Batch(spec, 0.0), limits=spec.limits))


def advance(engine, clock, proc, seconds, cpu=10.0, available=None, steps=1):
    """Let ``seconds`` pass in ``steps`` ticks, the node at ``cpu`` percent and ``available`` bytes free."""
    for _ in range(steps):
        clock.now += seconds / steps
        proc.node(cpu=cpu, seconds=seconds / steps, available=available)
        engine.tick()


def test_a_worker_is_terminated_below_the_limit_and_killed_after_the_grace(rig):
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=2, term_grace=5.0)
    advance(engine, clock, proc, 0.3, steps=3)
    advance(engine, clock, proc, 1.0, steps=4)  # the ramp admits a second worker once the first was seen
    assert len(processes.spawned) == 2 and processes.signals == []
    first, second = processes.spawned
    proc.worker(second, rss=3 * GiB, ran_ns=10**9)  # the newest grows ...
    advance(engine, clock, proc, 0.5, available=LIMIT - 500 * MiB)  # ... and takes free memory below L
    assert processes.of(second) == [signal.SIGTERM, signal.SIGCONT] and processes.of(first) == []
    terminated_at = clock.now
    advance(engine, clock, proc, 4.9, available=LIMIT - 500 * MiB + 3 * GiB, steps=10)  # it ignores SIGTERM
    assert processes.of(second) == [signal.SIGTERM, signal.SIGCONT]
    advance(engine, clock, proc, 0.2)
    assert processes.of(second)[2:] == [signal.SIGKILL, signal.SIGCONT]
    assert clock.now - terminated_at >= 5.0  # not before the grace
    processes.exit(second, sig=signal.SIGKILL)
    loop.poll(0)
    (end,) = [e for e in events if isinstance(e, End)]
    assert end.cause == CAUSE_GOVERNOR_MEMORY and "SIGKILL after 5s grace" in end.reason
    assert run.batch.tasks[1].status == QUEUED  # requeued (--retries)


def test_a_burner_is_paused_over_the_cpu_limit_and_continued_when_the_node_is_calm(rig):
    engine, clock, proc, processes, loop, events = rig
    submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    ran = 0
    for _ in range(4):  # it uses a third of a core (16 % of the node), and the node is at 100 %
        ran += 80_000_000
        proc.worker(pid, rss=50 * MiB, ran_ns=ran, state="R")
        advance(engine, clock, proc, 0.25, cpu=100.0)
    assert processes.of(pid) == [signal.SIGSTOP]
    paused_at = clock.now
    proc.worker(pid, rss=50 * MiB, ran_ns=ran, state="T")
    advance(engine, clock, proc, 0.3, cpu=5.0, steps=3)
    assert processes.of(pid) == [signal.SIGSTOP]  # not within the interval it was paused in
    advance(engine, clock, proc, 0.5, cpu=5.0, steps=5)
    assert processes.of(pid) == [signal.SIGSTOP, signal.SIGCONT]
    assert clock.now - paused_at >= LIMITS.interval


def test_the_timeout_counts_running_time_only(rig):
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=1, timeout=2.0, term_grace=1.0)
    advance(engine, clock, proc, 0.1)
    (pid,) = processes.spawned
    engine.hold(run)
    assert run.frozen and processes.of(pid) == []  # its batch's scope is frozen
    advance(engine, clock, proc, 10.0, steps=5)  # held far longer than the timeout
    engine.resume(run)
    assert processes.of(pid) == [signal.SIGCONT]
    advance(engine, clock, proc, 1.8, steps=6)
    assert processes.of(pid) == [signal.SIGCONT]  # 1.9 s of running time
    advance(engine, clock, proc, 0.3, steps=3)
    assert processes.of(pid)[1:] == [signal.SIGTERM, signal.SIGCONT]
    assert any(isinstance(e, Timeout) for e in events)
    processes.exit(pid, sig=signal.SIGTERM)
    loop.poll(0)
    (end,) = [e for e in events if isinstance(e, End)]
    assert end.cause == CAUSE_TIMEOUT


def test_a_hold_does_not_freeze_a_batch_whose_worker_is_in_its_grace(rig):
    """Frozen, a worker sent SIGTERM could not act on it before its SIGKILL: the batch's other
    workers are stopped by signal instead, and the ending one ends as it would have."""
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=2, term_grace=5.0)
    advance(engine, clock, proc, 1.3, steps=7)
    first, second = processes.spawned
    proc.worker(second, rss=3 * GiB, ran_ns=10**9)
    advance(engine, clock, proc, 0.5, available=LIMIT - 500 * MiB)
    assert processes.of(second) == [signal.SIGTERM, signal.SIGCONT]
    engine.hold(run)
    assert engine.scopes.calls == [] and not run.frozen
    assert processes.of(first) == [signal.SIGSTOP] and processes.of(second) == [signal.SIGTERM, signal.SIGCONT]
    engine.resume(run)
    assert processes.of(first) == [signal.SIGSTOP, signal.SIGCONT]


def test_a_hold_freezes_the_batch_when_no_worker_is_being_ended(rig):
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    engine.hold(run)
    assert engine.scopes.frozen == {"b"} and run.frozen and processes.of(pid) == []  # the freezer holds it
    engine.resume(run)
    assert engine.scopes.calls == [("FreezeUnit", "b"), ("ThawUnit", "b")] and engine.scopes.frozen == set()
    assert processes.of(pid) == [signal.SIGCONT]


def held_later(rig, answered: list):
    """A batch of one running worker whose hold is asked for while systemd has not answered yet;
    the hold's ``done`` appends "held" to ``answered``."""
    engine, clock, proc, processes, loop, events = rig
    engine.scopes.deferred = True
    run = submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    engine.hold(run, lambda: answered.append("held"))
    return run, pid


def test_a_hold_is_done_once_systemd_has_frozen_the_scope(rig):
    """FreezeUnit is asked for off the loop: until systemd answers, the worker is not held and
    the user's pause is not answered; then it is held by the freezer (no signal)."""
    engine, clock, proc, processes, loop, events = rig
    answered = []
    run, pid = held_later(rig, answered)
    assert answered == [] and run.freezing and engine.scopes.calls == [("FreezeUnit", "b")]
    advance(engine, clock, proc, 0.3, steps=3)  # the loop goes on meanwhile
    assert not any(isinstance(e, Held) for e in events)
    engine.scopes.answer()
    assert answered == ["held"] and run.frozen and not run.freezing and processes.of(pid) == []
    assert any(isinstance(e, Held) for e in events)


def test_a_resume_while_the_freeze_is_under_way_thaws_after_it_and_holds_nothing(rig):
    engine, clock, proc, processes, loop, events = rig
    answered = []
    run, pid = held_later(rig, answered)
    engine.resume(run, lambda: answered.append("resumed"))
    engine.scopes.answer()
    assert engine.scopes.calls == [("FreezeUnit", "b"), ("ThawUnit", "b")] and engine.scopes.frozen == set()
    assert answered == ["held", "resumed"] and not run.frozen and not run.held
    advance(engine, clock, proc, 0.5, steps=5)
    assert signal.SIGSTOP not in processes.of(pid)  # its Hold never came: it runs on
    # Followers are told of neither: a "released" with no "held" before it would say nothing true.
    assert not any(isinstance(e, (Held, Released)) for e in events)


def test_a_worker_ended_while_the_freeze_was_under_way_is_not_left_frozen_in_its_grace(rig):
    """Frozen, a worker sent SIGTERM could not act on it in its grace: when one of the batch's
    workers is being ended by the time systemd has frozen the scope, the scope is thawed again
    and the others are stopped by signal."""
    engine, clock, proc, processes, loop, events = rig
    engine.scopes.deferred = True
    run = submit(engine, tasks=2, term_grace=5.0)
    advance(engine, clock, proc, 1.3, steps=7)
    first, second = processes.spawned
    engine.hold(run)
    proc.worker(second, rss=3 * GiB, ran_ns=10**9)
    advance(engine, clock, proc, 0.5, available=LIMIT - 500 * MiB)
    assert processes.of(second)[:1] == [signal.SIGTERM]
    engine.scopes.answer()
    assert engine.scopes.calls == [("FreezeUnit", "b"), ("ThawUnit", "b")] and engine.scopes.frozen == set()
    assert not run.frozen and processes.of(first) == [signal.SIGSTOP]


def test_samples_stretch_while_every_worker_stands_still_and_come_back_once_one_runs(rig):
    engine, clock, proc, processes, loop, events = rig
    submit(engine, tasks=2)
    advance(engine, clock, proc, 2.0, cpu=2.0, available=15 * GiB, steps=20)
    assert len(processes.spawned) == 2 and not engine.runs["b"].batch.queue
    assert engine.still  # both measured, neither ran since: nothing to watch closely
    assert engine.next_sample_at - engine.last_sample.time > LIMITS.interval
    # One wakes up and burns: the next sample sees it, and samples are an interval apart again.
    pid = processes.spawned[0]
    proc.worker(pid, rss=50 * MiB, ran_ns=500_000_000, state="R")
    clock.now = engine.next_sample_at
    proc.node(cpu=30.0, seconds=0.5)
    engine.tick()
    assert not engine.still
    assert engine.next_sample_at - engine.last_sample.time <= LIMITS.interval


def test_samples_do_not_stretch_while_a_batch_waits_to_be_admitted(rig):
    engine, clock, proc, processes, loop, events = rig
    submit(engine, tasks=3)  # max_workers is 2: one task waits
    advance(engine, clock, proc, 2.0, cpu=2.0, available=15 * GiB, steps=20)
    assert len(processes.spawned) == 2 and engine.runs["b"].batch.queue
    assert not engine.still
    assert engine.next_sample_at - engine.last_sample.time <= LIMITS.interval


def test_a_worker_resumed_is_not_taken_for_still_until_it_is_measured_again(rig):
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=2)
    advance(engine, clock, proc, 2.0, cpu=2.0, available=15 * GiB, steps=20)
    assert engine.still
    engine.hold(run)
    engine.resume(run)
    advance(engine, clock, proc, 0.01, cpu=2.0, available=15 * GiB)  # the step resume asks for at once
    assert not engine.still  # its last reading covers the time it was held, not what it does now
    assert engine.next_sample_at - engine.last_sample.time <= LIMITS.interval


def test_samples_stay_close_while_free_memory_falls_in_steps_near_the_gap(rig):
    """MemAvailable moves in steps (the kernel folds per-CPU counts in lazily): samples that read
    the same figure right after a fall must not make the engine think the fall has stopped."""
    engine, clock, proc, processes, loop, events = rig
    submit(engine, tasks=1)
    edge = LIMIT + LIMITS.memory_gap
    advance(engine, clock, proc, 0.3, available=edge + 100 * MiB, steps=3)
    waits = []
    for available in (edge + 30 * MiB, edge + 22 * MiB, edge + 22 * MiB, edge + 22 * MiB, edge + 14 * MiB):
        seconds = engine.next_sample_at - clock.now
        clock.now = engine.next_sample_at
        proc.node(cpu=10.0, seconds=seconds, available=available)
        engine.tick()
        waits.append(engine.next_sample_at - engine.last_sample.time)
    assert waits == pytest.approx([SHORTEST_INTERVAL] * len(waits))
    # Once it has held still for a RATE_SPAN, the steady shortest wait (a node may sit there for long).
    for _ in range(round(RATE_SPAN / SHORTEST_INTERVAL) + 2):
        seconds = engine.next_sample_at - clock.now
        clock.now = engine.next_sample_at
        proc.node(cpu=10.0, seconds=seconds, available=edge + 14 * MiB)
        engine.tick()
    assert engine.next_sample_at - engine.last_sample.time == pytest.approx(2 * SHORTEST_INTERVAL)


def test_an_agent_terminate_not_acknowledged_escalates_to_sigterm_then_sigkill(rig):
    """Agent mode: below L the newest worker is asked to stop through the channel; no ack within
    --agent-timeout, and it gets SIGTERM, then SIGKILL after the grace, each at its time."""
    engine, clock, proc, processes, loop, events = rig
    engine.agent = agent = FakeAgent(clock)
    submit(engine, tasks=2, term_mode="agent", pause_mode="agent", agent_timeout=2.0, term_grace=5.0)
    advance(engine, clock, proc, 1.3, steps=7)
    first, second = processes.spawned
    proc.worker(second, rss=3 * GiB, ran_ns=10**9)
    advance(engine, clock, proc, 0.5, available=LIMIT - 500 * MiB)
    assert agent.asked == [(second, "terminate")] and processes.of(second) == []  # asked, not signalled
    asked_at = clock.now
    advance(engine, clock, proc, 1.9, available=LIMIT - 500 * MiB + 3 * GiB, steps=10)
    assert processes.of(second) == []
    advance(engine, clock, proc, 0.2)
    assert processes.of(second) == [signal.SIGTERM, signal.SIGCONT] and clock.now - asked_at >= 2.0
    signalled_at = clock.now
    advance(engine, clock, proc, 5.2, steps=26)
    assert processes.of(second)[2:] == [signal.SIGKILL, signal.SIGCONT] and clock.now - signalled_at >= 5.0
    assert processes.of(first) == []


def test_an_agent_pause_acknowledged_keeps_the_worker_unsignalled_and_a_continue_asks_again(rig):
    engine, clock, proc, processes, loop, events = rig
    engine.agent = agent = FakeAgent(clock)
    submit(engine, tasks=2, pause_mode="agent", agent_timeout=2.0)
    advance(engine, clock, proc, 1.3, steps=7)
    first, second = processes.spawned
    proc.worker(first, rss=50 * MiB, ran_ns=10**9)
    proc.worker(second, rss=50 * MiB, ran_ns=10**9)
    advance(engine, clock, proc, 0.5, cpu=99.0)  # over the CPU limit: one is paused
    (paused,) = [pid for pid, command in agent.asked if command == "pause"]
    agent.ack(engine, paused, "pause")
    proc.worker(paused, rss=50 * MiB, ran_ns=10**9)  # it complies: no CPU since
    advance(engine, clock, proc, 3.0, cpu=99.0, steps=15)
    assert processes.of(paused) == []  # no SIGSTOP: it did stop
    advance(engine, clock, proc, 2.0, cpu=20.0, steps=10)  # calm: it is continued through the channel
    assert (paused, "continue") in agent.asked and processes.of(paused) == []


def test_a_worker_adopted_after_a_restart_is_governed_like_any_other(rig):
    """A restarted pmlmd adopts a worker an earlier one started (not its child), continues it
    (whatever the pmlmd before left it in) and ends it as any other when free memory falls below
    L: SIGTERM, then SIGKILL after the grace."""
    engine, clock, proc, processes, loop, events = rig
    run = submit(engine, tasks=1, term_grace=5.0)
    task = run.batch.queue.popleft()
    pid = 39000
    proc.worker(pid, rss=3 * GiB, ran_ns=10**9)
    processes.pidfds[pid] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    child = procctl.Child(pid=pid, start_ticks=4242, pidfd=processes.pidfds[pid], started=clock.now - 60, adopted=True)
    attempt = run.batch.start_attempt(task, pid, clock.wall() - 60)
    engine.adopt(run, task, attempt, child)
    assert processes.of(pid) == [signal.SIGCONT]
    advance(engine, clock, proc, 0.5, available=LIMIT - 500 * MiB)
    assert processes.of(pid) == [signal.SIGCONT, signal.SIGTERM, signal.SIGCONT] and processes.spawned == []
    advance(engine, clock, proc, 5.2, available=LIMIT - 500 * MiB, steps=26)
    assert processes.of(pid)[3:] == [signal.SIGKILL, signal.SIGCONT]
    processes.exit(pid, sig=signal.SIGKILL)
    loop.poll(0)
    (end,) = [e for e in events if isinstance(e, End)]
    assert end.cause == CAUSE_GOVERNOR_MEMORY


def test_a_freeze_refused_holds_by_signals_and_its_resume_asks_no_thaw(rig):
    engine, clock, proc, processes, loop, events = rig
    engine.scopes.outcomes = [False]  # no scope yet, or no cgroup2 freezer
    run = submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    engine.hold(run)
    assert processes.of(pid) == [signal.SIGSTOP] and not run.frozen and engine.freezer(run) == "running"
    engine.resume(run)
    assert engine.scopes.calls == [("FreezeUnit", "b")] and processes.of(pid) == [signal.SIGSTOP, signal.SIGCONT]


def test_a_freeze_systemd_did_not_answer_is_thawed_at_the_resume_and_a_failed_thaw_asked_again(rig):
    """No answer in time: the workers are held by signals, but systemd may still freeze the
    scope (here it does). The resume thaws it; the first ThawUnit fails (queued behind the
    FreezeUnit on a connection that failed), so it is asked once more."""
    engine, clock, proc, processes, loop, events = rig
    engine.scopes.outcomes = [None, None, True]
    run = submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    engine.hold(run)
    assert processes.of(pid) == [signal.SIGSTOP] and engine.scopes.frozen == {"b"}
    answered = []
    engine.resume(run, lambda: answered.append("resumed"))
    assert engine.scopes.calls == [("FreezeUnit", "b"), ("ThawUnit", "b"), ("ThawUnit", "b")]
    assert engine.scopes.frozen == set() and answered == ["resumed"] and engine.freezer(run) == "running"


def test_a_late_answer_to_an_earlier_pause_is_not_taken_for_a_later_one(rig):
    """pause, resume, pause again, with systemd answering late: the first FreezeUnit is refused
    (no scope yet), and its answer is not taken for the second pause's; the second resume comes
    before the second FreezeUnit is answered, and still thaws what it freezes."""
    engine, clock, proc, processes, loop, events = rig
    engine.scopes.deferred = True
    engine.scopes.outcomes = [False]
    run = submit(engine, tasks=1)
    advance(engine, clock, proc, 0.3, steps=3)
    (pid,) = processes.spawned
    answered = []
    engine.hold(run, lambda: answered.append("held 1"))
    engine.resume(run, lambda: answered.append("resumed 1"))
    engine.hold(run, lambda: answered.append("held 2"))
    assert engine.freezer(run) == "freezing"
    engine.scopes.answer(1)  # the first FreezeUnit, refused
    assert answered == ["held 1"] and processes.of(pid) == []  # stale: not held by signals for the second pause
    engine.resume(run, lambda: answered.append("resumed 2"))
    assert engine.freezer(run) == "thawing"
    engine.scopes.answer()
    assert answered == ["held 1", "resumed 1", "held 2", "resumed 2"]
    assert engine.scopes.calls == [("FreezeUnit", "b"), ("ThawUnit", "b"), ("FreezeUnit", "b"), ("ThawUnit", "b")]
    assert engine.scopes.frozen == set() and engine.freezer(run) == "running" and not run.frozen


@pytest.mark.parametrize("nofile, gated", [
    # Only the soft descriptor limit differs from pmlmd's: pmlmd takes it on for the start.
    (lambda hard: (300, hard), False),
    # The hard one is lower: pmlmd could not raise its own again, the gate sets it as the worker.
    (lambda hard: (300, 300), True),
], ids=["soft", "hard"])
def test_a_worker_starts_without_a_gate_when_pmlmd_can_hand_its_limits_on(tmp_path, nofile, gated):
    limit = nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with rigged(tmp_path, worker_rlimits={resource.RLIMIT_NOFILE: limit}) as (engine, clock, proc, processes, _, _):
        submit(engine, tasks=1)
        advance(engine, clock, proc, 0.3, steps=3)
        ((argv, kw),) = processes.commands
        if gated:
            assert argv[0] == b"/bin/sh" and b"ulimit -S -n 300; ulimit -H -n 300; " in argv[2]
            assert kw["rlimits"] is None
        else:
            assert argv == [b"work"] and kw["stdin_fd"] is None
            assert kw["rlimits"] == {resource.RLIMIT_NOFILE: limit}
