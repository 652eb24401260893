"""The controls GNU parallel users reach for, with real processes: --timeout, --halt, --joblog,
the task line appended as the last argument (--no-append), and ``pmlmctl retry``.

``pmlmctl run`` here; the daemon's side (submit, retry, a restart, joblogs written as the
submitting user) in test_controls_daemon. Every worker a test starts ends with it (the pmlm
fixture); the long sleepers are ended by the timeouts under test, or by the fixture.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from support import wait_for

PY = sys.executable
# One task per line: "ok" exits 0, a number exits with it, "hang" sleeps until it is ended,
# "wait:PATH" runs until PATH exists (bounded, so nothing outlives a broken test for long).
TASK = ("import os, sys, time\n"
        "t = os.environ['PMLM_TASK']\n"
        "if t == 'hang':\n    time.sleep(60)\n"
        "elif t.startswith('wait:'):\n"
        "    end = time.monotonic() + 60\n"
        "    while not os.path.exists(t[5:]) and time.monotonic() < end:\n        time.sleep(0.02)\n"
        "sys.exit(int(t) if t.isdigit() else 0)\n")


def attempts(report, index):
    return report["tasks"][index]["attempts"]


def tasks_file(tmp_path, *lines):
    path = tmp_path / "tasks"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# --- --timeout ------------------------------------------------------------------------------------

def test_timeout_ends_a_long_attempt_with_sigterm_and_fails_its_task(pmlm):
    run = pmlm("--timeout", "0.5", "--term-grace", "20", "--", "sleep", "30")
    assert run.wait() == 1, run.stderr
    report = run.report()
    (attempt,) = attempts(report, 0)
    assert attempt["cause"] == "timeout" and attempt["signal"] == 15 and attempt["stop_path"] == "sigterm"
    assert "--timeout 0.5s" in attempt["reason"]
    assert report["tasks"][0]["status"] == "failed" and report["counts"]["failed"] == 1
    assert report["limits"]["timeout_s"] == 0.5
    assert "0 (timed out after 0.5s)" in report["error_message"]
    assert any(r.get("event") == "timeout" for r in run.trace())


def test_a_worker_that_ignores_sigterm_gets_sigkill_after_the_grace(pmlm):
    # An ignored signal stays ignored across exec: sleep ignores SIGTERM too.
    run = pmlm("--timeout", "0.3", "--term-grace", "0.3", "--shell", "--", "trap '' TERM; sleep 30")
    assert run.wait() == 1, run.stderr
    (attempt,) = attempts(run.report(), 0)
    assert attempt["cause"] == "timeout" and attempt["signal"] == 9 and attempt["stop_path"] == "sigkill"
    assert "SIGKILL after 0.3s grace" in attempt["reason"]


def test_a_timeout_counts_against_retry_failed_even_when_the_worker_exits_0_on_sigterm(pmlm):
    run = pmlm("--timeout", "0.3", "--retry-failed", "1", "--shell", "--", "trap 'exit 0' TERM; sleep 30 & wait")
    assert run.wait() == 1, run.stderr
    report = run.report()
    assert [(a["cause"], a["exit_code"]) for a in attempts(report, 0)] == [("timeout", 0), ("timeout", 0)]
    assert report["tasks"][0]["status"] == "failed" and report["counts"]["requeued"] == 1


def test_attempts_within_the_timeout_are_not_touched(pmlm):
    run = pmlm("-n", "3", "--timeout", "60", "--", "true")
    assert run.wait() == 0, run.stderr
    assert {a["cause"] for t in run.report()["tasks"] for a in t["attempts"]} == {"exit"}


# --- --halt -----------------------------------------------------------------------------------------

def test_halt_soon_starts_no_more_tasks_and_lets_the_running_ones_finish(pmlm, tmp_path):
    release = tmp_path / "release"
    tasks = tasks_file(tmp_path, f"wait:{release}", "3", "ok", "ok")
    run = pmlm("-j", "2", "--halt", "soon,fail=1", "--tasks-file", tasks, "--", PY, "-c", TASK)
    halted = wait_for(lambda: [r for r in run.trace() if r.get("event") == "halted"], timeout=60,
                      what="the batch to halt")
    assert halted[0]["reason"] == "halted after 1 failed task (--halt soon,fail=1)"
    release.touch()  # the running task goes on to its end
    assert run.wait() == 1, run.stderr
    report = run.report()
    assert [t["status"] for t in report["tasks"]] == ["succeeded", "failed", "cancelled", "cancelled"]
    assert [len(t["attempts"]) for t in report["tasks"]] == [1, 1, 0, 0]
    assert report["error_message"].startswith("halted after 1 failed task (--halt soon,fail=1): 3 of 4 tasks")
    assert report["limits"]["halt"] == "soon,fail=1"
    assert "halted after 1 failed task" in run.stderr


def test_halt_now_also_terminates_the_running_tasks(pmlm, tmp_path):
    # Tasks start in their order: the first one runs when the second fails.
    tasks = tasks_file(tmp_path, "hang", "5", "ok")
    run = pmlm("-j", "2", "--halt", "now,fail=1", "--tasks-file", tasks, "--", PY, "-c", TASK)
    assert run.wait() == 1, run.stderr
    report = run.report()
    assert [t["status"] for t in report["tasks"]] == ["cancelled", "failed", "cancelled"]
    (hung,) = attempts(report, 0)
    assert hung["cause"] == "cancelled" and hung["signal"] == 15
    assert "halted after 1 failed task (--halt now,fail=1)" in hung["reason"]
    assert report["error_message"].startswith("halted after 1 failed task (--halt now,fail=1)")


def test_halt_on_a_share_of_the_tasks(pmlm, tmp_path):
    tasks = tasks_file(tmp_path, "1", "2", "ok", "ok", "ok")
    # 2 of 5 is 40%: the batch halts at the second failure, not the first.
    run = pmlm("-j", "1", "--halt", "soon,fail=40%", "--tasks-file", tasks, "--", PY, "-c", TASK)
    assert run.wait() == 1, run.stderr
    report = run.report()
    assert [t["status"] for t in report["tasks"]] == ["failed", "failed", "cancelled", "cancelled", "cancelled"]
    assert "halted after 2 failed tasks (--halt soon,fail=40%)" in report["error_message"]


def test_halt_counts_tasks_not_attempts(pmlm, tmp_path):
    tasks = tasks_file(tmp_path, "1", "ok", "ok")
    run = pmlm("-j", "1", "--retry-failed", "2", "--halt", "soon,fail=2", "--tasks-file", tasks, "--", PY, "-c",
               TASK)
    assert run.wait() == 1, run.stderr
    report = run.report()
    assert [t["status"] for t in report["tasks"]] == ["failed", "succeeded", "succeeded"]
    assert len(attempts(report, 0)) == 3 and "halted" not in report["error_message"]


def test_halt_is_checked_like_every_option(pmlm):
    for value in ("sometime,fail=1", "soon,success=1", "now,fail=0", "soon,fail=0.5%"):
        result = subprocess.run([PY, "-m", "pmlmd.client.ctl", "run", "--halt", value, "--", "true"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, value
        assert "--halt must be now,fail=N or soon,fail=N" in result.stderr or "--halt fail= takes" in result.stderr


# --- --joblog -----------------------------------------------------------------------------------------

JOBLOG_HEADER = ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command"]


def read_joblog(path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the joblog ends with a newline"
    assert lines[0].decode().split("\t") == JOBLOG_HEADER
    rows = []
    for line in lines[1:-1]:
        fields = line.split(b"\t", 8)
        assert len(fields) == 9, line
        rows.append(dict(zip(JOBLOG_HEADER, [f.decode("utf-8", "surrogateescape") for f in fields])))
    return rows


def check_joblog_numbers(row: dict) -> None:
    """GNU parallel's number formats: start with 3 decimals, runtime %10.3f, no transfers."""
    assert row["Host"] == ":" and row["Send"] == "0" and row["Receive"] == "0"
    assert re.fullmatch(r"\d{10,}\.\d{3}", row["Starttime"]), row
    assert len(row["JobRuntime"]) >= 10 and re.fullmatch(r" *\d+\.\d{3}", row["JobRuntime"]), row


def test_joblog_has_a_line_per_attempt_in_gnu_parallels_format(pmlm, tmp_path):
    joblog = tmp_path / "joblog.tsv"
    tasks = tasks_file(tmp_path, "0", "3", "hang")
    script = "case $1 in hang) exec sleep 30;; *) exit \"$1\";; esac"
    run = pmlm("--joblog", str(joblog), "--timeout", "2", "--retry-failed", "1", "-j", "1", "--tasks-file", tasks,
               "--", "sh", "-c", script, "sh")
    assert run.wait() == 1, run.stderr
    rows = read_joblog(joblog)
    for row in rows:
        check_joblog_numbers(row)
    # Task 0 once, task 1 and the hanging task 2 twice (--retry-failed 1): one line per attempt, Seq from 1.
    assert sorted((row["Seq"], row["Exitval"], row["Signal"]) for row in rows) == [
        ("1", "0", "0"), ("2", "3", "0"), ("2", "3", "0"), ("3", "-1", "15"), ("3", "-1", "15")]
    command = {row["Seq"]: row["Command"] for row in rows}
    assert command == {str(n): shlex.join(["sh", "-c", script, "sh", line])
                       for n, line in ((1, "0"), (2, "3"), (3, "hang"))}
    report = run.report()
    for row in rows:
        task = report["tasks"][int(row["Seq"]) - 1]
        assert any(abs(float(row["Starttime"]) - _epoch(a["start"])) < 0.002 for a in task["attempts"]), row


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_joblog_writes_the_shell_script_as_it_ran_with_newlines_as_nul(pmlm, tmp_path):
    joblog = tmp_path / "joblog.tsv"
    tasks = tmp_path / "tasks"
    tasks.write_bytes(b"two\nlines\0caf\xe9\0")
    run = pmlm("--joblog", str(joblog), "--null", "--shell", "--tasks-file", str(tasks), "--", "true", "{}")
    assert run.wait() == 0, run.stderr
    rows = sorted(read_joblog(joblog), key=lambda row: row["Seq"])
    assert [row["Command"] for row in rows] == ["true 'two\0lines'", "true 'caf\udce9'"]


def test_an_unwritable_joblog_is_a_usage_error_before_anything_runs(pmlm, tmp_path):
    marker = tmp_path / "ran"
    run = pmlm("--joblog", str(tmp_path / "no" / "such" / "dir"), "--", "touch", str(marker))
    assert run.wait() == 2
    assert "cannot write" in run.stderr and "No such file or directory" in run.stderr
    assert not marker.exists()


# --- the task line as the last argument ----------------------------------------------------------------

ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def test_a_task_line_is_appended_when_the_command_has_no_placeholder(pmlm, tmp_path):
    tasks = tasks_file(tmp_path, "a b", "c")
    run = pmlm("--json", "-j", "1", "--tasks-file", tasks, "--", PY, "-c", ARGV, "first")
    assert run.wait() == 0, run.stderr
    seen = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("[")]
    assert seen == [["first", "a b"], ["first", "c"]]
    assert run.report()["limits"]["append"] is True


def test_no_append_keeps_the_command_as_it_is(pmlm, tmp_path):
    tasks = tasks_file(tmp_path, "a b")
    run = pmlm("--json", "--no-append", "--tasks-file", tasks, "--", PY, "-c", ARGV, "first")
    assert run.wait() == 0, run.stderr
    assert [json.loads(line) for line in run.stderr.splitlines() if line.startswith("[")] == [["first"]]


def test_a_placeholder_means_nothing_is_appended(pmlm, tmp_path):
    tasks = tasks_file(tmp_path, "x")
    run = pmlm("--json", "--tasks-file", tasks, "--", PY, "-c", ARGV, "<{}>")
    assert run.wait() == 0, run.stderr
    assert [json.loads(line) for line in run.stderr.splitlines() if line.startswith("[")] == [["<x>"]]
    assert run.report()["limits"]["append"] is True  # asked for, and not needed: the line went into {}


def test_with_shell_the_line_is_appended_shell_quoted(pmlm, tmp_path):
    out = tmp_path / "out"
    tasks = tasks_file(tmp_path, "a b", "c'd;echo pwned")
    run = pmlm("-j", "1", "--shell", "--tasks-file", tasks, "--", "printf", "'%s|'", ">>", str(out))
    assert run.wait() == 0, run.stderr
    # Each script ends in the quoted line: printf gets it as one argument, nothing runs from it.
    assert out.read_text() == "a b|c'd;echo pwned|"


def test_the_appended_line_counts_in_the_exec_size_check(tmp_path):
    # With a 512 KiB stack exec takes 128 KiB of arguments and environment: a line of 70000
    # bytes fits once ($PMLM_TASK) but not twice (appended as well).
    tasks = tmp_path / "tasks"
    tasks.write_text("x" * 70000 + "\n")
    command = ["prlimit", "--stack=524288", PY, "-m", "pmlmd.client.ctl", "run", "--tasks-file", str(tasks)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    appended = subprocess.run(command + ["--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert appended.returncode == 2, appended.stderr
    assert "line 1 of" in appended.stderr and "arguments and environment would take" in appended.stderr
    kept = subprocess.run(command + ["--no-append", "--", "true"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert kept.returncode == 0, kept.stderr
