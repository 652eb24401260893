"""The cgroup backend with the kernel's memory controller (runs inside the VM: tests/vm).

The host binds the memory controller to cgroup v1, so memory.current, memory.high, memory.max
and memory.events of a worker cgroup exist only here, on a pure cgroup2 hierarchy. Every worker
and cgroup a test makes is ended with it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))

from support import CgroupScopes, EngineRun, MemorySampler, wait_for  # noqa: E402

from pmlmd.node import cgroup  # noqa: E402
from pmlmd.core.batch import CAUSE_GOVERNOR_MEMORY, SUCCEEDED  # noqa: E402
from pmlmd.core.governor import KILLED, PAUSED, TERMINATING, Limits  # noqa: E402
from pmlmd.node.sampler import ProcReader  # noqa: E402

HELPERS = REPO / "tests" / "helpers"
MIB = 1 << 20


@pytest.fixture
def subtree():
    """A cgroup backend subtree of the test's own, killed and removed at its end."""
    tree = cgroup.choose("cgroup", cgroup.subtree_name("pmlmvm", uuid.uuid4().hex))
    try:
        yield tree
    finally:
        tree.discard()


def available() -> int:
    return ProcReader().meminfo()["MemAvailable"]


def limits_with_headroom(headroom: int, **kw) -> Limits:
    """Limits whose memory limit L lies ``headroom`` bytes below what is free now."""
    total = ProcReader().meminfo()["MemTotal"]
    return Limits(cpu_limit=100, memfree_limit=100.0 * (available() - headroom) / total, **kw)


def read_line(tree: cgroup.Subtree, name: str) -> int | None:
    return cgroup.read_int(os.path.join(tree.root, name))


def test_the_memory_controller_is_enabled_for_the_workers(subtree):
    with EngineRun(["sleep", "30"], 1, cgroups=subtree) as er:
        (w,) = er.workers(1)
        assert er.engine.guards, "the guard was not enabled on a pure cgroup2 hierarchy"
        assert w.cgroup.memory_bytes() is not None
        with open(os.path.join(w.cgroup.path, "memory.oom.group")) as f:
            assert f.read().strip() == "1"  # the OOM killer ends the whole worker
        assert "memory.high guard" in cgroup.containment(subtree)


def test_a_worker_whose_children_share_its_memory_is_counted_once(subtree):
    # 100 MiB, forked to five children that hold it: RSS summed per process says about 600 MiB.
    with EngineRun([sys.executable, str(HELPERS / "forkshare.py"), "20"], 1, cgroups=subtree) as er:
        (w,) = er.workers(1)
        er.until(lambda: len(w.cgroup.pids()) == 6 and (w.cgroup.memory_bytes() or 0) > 100 * MIB,
                 what="the worker and its five children in its cgroup, 100 MiB touched")
        er.engine.last_refresh = float("-inf")  # measure at the next step
        er.engine.next_sample_at = 0.0
        er.until(lambda: w.rss > 90 * MIB, what="the worker measured")
        assert w.rss < 160 * MIB, f"counted {w.rss / MIB:.0f} MiB for a worker that uses about 110 MiB"


def test_the_guard_lines_stand_where_the_limit_and_the_floor_are(subtree):
    limits = limits_with_headroom(600 * MIB, min_free=0)
    with EngineRun(["sleep", "30"], 1, limits=limits, cgroups=subtree) as er:
        er.workers(1)
        er.engine.next_sample_at = 0.0
        er.turn()
        used, free = er.engine.guards[subtree.root].used(), available()
        limit = limits.memory_limit_bytes(ProcReader().meminfo()["MemTotal"])
        high, hard = read_line(subtree, "memory.high"), read_line(subtree, "memory.max")
        assert high is not None and hard is not None, "memory.high and memory.max were left at max"
        # high: what the workers use plus what the node may still give above L (within the quantum
        # the guard rewrites at and what moved between the step and this reading).
        line = used + free - limit
        inside = min(line // cgroup.MemoryGuard.OVERSHOOT, limits.memory_gap // 2)
        assert abs(high - (line - inside)) < 32 * MIB
        assert abs(hard - (used + free)) < 32 * MIB  # the floor is 0 here
    # The engine ended: nothing is left throttled by a line nobody moves.
    assert not os.path.exists(subtree.root) or read_line(subtree, "memory.high") is None


def test_a_worker_the_oom_killer_ended_is_requeued_like_a_memory_termination(subtree):
    marker = Path("/tmp") / f"pmlmvm-{uuid.uuid4().hex}"
    # The first attempt is held to 64 MiB by a memory.max of its own cgroup (standing in for the
    # subtree's floor line, which the node's size would put far away) and grows to 200 MiB: the
    # kernel kills it. The second attempt runs without that line and succeeds.
    script = (f"import os, sys; first = not os.path.exists({str(marker)!r}); open({str(marker)!r}, 'a').close(); "
              "import time; time.sleep(1 if first else 0); "
              "data = [bytearray(20 << 20) for _ in range(10)]; [d.__setitem__(slice(None, None, 4096), b'x' * (len(d) // 4096)) for d in data]")
    try:
        with EngineRun([sys.executable, "-c", script], 1, limits=Limits(cpu_limit=100, memfree_limit=1, min_free=0),
                       cgroups=subtree) as er:
            (w,) = er.workers(1)
            with open(os.path.join(w.cgroup.path, "memory.max"), "w") as f:
                f.write(str(64 * MIB))
            task = er.run.batch.tasks[0]
            er.until(lambda: task.status == SUCCEEDED, what="the task succeeded on its second attempt", timeout=60)
            first = task.attempts[0]
            assert first.cause == CAUSE_GOVERNOR_MEMORY
            assert "OOM killer" in (first.reason or "")
            assert len(task.attempts) == 2
    finally:
        marker.unlink(missing_ok=True)


def test_the_kernel_holds_the_line_while_pmlmd_does_not_look_and_wakes_it(subtree):
    """pmlmd sets the line at one step, then does not look (a loop stalled by anything): a worker
    growing without pause stops at the line, the kernel's memory.events wakes pmlmd, and its next
    step acts on the worker by policy."""
    headroom = 300 * MIB
    limits = limits_with_headroom(headroom, min_free=0)
    limit = limits.memory_limit_bytes(ProcReader().meminfo()["MemTotal"])
    events = os.path.join(subtree.root, "memory.events")
    with EngineRun([sys.executable, str(HELPERS / "hog.py"), "700", "16", "0", "30"], 1, limits=limits,
                   cgroups=subtree) as er:
        (w,) = er.workers(1)  # the step that started it also set the line
        high = read_line(subtree, "memory.high")
        assert high is not None
        with MemorySampler(period=0.001) as sampler:
            wait_for(lambda: cgroup.memory_events(events).get("high", 0) > 0, timeout=60,
                     what="the worker reaching memory.high")
            at_line = w.cgroup.memory_bytes()
            # Throttled, it stands at the line: what it gains in a second past reaching it is what
            # the kernel lets through, a few MiB at most (its allocations sleep).
            time.sleep(1.0)
            later = w.cgroup.memory_bytes()
        print(f"line {high / MIB:.0f} MiB; worker {at_line / MIB:.0f} then {later / MIB:.0f} MiB; "
              f"L={limit / MIB:.0f} MiB, lowest free {sampler.lowest / MIB:.0f} MiB")
        assert later < 650 * MIB, "the worker ran on past the line"
        assert later - high < 16 * MIB
        assert sampler.lowest >= limit, \
            f"free memory fell {(limit - sampler.lowest) / MIB:.0f} MiB below the limit"
        # The change of memory.events is a POLLPRI on pmlmd's descriptor: one loop turn acts on it.
        poller = select.poll()
        poller.register(er.engine.guards[subtree.root].fileno(), select.POLLPRI)
        assert poller.poll(0), "memory.events did not signal its change"
        er.engine.next_sample_at = float("inf")  # no sample is due but the one the event asks for
        before = er.engine.last_sample.time
        er.turn()
        assert er.engine.last_sample.time > before, "the event did not bring a sample"
        # Within the gap, a worker growing at the line is paused once its growth is measured (the
        # refresh runs every FAST_REFRESH there); below the limit it would be terminated.
        er.until(lambda: w.state in (PAUSED, TERMINATING, KILLED) or w.child.pid not in er.engine.workers,
                 what="the governor acting on the worker at the line", timeout=10)


@pytest.mark.parametrize("step_mb", [8, 64])
def test_a_fast_grower_at_default_settings_never_takes_free_memory_below_the_limit(tmp_path, step_mb):
    """pmlmctl run as a user runs it: default interval and gap, L 400 MiB below what is free.
    A worker allocating as fast as it can (64 MiB a step, no pause) or in small steps is
    stopped by the kernel at the line while pmlmd decides."""
    headroom = 400 * MIB
    total = ProcReader().meminfo()["MemTotal"]
    free = available()
    limit = free - headroom
    pct = 100.0 * limit / total
    cmd = [sys.executable, "-m", "pmlmd.client.ctl", "run", "--worker-backend", "cgroup", "--cpu-limit", "100", "--memfree-limit", f"{pct:.3f}",
           "--min-free", "0", "--retries", "0", "--", sys.executable, str(HELPERS / "hog.py"), "1000", str(step_mb),
           "0", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with MemorySampler(period=0.001) as sampler:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    lowest = sampler.lowest
    print(out)
    print(f"L={limit / MIB:.0f} MiB, lowest free {lowest / MIB:.0f} MiB ({(lowest - limit) / MIB:+.1f} MiB from L)")
    assert lowest >= limit, f"free memory fell {(limit - lowest) / MIB:.0f} MiB below the limit"


def test_memory_pressure_on_the_node_wakes_pmlmd_for_a_sample(scratch_cgroup):
    """Any task of the node stalling on memory (here one throttled far past memory.high of a cgroup
    that is not pmlmd's) fires the PSI trigger on /proc/pressure/memory: pmlmd samples at once,
    though no sample was due."""
    with EngineRun(["sleep", "60"], 1) as er:  # the /proc backend: no memory.events of its own
        er.workers(1)
        assert er.engine.pressure is not None, "no PSI trigger on /proc/pressure/memory"
        assert er.engine.pressure.window_us == 500_000  # root with CAP_SYS_RESOURCE: the fast one
        er.engine.next_sample_at = float("inf")
        before = er.engine.last_sample.time
        (scratch_cgroup / "memory.high").write_text(str(16 * MIB))
        # No swap in the guest: the kernel cannot reclaim the allocator's pages and throttles it.
        hog = subprocess.Popen(["sh", "-c", f"echo $$ > {scratch_cgroup}/cgroup.procs && "
                                            "exec perl -e '$x = \"a\" x (64 * 1048576); sleep 60'"])
        try:
            er.until(lambda: er.engine.last_sample.time > before, what="a sample woken by memory pressure")
        finally:
            hog.kill()
            hog.wait()


def test_batch_scopes_each_get_a_guard_and_share_what_the_node_may_still_give():
    # Under systemd each batch's workers are below its scope (cgroup.Scoped); CgroupScopes stands
    # in for systemd (not PID 1 in the VM; the systemd tier tests the real one, without a memory
    # controller). Two batches: two guards, each with half of the room to L above its usage.
    from pmlmd.core.batch import Batch, BatchSpec
    from pmlmd.engine import BatchRun

    mount = cgroup.cgroup2_mount()
    name = f"pmlmvm-{uuid.uuid4().hex[:8]}.slice"
    scopes = CgroupScopes(mount, name)
    tree = cgroup.Scoped(mount, "/" + name)
    # Room for both: a batch with no finished worker is admitted only with twice the gap G to spare.
    limits = limits_with_headroom(1000 * MIB, min_free=0)
    try:
        with EngineRun(["sleep", "30"], 1, limits=limits, cgroups=tree, scopes=scopes, batch_id="a") as er:
            spec = BatchSpec(batch_id="b", command=["sleep", "30"], tasks=[None], limits=limits)
            er.engine.add(BatchRun(batch=Batch(spec, time.time()), limits=limits))
            workers = er.workers(2)
            assert sorted(er.engine.guards) == sorted(os.path.join(scopes.slice, f"pmlm-{b}.scope", "workers")
                                                      for b in "ab")
            for w in workers:
                assert w.cgroup.memory_bytes() is not None  # the controller is on below each scope
            er.engine.next_sample_at = 0.0
            er.turn()
            free = available()
            limit = limits.memory_limit_bytes(ProcReader().meminfo()["MemTotal"])
            for root, guard in er.engine.guards.items():
                used = guard.used()
                high = cgroup.read_int(os.path.join(root, "memory.high"))
                assert high is not None, f"{root}: memory.high was left at max"
                line = used + (free - limit) // 2
                inside = min(line // cgroup.MemoryGuard.OVERSHOOT, limits.memory_gap // 2)
                assert abs(high - (line - inside)) < 32 * MIB, (root, high, line - inside)
            # A batch that ends takes its guard with it; the other keeps its own.
            er.engine.cancel(er.run, "the test ends this batch")
            er.until(lambda: len(er.engine.guards) == 1, what="the ended batch's guard gone")
    finally:
        scopes.discard()
