"""Running short of a resource the supervisor itself needs slows admission down; it never loses a
worker or fails a task that could run later.

The shortage is made real with prlimit(1): pmlmctl run and pmlmd start with few open files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PY = sys.executable


def test_run_with_few_open_files_runs_every_task(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(["prlimit", "--nofile=64:64", "--", PY, "-m", "pmlmd.client.ctl", "run", "-j", "100", "-n", "100",
                             "--report", str(report), "--", "sleep", "2"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    counts = json.loads(report.read_text())["counts"]
    assert counts["succeeded"] == 100 and counts["failed"] == 0, counts
    # It says why it ran fewer at once than asked.
    assert "admitting no more workers for now" in result.stderr


def test_daemon_with_few_open_files_runs_every_task(daemon_factory):
    daemon = daemon_factory("[limits]\nmax_workers = 60\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\n"
                            "min_free = 0\n").start(prefix=("prlimit", "--nofile=64:64", "--"))
    result = daemon.ctl("submit", "--wait", "-n", "60", "-j", "60", "--", "sleep", "2", timeout=120)
    assert result.returncode == 0, result.stderr + daemon.logs()
    (status,) = json.loads(daemon.ctl("list", "--json").stdout)
    assert status["counts"]["succeeded"] == 60 and status["counts"]["failed"] == 0, status
    assert "admitting no more workers for now" in daemon.logs()
    assert "Traceback" not in daemon.logs()


def test_run_that_cannot_go_on_ends_its_workers_and_writes_the_report(tmp_path):
    # An internal fault cannot be provoked from outside: it is injected (the engine's third
    # governor step raises) into a real pmlmctl run with a real worker.
    report, pidfile = tmp_path / "report.json", tmp_path / "pid"
    inject = ("import sys, pmlmd.engine as e\n"
              "step, calls = e.Engine.step, []\n"
              "def failing(self):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 3: raise RuntimeError('injected fault')\n"
              "    return step(self)\n"
              "e.Engine.step = failing\n"
              "from pmlmd.client.ctl import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([PY, "-c", inject, "run", "--report", str(report), "--", "/bin/sh", "-c",
                             f"echo $$ > {pidfile}; exec sleep 30"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "could not go on (RuntimeError: injected fault); every worker it started was ended" in result.stderr
    (task,) = json.loads(report.read_text())["tasks"]
    assert task["status"] == "cancelled", task
    pid = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
