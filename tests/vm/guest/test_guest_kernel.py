"""The VM harness itself: the guest offers what the VM tier is for.

A pure cgroup2 hierarchy whose root offers the memory and cpu controllers; a child cgroup with
the memory controller on has the files pmlmd reads and writes (memory.current, memory.high,
memory.max, memory.events, memory.pressure); the kernel enforces memory.high (throttling, seen
as memory pressure that fires a PSI trigger) and memory.max (the OOM killer). Each test starts
its own small allocator in the cgroup, so none depends on the others.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1 << 20


def events(cgroup: Path) -> dict[str, int]:
    """memory.events as {"low": 0, "high": N, "max": N, "oom": N, "oom_kill": N, ...}."""
    return {k: int(v) for k, v in (line.split() for line in (cgroup / "memory.events").read_text().splitlines())}


def allocate_in(cgroup: Path, mib: int, then_sleep: float = 60.0) -> subprocess.Popen:
    """A process that enters ``cgroup`` before it runs anything, touches ``mib`` MiB, then sleeps.

    perl starts in milliseconds even under emulation; its string repetition writes every page.
    """
    script = f'echo $$ > {cgroup}/cgroup.procs && exec perl -e \'$x = "a" x ({mib} * 1048576); sleep {then_sleep}\''
    return subprocess.Popen(["sh", "-c", script])


def test_pure_cgroup2_with_memory_and_cpu():
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    fstypes = {fields[4]: fields[fields.index("-") + 1] for fields in mounts}
    assert fstypes.get(str(CGROUP_ROOT)) == "cgroup2"
    assert "cgroup" not in fstypes.values(), "a cgroup v1 hierarchy is mounted"
    assert Path("/proc/self/cgroup").read_text() == "0::/\n"  # only the v2 line: in the root cgroup
    controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    assert {"memory", "cpu", "io", "pids"} <= set(controllers), controllers
    assert Path("/proc/pressure/memory").read_text().startswith("some avg10=")


def test_child_cgroup_has_the_memory_files(scratch_cgroup):
    for name in ("memory.current", "memory.high", "memory.max", "memory.events", "memory.pressure",
                 "cpu.max", "cpu.stat", "cpu.pressure"):
        assert (scratch_cgroup / name).exists(), name
    assert (scratch_cgroup / "memory.high").read_text() == "max\n"
    (scratch_cgroup / "memory.high").write_text(str(64 * MIB))
    assert (scratch_cgroup / "memory.high").read_text() == f"{64 * MIB}\n"
    assert int((scratch_cgroup / "memory.current").read_text()) < MIB  # nothing in it yet
    proc = allocate_in(scratch_cgroup, 24)
    try:
        deadline = time.monotonic() + 30
        while int((scratch_cgroup / "memory.current").read_text()) < 24 * MIB:
            assert time.monotonic() < deadline, "memory.current never counted the 24 MiB"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def test_psi_trigger_fires_when_memory_high_throttles(scratch_cgroup):
    # Trigger: 10 ms of "some" stall within a 1 s window (kernel doc: accounting/psi.rst).
    fd = os.open(scratch_cgroup / "memory.pressure", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"some 10000 1000000\0")
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        assert poller.poll(200) == [], "the trigger fired with nothing in the cgroup"
        (scratch_cgroup / "memory.high").write_text(str(16 * MIB))
        # No swap in the guest: the kernel cannot reclaim the allocator's pages and throttles it
        # above memory.high, which is a memory stall.
        proc = allocate_in(scratch_cgroup, 64)
        try:
            fired = poller.poll(30_000)
        finally:
            proc.kill()
            proc.wait()
    finally:
        os.close(fd)
    assert fired and fired[0][1] & select.POLLPRI, f"no PSI event in 30 s; memory.events {events(scratch_cgroup)}"
    assert events(scratch_cgroup)["high"] > 0
    assert "some avg10=" in (scratch_cgroup / "memory.pressure").read_text()


def test_memory_max_ends_in_the_oom_killer(scratch_cgroup):
    (scratch_cgroup / "memory.max").write_text(str(32 * MIB))
    proc = allocate_in(scratch_cgroup, 64, then_sleep=0)
    assert proc.wait(timeout=60) == -9  # SIGKILL from the OOM killer
    counts = events(scratch_cgroup)
    assert counts["oom_kill"] >= 1 and counts["max"] >= 1, counts
