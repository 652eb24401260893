"""Processes that leave their worker's process group or session still belong to the worker.

A worker that starts `setsid sleep 50 &` (a double-forking daemon does the same) puts that
process outside the group pmlmd signals. Under both worker backends such a process is paused,
continued and ended with its worker, on a normal end, on Ctrl-C and on cancel:

- cgroup: each worker is in a cgroup v2 of its own, which the process cannot leave; it is
  frozen, thawed and killed with the cgroup (this host's unified hierarchy has no
  controllers, which none of that needs);
- proc: pmlmctl run and pmlmd are child subreapers and walk their workers' process trees.

Every process a test starts is ended by the test: the escaped ones are found by the pid they
wrote to a file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pmlmd.node import cgroup
from support import wait_for

# Starts an escaped sleeper, writes its pid to $1, then (with $2) stays alive that many seconds.
ESCAPE = 'setsid sleep 50 </dev/null >/dev/null 2>&1 & echo $! > "$1"; [ -n "$2" ] && exec sleep "$2"; exit 0'


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def stopped(pid: int) -> bool:
    """Stopped by a signal (state T), or frozen with its cgroup (cgroup.events "frozen 1")."""
    if state(pid) == "T":
        return True
    relative = cgroup.own_cgroup(str(pid))
    mount = cgroup.cgroup2_mount()
    if not relative or relative == "/" or mount is None:
        return False
    with open(os.path.join(mount, relative.lstrip("/"), "cgroup.events")) as f:
        return "frozen 1" in f.read().splitlines()


@pytest.fixture(params=["cgroup", "proc"])
def backend(request) -> str:
    """The worker backend under test; "cgroup" where this host gives pmlmctl a cgroup2 subtree."""
    if request.param == "cgroup":
        try:
            subtree = cgroup.choose("cgroup", cgroup.subtree_name("pmlmt", str(os.getpid())))
        except cgroup.Unusable as e:
            pytest.skip(f"no cgroup backend here: {e}")
        subtree.remove()
    return request.param


def daemon_config(backend: str) -> str:
    return (f'[daemon]\nworker_backend = "{backend}"\n'
            "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n")


@pytest.fixture
def escaped_pids():
    """Pid files the escaped sleepers write; whatever is still alive at the end is killed."""
    files: list[Path] = []
    yield files
    for path in files:
        if path.exists() and path.read_text().strip():
            pid = int(path.read_text())
            if alive(pid) and "sleep" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)


def escaped_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), what=f"a pid in {path}"))


def test_run_ends_an_escaped_process_when_its_worker_ends(pmlm, tmp_path, escaped_pids, backend):
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    run = pmlm("--worker-backend", backend, "--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile))
    assert run.wait(timeout=60) == 0, run.stderr
    assert not alive(escaped_pid(pidfile))
    (task,) = run.report()["tasks"]
    reason = task["attempts"][0]["reason"]
    assert "left 1 processes" in reason and "behind" in reason and reason.endswith("ended with it")


def test_run_ends_an_escaped_process_on_ctrl_c(pmlm, tmp_path, escaped_pids, backend):
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    run = pmlm("--worker-backend", backend, "--term-grace", "2", "--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile), "60")
    pid = escaped_pid(pidfile)
    wait_for(lambda: run.started_workers(), what="the worker started")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) != 0
    assert not alive(pid)


def test_daemon_ends_escaped_processes_on_a_normal_end_and_on_cancel(daemon_factory, tmp_path, escaped_pids,
                                                                     backend):
    daemon = daemon_factory(daemon_config(backend)).start()
    ended, cancelled = tmp_path / "ended", tmp_path / "cancelled"
    escaped_pids += [ended, cancelled]
    result = daemon.ctl("submit", "--wait", "--", "/bin/sh", "-c", ESCAPE, "sh", str(ended))
    assert result.returncode == 0, result.stderr
    assert not alive(escaped_pid(ended))

    batch = daemon.ctl("submit", "--term-grace", "2", "--", "/bin/sh", "-c", ESCAPE, "sh", str(cancelled),
                       "60").stdout.strip()
    pid = escaped_pid(cancelled)
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["state"] == "cancelled",
             what="the batch to end")
    wait_for(lambda: not alive(pid), timeout=10, what="the escaped process ended")


def test_an_escaped_process_is_paused_and_continued_with_its_worker(daemon_factory, tmp_path, escaped_pids,
                                                                    backend):
    daemon = daemon_factory(daemon_config(backend)).start()
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    batch = daemon.ctl("submit", "--term-grace", "2", "--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile),
                       "60").stdout.strip()
    pid = escaped_pid(pidfile)
    assert daemon.ctl("pause", batch).returncode == 0
    # Found on the daemon's next look at its workers' trees, it is stopped like the rest.
    wait_for(lambda: stopped(pid), timeout=10, what="the escaped process stopped")
    assert daemon.ctl("resume", batch).returncode == 0
    wait_for(lambda: not stopped(pid), timeout=10, what="the escaped process continued")
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: not alive(pid), timeout=15, what="the escaped process ended")
