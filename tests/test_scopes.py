"""Placing workers: the gate that holds a worker until it is inside its batch's scope.

The systemd backend itself needs a real systemd and is tested in tests/systemd; here a
recording backend (a test double for the D-Bus calls, which cannot run on this host)
checks the order the engine keeps: the worker exists, is placed, and only then runs
the user's command.
"""

import os
import select
import threading
import time

import pytest

from pmlmd.core.batch import Batch, BatchSpec
from pmlmd.engine import BatchRun, Engine
from pmlmd.node.loop import Loop
from pmlmd.core.governor import Limits
from pmlmd.daemon.config import Config
from pmlmd.node.scopes import (CgroupLimits, NoScopes, OffLoop, SystemdScopes, batch_of_scope, memory_max, scope_name,
                          tasks_max)


class RecordingScopes(NoScopes):
    name = "recording"
    gated = True

    def __init__(self, marker_dir):
        self.marker_dir = marker_dir
        self.placed = []

    def place(self, batch_id, description, pid, attach=True):
        # At this moment the worker must exist but must not have run the command yet.
        started_early = os.listdir(self.marker_dir)
        # posix_spawn returns once the exec is past its point of no return, a moment before the
        # kernel has set up the new argv (an exec sends no event): read it once it is there.
        for _ in range(1000):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            if cmdline[0]:
                break
            time.sleep(0.001)
        self.placed.append((batch_id, description, pid, started_early, cmdline[:1]))
        return True


def test_scope_names_round_trip():
    assert scope_name("42") == "pmlm-42.scope"
    assert batch_of_scope("pmlm-42.scope") == "42"
    assert batch_of_scope("ssh.service") is None


def fake_node(tmp_path, threads_max="192729", pid_max="4194304", mem_total_kb=24683652, cgroup_files=None):
    """A fake /proc/sys/kernel, /proc/meminfo and root cgroup; the numbers are the systemd tier's container."""
    kernel, cgroup = tmp_path / "kernel", tmp_path / "cgroup"
    kernel.mkdir(parents=True)
    cgroup.mkdir()
    (kernel / "threads-max").write_text(threads_max + "\n")
    (kernel / "pid_max").write_text(pid_max + "\n")
    (tmp_path / "meminfo").write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        1000 kB\n")
    for name, text in (cgroup_files or {}).items():
        (cgroup / name).write_text(text)
    return str(kernel), str(tmp_path / "meminfo"), str(cgroup)


def test_numbers_and_infinity_go_on_the_bus_as_they_are(tmp_path):
    kernel, meminfo, cgroup = fake_node(tmp_path)
    assert tasks_max(4096, kernel, cgroup) == 4096
    assert memory_max(4 << 30, meminfo, cgroup) == 4 << 30
    # "infinity" is sent, not left out: a scope without TasksMax gets systemd's DefaultTasksMax.
    assert tasks_max("infinity", kernel, cgroup) == memory_max("infinity", meminfo, cgroup) == 2**64 - 1


def test_percentages_come_to_what_systemd_makes_of_them(tmp_path):
    # In the systemd tier's container (threads-max 192729, pid_max 4194304, MemTotal 24683652 kB)
    # systemd showed these TasksMax and MemoryMax for units given the same percentages.
    kernel, meminfo, cgroup = fake_node(tmp_path)
    for percent, tasks, memory in (("25%", 48182, 6319013888), ("50%", 96364, 12638027776),
                                   ("90%", 173456, 22748450816), ("12.5%", 24091, 3159506944),
                                   ("33.33%", 64236, 8424509440)):
        assert tasks_max(percent, kernel, cgroup) == tasks
        assert memory_max(percent, meminfo, cgroup) == memory
    assert memory_max("100%", meminfo, cgroup) == 24683652 * 1024


def test_percentages_follow_the_smallest_ceiling(tmp_path):
    # pid 0 is no pid: pid_max 32768 allows 32767 tasks; a container's root cgroup may allow fewer.
    kernel, meminfo, cgroup = fake_node(tmp_path, pid_max="32768")
    assert tasks_max("100%", kernel, cgroup) == 32767
    kernel, meminfo, cgroup = fake_node(tmp_path / "c", cgroup_files={"pids.max": "10000\n",
                                                                     "memory.max": f"{1 << 30}\n"})
    assert tasks_max("50%", kernel, cgroup) == 5000
    assert memory_max("50%", meminfo, cgroup) == 1 << 29
    kernel, meminfo, cgroup = fake_node(tmp_path / "d", cgroup_files={"pids.max": "max\n", "memory.max": "max\n"})
    assert tasks_max("100%", kernel, cgroup) == 192729


def test_the_configured_backstops_reach_scopes_and_the_slice():
    limits = CgroupLimits.of(Config())
    assert limits == CgroupLimits("50%", "90%", "25%", "infinity")
    assert [name for name, _ in limits.scope_properties()] == ["TasksMax", "MemoryMax"]
    backend = SystemdScopes(connection=object(), limits=limits)
    calls = []
    backend._call = lambda *args: calls.append(args)
    backend.limit_slice()
    # Runtime (True): set again from pmlmd.toml at every start, nothing written to /etc.
    assert calls == [("SetUnitProperties", "sba(sv)", ("pmlm.slice", True, limits.slice_properties()))]
    assert [name for name, _ in calls[0][2][2]] == ["TasksMax", "MemoryMax"]


def test_without_limits_the_slice_is_left_alone():
    backend = SystemdScopes(connection=object())  # --release-workers: it only thaws and continues
    backend._call = lambda *args: pytest.fail(f"unexpected call {args}")
    backend.limit_slice()


def test_a_gated_worker_runs_its_command_only_after_it_was_placed(tmp_path):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    scopes = RecordingScopes(str(marker_dir))
    loop = Loop()
    engine = Engine(Limits(), loop, scopes=scopes)
    # $$ is the worker's pid: the gate execs the command in its own place.
    spec = BatchSpec(batch_id="7", command=["/bin/sh", "-c", f"touch {marker_dir}/$$"],
                     tasks=[None, None], limits=Limits())
    engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits, description="pmlmd batch 7 of root"))
    try:
        deadline = time.monotonic() + 30
        while engine.busy() and time.monotonic() < deadline:
            loop.poll(engine.next_deadline() - time.monotonic())
            engine.tick()
    finally:
        engine.abandon()
        loop.close()
    placed_pids = [pid for _, _, pid, _, _ in scopes.placed]
    assert sorted(os.listdir(marker_dir)) == sorted(str(pid) for pid in placed_pids)  # each ran, once placed
    for batch_id, description, pid, early, argv0 in scopes.placed:
        assert (batch_id, description, argv0) == ("7", "pmlmd batch 7 of root", [b"/bin/sh"])
        assert str(pid) not in early  # it had not run the command when it was placed


def test_the_freezer_state_in_status_is_told_from_memory_without_asking_systemd():
    # A bus that fails any call: status must not make one (the enforcing loop never waits on D-Bus).
    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"status asked systemd ({name})")

    backend = SystemdScopes(connection=NoCalls())
    assert backend.freezer_state("7", "running") is None  # no scope (yet)
    backend.started.add("7")
    assert backend.freezer_state("7", "running") == "running"
    assert backend.freezer_state("7", "frozen") == "frozen"
    assert NoScopes().freezer_state("7", "frozen") is None


class Connection:
    """Stands in for a jeepney connection to the system bus (no systemd here): who opened it."""

    def __init__(self):
        self.thread = threading.current_thread()
        self.closed = False

    def close(self):
        self.closed = True


def delivered(off_loop: OffLoop, count: int) -> list:
    """Turn a loop on the OffLoop's eventfd until ``count`` results were handed back."""
    out = []
    with select.epoll() as ep:
        ep.register(off_loop.fd, select.EPOLLIN)
        while len(out) < count:
            assert ep.poll(10), "no result handed back"
            off_loop.deliver()
            out += [r for r in results if r not in out]
    return out


results: list = []


def test_calls_off_the_loop_run_in_order_on_a_connection_the_loop_opened():
    results.clear()
    connections = []
    off_loop = OffLoop(lambda: connections.append(Connection()) or connections[-1])
    release = threading.Event()
    off_loop.submit(lambda bus: (release.wait(10), (bus, threading.current_thread()))[1],
                    lambda value, error: results.append(("first", value, error)))
    off_loop.submit(lambda bus: 2, lambda value, error: results.append(("second", value, error)))
    off_loop.deliver()
    assert results == []  # the first call is still being made: nothing is waited for here
    release.set()
    first, second = delivered(off_loop, 2)
    (bus, thread), error = first[1], first[2]
    assert first[0] == "first" and error is None and second == ("second", 2, None)
    # Opened by the submitting thread (the loop's), used by the other one.
    assert bus is connections[0] and bus.thread is threading.current_thread() and thread is not bus.thread


def test_a_failed_connection_is_replaced_and_a_failing_done_strands_nothing():
    results.clear()
    connections = []
    off_loop = OffLoop(lambda: connections.append(Connection()) or connections[-1])

    def broken(bus):
        raise TimeoutError("systemd did not answer")

    def done_that_raises(value, error):
        results.append(("raised", error))
        raise RuntimeError("a callback fails")

    off_loop.submit(broken, done_that_raises)
    off_loop.drain(10)
    with pytest.raises(RuntimeError):
        off_loop.deliver()
    assert connections[0].closed and isinstance(results[0][1], TimeoutError)
    off_loop.submit(lambda bus: bus, lambda value, error: results.append(("again", value, error)))
    assert delivered(off_loop, 2)[1] == ("again", connections[1], None)  # a new connection


def test_settling_makes_the_calls_that_results_ask_for_too():
    results.clear()
    off_loop = OffLoop(Connection)

    def first_done(value, error):  # as a scope made again with the next worker asks for another call
        results.append(("first", value))
        off_loop.submit(lambda bus: 2, lambda value, error: results.append(("second", value)))

    off_loop.submit(lambda bus: 1, first_done)
    off_loop.settle(10)
    assert results == [("first", 1), ("second", 2)] and off_loop.pending == 0
