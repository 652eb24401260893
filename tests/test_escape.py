"""Processes that leave their worker's process group or session still belong to the worker.

A worker that starts `setsid sleep 50 &` (a double-forking daemon does the same) puts that
process outside the group pmlmd signals. pmlmctl run and pmlmd are child subreapers and walk
their workers' process trees, so such a process is paused, continued and ended with its
worker, on a normal end, on Ctrl-C and on cancel. Every process a test starts is ended by
the test: the escaped ones are found by the pid they wrote to a file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

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


def test_run_ends_an_escaped_process_when_its_worker_ends(pmlm, tmp_path, escaped_pids):
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    run = pmlm("--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile))
    assert run.wait(timeout=60) == 0, run.stderr
    assert not alive(escaped_pid(pidfile))
    (task,) = run.report()["tasks"]
    assert "left 1 processes outside its process group behind" in task["attempts"][0]["reason"]


def test_run_ends_an_escaped_process_on_ctrl_c(pmlm, tmp_path, escaped_pids):
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    run = pmlm("--term-grace", "2", "--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile), "60")
    pid = escaped_pid(pidfile)
    wait_for(lambda: run.started_workers(), what="the worker started")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) != 0
    assert not alive(pid)


def test_daemon_ends_escaped_processes_on_a_normal_end_and_on_cancel(daemon_factory, tmp_path, escaped_pids):
    daemon = daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n").start()
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


def test_an_escaped_process_is_paused_and_continued_with_its_worker(daemon_factory, tmp_path, escaped_pids):
    daemon = daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n").start()
    pidfile = tmp_path / "pid"
    escaped_pids.append(pidfile)
    batch = daemon.ctl("submit", "--term-grace", "2", "--", "/bin/sh", "-c", ESCAPE, "sh", str(pidfile),
                       "60").stdout.strip()
    pid = escaped_pid(pidfile)
    assert daemon.ctl("pause", batch).returncode == 0
    # Found on the daemon's next look at its workers' trees, it is stopped like the rest.
    wait_for(lambda: state(pid) == "T", timeout=10, what="the escaped process stopped")
    assert daemon.ctl("resume", batch).returncode == 0
    wait_for(lambda: state(pid) != "T", timeout=10, what="the escaped process continued")
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: not alive(pid), timeout=15, what="the escaped process ended")
