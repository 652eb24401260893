"""Measuring workers costs what the workers are, not what the node runs.

The engine sums each worker from its own process tree (/proc/PID/task/TID/children), so the
other processes of the node are never read: here 40 unrelated sleepers, started and ended by
the test, are never looked at while two workers with a child each are measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pmlmd.core.batch import Batch, BatchSpec
from pmlmd.engine import BatchRun, Engine
from pmlmd.node.loop import Loop
from pmlmd.core.events import Decision
from pmlmd.core.governor import Limits
from pmlmd.node.sampler import ProcReader

from support import EngineRun, wait_for


class CountingProc(ProcReader):
    """A ProcReader that remembers whose stat and CPU time it read, and whose children."""

    def __init__(self):
        super().__init__()
        self.read: set[int] = set()
        self.listed: set[int] = set()

    def pid_stat(self, pid: int):
        self.read.add(pid)
        return super().pid_stat(pid)

    def thread_runtime(self, pid: int, tid: int):
        self.read.add(pid)
        return super().thread_runtime(pid, tid)

    def thread_schedstat(self, pid: int, fd: int):
        self.read.add(pid)
        return super().thread_schedstat(pid, fd)

    def children(self, pid: int):
        self.listed.add(pid)
        return super().children(pid)


def walk_afresh(engine: Engine) -> dict:
    """What _tree_usage finds walking every tree (as if none had been walked before)."""
    for w in engine.workers.values():
        w.runtimes = {}
    return engine._tree_usage()


def test_a_refresh_reads_the_workers_trees_only():
    proc = CountingProc()
    assert proc.has_children_lists()  # Debian's kernels keep them (CONFIG_PROC_CHILDREN)
    unrelated = [subprocess.Popen(["sleep", "30"]) for _ in range(40)]
    loop = Loop()
    engine = Engine(Limits(), loop, proc=proc)
    # Each worker: a leader with one child, 16 MiB of it in the child.
    # (b"x" * N writes every page: a zeroed buffer could stay unbacked by memory.)
    command = ["sh", "-c", "python3 -c 'b = b\"x\" * (16 << 20); import time; time.sleep(20)' & exec sleep 20"]
    spec = BatchSpec(batch_id="r", command=command, tasks=[None, None], limits=Limits())
    run = engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits))
    try:
        def both_measured():
            loop.poll(0.05)
            engine.tick()
            if len(engine.workers) < 2:
                return False
            proc.read.clear()
            usage = walk_afresh(engine)
            return len(usage) == 2 and all(u.processes == 2 for u in usage.values())

        wait_for(both_measured, timeout=30, what="two workers of two processes each")
        assert not proc.read & {p.pid for p in unrelated}  # never read
        assert proc.read <= {pid for u in walk_afresh(engine).values() for pid in u.pids}

        def children_counted():  # once the children have filled their 16 MiB, it is their workers'
            engine._refresh_workers(time.monotonic())
            return all(w.rss >= 16 << 20 for w in engine.workers.values())

        wait_for(children_counted, timeout=30, what="each worker to count its child's memory")
    finally:
        engine.cancel(run, "the test ends")
        engine.abandon()
        loop.close()
        for p in unrelated:
            p.kill()
            p.wait()


def test_an_idle_engine_takes_no_samples_and_sets_no_deadline():
    """With no batch and no process of one there is nothing to govern: the loop may sleep until a
    request comes (the daemon then wakes for housekeeping only, every few seconds)."""
    loop = Loop()
    engine = Engine(Limits(), loop, proc=CountingProc())
    try:
        assert engine.idle() and engine.next_deadline() == float("inf")
        engine.tick()
        assert engine.last_sample is None
        spec = BatchSpec(batch_id="i", command=["true"], tasks=[None], limits=Limits())
        run = engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits))
        assert not engine.idle() and engine.next_deadline() <= time.monotonic()  # a batch: sample at once
        wait_for(lambda: (loop.poll(0.05), engine.tick(), engine.idle())[2], timeout=30, what="the batch to end")
        assert engine.last_sample is not None and engine.next_deadline() == float("inf")
        del run
    finally:
        engine.abandon()
        loop.close()


def test_a_step_stops_starting_workers_when_its_time_is_up_and_the_next_goes_on_at_once(monkeypatch):
    """Admitting many workers is spread over loop turns, so requests are served in between: with no
    time at all per step, each step starts one worker and makes the next step due at once; the
    steps that follow start what the cut one admitted, never more (the ramp keeps its pace)."""
    from pmlmd import engine as engine_module

    monkeypatch.setattr(engine_module, "SPAWN_BUDGET", 0.0)
    loop = Loop()
    events = []
    engine = Engine(Limits(cpu_limit=100, max_workers=8), loop, on_event=events.append)
    spec = BatchSpec(batch_id="b", command=["sleep", "30"], tasks=[None] * 8, limits=engine.limits)
    run = engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits))
    try:
        started_per_step, cuts = [], 0
        while len(engine.workers) < 8:
            before, seen, backlog = len(engine.workers), len(events), dict(engine.spawn_backlog)
            engine.step()
            started_per_step.append(len(engine.workers) - before)
            if backlog and engine.spawn_backlog:  # a follow-up admits no more than the cut step left
                assert engine.spawn_backlog["b"] < backlog["b"], (backlog, engine.spawn_backlog)
            cut = [e for e in events[seen:] if isinstance(e, Decision) and e.decision == "spawn"
                   and "more at the next" in e.reason]
            if cut:  # admitted more than it started: the next step is due at once
                cuts += 1
                assert cut[0].count == 1 and engine.next_sample_at == engine.last_sample.time
            assert len(started_per_step) < 100, started_per_step
        assert set(started_per_step) <= {0, 1} and sum(started_per_step) == 8
        assert cuts  # the ramp admitted 2, 4, ... at once: each time only one started per step
    finally:
        engine.cancel(run, "the test ends")
        engine.abandon()
        loop.close()


def test_workers_in_a_scope_that_used_no_cpu_are_not_read_again():
    """proc backend under systemd: each batch's workers live in its scope, whose cpu.stat says
    whether anything in it ran since the last refresh; if nothing did, no tree is walked. Here a
    cgroup the test makes on this host's cgroup2 hierarchy stands in for the scope."""
    import os

    import pytest

    from pmlmd.node import cgroup

    try:
        scope = cgroup.choose("cgroup", cgroup.subtree_name("pmlmt-scope", str(os.getpid())))
    except cgroup.Unusable as e:
        pytest.skip(f"no cgroup2 hierarchy pmlmd may write here: {e}")
    proc = CountingProc()
    try:
        with EngineRun(["sleep", "30"], 1, Limits(), proc=proc) as er:  # no cgroups: the proc backend
            (w,) = er.workers(1)
            # Asleep first: what its exec and loader still ran after the move would count in the scope.
            wait_for(lambda: _asleep(w.child.pid), timeout=10, what="the worker's sleep(1) asleep")
            with open(os.path.join(scope.root, "cgroup.procs"), "w") as f:
                f.write(str(w.child.pid))  # as systemd's StartTransientUnit would place it
            er.engine._refresh_workers(time.monotonic())  # first look: read, and the scope noted
            assert w.scope_stat == os.path.join(scope.root, "cpu.stat")
            proc.read.clear()
            er.engine._refresh_workers(time.monotonic())
            assert proc.read == set() and w.cpu == 0.0  # the scope used no CPU: nothing read
            # Anything that runs in the scope (a short process the test puts there) makes it read again.
            burner = subprocess.Popen(["sh", "-c", f"echo $$ > {scope.root}/cgroup.procs; i=0; "
                                       "while [ $i -lt 20000 ]; do i=$((i+1)); done"])
            burner.wait(timeout=30)
            proc.read.clear()
            er.engine._refresh_workers(time.monotonic())
            assert w.child.pid in proc.read
    finally:
        scope.discard()


def test_a_tree_that_did_not_run_is_not_walked_and_a_fork_is_seen_at_once(tmp_path):
    """proc backend: a refresh reads the CPU time (/proc/PID/schedstat, exact to the nanosecond)
    of each process of a worker's tree; when none moved, no children list and no stat is read.
    A fork moves the parent's time, so the new child is found at the next refresh."""
    import os

    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    proc = CountingProc()
    with EngineRun(["sh", "-c", f"read _ < {fifo}; sleep 30 & wait"], 1, Limits(), proc=proc) as er:
        (w,) = er.workers(1)
        engine = er.engine
        er.until(lambda: w.measured_at is not None and engine._refresh_workers(time.monotonic()) is None
                 and w.cpu == 0.0, what="the worker measured standing still")
        proc.read.clear()
        proc.listed.clear()
        engine._refresh_workers(time.monotonic())
        assert proc.listed == set() and proc.read == {w.child.pid}  # its CPU time, nothing else
        with open(fifo, "w") as f:
            f.write("go\n")
        er.until(lambda: len(w.runtimes) == 2 or engine._refresh_workers(time.monotonic()) is not None,
                 what="the forked sleep found")
        assert w.child.pid in proc.listed


def test_a_fork_from_a_thread_of_a_process_whose_main_thread_sleeps_is_found(tmp_path):
    """proc backend: /proc/PID/schedstat is the main thread's alone. A worker whose main thread
    waits while another thread forks (a thread pool, a JVM, a Go program) must still be walked
    again: each thread's time is read (/proc/PID/task/TID/schedstat)."""
    import os
    import sys

    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    script = ("import subprocess, sys, threading\n"
              "def work():\n"
              f"    open({fifo!r}).read()\n"
              "    subprocess.Popen(['sleep', '30']).wait()\n"
              "t = threading.Thread(target=work)\n"
              "t.start()\n"
              "t.join()\n")
    proc = CountingProc()
    with EngineRun([sys.executable, "-c", script], 1, Limits(), proc=proc) as er:
        (w,) = er.workers(1)
        engine = er.engine
        er.until(lambda: w.measured_at is not None and engine._refresh_workers(time.monotonic()) is None
                 and len(w.runtimes.get(w.child.pid, {})) == 2, what="the worker and its thread measured")
        with open(fifo, "w") as f:
            f.write("go\n")
        er.until(lambda: len(w.runtimes) == 2 or engine._refresh_workers(time.monotonic()) is not None,
                 what="the sleep forked by the second thread found")
        (child,) = [pid for pid in w.runtimes if pid != w.child.pid]
        assert open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")[0] == b"sleep"


def test_thread_clocks_keep_a_descriptor_per_thread_and_drop_it_once_the_thread_is_gone():
    from pmlmd.node.sampler import ThreadClocks

    clocks = ThreadClocks(ProcReader(), limit=8)
    child = subprocess.Popen(["sleep", "30"])
    try:
        first = clocks.runtime(child.pid, child.pid)
        assert first is not None and list(clocks.fds) == [(child.pid, child.pid)]
        fd = clocks.fds[(child.pid, child.pid)]
        assert clocks.runtime(child.pid, child.pid) == first  # read again through the same descriptor
        assert clocks.fds[(child.pid, child.pid)] == fd
    finally:
        child.kill()
        child.wait()
    # Reaped: its pid may be anyone's now, but the descriptor stays the old thread's and reads fail.
    assert clocks.runtime(child.pid, child.pid) is None
    assert clocks.fds == {}
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_engine_closes_the_clock_descriptors_of_workers_that_ended():
    with EngineRun(["sleep", "30"], 2) as er:
        workers = er.workers(2)
        er.until(lambda: all(w.runtimes for w in workers), what="both workers walked")
        pids = {w.child.pid for w in workers}
        er.engine.last_refresh = float("-inf")
        er.until(lambda: {pid for pid, _ in er.engine.clocks.fds} == pids, what="their threads' descriptors kept")
        for w in workers:
            os.kill(w.child.pid, signal.SIGKILL)
        er.until(lambda: not er.engine.workers, what="both workers reaped")
        assert er.engine.clocks.fds == {}


def _asleep(pid: int) -> bool:
    """The process runs sleep(1) and sleeps (nothing signals the end of an exec: looked at in /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return state == b"S" and f.read().split(b"\0")[0].endswith(b"sleep")
