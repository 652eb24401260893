"""--timeout, --halt, --joblog, appended task lines and ``pmlmctl retry`` against a live pmlmd.

The daemon keeps a batch's options across a restart, writes the joblog through a descriptor
it opened as the batch's owner (never as root: the tests that need other users run as root
and create them, as test_daemon_auth does), and retries what did not succeed with the
original submission.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pmlmd.core import protocol

from support import group_states, wait_for
# The users, their daemon and the cleanup that cancels what a test leaves running.
from test_daemon_auth import (SH_PATH, accounts, as_root, as_user, no_batch_outlives_the_test, served,  # noqa: F401
                              submitted, wait_event)
from test_controls import JOBLOG_HEADER, TASK, check_joblog_numbers, read_joblog, tasks_file

PY = sys.executable
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and changes uid")


def status(daemon, batch=None):
    with daemon.client() as client:
        return client.call("status", batch=batch)


def report(daemon, batch):
    return json.loads(daemon.ctl("report", batch).stdout)


def wait_finished(daemon, batch, timeout=60):
    return wait_for(lambda: (s := status(daemon, batch))["ended"] is not None and s, timeout=timeout,
                    what=f"batch {batch} to finish")


# --- submit ----------------------------------------------------------------------------------------

def test_submit_takes_timeout_halt_and_joblog(daemon, tmp_path):
    joblog = tmp_path / "joblog.tsv"
    tasks = tasks_file(tmp_path, "hang", "ok", "ok")
    result = daemon.ctl("submit", "--wait", "-j", "1", "--timeout", "0.5", "--term-grace", "5", "--halt",
                        "soon,fail=1", "--joblog", "joblog.tsv", "--tasks-file", tasks, "--", PY, "-c", TASK,
                        cwd=tmp_path)
    assert result.returncode == 1, result.stderr + daemon.logs()
    assert "halted after 1 failed task (--halt soon,fail=1)" in result.stderr
    batch = result.stderr.split()[1]
    got = report(daemon, batch)
    assert [t["status"] for t in got["tasks"]] == ["failed", "cancelled", "cancelled"]
    (attempt,) = got["tasks"][0]["attempts"]
    assert attempt["cause"] == "timeout" and attempt["signal"] == 15
    assert got["limits"]["timeout_s"] == 0.5 and got["limits"]["halt"] == "soon,fail=1"
    # The relative path is the submitter's: pmlmctl sends it absolute.
    (row,) = read_joblog(joblog)
    check_joblog_numbers(row)
    assert (row["Seq"], row["Exitval"], row["Signal"]) == ("1", "-1", "15")
    # Appended (no {} in the command); the script's newlines written as NUL, as GNU parallel does.
    assert row["Command"] == shlex.join([PY, "-c", TASK, "hang"]).replace("\n", "\0")


def test_halt_now_ends_the_running_workers_of_a_daemon_batch(daemon, tmp_path):
    tasks = tasks_file(tmp_path, "hang", "7", "ok")
    result = daemon.ctl("submit", "--wait", "-j", "2", "--halt", "now,fail=1", "--tasks-file", tasks, "--", PY,
                        "-c", TASK)
    assert result.returncode == 1, result.stderr + daemon.logs()
    got = report(daemon, result.stderr.split()[1])
    assert [t["status"] for t in got["tasks"]] == ["cancelled", "failed", "cancelled"]
    assert "halted after 1 failed task (--halt now,fail=1)" in got["tasks"][0]["attempts"][0]["reason"]


def test_time_a_batch_is_paused_does_not_count_against_its_timeout(daemon):
    # About a second of work; paused for longer than the whole timeout, and still it succeeds.
    work = "import time\nfor _ in range(10): time.sleep(0.1)\n"
    batch = daemon.ctl("submit", "--timeout", "4", "--", PY, "-c", work).stdout.strip()
    wait_for(lambda: status(daemon, batch)["counts"]["running"] == 1, what="the worker running")
    assert daemon.ctl("pause", batch).returncode == 0
    (pid, _), = daemon.worker_pids()
    wait_for(lambda: group_states(pid) == "T", what="the worker stopped")
    time.sleep(5)  # the passing of time is what is tested: longer than the timeout, while paused
    assert daemon.ctl("resume", batch).returncode == 0
    final = wait_finished(daemon, batch)
    assert final["counts"]["succeeded"] == 1, report(daemon, batch)
    assert report(daemon, batch)["tasks"][0]["attempts"][0]["cause"] == "exit"


def test_a_batchs_options_and_joblog_survive_a_daemon_restart(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    joblog, release = tmp_path / "joblog.tsv", tmp_path / "release"
    tasks = tasks_file(tmp_path, f"wait:{release}", "ok")
    batch = daemon.ctl("submit", "-j", "1", "--timeout", "300", "--halt", "soon,fail=1", "--no-append", "--joblog",
                       str(joblog), "--tasks-file", tasks, "--", PY, "-c", TASK).stdout.strip()
    wait_for(lambda: status(daemon, batch)["counts"]["running"] == 1, what="the first worker running")
    assert daemon.stop() == 0
    daemon.start()
    release.touch()  # the adopted worker ends; its exit status is out of the new daemon's reach
    final = wait_finished(daemon, batch)
    got = report(daemon, batch)
    assert final["counts"]["succeeded"] == 2, got
    assert (got["limits"]["timeout_s"], got["limits"]["halt"], got["limits"]["append"]) == (300.0, "soon,fail=1",
                                                                                              False)
    # The adopted attempt ended unseen (requeued, not a failure: no halt), then each task once more.
    assert [a["cause"] for a in got["tasks"][0]["attempts"]] == ["daemon-restart", "exit"]
    rows = read_joblog(joblog)  # one header: reopened for appending, not truncated
    assert [(row["Seq"], row["Exitval"]) for row in rows] == [("1", "-1"), ("1", "0"), ("2", "0")]
    assert {row["Command"] for row in rows} == {shlex.join([PY, "-c", TASK]).replace("\n", "\0")}  # no-append kept


# --- retry -----------------------------------------------------------------------------------------

FLAKY = ("import os, sys\nt = sys.argv[1]\n"
         "with open(t + '.seen', 'a') as f: f.write(os.getcwd() + ' ' + os.environ['PMLM_GREETING'] + '\\n')\n"
         "sys.exit(0 if t == 'ok' or os.path.exists('fixed') else int(t))\n")


def test_retry_submits_the_tasks_that_did_not_succeed_with_the_same_options(daemon, tmp_path):
    tasks = tasks_file(tmp_path, "ok", "3", "4")
    env = {**os.environ, "PMLM_GREETING": "hello"}
    first = daemon.ctl("submit", "--wait", "--timeout", "60", "--retry-failed", "0", "--name", "flaky",
                       "--tasks-file", tasks, "--", PY, "-c", FLAKY, cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stderr
    original = first.stderr.split()[1]
    (tmp_path / "fixed").touch()
    # From elsewhere, with another environment: the batch's own directory and environment are used.
    retried = daemon.ctl("retry", original, cwd="/", env={**os.environ, "PMLM_GREETING": "other"})
    assert retried.returncode == 0, retried.stderr
    batch = retried.stdout.strip()
    assert batch != original
    assert f"batch {batch} retries 2 tasks of batch {original} (its tasks 1, 2" in retried.stderr
    wait_finished(daemon, batch)
    got, before = report(daemon, batch), report(daemon, original)
    assert [(t["task"], t["status"]) for t in got["tasks"]] == [("3", "succeeded"), ("4", "succeeded")]
    assert got["command"] == before["command"] and got["limits"] == before["limits"]
    assert got["task_id"] == "flaky"
    for line in ("3", "4"):
        assert (tmp_path / f"{line}.seen").read_text() == f"{tmp_path} hello\n" * 2
    assert (tmp_path / "ok.seen").read_text() == f"{tmp_path} hello\n"  # succeeded: not run again
    # Nothing of the new batch is left to retry.
    again = daemon.ctl("retry", batch)
    assert again.returncode == 2 and "nothing to retry" in again.stderr


def test_retry_takes_cancelled_tasks_unless_only_failed_ones_are_asked_for(daemon):
    batch = daemon.ctl("submit", "-n", "3", "-j", "1", "--", "sleep", "30").stdout.strip()
    wait_for(lambda: status(daemon, batch)["counts"]["running"] == 1, what="a worker running")
    running = daemon.ctl("retry", batch)
    assert running.returncode == 2 and "still running" in running.stderr
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_finished(daemon, batch)
    failed_only = daemon.ctl("retry", "--failed", batch)
    assert failed_only.returncode == 2 and "no failed or given-up task" in failed_only.stderr
    retried = daemon.ctl("retry", "--json", batch)
    assert retried.returncode == 0, retried.stderr
    again = retried.stdout.strip()
    assert len(report(daemon, again)["tasks"]) == 3  # -n 3: three tasks again, numbered 0 to 2
    daemon.ctl("cancel", again)
    wait_finished(daemon, again)
    unknown = daemon.ctl("retry", "999")
    assert unknown.returncode == 2 and "no batch '999'" in unknown.stderr


def test_retry_wait_exits_like_run(daemon, tmp_path):
    tasks = tasks_file(tmp_path, "2")
    first = daemon.ctl("submit", "--wait", "--tasks-file", tasks, "--", PY, "-c", TASK)
    assert first.returncode == 1
    retried = daemon.ctl("retry", "--wait", "--json", first.stderr.split()[1])
    assert retried.returncode == 1, retried.stderr
    assert json.loads(retried.stdout)["counts"]["failed"] == 1


# --- as the submitting user --------------------------------------------------------------------------

@pytest.fixture
def userdir(accounts):
    """A directory of member a's, 0700, and a root-only directory (0700) beside it."""
    base = Path(tempfile.mkdtemp(prefix="pmlmc-"))
    base.chmod(0o755)
    mine, secret = base / "mine", base / "secret"
    mine.mkdir()
    secret.mkdir(mode=0o700)
    entry = pwd.getpwnam(accounts.a)
    os.chown(mine, entry.pw_uid, entry.pw_gid)
    mine.chmod(0o700)
    yield mine, secret
    shutil.rmtree(base, ignore_errors=True)


def user_submit(served, user, directory, **args):
    return as_user(served, user, "submit", **{"command": ["/bin/sh", "-c", "exit 0"], "cwd": str(directory),
                                              "env": SH_PATH, **args})


@needs_root
def test_the_daemon_writes_the_joblog_as_the_submitting_user(served, accounts, userdir):
    mine, _ = userdir
    joblog = mine / "joblog.tsv"
    batch = submitted(user_submit(served, accounts.a, mine, task_lines=["x", "y"], joblog=str(joblog),
                                  append=True, umask=0o077))
    assert wait_event(served, batch, "finished")["exit_status"] == 0
    info, entry = joblog.stat(), pwd.getpwnam(accounts.a)
    assert (info.st_uid, info.st_gid) == (entry.pw_uid, entry.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o600  # created with the submitter's umask
    rows = read_joblog(joblog)
    assert sorted((row["Seq"], row["Command"]) for row in rows) == [("1", "/bin/sh -c 'exit 0' x"),
                                                                     ("2", "/bin/sh -c 'exit 0' y")]


@needs_root
def test_a_joblog_the_user_may_not_write_is_refused_at_submit(served, accounts, userdir):
    _, secret = userdir
    target = secret / "joblog.tsv"
    reply = user_submit(served, accounts.a, "/tmp", joblog=str(target))
    assert reply["ok"] is False and reply["error"]["code"] == protocol.BAD_FIELD, reply
    message = reply["error"]["message"]
    assert str(target) in message and "Permission denied" in message and "joblog" in message, message
    assert not target.exists()  # root's permissions were never used for it
    # Root itself may: the same path works for a batch of root's.
    with served.client() as client:
        batch = client.call("submit", command=["/bin/true"], cwd="/tmp", joblog=str(target))["batch"]
    wait_event(served, batch, "finished")
    assert target.read_text().startswith("\t".join(JOBLOG_HEADER))


@needs_root
def test_a_joblog_that_is_no_regular_file_is_refused_without_blocking(served, accounts, userdir):
    mine, _ = userdir
    fifo = mine / "fifo"
    os.mkfifo(fifo)
    os.chown(fifo, accounts.uid(accounts.a), -1)
    reply = user_submit(served, accounts.a, mine, joblog=str(fifo))
    assert reply["ok"] is False and reply["error"]["code"] == protocol.BAD_FIELD, reply
    assert str(fifo) in reply["error"]["message"], reply
    assert as_root(served, "ping")["pid"] == served.proc.pid  # it serves on


@needs_root
def test_only_the_owner_or_root_may_retry_and_the_retry_runs_as_the_owner(served, accounts, userdir):
    mine, _ = userdir
    batch = submitted(user_submit(served, accounts.a, mine, command=["/bin/sh", "-c", "id -u > uid-$1; exit 3",
                                                                      "sh"], task_lines=["1", "2"], append=True))
    wait_event(served, batch, "finished")
    denied = as_user(served, accounts.b, "retry", batch=batch)
    assert denied["ok"] is False and denied["error"]["code"] == protocol.PERMISSION_DENIED, denied
    assert "only its owner or root may retry" in denied["error"]["message"]
    own = submitted(as_user(served, accounts.a, "retry", batch=batch))
    wait_event(served, own, "finished")
    for name in ("uid-1", "uid-2"):
        (mine / name).unlink()
    with served.client() as client:
        by_root = client.call("retry", batch=own, failed_only=True)
    assert by_root["retried"] == [0, 1]
    wait_event(served, by_root["batch"], "finished")
    assert as_root(served, "status", batch=by_root["batch"])["counts"]["failed"] == 2
    # Root's retry of a member's batch runs as the member, in the member's directory.
    for name in ("uid-1", "uid-2"):
        assert int((mine / name).read_text()) == accounts.uid(accounts.a)
