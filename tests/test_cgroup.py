"""The cgroup backend: each worker in a cgroup v2 of its own (pmlmd/node/cgroup.py).

Against the real cgroup2 hierarchy of this host (on the hybrid test machines the unified
hierarchy at /sys/fs/cgroup/unified, which has no controllers: membership, the freezer,
cgroup.kill and cpu.stat need none). Where pmlmd could not own a subtree here the tests skip,
saying why. Every process a test starts is in a cgroup the test made, and is killed with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

from pmlmd.node import cgroup
from pmlmd.core.governor import Limits
from pmlmd.node.scopes import OffLoop
from support import CgroupScopes, EngineRun, group_states, process_state, wait_for

PY = sys.executable
# A worker that leaves its process group and session, twice over, then reports every pid it made.
ESCAPES = ('setsid sh -c "sleep 60 & echo \\$! >> $1; exec sleep 60" </dev/null >/dev/null 2>&1 & '
           'echo $! >> "$1"; (setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $! >> "$1"); exec sleep 60')


@pytest.fixture
def subtree():
    try:
        tree = cgroup.choose("cgroup", cgroup.subtree_name("pmlmt", f"{os.getpid()}-{id(object())}"))
    except cgroup.Unusable as e:
        pytest.skip(f"no cgroup backend here: {e}")
    yield tree
    tree.discard()
    assert not os.path.exists(tree.root)


def start(tree: cgroup.Subtree, name: str, *argv: str) -> tuple[cgroup.Worker, subprocess.Popen]:
    with tree.starting(name) as w:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    return w, proc


def test_a_worker_is_in_its_cgroup_from_its_first_instruction_and_pmlmd_is_not(subtree):
    w, proc = start(subtree, "1.0.1", "/bin/sh", "-c", "grep ^0:: /proc/self/cgroup")
    out, _ = proc.communicate(timeout=30)
    assert out.decode().strip() == f"0::{w.relative}"
    assert cgroup.own_cgroup() != w.relative  # the starter stepped back out
    assert subtree.member_of(os.getpid()) is None


def test_nothing_leaves_the_cgroup_and_kill_ends_it_all(subtree, tmp_path):
    pids_file = tmp_path / "pids"
    w, proc = start(subtree, "1.1.1", "/bin/sh", "-c", ESCAPES, "sh", str(pids_file))
    escaped = wait_for(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 3 and
                       [int(p) for p in pids_file.read_text().split()], what="three escaped pids")
    # Other sessions, other process groups, re-parented: all still the worker's.
    assert {os.getsid(pid) for pid in escaped} - {proc.pid}
    assert set(escaped) <= set(w.pids())
    assert all(subtree.member_of(pid) == "1.1.1" for pid in escaped)
    w.kill()
    proc.wait(timeout=30)
    assert w.wait_empty(10.0)
    assert w.pids() == [] and w.remove()


def test_freezing_stops_every_member_and_thawing_lets_them_go_on(subtree, tmp_path):
    pids_file = tmp_path / "pids"
    w, proc = start(subtree, "1.2.1", "/bin/sh", "-c", ESCAPES, "sh", str(pids_file))
    escaped = wait_for(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 3 and
                       [int(p) for p in pids_file.read_text().split()], what="three escaped pids")
    w.freeze()
    wait_for(lambda: w.events()["frozen"] == 1, what="frozen 1 in cgroup.events")
    assert all(process_state(pid) == "T" for pid in escaped)  # tests' support counts frozen as stopped
    w.thaw()
    wait_for(lambda: w.events()["frozen"] == 0, what="frozen 0 in cgroup.events")
    assert w.signal(signal.SIGTERM) == len(escaped) + 1  # the leader and every escaped process
    proc.wait(timeout=30)
    assert w.wait_empty(10.0)


def test_cpu_time_counts_members_that_have_exited(subtree):
    # A child burns a CPU-second's tenth and exits; the worker then sleeps.
    burn = f"{PY} -c 'import time; t = time.process_time(); exec(\"while time.process_time() - t < 0.1: pass\")'"
    w, proc = start(subtree, "1.3.1", "/bin/sh", "-c", f"{burn}; echo done; exec sleep 60")
    assert proc.stdout.readline() == b"done\n"
    assert w.cpu_usec() >= 100_000  # the exited child's 0.1 s included
    w.kill()
    proc.wait(timeout=30)


def test_the_mount_is_read_from_mountinfo(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /sys rw - sysfs sysfs rw\n"
                         "30 22 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    assert cgroup.cgroup2_mount(str(mountinfo)) == "/sys/fs/cgroup/unified"
    mountinfo.write_text("22 1 0:21 / /sys rw - sysfs sysfs rw\n")
    assert cgroup.cgroup2_mount(str(mountinfo)) is None


def test_pmlmctl_run_refuses_a_cgroup_backend_it_cannot_have_and_names_the_way_out(monkeypatch):
    from pmlmd.client import ctl

    monkeypatch.setattr(cgroup, "cgroup2_mount", lambda mountinfo=None: None)  # as on a cgroup v1-only host
    with pytest.raises(SystemExit) as e:
        ctl.main(["run", "--worker-backend", "cgroup", "-n", "1", "--", "true"])
    assert e.value.code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes cgroups")
def test_a_restarted_daemon_freezes_and_ends_the_workers_the_one_before_started(daemon_factory, subtree, tmp_path):
    subtree.remove()
    config = '[daemon]\nworker_backend = "cgroup"\n[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\n' \
             'min_free = 0\n'
    daemon = daemon_factory(config).start()
    pids_file = tmp_path / "pids"
    batch = daemon.ctl("submit", "--term-grace", "1", "--", "/bin/sh", "-c", ESCAPES, "sh",
                       str(pids_file)).stdout.strip()
    escaped = wait_for(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 3 and
                       [int(p) for p in pids_file.read_text().split()], what="three escaped pids")
    status = daemon.ctl("status").stdout
    assert "workers: a cgroup each, cgroup v2 (" in status, status
    # The governor's or a user's pause, then pmlmd stops: nothing may stay frozen while none runs.
    assert daemon.ctl("pause", batch).returncode == 0
    wait_for(lambda: all(process_state(pid) == "T" for pid in escaped), what="the worker's processes frozen")
    assert daemon.stop() == 0
    assert all(process_state(pid) != "T" for pid in escaped)
    daemon.start()
    assert daemon.ctl("pause", batch).returncode == 0
    wait_for(lambda: all(process_state(pid) == "T" for pid in escaped), what="frozen again by the new pmlmd")
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["state"] == "cancelled",
             what="the batch cancelled")
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in escaped), what="every process ended")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes cgroups")
def test_release_workers_thaws_what_a_killed_daemon_left_frozen(daemon_factory, subtree, tmp_path):
    subtree.remove()
    daemon = daemon_factory('[daemon]\nworker_backend = "cgroup"\n').start()
    batch = daemon.ctl("submit", "--", "sleep", "60").stdout.strip()
    wait_for(lambda: len(daemon.worker_pids()) == 1, what="the worker recorded")
    (pid, _), = daemon.worker_pids()
    assert daemon.ctl("pause", batch).returncode == 0
    wait_for(lambda: group_states(pid) == "T", what="the worker frozen")
    daemon.stop(signal.SIGKILL)  # a crash: nobody thawed it
    assert group_states(pid) == "T"
    result = subprocess.run([PY, "-m", "pmlmd", "--release-workers", "--config", str(daemon.config_path),
                             "--state-dir", daemon.state_dir, "--log-target", "console"],
                            capture_output=True, text=True, timeout=30, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    assert group_states(pid) == "S"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes cgroups")
def test_a_run_removes_what_a_killed_run_left_in_the_cgroup_tree(pmlm, subtree):
    subtree.remove()
    killed = pmlm("--worker-backend", "cgroup", "--", "sleep", "60")
    (start,) = wait_for(lambda: killed.started_workers(), what="the worker started")
    left = cgroup.existing(cgroup.subtree_name("pmlmctl", str(killed.proc.pid)))
    assert left is not None and [w.pids() for w in left.workers()] == [[start["pid"]]]
    killed.proc.kill()  # SIGKILL: pmlmctl cannot clean up; its worker runs on, unsupervised
    killed.proc.wait()
    os.kill(start["pid"], signal.SIGKILL)
    wait_for(lambda: all(w.events()["populated"] == 0 for w in left.workers()), what="the worker gone")
    assert os.path.isdir(left.root)
    after = pmlm("--worker-backend", "cgroup", "--", "true")
    assert after.wait(timeout=60) == 0, after.stderr
    assert not os.path.exists(left.root)


def test_idle_workers_cgroups_are_not_read_and_a_busy_one_is(subtree):
    """A refresh reads the subtree's cpu.stat; only when it moved, each worker's, and only a worker
    that used CPU has its members read. Idle workers keep what they last measured, CPU 0."""
    import time

    from pmlmd.core.governor import Limits
    from pmlmd.node.sampler import CLOCK_TICKS
    from test_refresh import CountingProc

    proc = CountingProc()
    # Task 0 sleeps; task 1 waits for a line on a FIFO, then burns a CPU for a moment and sleeps.
    fifo = os.path.join(tempfile.mkdtemp(prefix="pmlmt-"), "go")
    os.mkfifo(fifo)
    burn = f"{PY} -c 'import time; t = time.process_time(); exec(\"while time.process_time() - t < 0.2: pass\")'"
    command = ["sh", "-c", f'if [ "$PMLM_TASK_INDEX" = 1 ]; then read _ < {fifo}; {burn}; fi; exec sleep 30']
    try:
        with EngineRun(command, 2, Limits(), proc=proc, cgroups=subtree) as er:
            engine = er.engine
            er.until(lambda: len(engine.workers) == 2 and all(w.measured_at is not None
                                                              for w in engine.workers.values()),
                     what="two workers measured")
            engine._refresh_workers(time.monotonic())  # both idle now: what they started with is counted
            sleeper, waiter = er.workers(2)
            before = {w.task.index: (w.rss, w.ticks) for w in engine.workers.values()}
            proc.read.clear()
            engine._refresh_workers(time.monotonic())
            assert proc.read == set()  # nothing moved in the subtree: no worker was read
            assert {w.task.index: (w.rss, w.ticks) for w in engine.workers.values()} == before
            assert sleeper.cpu == 0.0 and waiter.cpu == 0.0
            with open(fifo, "w") as f:
                f.write("go\n")
            wait_for(lambda: waiter.cgroup.cpu_usec() * CLOCK_TICKS / 1e6 >= before[1][1] + 0.2 * CLOCK_TICKS,
                     what="the burn")
            proc.read.clear()
            engine._refresh_workers(time.monotonic())
            assert set(waiter.cgroup.pids()) <= proc.read and not set(sleeper.cgroup.pids()) & proc.read
            assert waiter.cpu > 0 and sleeper.cpu == 0.0
    finally:
        os.unlink(fifo)
        os.rmdir(os.path.dirname(fifo))


def test_a_worker_whose_cgroup_cannot_be_made_runs_outside_and_is_still_ended(subtree, caplog):
    with open(os.path.join(subtree.root, "cgroup.max.descendants"), "w") as f:
        f.write("1")  # room for one worker's cgroup: the second mkdir fails (EAGAIN)
    with EngineRun(["sleep", "30"], 2, cgroups=subtree) as er:
        inside, outside = sorted(er.workers(2), key=lambda w: w.cgroup is None)
        assert inside.cgroup is not None and inside.cgroup.pids() == [inside.child.pid]
        assert outside.cgroup is None and subtree.member_of(outside.child.pid) is None
        assert "it runs outside, followed through its process group" in caplog.text
        er.engine.cancel(er.run, "the test ends")
        er.until(lambda: not er.engine.workers, what="both workers ended by the cancel")
        assert [t.status for t in er.run.batch.tasks] == ["cancelled", "cancelled"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes cgroups")
def test_what_an_ended_worker_left_when_pmlmd_stopped_is_ended_by_the_next(daemon_factory, subtree, tmp_path):
    subtree.remove()
    daemon = daemon_factory('[daemon]\nworker_backend = "cgroup"\n').start()
    pidfile = tmp_path / "pid"
    # The worker leaves a sleep that ignores SIGTERM behind and ends; pmlmd stops within the grace.
    batch = daemon.ctl("submit", "--term-grace", "60", "--shell", "--",
                       f"trap '' TERM; sleep 300 & echo $! > {pidfile}; exit 0").stdout.strip()
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the leftover's pid"))
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["ended"] is not None,
             what="the batch ended")
    assert daemon.stop() == 0
    assert os.path.exists(f"/proc/{pid}")  # left running: nobody supervises it now
    daemon.start()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or process_state(pid) == "Z", timeout=15,
             what="the leftover ended (SIGKILL after the grace: it ignores SIGTERM)")
    assert "ending 1 processes that ended workers left in their cgroups" in daemon.logs()


def test_a_worker_never_joins_a_cgroup_that_holds_leftovers_and_the_leftovers_alone_are_ended(subtree):
    """An attempt the state lost starts again under the same id: what its first worker left in
    that cgroup is ended as leftovers (end_leftovers), and the new worker gets a cgroup of its own."""
    old, leftover = start(subtree, "x.0.1", "sleep", "60")  # what the lost attempt left
    with EngineRun(["sleep", "60"], 1, batch_id="x", cgroups=subtree) as er:
        (w,) = er.workers(1)
        assert w.cgroup.path == old.path + "~1" and subtree.member_of(w.child.pid) == "x.0.1"
        er.engine.end_leftovers()
        assert leftover.wait(timeout=10) == -signal.SIGTERM
        er.until(lambda: not os.path.exists(old.path), what="its cgroup gone")
        assert os.path.exists(f"/proc/{w.child.pid}") and w.cgroup.pids() == [w.child.pid]


def test_pmlmd_version_says_where_workers_would_run_and_makes_nothing(subtree):
    # The fixture shows this process may own a subtree; --version must say so without making one.
    parent = os.path.dirname(subtree.root)
    before = set(os.listdir(parent))
    result = subprocess.run([PY, "-m", "pmlmd", "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    version, workers = result.stdout.splitlines()
    assert version.startswith("pmlmd ")
    assert workers.startswith(f"workers: a cgroup each, cgroup v2 (below {os.path.normpath(parent)};"), workers
    with open(os.path.join(parent, "cgroup.controllers")) as f:
        memory = "memory" in f.read().split()
    assert ("memory.high guard" in workers) == memory, workers
    assert set(os.listdir(parent)) == before


def test_without_the_memory_controller_the_backend_runs_without_a_guard(subtree):
    with open(os.path.join(os.path.dirname(subtree.root), "cgroup.controllers")) as f:
        if "memory" in f.read().split():
            pytest.skip("the memory controller is on this cgroup2 hierarchy (the VM tier tests the guard)")
    with EngineRun(["sleep", "30"], 1, cgroups=subtree) as er:
        (w,) = er.workers(1)
        assert not er.engine.guards and not subtree.memory
        er.until(lambda: w.rss > 0, what="the worker measured from its processes")


def test_the_memory_guard_places_its_lines_from_usage_free_memory_limit_and_floor(tmp_path):
    # The memory controller is not on this host's cgroup2 hierarchy: a plain directory stands in for
    # the subtree's memory files here (the VM tier, tests/vm, runs the guard on the kernel's).
    (tmp_path / "memory.events").write_text("high 0\nmax 0\noom 0\noom_kill 0\n")
    (tmp_path / "memory.current").write_text(f"{100 << 20}\n")
    guard = cgroup.MemoryGuard(cgroup.Subtree(str(tmp_path), str(tmp_path.parent)))

    def lines():
        return int((tmp_path / "memory.high").read_text()), int((tmp_path / "memory.max").read_text())

    mib = 1 << 20
    # 100 MiB used, 1000 MiB free, L = 600 MiB, G = 200 MiB, F = 300 MiB: 400 MiB more to L, 700
    # to F. The soft line stands 1/16 inside (the kernel lets a fast allocator past it by a few
    # percent), here 31.25 MiB ...
    high = 500 * mib - 500 * mib // 16
    assert guard.update(1000 * mib, 600 * mib, 200 * mib, 300 * mib) == (high, 800 * mib)
    assert lines() == (high, 800 * mib)
    # ... but never more than G/2: with G = 40 MiB, 20 MiB inside.
    assert guard.update(1000 * mib, 600 * mib, 40 * mib, 300 * mib) == (480 * mib, 800 * mib)
    # Two batch scopes share the room (each its own guard): each gets half of the 400 MiB to L and
    # of the 700 MiB to F, so together they stay inside both.
    half = 300 * mib - 300 * mib // 16
    assert guard.update(1000 * mib, 600 * mib, 200 * mib, 300 * mib, share=2) == (half, 450 * mib)
    # Below L: the line is what they use now, never under it (a write under the usage would make
    # pmlmd reclaim, or at memory.max OOM-kill, in its own time).
    assert guard.update(500 * mib, 600 * mib, 200 * mib, 300 * mib) == (100 * mib, 300 * mib)
    assert guard.update(200 * mib, 600 * mib, 200 * mib, 300 * mib) == (100 * mib, 100 * mib)
    assert lines() == (100 * mib, 100 * mib)
    # A move smaller than the quantum is not written.
    (tmp_path / "memory.current").write_text(f"{100 * mib + 512 * 1024}\n")
    assert guard.update(200 * mib, 600 * mib, 200 * mib, 300 * mib) == (100 * mib + 512 * 1024,) * 2
    assert lines() == (100 * mib, 100 * mib)
    assert guard.events() == {"high": 0, "max": 0, "oom": 0, "oom_kill": 0}
    guard.lift()
    assert (tmp_path / "memory.high").read_text() == (tmp_path / "memory.max").read_text() == "max"


def test_the_loop_wakes_on_a_cgroup_file_change(subtree):
    # cgroup.events polls readable always and signals a change as POLLPRI (kernfs): the loop must
    # watch for EPOLLPRI alone.
    from pmlmd.node.loop import Loop
    import select

    w = subtree.worker("watched")
    os.mkdir(w.path)
    fd = os.open(os.path.join(w.path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    loop = Loop()
    woken = []
    loop.watch(fd, lambda: (woken.append(os.pread(fd, 4096, 0)), os.lseek(fd, 0, os.SEEK_SET)), select.EPOLLPRI)
    os.pread(fd, 4096, 0)  # read once: from here on only a change polls as POLLPRI
    try:
        loop.poll(0.05)
        assert woken == [], "woken with no change"
        proc = subprocess.Popen(["sh", "-c", f"echo $$ > {w.path}/cgroup.procs; exec sleep 30"])
        try:
            wait_for(lambda: (loop.poll(0.05), woken)[1], what="the loop woken by 'populated 1'")
            assert b"populated 1" in woken[-1]
        finally:
            proc.kill()
            proc.wait()
    finally:
        loop.unwatch(fd)
        os.close(fd)
        loop.close()


def test_a_worker_that_starts_to_burn_after_standing_still_is_measured_at_its_rate(subtree, tmp_path):
    # Refreshes that find every worker still read one file; the CPU a worker then uses was used
    # after the last of them, and its rate is taken over that span, not since its last reading
    # seconds ago (which read a burner as a quarter of what it used and paused too many).
    go = tmp_path / "go"
    os.mkfifo(go)
    burner = os.path.join(os.path.dirname(__file__), "helpers", "burn.py")
    with EngineRun(["sh", "-c", f'read _ < {go}; exec "$0" "$1" 3 0 20', PY, burner], 1, cgroups=subtree) as er:
        (w,) = er.workers(1)
        er.until(lambda: w.measured_at is not None and er.engine.settled == 1, what="the worker measured standing still")
        measured = w.measured_at
        er.until(lambda: er.engine.still_at >= measured + 2.0, what="two seconds of refreshes finding it still")
        with open(go, "w") as f:
            f.write("go\n")
        er.until(lambda: (w.cpu or 0.0) > 0.0, what="the burner measured")
        one_core = 100.0 / er.engine.node.cpu_count
        assert w.cpu > 0.5 * one_core, f"a burner of one core measured at {w.cpu:.1f} % of the node"


@pytest.fixture
def scoped(subtree):
    """Batch scopes as under systemd (CgroupScopes stands in for systemd, not PID 1 here) and the
    Scoped worker cgroups below them; everything killed and removed at the end."""
    name = f"pmlmt-{os.getpid()}.slice"
    scopes = CgroupScopes(subtree.mount, name)
    try:
        yield cgroup.Scoped(subtree.mount, "/" + name), scopes
    finally:
        scopes.discard()


def pid_alive(pid: int) -> bool:
    try:
        return process_state(pid) != "Z"
    except FileNotFoundError:  # gone, and reaped
        return False


def test_under_scopes_each_worker_has_a_cgroup_below_its_batchs_scope_and_nothing_leaves_it(scoped):
    tree, scopes = scoped
    with EngineRun(["sh", "-c", "setsid sleep 60 </dev/null & exec sleep 60"], 2, cgroups=tree, scopes=scopes) as er:
        workers = er.workers(2)
        scope = os.path.join(scopes.slice, "pmlm-t.scope")
        for w in workers:
            assert w.cgroup is not None and w.cgroup.path == os.path.join(scope, "workers", f"t.{w.task.index}.1")
            wait_for(lambda: len(w.cgroup.pids()) == 2, what="the worker and its setsid sleep in its cgroup")
        with open(os.path.join(scope, "cgroup.procs")) as f:
            assert f.read() == ""  # the first worker, which made the scope, was moved down too
        members = [pid for w in workers for pid in w.cgroup.pids()]
        assert tree.cpu_usec() is not None and tree.tree("t") is not None
        # A restarted pmlmd finds a worker's cgroup (and its batch's subtree) from the pid alone.
        again = cgroup.Scoped(tree.mount, "/" + os.path.basename(scopes.slice))
        found = again.cgroup_of(workers[0].child.pid)
        assert found.path == workers[0].cgroup.path
        assert again.tree("t") is None  # looking registers nothing (an orphan of an ended batch is looked up too)
        assert again.adopt("t", found).root == os.path.join(scope, "workers")
        assert sorted(w.path for w in again.workers()) == sorted(w.cgroup.path for w in workers)
    wait_for(lambda: not any(map(pid_alive, members)), what="every member ended with the batch")


def test_a_batch_whose_scope_went_with_its_last_worker_gets_a_new_one_for_the_next(scoped):
    tree, scopes = scoped
    limits = Limits(cpu_limit=100, max_workers=1)
    with EngineRun(["sh", "-c", "exec sleep 0.2"], 2, limits=limits, cgroups=tree, scopes=scopes) as er:
        (first,) = er.workers(1)
        # Not turning the loop: the first worker ends, and its scope goes with it, as systemd
        # removes a scope whose last process has gone (CgroupScopes.stop stands in for that).
        wait_for(lambda: process_state(first.child.pid) == "Z", what="the first worker ended")
        scopes.stop("t")
        er.until(lambda: any(w is not first for w in er.engine.workers.values()), what="the second worker")
        (second,) = er.engine.workers.values()
        assert second.cgroup is not None and second.cgroup.path.endswith("pmlm-t.scope/workers/t.1.1")
        assert second.cgroup.pids() == [second.child.pid]


class LateScopes(CgroupScopes):
    """CgroupScopes made as SystemdScopes makes its scopes, off the loop (scopes.OffLoop), each
    call held until ``go`` is set: a systemd slow to answer. ``made`` is set once a scope is there."""

    def __init__(self, mount: str, slice_name: str):
        super().__init__(mount, slice_name)
        self.go, self.made = threading.Event(), threading.Event()
        self.off_loop = OffLoop(lambda: None)
        self.fd = self.off_loop.fd

    def deliver(self) -> None:
        self.off_loop.deliver()

    def place_later(self, batch_id, description, pid, attach, done):
        def call(bus):
            path = CgroupScopes.place(self, batch_id, description, pid, attach)
            self.made.set()
            assert self.go.wait(30)
            if not os.path.exists(f"/proc/{pid}") and os.path.isdir(self._path(batch_id)):
                os.rmdir(self._path(batch_id))  # as systemd collects a scope whose only process has gone
            return path

        self.off_loop.submit(call, lambda path, error: done(None if error else path))


@pytest.fixture
def late(subtree):
    name = f"pmlmt-{os.getpid()}.slice"
    scopes = LateScopes(subtree.mount, name)
    try:
        yield cgroup.Scoped(subtree.mount, "/" + name), scopes
    finally:
        scopes.go.set()
        scopes.discard()


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_workers_wait_at_their_gates_while_their_scope_is_made_and_the_loop_goes_on(late):
    tree, scopes = late
    with EngineRun(["sh", "-c", "exec sleep 60"], 2, cgroups=tree, scopes=scopes) as er:
        workers = er.workers(2)  # the loop went on: the second worker was admitted meanwhile
        assert scopes.made.is_set() and not scopes.go.is_set()
        for w in workers:
            assert w.cgroup is None
            # At its gate (once the exec has set its name), not yet the command.
            wait_for(lambda: comm(w.child.pid) != "python3", what="the gate's exec")
            assert comm(w.child.pid) == "sh"
        scopes.go.set()
        er.until(lambda: all(w.cgroup is not None for w in workers), what="both workers placed")
        for w in workers:
            assert w.cgroup.path == os.path.join(scopes.slice, "pmlm-t.scope", "workers", f"t.{w.task.index}.1")
            wait_for(lambda: comm(w.child.pid) == "sleep", what="the gate opened")
            assert w.cgroup.pids() == [w.child.pid]
        assert er.engine.uncontained == 0


def test_a_batch_that_ends_while_its_scope_is_made_leaves_no_subtree(late):
    tree, scopes = late
    with EngineRun(["sh", "-c", "exec sleep 60"], 1, cgroups=tree, scopes=scopes) as er:
        (w,) = er.workers(1)
        assert scopes.made.wait(10)  # the scope is there, its result not handed back yet
        er.engine.cancel(er.run, "the test cancels it")
        er.until(lambda: er.run.id not in er.engine.runs, what="the batch to end")
        scopes.go.set()
        er.until(lambda: not er.engine.placing, what="the late result handed in")
        assert tree.tree("t") is None and not os.path.exists(os.path.join(scopes.slice, "pmlm-t.scope"))


def test_when_the_worker_a_scope_is_made_with_ends_at_its_gate_the_next_one_makes_it(late):
    tree, scopes = late
    with EngineRun(["sh", "-c", "exec sleep 60"], 2, cgroups=tree, scopes=scopes) as er:
        first, second = er.workers(2)
        assert scopes.made.wait(10) and first.cgroup is None
        os.kill(first.child.pid, signal.SIGKILL)  # ended at its gate (as the governor's victim would be)
        er.until(lambda: first.child.pid not in er.engine.workers, what="the first worker reaped")
        scopes.go.set()
        er.until(lambda: second.cgroup is not None, what="the second worker placed")
        assert second.cgroup.path == os.path.join(scopes.slice, "pmlm-t.scope", "workers", "t.1.1")
        assert second.cgroup.pids() == [second.child.pid]
