"""Agent mode end to end: pmlmd (or pmlmctl run) asking real workers that block SIGTERM to stop or pause."""

import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from support import wait_for

PY = sys.executable
EXAMPLE = str(Path(__file__).parent.parent / "examples" / "agent_worker.py")

# A worker that ignores SIGTERM, checks the channel every 50 ms, writes a line per tick to
# $OUT/<task> and "cleanup" when told to stop; it waits DELAY seconds before it connects.
WORKER = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out = open(os.path.join(sys.argv[1], os.environ["PMLM_TASK_INDEX"]), "a", buffering=1)
time.sleep(float(sys.argv[2]))
from pmlmd.agent import Agent, TerminationRequested
with Agent.from_env() as agent:
    try:
        for tick in range(2000):
            agent.checkpoint()
            out.write(f"tick {tick}\n")
            time.sleep(0.05)
    except TerminationRequested:
        out.write("cleanup\n")
"""

# A worker that ignores SIGTERM and never looks at the channel.
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(__import__('sys').argv[1], 'w'); " \
       "time.sleep(60)"


def attempts(report):
    return [a for t in report["tasks"] for a in t["attempts"]]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []

# The governor stays out of these tests' way: they are about the channel.
UNLIMITED = "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n"


def ticking_agent_worker(daemon, tmp_path):
    """Submit one agent-mode WORKER to the daemon and wait until it ticks; (batch id, its output file)."""
    out = tmp_path / "0"
    batch = daemon.ctl("submit", "--pause-mode", "agent", "--term-mode", "agent", "--", PY, "-c", WORKER,
                       str(tmp_path), "0").stdout.strip()
    wait_for(lambda: "tick 3" in lines(out), what="the worker ticking")
    return batch, out


def stalled(out) -> int:
    """Wait until the worker's ticks stop growing (it stands in checkpoint); the number of lines then."""
    return wait_for(lambda: (n := len(lines(out))) and (time.sleep(0.3) or len(lines(out)) == n) and n,
                    timeout=10, what="the ticks to stop")


def test_a_worker_blocking_sigterm_stops_through_the_channel(pmlm, tmp_path):
    run = pmlm("-n", "2", "-j", "2", "--term-mode", "agent", "--term-grace", "30", "--", PY, "-c", WORKER,
               str(tmp_path), "0")
    for task in ("0", "1"):
        wait_for(lambda: "tick 1" in lines(tmp_path / task), what=f"worker {task} ticking")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    for task in ("0", "1"):
        assert lines(tmp_path / task)[-1] == "cleanup"
    for attempt in attempts(run.report()):
        assert attempt["stop_path"] == "agent" and attempt["exit_code"] == 0 and attempt["signal"] is None
        assert attempt["cause"] == "cancelled"


def test_a_deaf_worker_is_signalled_after_the_agent_timeout_and_killed(pmlm, tmp_path):
    ready = tmp_path / "ready"
    run = pmlm("--term-mode", "agent", "--agent-timeout", "0.5", "--term-grace", "0.5", "--", PY, "-c", DEAF,
               str(ready))
    wait_for(ready.exists, what="the deaf worker")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    (attempt,) = attempts(run.report())
    assert attempt["stop_path"] == "sigkill" and attempt["signal"] == signal.SIGKILL
    assert "no agent acknowledgement within 0.5s" in attempt["reason"]
    assert "SIGKILL after 0.5s grace" in attempt["reason"]


def test_a_late_subscriber_still_gets_the_request(pmlm, tmp_path):
    # The worker connects 1.5 s after it starts; the stop request is sent at once and re-sent until acknowledged.
    run = pmlm("--term-mode", "agent", "--agent-timeout", "10", "--", PY, "-c", WORKER, str(tmp_path), "1.5")
    wait_for(lambda: run.started_workers(), what="the worker to start")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    # It connected long after the request went out, and got it at once (the next re-send, within 0.1 s).
    seen = lines(tmp_path / "0")
    assert seen[-1] == "cleanup" and len(seen) <= 4, seen
    (attempt,) = attempts(run.report())
    assert attempt["stop_path"] == "agent" and attempt["exit_code"] == 0


def test_pause_in_agent_mode_blocks_the_worker_in_checkpoint_until_resume(daemon_factory, tmp_path):
    daemon = daemon_factory(UNLIMITED).start()
    batch, out = ticking_agent_worker(daemon, tmp_path)
    assert daemon.ctl("pause", batch).returncode == 0
    # It stops at its next checkpoint: the ticks stop growing, while the process is not stopped (state S).
    lines_when_stalled = stalled(out)
    (pid, _), = daemon.worker_pids()
    assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "S"
    assert daemon.ctl("resume", batch).returncode == 0
    wait_for(lambda: len(lines(out)) > lines_when_stalled + 2, what="the ticks to resume")
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["state"] == "cancelled",
             what="the batch to end")
    assert lines(out)[-1] == "cleanup"


@pytest.mark.slow
def test_two_hundred_agent_workers_all_stop_on_cancel_within_the_deadline(daemon_factory):
    daemon = daemon_factory("[limits]\nmax_workers = 256\ncpu_limit = 100\ncpu_margin = 0\nmemfree_limit = 0\nmemory_gap = 0\n"
                            "min_free = 0\n").start()
    batch = daemon.ctl("submit", "-n", "200", "-j", "200", "--term-mode", "agent", "--term-grace", "30",
                       "--", PY, EXAMPLE, "100000").stdout.strip()

    def status():
        # 200 interpreters starting on a small machine can starve pmlmctl too: a late answer is no answer.
        result = daemon.ctl("status", "--json", batch)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    wait_for(lambda: status().get("counts", {}).get("running") == 200, timeout=240, poll=0.5,
             what="200 running workers")
    # Every worker has connected once it printed its first line; give the last ones their first checkpoint.
    cancelled_at = time.time()
    cancel = daemon.ctl("cancel", batch)
    assert cancel.returncode == 0, cancel.stderr + "\n".join(l for l in daemon.logs().splitlines() if "did task" not in l)[-6000:]
    wait_for(lambda: status().get("state") == "cancelled", timeout=60, poll=0.05, what="all 200 to stop")
    report = json.loads(daemon.ctl("report", batch).stdout)
    took = max(datetime.fromisoformat(a["end"]).timestamp() for a in attempts(report)) - cancelled_at
    paths = [a["stop_path"] for a in attempts(report)]
    assert paths == ["agent"] * 200, f"not all stopped through the channel: {sorted(set(paths))}"
    assert took < 5.0 + 1.0, f"{took:.2f}s from cancel to the last exit"
    print(f"\n200 agent workers: {took:.3f}s from cancel to the last exit")


def test_an_agent_paused_worker_survives_a_daemon_restart_and_resumes(daemon_factory, tmp_path):
    daemon = daemon_factory(UNLIMITED).start()
    batch, out = ticking_agent_worker(daemon, tmp_path)
    daemon.ctl("pause", batch)
    lines_when_stalled = stalled(out)
    daemon.stop(signal.SIGKILL)
    daemon.start()  # adopts it; the batch is still paused by its owner
    assert json.loads(daemon.ctl("status", "--json", batch).stdout)["state"] == "paused"
    assert daemon.ctl("resume", batch).returncode == 0
    # The worker's channel reconnected to the new pmlmd, which told it to go on.
    wait_for(lambda: len(lines(out)) > lines_when_stalled + 2, what="the ticks to resume after the restart")
    daemon.ctl("cancel", batch)
    wait_for(lambda: lines(out)[-1] == "cleanup", what="the worker to stop through the new channel")
