"""Task output: what a batch's tasks print reaches its owner, and nobody else.

The daemon keeps each task's stdout and stderr in files of its own (output.TaskFiles) and
serves them to the batch's owner and root (``pmlmctl log``, ``pmlmctl wait``); ``--results``
writes them where the submitter says, as the submitter; ``pmlmctl run`` reads its workers'
output through pipes and prints it whole lines at a time (``--tag``, ``--group``).
Real daemons, real users (made with useradd, see test_daemon_auth), real processes.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pmlmd.client import ctl

from pmlmd.node import output
from pmlmd.core.batch import Attempt

from support import wait_for
from test_daemon_auth import (SH_PATH, accounts, as_root, as_user, no_batch_outlives_the_test, outdir,  # noqa: F401
                              run_as, served, submitted, wait_event)

PY = sys.executable
ECHO_BOTH = ["/bin/sh", "-c", "echo out-$PMLM_TASK_INDEX; echo err-$PMLM_TASK_INDEX >&2"]


def ctl_as(username: str, socket: str, *argv: str) -> dict:
    """Run pmlmctl's own main() as ``username`` (in a forked child, see run_as); its exit status and output."""
    def action():
        captured = {}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            captured[name] = tempfile.TemporaryFile()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(captured[name].fileno(), fd)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0, closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0, closefd=False), write_through=True)
        code = ctl.main(["--socket", socket, *argv])
        result = {"code": code}
        for name, file in captured.items():
            file.seek(0)
            result[name] = file.read().decode("utf-8", "replace")
        return result
    return run_as(username, action)


# --- the daemon: who reads what ------------------------------------------------------------------

def test_a_member_reads_exactly_what_their_tasks_printed_and_another_member_is_denied(served, accounts):
    batch = submitted(as_user(served, accounts.a, "submit", command=ECHO_BOTH, tasks=3, cwd="/tmp", env=SH_PATH))
    assert wait_event(served, batch, "finished")["exit_status"] == 0

    out = ctl_as(accounts.a, served.socket, "log", batch)
    assert (out["code"], out["stdout"], out["stderr"]) == (0, "out-0\nout-1\nout-2\n", "")
    err = ctl_as(accounts.a, served.socket, "log", batch, "--stderr")
    assert (err["code"], err["stdout"]) == (0, "err-0\nerr-1\nerr-2\n")
    one = ctl_as(accounts.a, served.socket, "log", batch, "1", "--tag")
    assert one["stdout"] == "1\tout-1\n"

    denied = ctl_as(accounts.b, served.socket, "log", batch)
    assert denied["code"] == 1 and denied["stdout"] == "", denied
    assert "permission denied" in denied["stderr"] and "only its owner or root" in denied["stderr"]
    # root may read any batch's output.
    assert as_root(served, "log", batch=batch)["chunks"][0]["data"] == "out-0\n"


def test_the_files_pmlmd_keeps_are_roots_alone(served, accounts):
    batch = submitted(as_user(served, accounts.a, "submit", command=ECHO_BOTH, cwd="/tmp", env=SH_PATH))
    wait_event(served, batch, "finished")
    kept = Path(served.state_dir) / "output" / batch / "0.out"
    assert kept.read_text() == "out-0\n"
    info = kept.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert stat.S_IMODE(kept.parent.parent.stat().st_mode) == 0o700


def test_results_are_written_as_the_submitter(served, accounts, outdir):
    results = outdir / "res"
    batch = submitted(as_user(served, accounts.a, "submit", command=["/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"],
                              tasks=2, cwd="/tmp", env=SH_PATH, results=str(results)))
    wait_event(served, batch, "finished")
    uid = accounts.uid(accounts.a)
    for index in (0, 1):
        task_dir = results / str(index)
        assert (task_dir / "stdout").read_text() == "hi\n"
        assert (task_dir / "stderr").read_text() == "oops\n"
        assert (task_dir / "exit").read_text() == "3\n"
        for path in (task_dir, task_dir / "stdout", task_dir / "stderr", task_dir / "exit"):
            assert path.stat().st_uid == uid, path
    assert results.stat().st_uid == uid


def test_a_fifo_among_a_members_results_cannot_hold_the_daemon(served, accounts, outdir):
    # A FIFO where a task's stdout is to go: opening it for writing would wait for a reader, and
    # pmlmd's loop (its governor too) would stand still, acting as the member, until one came.
    results = outdir / "res"
    fifo = results / "0" / "stdout"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    uid = accounts.uid(accounts.a)
    for path in (results, fifo.parent, fifo):
        os.chown(path, uid, -1)
    try:
        batch = submitted(as_user(served, accounts.a, "submit", command=["/bin/sh", "-c", "echo hi"], cwd="/tmp",
                                  env=SH_PATH, results=str(results)))
        assert wait_event(served, batch, "finished", timeout=30)["exit_status"] == 0
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        wait_for(lambda: "not a regular file" in served.logs(), timeout=10, what="the refusal in the log")
    finally:
        # Had pmlmd opened it, this lets its open return, so that the daemon can be stopped.
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


def test_results_where_the_submitter_may_not_write_are_refused_at_submit(served, accounts):
    private = Path(tempfile.mkdtemp(prefix="pmlmt-private-"))  # root's, 0700
    try:
        reply = as_user(served, accounts.a, "submit", command=["/bin/true"], cwd="/tmp", env=SH_PATH,
                        results=str(private / "res"))
        assert reply["ok"] is False and reply["error"]["code"] == "bad-field", reply
        assert "cannot make the results directory" in reply["error"]["message"]
        assert "permission denied" in reply["error"]["message"].lower()
        assert not (private / "res").exists()
    finally:
        shutil.rmtree(private)


# --- the daemon: how much is kept, and for how long ----------------------------------------------

def test_only_the_tail_is_kept_and_the_reader_is_told(daemon_factory, tmp_path):
    daemon = daemon_factory('[daemon]\noutput_limit = "8K"\n').start()
    result = daemon.ctl("submit", "--wait", "--", "seq", "1", "100000")  # 588895 bytes
    assert result.returncode == 0, result.stderr
    batch = result.stderr.split()[1]
    log = daemon.ctl("log", batch)
    assert log.returncode == 0
    assert log.stdout.endswith("99999\n100000\n")
    assert 8192 <= len(log.stdout) < 8192 + 4096
    assert "were not kept (output_limit in pmlmd.toml)" in log.stderr
    kept = Path(daemon.state_dir) / "output" / batch / "0.out"
    assert kept.stat().st_size == 588895  # offsets stay those of everything the task wrote
    assert kept.stat().st_blocks * 512 <= 16384  # the rest of the disk blocks were freed


def test_follow_prints_as_tasks_write_and_ends_with_the_batch(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    go = tmp_path / "go"
    batch = daemon.ctl("submit", "-n", "2", "-j", "2", "--", "/bin/sh", "-c",
                       f"echo first-$PMLM_TASK_INDEX; while [ ! -e {go} ]; do sleep 0.05; done; "
                       "echo second-$PMLM_TASK_INDEX").stdout.strip()
    follower = subprocess.Popen([PY, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "log", "--follow", batch],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Task 0's first line arrives while it still runs; task 1's waits for task 0 (task order).
        assert follower.stdout.readline() == "first-0\n"
        go.touch()
        rest, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert rest == "second-0\nfirst-1\nsecond-1\n" and follower.returncode == 0, err


def test_a_worker_adopted_after_a_restart_goes_on_writing_to_its_log(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    go = tmp_path / "go"
    batch = daemon.ctl("submit", "--", "/bin/sh", "-c",
                       f"echo before; while [ ! -e {go} ]; do sleep 0.05; done; echo after").stdout.strip()
    wait_for(lambda: daemon.ctl("log", batch).stdout == "before\n", what="the first line")
    assert daemon.stop() == 0
    daemon.start()
    go.touch()
    result = daemon.ctl("wait", batch)
    assert result.returncode == 0, result.stderr
    # The adopted worker's line follows its first; its exit status is unknown after the
    # restart, so the task runs once more (at-least-once), and prints both lines again.
    assert daemon.ctl("log", batch).stdout == "before\nafter\nbefore\nafter\n"


def test_wait_shows_the_output_then_the_summary_and_exits_like_run(daemon_factory):
    daemon = daemon_factory().start()
    batch = daemon.ctl("submit", "-n", "2", "--", "/bin/sh", "-c",
                       "echo out-$PMLM_TASK_INDEX; echo err-$PMLM_TASK_INDEX >&2; exit $PMLM_TASK_INDEX").stdout.strip()
    result = daemon.ctl("wait", batch)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["out-0", "out-1", f"batch {batch}: 2 tasks, 1 succeeded, 1 failed in "
                                          + result.stdout.splitlines()[-1].rsplit(" in ", 1)[1]]
    assert "err-0\nerr-1\n" in result.stderr


def test_output_of_pruned_batches_goes_with_them(daemon_factory):
    daemon = daemon_factory('[daemon]\nprune_after = "1s"\n').start()
    batch = daemon.ctl("submit", "--wait", "--", "echo", "hello").stderr.split()[1]
    directory = Path(daemon.state_dir) / "output" / batch
    assert directory.exists()
    wait_for(lambda: not directory.exists(), timeout=20, what="the pruned batch's output to go")
    assert daemon.ctl("log", batch).returncode != 0


def test_a_log_request_for_a_task_the_batch_does_not_have_names_the_range(daemon_factory):
    daemon = daemon_factory().start()
    batch = daemon.ctl("submit", "--wait", "-n", "3", "--", "true").stderr.split()[1]
    result = daemon.ctl("log", batch, "7")
    assert result.returncode == 2
    assert f"batch {batch} has no task 7: its 3 tasks are numbered from 0 to 2" in result.stderr


# --- TaskFiles without a daemon --------------------------------------------------------------------

class _Run:
    def __init__(self, batch_id: str, results=None, owner=None):
        self.id, self.results, self.owner = batch_id, results, owner


class _Task:
    def __init__(self, index: int):
        self.index = index


def test_task_files_keep_the_tail_and_say_how_much_was_dropped(tmp_path):
    files = output.TaskFiles(str(tmp_path / "out"), limit=10000)
    run, task = _Run("7"), _Task(3)
    out_fd, err_fd = files.open(run, task, 1)
    data = b"".join(b"%06d\n" % i for i in range(5000))  # 35000 bytes
    os.write(out_fd, data)
    files.enforce()
    chunk = files.read("7", 3, "stdout", 0, 1 << 20)
    assert chunk.skipped + len(chunk.data) == len(data)
    assert chunk.data == data[chunk.skipped:]
    assert 10000 <= len(chunk.data) < 10000 + output.BLOCK
    files.ended(run, task, None)
    # Nothing was written to stderr: no file is left for it.
    assert sorted(os.listdir(tmp_path / "out" / "7")) == ["3.out"]
    assert files.tasks_with_output("7", "stdout") == [3] and files.tasks_with_output("7", "stderr") == []
    # Read on from where a reader stopped.
    later = files.read("7", 3, "stdout", len(data) - 7, 100)
    assert (later.offset, later.data, later.skipped) == (len(data) - 7, data[-7:], 0)


def test_task_files_forward_whole_lines(tmp_path):
    lines = []
    files = output.TaskFiles(str(tmp_path / "out"), limit=1 << 20,
                             forward=lambda batch, task, stream, line: lines.append((task, stream, line)))
    run, task = _Run("1"), _Task(0)
    out_fd, err_fd = files.open(run, task, 1)
    os.write(out_fd, b"one\ntw")
    os.write(err_fd, b"problem\n")
    files.enforce()
    assert lines == [(0, "stdout", b"one"), (0, "stderr", b"problem")]
    os.write(out_fd, b"o\nthree")
    files.ended(run, task, None)
    assert lines[2:] == [(0, "stdout", b"two"), (0, "stdout", b"three")]


@pytest.mark.parametrize("where", ["beside", "tmpfs"])
def test_results_of_an_attempt_hold_its_exit_status(tmp_path, where):
    # On another file system than pmlmd's copy of the output (/dev/shm: tmpfs), where
    # copy_file_range(2) refuses to copy (EXDEV).
    if where == "tmpfs" and (not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev):
        pytest.skip("no /dev/shm on a file system of its own here")
    results = (tmp_path if where == "beside" else Path(tempfile.mkdtemp(dir="/dev/shm"))) / "res"
    on_tmpfs = where == "tmpfs"
    files = output.TaskFiles(str(tmp_path / "out"), limit=1 << 20)
    run, task = _Run("1", results=str(results)), _Task(4)
    out_fd, _ = files.open(run, task, 1)
    os.write(out_fd, b"x\n")
    try:
        files.ended(run, task, Attempt(number=1, pid=None, start=0.0, signal=9))
        assert (results / "4" / "stdout").read_text() == "x\n"
        assert (results / "4" / "stderr").read_text() == ""
        assert (results / "4" / "exit").read_text() == "137\n"
    finally:
        if on_tmpfs:
            shutil.rmtree(results.parent, ignore_errors=True)


def test_keep_only_removes_the_output_of_batches_the_state_has_forgotten(tmp_path):
    files = output.TaskFiles(str(tmp_path / "out"), limit=100)
    for batch_id in ("1", "2"):
        out_fd, _ = files.open(_Run(batch_id), _Task(0), 1)
        os.write(out_fd, b"x")
        files.ended(_Run(batch_id), _Task(0), None)
    assert files.keep_only({"2"}) == 1
    assert os.listdir(tmp_path / "out") == ["2"]


# --- pmlmctl run -----------------------------------------------------------------------------------

def run_ctl(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pmlmd.client.ctl", "run", *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_run_tag_prefixes_each_line_with_its_task(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.write_text("alpha\nbeta\n")
    result = run_ctl("--tag", "--tasks-file", str(tasks), "--", "/bin/sh", "-c", "echo 1 $PMLM_TASK; echo 2 >&2")
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if "\t" in line) == ["alpha\t1 alpha", "beta\t1 beta"]
    assert sorted(line for line in result.stderr.splitlines() if "\t" in line) == ["alpha\t2", "beta\t2"]


def test_run_group_prints_each_tasks_output_together(tmp_path):
    # Both tasks print their first line before either prints its second: line by line they would
    # interleave; grouped, each task's lines come out together.
    script = ("echo $PMLM_TASK_INDEX-1; touch {d}/$PMLM_TASK_INDEX; "
              "while [ ! -e {d}/$((1 - PMLM_TASK_INDEX)) ]; do sleep 0.02; done; echo $PMLM_TASK_INDEX-2"
              ).format(d=tmp_path)
    result = run_ctl("--group", "-n", "2", "-j", "2", "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert lines in (["0-1", "0-2", "1-1", "1-2"], ["1-1", "1-2", "0-1", "0-2"])


def test_run_results_get_each_tasks_output_and_exit_status(tmp_path):
    result = run_ctl("--results", "res", "-n", "2", "--", "/bin/sh", "-c",
                     "echo out-$PMLM_TASK_INDEX; echo err >&2; exit $((PMLM_TASK_INDEX + 4))", cwd=tmp_path)
    assert result.returncode == 1
    for index in (0, 1):
        assert (tmp_path / "res" / str(index) / "stdout").read_text() == f"out-{index}\n"
        assert (tmp_path / "res" / str(index) / "stderr").read_text() == "err\n"
        assert (tmp_path / "res" / str(index) / "exit").read_text() == f"{index + 4}\n"
    # And the output still reaches the terminal (here: pmlmctl's stdout and stderr).
    assert "out-0\n" in result.stdout and "out-1\n" in result.stdout


def test_terminal_sink_writes_whole_lines_only():
    written = []
    sink = output.Terminal(lambda stream, data: written.append((stream, data)), tag=b"t")
    sink.write("stdout", b"ab")
    sink.write("stdout", b"c\nde")
    assert written == [("stdout", b"t\tabc\n")]
    sink.close(None)
    assert written[1:] == [("stdout", b"t\tde\n")]  # the last line ends, so the next output starts afresh


def test_long_lines_reach_wait_whole_and_a_retry_leaves_the_results_alone(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    results = tmp_path / "res"
    # A line longer than a log reply, on stdout, while stderr is written too: nothing is cut.
    script = "head -c 300000 /dev/zero | tr '\\0' x; echo; echo e >&2; [ $PMLM_TASK_INDEX = 0 ]"
    batch = daemon.ctl("submit", "-n", "2", "--results", str(results), "--", "/bin/sh", "-c", script).stdout.strip()
    waited = daemon.ctl("wait", batch)
    assert waited.returncode == 1
    assert [len(line) for line in waited.stdout.splitlines()[:2]] == [300000, 300000]
    assert waited.stderr.startswith("e\ne\n")
    tagged = daemon.ctl("log", batch, "--tag").stdout.splitlines()
    assert [len(line) for line in tagged] == [300002, 300002]
    before = {path: path.read_bytes() for path in results.rglob("*") if path.is_file()}
    retried = daemon.ctl("retry", "--wait", batch)
    assert retried.returncode == 0, retried.stderr  # renumbered from 0, the task succeeds this time
    assert {path: path.read_bytes() for path in results.rglob("*") if path.is_file()} == before


def test_cli_mistakes_in_log_and_results_are_usage_errors(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    bad_task = daemon.ctl("log", "1", "-5")
    assert bad_task.returncode == 2 and "TASK must be between 0 and" in bad_task.stderr
    assert daemon.ctl("log", "42").returncode == 2  # no such batch: a usage error, not "a task failed"
    empty = run_ctl("--results", "", "--", "true", cwd=tmp_path)
    assert empty.returncode == 2 and "--results needs a directory" in empty.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_ends_pmlmctl_quietly(daemon_factory):
    daemon = daemon_factory().start()
    batch = daemon.ctl("submit", "--wait", "--", "seq", "1", "100000").stderr.split()[1]
    # As `pmlmctl log ID | head -1` does: the reader takes one line and closes the pipe.
    reader = subprocess.Popen([PY, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "log", batch],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.readline() == b"1\n"
    reader.stdout.close()
    err = reader.stderr.read()
    assert reader.wait(timeout=60) == 141 and b"Traceback" not in err, err


def test_a_worker_whose_output_files_cannot_be_made_never_writes_into_pmlmds_log(daemon_factory):
    """pmlmd's own stdout and stderr are its log (the journal under systemd): a worker that wrote
    there could forge lines that look like pmlmd's. Its output is lost instead, and that is logged."""
    daemon = daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n").start()
    # The first batch's output directory cannot be made: a plain file holds its name.
    Path(daemon.state_dir, "output", "1").write_text("")
    result = daemon.ctl("submit", "--wait", "--", "sh", "-c",
                        "echo 'CRITICAL pmlmd.daemon: FORGED'; echo FORGED-TOO >&2")
    assert result.returncode == 0, result.stderr
    lines = daemon.logs().splitlines()  # the submit's own line names the command, quoted
    assert "CRITICAL pmlmd.daemon: FORGED" not in lines and "FORGED-TOO" not in lines, lines
    assert "FORGED" not in result.stdout
    assert any("what its workers write is lost" in line for line in lines)
