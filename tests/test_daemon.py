"""pmlmd as an ordinary process on a private socket and state dir, driven through pmlmctl."""

import json
import os
import pwd
import resource
import signal
import stat
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from pmlmd.client import ctl

from pmlmd.core import protocol

from support import BURN, group_states, meminfo, wait_for
from test_daemon_auth import wait_event
from test_summary import write_v1_state

PY = sys.executable


def status(daemon, batch=None):
    with daemon.client() as client:
        return client.call("status", batch=batch)


def wait_finished(daemon, batch, timeout=60):
    """The batch's summary once it has ended (finished, cancelled or failed)."""
    return wait_for(lambda: (s := status(daemon, batch))["ended"] is not None and s, timeout=timeout,
                    what=f"batch {batch} to end")


def test_submit_wait_runs_the_batch_and_exits_like_run(daemon):
    result = daemon.ctl("submit", "--wait", "-n", "8", "--", "sleep", "0.2")
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert "8 tasks, 8 succeeded" in result.stdout
    failing = daemon.ctl("submit", "--wait", "--", "false")
    assert failing.returncode == 1
    assert "exit 1" in failing.stderr


def test_submit_prints_the_batch_id_and_the_report_is_kept(daemon, tmp_path):
    result = daemon.ctl("submit", "--name", "nightly", "-n", "2", "--", "true")
    assert result.returncode == 0, result.stderr
    batch = result.stdout.strip()
    wait_finished(daemon, batch)
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert report["batch_id"] == batch and report["counts"]["succeeded"] == 2
    listing = json.loads(daemon.ctl("list", "--json").stdout)
    assert [(b["batch"], b["name"] if "name" in b else None) for b in listing] == [(batch, "nightly")]


def test_workers_run_in_the_submitters_directory_and_environment(daemon, tmp_path):
    out = tmp_path / "out"
    result = daemon.ctl("submit", "--wait", "--shell", "--", "pwd > out; echo $PMLM_GREETING >> out",
                        cwd=tmp_path, env={**os.environ, "PMLM_GREETING": "hello"})
    assert result.returncode == 0, result.stderr
    assert out.read_text() == f"{tmp_path}\nhello\n"


def test_ready_status_and_stopping_reach_systemd(daemon):
    ready = next(m for m in daemon.messages if "READY=1" in m.split("\n"))
    assert "STATUS=0 batches, 0 running, 0 paused" in ready
    daemon.stop()
    daemon.wait_notify("STOPPING=1")
    assert daemon.proc.returncode == 0
    assert not os.path.exists(daemon.socket)


def test_client_without_a_daemon_exits_4_with_one_clear_line(tmp_path):
    result = subprocess.run([PY, "-m", "pmlmd.client.ctl", "--socket", str(tmp_path / "none.sock"), "status"],
                            capture_output=True, text=True)
    assert result.returncode == 4
    assert result.stderr.startswith(f"pmlmctl: pmlmd is not running: cannot connect to {tmp_path / 'none.sock'}")
    # A private socket path: the packaged service would not listen there, so no systemctl advice.
    assert "check --socket" in result.stderr and "systemctl" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_config_is_refused_at_start_with_file_and_key(daemon_factory):
    daemon = daemon_factory("[limits]\ncpu_limt = 50\n")
    daemon.start_failing = subprocess.run(
        [PY, "-m", "pmlmd", "--config", str(daemon.config_path), "--socket", daemon.socket, "--state-dir",
         daemon.state_dir], capture_output=True, text=True, timeout=30)
    assert daemon.start_failing.returncode == 2
    message = daemon.start_failing.stderr
    assert str(daemon.config_path) in message and "limits.cpu_limt" in message and "cpu_limit" in message


def test_unwritable_state_dir_is_refused_clearly(daemon_factory):
    daemon = daemon_factory()
    blocker = Path(daemon.state_dir)
    blocker.write_text("a file where the state dir should be")
    result = subprocess.run([PY, "-m", "pmlmd", "--config", str(daemon.config_path), "--socket", daemon.socket,
                             "--state-dir", daemon.state_dir], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot use the state database" in result.stderr and "--state-dir" in result.stderr


def test_status_shows_every_limit_the_node_sets(daemon_factory):
    from pmlmd.core.options import LIMIT_OPTIONS

    daemon = daemon_factory("[limits]\ncpu_margin = 7\nmemory_metric = 'free'\n").start()
    limits = status(daemon)["limits"]
    assert set(limits) == {option.name for option in LIMIT_OPTIONS} | {"max_workers"}
    assert limits["cpu_margin"] == 7 and limits["memory_metric"] == "free"


def test_sighup_applies_good_limits_and_keeps_them_on_a_bad_file(daemon_factory):
    daemon = daemon_factory("[limits]\ncpu_limit = 80\n").start()
    assert status(daemon)["limits"]["cpu_limit"] == 80
    daemon.config_path.write_text("[limits]\ncpu_limit = 70\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_notify("RELOADING=1")
    daemon.wait_notify("READY=1")
    assert status(daemon)["limits"]["cpu_limit"] == 70
    daemon.config_path.write_text("[limits]\ncpu_limit = 'lots'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = daemon.wait_notify("RELOADING=1")
    assert "MONOTONIC_USEC=" in reloading
    daemon.wait_notify("READY=1")
    assert status(daemon)["limits"]["cpu_limit"] == 70
    assert "reload refused, keeping the running configuration" in daemon.logs()
    assert "limits.cpu_limit" in daemon.logs()


def test_sighup_applies_the_log_level_and_says_what_waits_for_a_restart(daemon_factory):
    daemon = daemon_factory().start()
    daemon.config_path.write_text('[daemon]\nlog_level = "debug"\nworker_backend = "proc"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_notify("RELOADING=1")
    daemon.wait_notify("READY=1")
    assert "reload: worker_backend changed, and takes effect only at the next start of pmlmd" in daemon.logs()
    # The admissions (DEBUG) are logged from now on.
    assert "spawn 1 for batch" not in daemon.logs()
    assert daemon.ctl("submit", "--wait", "--", "true").returncode == 0
    assert "spawn 1 for batch" in daemon.logs()


def test_a_batch_that_could_never_start_is_refused_and_one_that_waits_says_why(daemon):
    never = daemon.ctl("submit", "--min-free", "1048576T", "--", "true")
    assert never.returncode == 2 and "no task could ever start" in never.stderr, never.stderr
    assert "min_free 1048576.0T free before a first task starts, and this node has " in never.stderr, never.stderr
    # A memory limit between what is free now and all of memory: the batch waits, and says why.
    info = meminfo()
    between = (info["MemAvailable"] + info["MemTotal"] - (200 << 20)) / 2
    batch = daemon.ctl("submit", "--memfree-limit", f"{100 * between / info['MemTotal']:.2f}", "--", "true")
    assert batch.returncode == 0, batch.stderr
    batch = batch.stdout.strip()
    try:
        said = wait_for(lambda: status(daemon, batch).get("waiting"), what="the reason it waits")
        assert "below the batch's memory limit" in said and "its tasks start once that much is free" in said, said
        assert status(daemon, batch)["counts"]["queued"] == 1
        shown = daemon.ctl("status", batch).stdout.splitlines()
        assert [line for line in shown if line.startswith("waiting   ")], shown
    finally:
        daemon.ctl("cancel", batch)
    assert "waiting" not in wait_finished(daemon, batch)
    again = daemon.ctl("cancel", batch)
    assert (again.returncode, again.stdout) == (0, f"batch {batch}: has ended already: nothing to cancel\n")


def test_pause_and_resume_a_batch_stop_and_continue_every_worker(daemon):
    batch = daemon.ctl("submit", "-n", "2", "-j", "2", "--", "sleep", "30").stdout.strip()
    wait_for(lambda: status(daemon, batch)["counts"]["running"] == 2, what="two running workers")
    assert daemon.ctl("pause", batch).stdout.strip() == f"batch {batch}: paused"
    pids = [pid for pid, _ in daemon.worker_pids()]
    for pid in pids:
        wait_for(lambda: group_states(pid) == "T", what=f"worker {pid} stopped")
    assert status(daemon, batch)["state"] == "paused"
    resumed = daemon.ctl("resume", "--json", batch)
    assert resumed.returncode == 0 and json.loads(resumed.stdout) == {"batch": batch, "state": "active"}
    assert daemon.ctl("report", "--json", batch).returncode == 0  # --json where a user would try it
    for pid in pids:
        wait_for(lambda: group_states(pid) in ("S", "R"), what=f"worker {pid} continued")
    assert daemon.ctl("cancel", batch).returncode == 0
    final = wait_finished(daemon, batch)
    assert final["counts"]["cancelled"] == 2


def test_events_follow_streams_decisions_and_task_ends(daemon):
    follower = subprocess.Popen([PY, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "events", "--follow",
                                 "--json"], stdout=subprocess.PIPE, text=True)
    try:
        batch = daemon.ctl("submit", "-n", "2", "--", "true").stdout.strip()
        seen = []
        while not any(e.get("event") == "finished" for e in seen):
            seen.append(json.loads(follower.stdout.readline()))
        kinds = [e["event"] for e in seen if e.get("batch") == batch]
        assert kinds.count("start") == 2 and kinds.count("end") == 2 and "decision" in kinds
    finally:
        follower.kill()
        follower.wait()
    assert daemon.ctl("events", batch).stdout.count("ended (exit 0, exit)") == 2


def test_unknown_batch_gets_a_clear_error(daemon):
    result = daemon.ctl("cancel", "999")
    assert result.returncode == 2  # a usage error: the id names no batch
    assert "no batch '999'" in result.stderr


def test_restart_after_sigkill_finishes_the_batch_and_strands_nothing(daemon_factory):
    daemon = daemon_factory().start()
    batch = daemon.ctl("submit", "-n", "4", "-j", "2", "--", "sleep", "1").stdout.strip()
    wait_for(lambda: len(daemon.worker_pids()) == 2, what="two workers recorded")
    # Stop one worker as the governor would, then kill the daemon without warning.
    stopped_pid = daemon.worker_pids()[0][0]
    os.killpg(stopped_pid, signal.SIGSTOP)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    wait_for(lambda: group_states(stopped_pid) != "T", what="the stranded worker continued")
    final = wait_finished(daemon, batch)
    assert final["counts"]["succeeded"] == 4
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert all(t["status"] == "succeeded" for t in report["tasks"])
    causes = [a["cause"] for t in report["tasks"] for a in t["attempts"]]
    assert causes.count("exit") == 4  # every task's last attempt ended by itself
    assert set(causes) <= {"exit", "daemon-restart"}
    # The worker that was stopped when the daemon died survived it and was adopted, not lost.
    (stranded,) = [a for t in report["tasks"] for a in t["attempts"] if a["pid"] == stopped_pid]
    assert stranded["reason"].startswith("adopted after a daemon restart")


def _wait_for_gated_task(daemon, go, before: str, after: str, meanwhile) -> tuple[str, str]:
    """Run ``submit --wait`` of one task that prints ``before``, waits for the file ``go`` and
    prints ``after``; call ``meanwhile(waiter)`` while it waits, then create ``go``. The rest of
    the waiter's stdout and its stderr; it must have succeeded."""
    waiter = subprocess.Popen([sys.executable, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "submit", "--wait",
                               "--", "sh", "-c", f"{before}; while [ ! -e {go} ]; do sleep 0.05; done; {after}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        meanwhile(waiter)
        go.touch()
        out, err = waiter.communicate(timeout=60)
    finally:
        waiter.kill()
        waiter.wait()
    assert waiter.returncode == 0, err
    return out, err


def test_submit_wait_outlives_a_restart_of_the_daemon(daemon_factory, tmp_path):
    """submit --wait follows its batch through pushed events; a restarted pmlmd does not know that
    follower, so the wait asks how the batch stands after a quiet spell and ends with the batch."""
    daemon = daemon_factory().start()

    def restart(waiter):
        wait_for(lambda: len(daemon.worker_pids()) == 1, what="the worker recorded")
        assert daemon.stop() == 0
        daemon.start()

    out, _ = _wait_for_gated_task(daemon, tmp_path / "go", "true", "echo done", restart)
    assert "done" in out and "1 succeeded" in out


def test_submit_wait_prints_a_running_tasks_output_as_it_is_written(daemon_factory, tmp_path):
    """The wait follows task ends pushed by pmlmd, and still reads a task that has not ended: what
    it wrote so far reaches the terminal before the task ends (pmlmctl(1), wait)."""
    daemon = daemon_factory().start()

    def first_line(waiter):
        lines = []
        threading.Thread(target=lambda: lines.append(waiter.stdout.readline()), daemon=True).start()
        wait_for(lambda: lines, what="the running task's first line", timeout=30)
        assert lines == ["first\n"]  # the task still runs: it waits for the file

    out, _ = _wait_for_gated_task(daemon, tmp_path / "go", "echo first", "echo second", first_line)
    assert out.startswith("second\n") and "1 succeeded" in out


def test_stranded_terminate_ends_a_worker_that_ignores_sigterm_and_runs_its_task_again(daemon_factory, tmp_path):
    """With stranded = "terminate", a worker the pmlmd before left running is ended as any worker
    is: SIGTERM, then SIGKILL after the grace; its task runs again."""
    daemon = daemon_factory('[daemon]\nstranded = "terminate"\n').start()
    marker = tmp_path / "first"
    # The first attempt ignores SIGTERM and would sleep on for a minute; the second ends at once.
    script = f"trap '' TERM; if [ -e {marker} ]; then exit 0; fi; touch {marker}; sleep 60"
    batch = daemon.ctl("submit", "--term-grace", "1", "--", "sh", "-c", script).stdout.strip()
    wait_for(marker.exists, what="the first attempt started")
    (pid, _), = daemon.worker_pids()
    daemon.stop(signal.SIGKILL)
    daemon.start()
    final = wait_finished(daemon, batch, timeout=30)  # not the minute the first attempt would sleep
    assert final["counts"]["succeeded"] == 1
    report = json.loads(daemon.ctl("report", batch).stdout)
    first, second = report["tasks"][0]["attempts"]
    assert first["pid"] == pid and first["cause"] == "daemon-restart" and "stranded" in first["reason"]
    assert first["stop_path"] == "sigterm" or "SIGKILL" in first["reason"]
    assert second["cause"] == "exit" and second["exit_code"] == 0
    assert group_states(pid) == ""  # nothing of it lives on (its sleep neither)


@pytest.mark.slow
def test_low_priority_batch_pays_first_under_a_low_cpu_limit(daemon_factory):
    cpus = os.cpu_count()
    if cpus < 2:
        pytest.skip("needs two cores to exceed a one-core CPU limit")
    daemon = daemon_factory(f"[limits]\ncpu_limit = {100 / cpus}\n").start()
    # Both burners sleep first, so both batches are admitted before the CPU rises.
    burner = ["--", PY, BURN, "2.0", "0.5", "60"]
    low = daemon.ctl("submit", "--priority", "-5", *burner).stdout.strip()
    high = daemon.ctl("submit", "--priority", "5", *burner).stdout.strip()
    wait_finished(daemon, low, timeout=120)
    wait_finished(daemon, high, timeout=120)
    with daemon.client() as client:
        events = list(client.stream("events", batch=None, follow=False))
    decisions = [e for e in events if e.get("decision") in ("pause", "continue")]
    told = "\n".join(f"{e['time']} batch {e['batch']} {e['decision']}: {e.get('reason')}" for e in decisions)
    assert decisions and decisions[0]["decision"] == "pause" and decisions[0]["batch"] == low, told
    # The high-priority worker pays only while the low one stands paused (when the low one's share
    # does not cover the excess, other load on the node say, both pay, the low one first).
    low_paused = False
    for e in decisions:
        if e["batch"] == low:
            low_paused = e["decision"] == "pause"
        elif e["decision"] == "pause":
            assert low_paused, told


def test_state_survives_in_sqlite(daemon):
    batch = daemon.ctl("submit", "--wait", "-n", "3", "--", "true")
    assert batch.returncode == 0
    with sqlite3.connect(Path(daemon.state_dir) / "state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT state FROM batches").fetchall() == [("finished",)]
        assert db.execute("SELECT COUNT(*) FROM attempts WHERE cause='exit' AND exit_code=0").fetchone()[0] == 3


def test_watchdog_pings_come_from_the_main_loop(daemon_factory):
    daemon = daemon_factory(env={"WATCHDOG_USEC": "400000"}).start()
    daemon.wait_notify("WATCHDOG=1", timeout=5)
    daemon.wait_notify("WATCHDOG=1", timeout=5)


def test_finished_batches_are_pruned(daemon_factory):
    daemon = daemon_factory('[daemon]\nprune_after = "1s"\n').start()
    assert daemon.ctl("submit", "--wait", "--", "true").returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("list", "--json").stdout) == [], timeout=10,
             what="the finished batch to be pruned")
    assert "pruned 1 finished batches" in daemon.logs()


def test_socket_activation_uses_the_inherited_listening_socket(daemon_factory):
    import socket as socketlib

    daemon = daemon_factory()
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(daemon.socket)
    listener.listen(16)
    inode = os.stat(daemon.socket).st_ino
    # LISTEN_PID must name the daemon itself: a shim puts the socket at fd 3, then execs pmlmd in its own place.
    shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, '-m', 'pmlmd', *sys.argv[2:]])")
    log = open(daemon.log_path, "a")
    daemon.log = log
    daemon.proc = subprocess.Popen([PY, "-c", shim, str(listener.fileno()), "--config", str(daemon.config_path),
                                    "--socket", daemon.socket, "--state-dir", daemon.state_dir],
                                   pass_fds=[listener.fileno()], stdout=log, stderr=log, env=daemon.env)
    listener.close()
    daemon.wait_notify("READY=1")
    # The worker lists its own descriptors: the listening socket (fd 3 of pmlmd) is not among them.
    result = daemon.ctl("submit", "--wait", "--", "sh", "-c", 'ls /proc/$$/fd')
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert os.stat(daemon.socket).st_ino == inode  # served on the inherited socket, not a new one
    lines = result.stdout.splitlines()
    assert lines[:3] == ["0", "1", "2"] and lines[3].startswith("batch 1: "), result.stdout  # then the summary


@pytest.mark.slow
def test_a_batch_with_a_stricter_cpu_limit_is_held_to_it(daemon_factory):
    cpus = os.cpu_count()
    if cpus < 2:
        pytest.skip("needs two cores")
    daemon = daemon_factory("[limits]\ncpu_limit = 100\n").start()
    one_core = 100 / cpus
    # The node may use every core; this batch asked for one core's worth.
    batch = daemon.ctl("submit", "-n", "2", "-j", "2", "--cpu-limit", str(one_core), "--", PY, BURN, "1.5", "0.5",
                       "60").stdout.strip()
    final = wait_finished(daemon, batch, timeout=120)
    assert final["counts"]["succeeded"] == 2
    with daemon.client() as client:
        pauses = [e for e in client.stream("events", batch=batch, follow=False) if e.get("decision") == "pause"]
    assert pauses and all(f"limit {one_core:.0f}%" in e["reason"] for e in pauses), [e["reason"] for e in pauses]


def test_release_workers_continues_what_a_dead_daemon_left_stopped(daemon_factory):
    daemon = daemon_factory().start()
    daemon.ctl("submit", "-n", "2", "-j", "2", "--", "sleep", "30")
    wait_for(lambda: len(daemon.worker_pids()) == 2, what="two workers recorded")
    pids = [pid for pid, _ in daemon.worker_pids()]
    for pid in pids:
        os.killpg(pid, signal.SIGSTOP)
        wait_for(lambda: group_states(pid) == "T", what=f"worker {pid} stopped")
    daemon.stop(signal.SIGKILL)  # a crash: nobody continued them
    result = subprocess.run([PY, "-m", "pmlmd", "--release-workers", "--config", str(daemon.config_path),
                             "--state-dir", daemon.state_dir, "--log-target", "console"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "released workers (continue): 0 processes in pmlm scopes, 2 workers from the state database" \
        in result.stderr
    for pid in pids:
        assert group_states(pid) == "S"


def test_the_agent_channel_follows_a_moved_control_socket(daemon):
    # Each owner's sockets are made in this directory when the owner first needs them.
    directory = os.path.splitext(daemon.socket)[0] + "-agent.d"
    assert os.path.isdir(directory) and stat.S_IMODE(os.stat(directory).st_mode) == 0o711


def test_the_daemon_raises_its_own_open_files_limit_but_workers_keep_the_one_it_started_with(daemon_factory,
                                                                                              tmp_path):
    out = tmp_path / "limits"
    daemon = daemon_factory().start(prefix=("prlimit", "--nofile=256:4096", "--"))  # what it inherits
    # pmlmd itself may hold up to the hard limit (a connection or a pidfd each)...
    assert resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
    # ...its workers start with what it was given, as they would have before it raised its own: here
    # for a submit that names no limits of its own (an older pmlmctl; pmlmctl now sends its shell's).
    with daemon.client() as client:
        batch = client.call("submit", command=["/bin/sh", "-c", f"ulimit -Sn > {out}; ulimit -Hn >> {out}"],
                            cwd="/tmp")["batch"]
    wait_for(lambda: json.loads(daemon.ctl("status", batch, "--json").stdout)["state"] == "finished", timeout=30,
             what="the batch to finish")
    assert out.read_text().split() == ["256", "4096"]
    # pmlmctl sends its own limits: its workers get them, within pmlmd's hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = daemon.ctl("submit", "--wait", "--", "/bin/sh", "-c", f"ulimit -Sn > {out}; ulimit -Hn >> {out}")
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == [str(min(soft, 4096)), str(min(hard, 4096))]
    assert ("nofile" in result.stderr) == (hard > 4096)  # pmlmctl says when it was lowered


def test_a_batch_may_tighten_the_nodes_limits_but_a_looser_ask_is_refused_with_the_reason(daemon_factory):
    daemon = daemon_factory("[limits]\ncpu_limit = 90\nmemfree_limit = 20\n").start()
    looser = daemon.ctl("submit", "--cpu-limit", "95", "--memfree-limit", "10", "--", "true")
    assert looser.returncode == 2, looser.stderr
    assert "cpu_limit 95 is looser than this node's 90" in looser.stderr
    assert "ask for 90 or stricter" in looser.stderr and "[limits]" in looser.stderr
    assert looser.stderr.count("\n") == 1
    assert daemon.ctl("list", "--json").stdout.strip() == "[]"  # nothing was created
    stricter = daemon.ctl("submit", "--wait", "--cpu-limit", "50", "--memfree-limit", "30", "--", "true")
    assert stricter.returncode == 0, stricter.stderr


def test_following_one_batch_ends_when_it_finishes(daemon):
    batch = daemon.ctl("submit", "--", "sleep", "1").stdout.strip()
    followed = daemon.ctl("events", "--follow", batch, timeout=30)
    assert followed.returncode == 0, followed.stderr
    assert f"batch {batch}: finished: batch {batch}: 1 task, 1 succeeded" in followed.stdout.splitlines()[-1]
    # A batch that has finished already: its events, and the end at once.
    again = daemon.ctl("events", "--follow", batch, timeout=30)
    assert again.returncode == 0 and "finished" in again.stdout.splitlines()[-1]


def test_events_say_paused_and_resumed_as_the_commands_do(daemon):
    batch = daemon.ctl("submit", "--", "sleep", "30").stdout.strip()
    assert daemon.ctl("pause", batch).returncode == 0
    assert daemon.ctl("resume", batch).returncode == 0
    assert daemon.ctl("cancel", batch).returncode == 0
    lines = daemon.ctl("events", "--follow", batch, timeout=60).stdout.splitlines()
    assert any(line.endswith(f"batch {batch}: paused") for line in lines), lines
    assert any(line.endswith(f"batch {batch}: resumed") for line in lines), lines


def test_the_report_of_a_running_batch_says_it_runs_and_counts_nothing_as_failed(daemon):
    batch = daemon.ctl("submit", "-n", "3", "-j", "1", "--", "sleep", "30").stdout.strip()
    wait_for(lambda: len(daemon.worker_pids()) == 1, what="the first worker")
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert report["state"] == "running" and report["exit_status"] is None, report
    assert report["error_exist"] is False and report["error_message"] is None, report
    assert report["duration_s"] > 0
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("report", batch).stdout)["state"] == "cancelled",
             what="the batch to end")
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert report["exit_status"] == 1 and report["error_message"].startswith("cancelled"), report


def test_check_config_says_what_is_wrong_with_a_file_without_starting(tmp_path):
    bad, good = tmp_path / "bad.toml", tmp_path / "good.toml"
    bad.write_text("[limits]\ncpu_limt = 50\n")
    good.write_text("[limits]\ncpu_limit = 50\n")
    refused = subprocess.run([PY, "-m", "pmlmd", "--check-config", str(bad)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr == (f"pmlmd: {bad}: limits.cpu_limt: unknown key, did you mean \"cpu_limit\"? (known keys "
                              "in [limits]: cpu_limit, cpu_margin, memfree_limit, memory_metric, memory_gap, min_free, "
                              "victim, interval, max_workers)\n")
    taken = subprocess.run([PY, "-m", "pmlmd", "--config", str(good), "--check-config"], capture_output=True, text=True)
    assert taken.returncode == 0 and "the configuration is valid" in taken.stdout


# --- the batch summary: one shape for status ID, status and list, live or finished -------------------------

SUMMARY_KEYS = {"summary_version", "batch", "name", "owner", "command", "priority", "state", "tasks", "counts",
                "terminated_attempts", "requeued_attempts", "exit_status", "created", "started", "ended", "elapsed_s",
                "scope", "freezer", "intake"}


def summary_of(daemon, batch):
    """status ID's reply less the node's sample: the batch's summary."""
    reply = status(daemon, batch)
    assert set(reply) == SUMMARY_KEYS | {"node"}, reply
    del reply["node"]
    return reply


def listed(daemon):
    return {b["batch"]: b for b in json.loads(daemon.ctl("list", "--json").stdout)}


def counts(**given):
    return {"succeeded": 0, "failed": 0, "given_up": 0, "cancelled": 0, "running": 0, "paused": 0, "queued": 0,
            "returned": 0, **given}


def me():
    return {"user": pwd.getpwuid(os.geteuid()).pw_name, "uid": os.geteuid()}


def test_a_cancelled_batch_counts_its_cancelled_tasks_and_says_cancelled(daemon):
    batch = daemon.ctl("submit", "--name", "sleepers", "--priority", "3", "-n", "3", "-j", "1", "--",
                       "sleep", "30").stdout.strip()
    wait_event(daemon, batch, "start")
    live = summary_of(daemon, batch)
    assert (live["state"], live["tasks"], live["counts"]["queued"]) == ("running", 3, 2), live
    assert live["counts"]["running"] + live["counts"]["paused"] == 1, live
    assert (live["name"], live["owner"], live["priority"], live["command"]) == ("sleepers", me(), 3, ["sleep", "30"])
    assert live["started"] >= live["created"] and live["ended"] is None and live["exit_status"] is None
    assert [b["batch"] for b in status(daemon)["batches"]] == [batch]
    assert daemon.ctl("pause", batch).returncode == 0
    held = summary_of(daemon, batch)
    assert (held["state"], held["counts"]) == ("paused", counts(paused=1, queued=2)), held
    # The report says what status says.
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert report["state"] == "paused" and report["counts"]["paused"] == 1 and report["exit_status"] is None

    assert daemon.ctl("cancel", batch).returncode == 0
    wait_event(daemon, batch, "finished")
    ended = summary_of(daemon, batch)
    assert (ended["state"], ended["tasks"], ended["counts"]) == ("cancelled", 3, counts(cancelled=3)), ended
    assert ended["exit_status"] == 1 and ended["ended"] >= ended["started"] and ended["elapsed_s"] >= 0
    assert (ended["name"], ended["owner"], ended["priority"]) == ("sleepers", me(), 3)
    assert listed(daemon)[batch] == ended
    report = json.loads(daemon.ctl("report", batch).stdout)
    assert report["state"] == "cancelled" and report["counts"]["cancelled"] == 3

    text = daemon.ctl("status", batch).stdout
    assert "state     cancelled, exit status 1" in text and "tasks     3 tasks: 3 cancelled" in text, text
    assert f"owner     {me()['user']}" in text and "command   sleep 30" in text, text
    (line,) = [line for line in daemon.ctl("list").stdout.splitlines() if line.split()[0] == batch]
    assert line.split()[1:5] == ["sleepers", me()["user"], "3", "cancelled"] and line.endswith("3 tasks: 3 cancelled")


def test_a_finished_batch_reads_the_same_in_status_and_list_and_after_a_restart(daemon_factory):
    daemon = daemon_factory().start()
    batch = daemon.ctl("submit", "--name", "nightly", "--priority", "5", "-n", "2", "--", "true").stdout.strip()
    wait_event(daemon, batch, "finished")
    ended = summary_of(daemon, batch)
    assert (ended["name"], ended["owner"], ended["priority"], ended["command"]) == ("nightly", me(), 5, ["true"])
    assert (ended["state"], ended["tasks"], ended["counts"], ended["exit_status"]) == \
        ("finished", 2, counts(succeeded=2), 0), ended
    assert ended["created"] <= ended["started"] <= ended["ended"] and ended["elapsed_s"] >= 0
    assert listed(daemon) == {batch: ended}
    daemon.stop()
    daemon.start()
    assert summary_of(daemon, batch) == ended and listed(daemon) == {batch: ended}


def test_a_state_db_of_the_older_schema_is_restored_and_its_finished_batches_listed(daemon_factory):
    daemon = daemon_factory()
    # Batch 1 finished (cancelled) a minute ago, not old enough to be pruned; batch 2 is active, one task queued.
    write_v1_state(daemon.state_dir, created=time.time() - 60)
    daemon.start()
    wait_event(daemon, "2", "finished")
    old, restored = summary_of(daemon, "1"), summary_of(daemon, "2")
    assert (old["name"], old["priority"], old["state"], old["counts"]) == ("old", 4, "cancelled", counts(cancelled=3))
    assert old["owner"] == {"user": pwd.getpwuid(0).pw_name, "uid": 0}
    assert (restored["name"], restored["state"], restored["counts"]) == ("waiting", "finished", counts(succeeded=2))
    assert listed(daemon) == {"1": old, "2": restored}


# --- a reader that does not keep up -------------------------------------------------------------

PERMISSIVE = "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n"


def read_stream(sock, timeout=120.0):
    """The events of one stream, up to its closing reply: (events, the reply's result)."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and sock.poll(int(remaining * 1000)), f"no closing reply after {len(events)} events"
        message = protocol.decode_reply(sock.recv())
        assert message["ok"] is True, message
        if "event" not in message:
            return events, message["result"]
        events.append(message["event"])


def test_a_slow_events_reader_gets_each_event_or_a_count_of_those_dropped_and_the_end(daemon_factory):
    """A follower that reads nothing while 3000 tasks start and end: it gets, in order, each event or
    a dropped marker counting exactly those it missed, and the closing reply; a quick follower of the
    same batch gets every event (the truth to compare with)."""
    daemon = daemon_factory(PERMISSIVE).start()
    ctx = zmq.Context()
    fast, slow = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for sock in (fast, slow):
            sock.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        for sock in (fast, slow):
            sock.connect("ipc://" + daemon.socket)
        with daemon.client() as client:
            batch = client.call("submit", command=["/bin/true"], tasks=3000, cwd="/tmp",
                                env={"PATH": "/usr/bin:/bin"})["batch"]
        # Both streams start with the batch's events recorded so far (a few at most), then follow.
        fast.send(protocol.encode_request("events", request_id="fast", batch=batch, follow=True))
        slow.send(protocol.encode_request("events", request_id="slow", batch=batch, follow=True))
        every, end = read_stream(fast)
        assert end == {"events": "end"}
        assert all(e["event"] != "dropped" for e in every)
        assert every[-1]["event"] == "finished" and every[-1]["batch"] == batch
        assert sum(e["event"] == "end" for e in every) == 3000
        got, end = read_stream(slow, timeout=30)  # only now does the slow one read: all of it waits
        assert end == {"events": "end"}
        position, dropped = 0, 0
        for event in got:
            if event["event"] == "dropped":
                assert event["count"] > 0
                position += event["count"]
                dropped += event["count"]
            else:
                assert event == every[position], f"event {position} of the stream"
                position += 1
        assert position == len(every)
        assert dropped > 0, "the reader kept up: this test no longer tests a slow one"
    finally:
        fast.close()
        slow.close()
        ctx.term()


def test_pmlmctl_says_how_many_events_were_dropped():
    line = ctl.describe_event({"event": "dropped", "count": 17, "time": 0})
    assert line.endswith("events dropped: 17 (the reader was too slow)")


def test_a_worker_gets_the_loaders_variables_its_submitter_had(daemon_factory):
    """They pass the gate shell by its stdin, not its environment (gate.gated): still the worker's."""
    daemon = daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n").start()
    env = dict(os.environ, LD_LIBRARY_PATH="/nonexistent/lib:'quoted'", GCONV_PATH="$(echo not run)")
    result = daemon.ctl("submit", "--wait", "--", "sh", "-c", 'printf "%s|%s\\n" "$LD_LIBRARY_PATH" "$GCONV_PATH"',
                        env=env)
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert result.stdout.splitlines()[0] == "/nonexistent/lib:'quoted'|$(echo not run)"


def test_a_command_and_environment_too_long_for_exec_fail_the_task_and_say_why(daemon_factory):
    """The submit is checked against the submitter's limits; the exec happens under pmlmd's, which
    may be lower: then the task fails, naming the limit and what to do (E2BIG)."""
    daemon = daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n")
    daemon.start(prefix=("prlimit", "--stack=524288", "--"))  # pmlmd may exec 128 KiB of it
    env = dict(os.environ, BIG1="x" * 100_000, BIG2="y" * 100_000)
    result = daemon.ctl("submit", "--wait", "--json", "--", "true", env=env)
    assert result.returncode == 1, result.stderr
    (task,) = json.loads(result.stdout)["tasks"]
    reason = task["attempts"][0]["reason"]
    assert "Argument list too long" in reason and "a quarter of pmlmd's stack limit (131072 bytes here)" in reason
    assert "pass fewer or smaller arguments or variables" in reason
