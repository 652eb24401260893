"""A full disk and a damaged state.db, with a real pmlmd, real SQLite files and a real small file system.

The full-disk test mounts a tmpfs of a few MiB as the daemon's state directory (it needs root, as
mount does; it is skipped otherwise) and fills it with a file until ENOSPC.
"""

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from support import process_state, wait_for

PY = sys.executable


def status(daemon, batch=None):
    with daemon.client() as client:
        return client.call("status", batch=batch)


def ping(daemon):
    with daemon.client() as client:
        return client.call("ping")


def blocked_task(go: Path) -> list[str]:
    """A worker that runs until ``go`` exists (the test decides when it ends; an adopted worker's
    exit status cannot be known, so its task may run again: that one ends too)."""
    return ["--shell", "--", f"while [ ! -e {go} ]; do sleep 0.05; done"]


def release(go: Path) -> None:
    go.touch()


def running_worker(daemon, batch: str) -> int:
    def found():
        with closing(sqlite3.connect(Path(daemon.state_dir) / "state.db")) as db:
            row = db.execute("SELECT pid FROM attempts WHERE batch_id=? AND end IS NULL", (batch,)).fetchone()
        return row and row[0]
    return wait_for(found, what=f"a worker of batch {batch} recorded")


def start_refused(daemon) -> int:
    """Start pmlmd expecting it to refuse: its exit status."""
    with pytest.raises(AssertionError):
        daemon.start(timeout=30)
    return daemon.proc.wait(timeout=30)


def succeeded(daemon, batch: str):
    def ended():
        try:
            s = status(daemon, batch)
        except Exception:  # not in the state yet (a full disk): the summary is read from the file
            return None
        return s["ended"] is not None and s
    return wait_for(ended, timeout=60, what=f"batch {batch} to end")


def test_an_empty_state_db_is_restored_from_the_backup_and_ids_go_on(daemon_factory, tmp_path):
    fifo = tmp_path / "go"
    daemon = daemon_factory().start()
    done = daemon.ctl("submit", "--wait", "--", "true")
    assert done.returncode == 0, done.stderr
    batch = daemon.ctl("submit", *blocked_task(fifo)).stdout.strip()
    pid = running_worker(daemon, batch)
    assert daemon.stop() == 0  # the worker goes on; a clean stop leaves a backup
    state = Path(daemon.state_dir)
    assert (state / "state.db.backup").exists()
    assert (state / "last-batch-id").exists()
    os.truncate(state / "state.db", 0)

    daemon.start()
    logs = daemon.logs()
    assert "was empty" in logs and "restored from the backup" in logs, logs
    assert "Traceback" not in logs
    assert glob.glob(str(state / "state.db.damaged-*"))
    # The active batch and its running worker are not forgotten.
    summary = status(daemon, batch)
    assert summary["ended"] is None
    assert pid in daemon.worker_pids()[-1]
    new = daemon.ctl("submit", "--", "true").stdout.strip()
    assert int(new) > int(batch), (new, batch)  # no id is handed out twice
    release(fifo)
    assert succeeded(daemon, batch)["counts"]["succeeded"] == 1

    # No usable backup: the start is refused, in one line, and an empty state is started only when asked.
    assert daemon.stop() == 0
    os.unlink(state / "state.db.backup")
    os.truncate(state / "state.db", 0)
    assert start_refused(daemon) == 1
    logs = daemon.logs()
    assert "a state existed" in logs and "start-empty" in logs and "Traceback" not in logs, logs
    daemon.log.close()
    (state / "start-empty").touch()
    daemon.start()
    assert not (state / "start-empty").exists()
    # Stopped before any id was handed out: the next start finds a whole state, and goes on
    # above the mark all the same.
    assert daemon.stop() == 0
    daemon.start()
    again = daemon.ctl("submit", "--", "true").stdout.strip()
    assert int(again) > int(new), (again, new)


def test_a_second_pmlmd_on_the_same_state_is_refused(daemon_factory):
    # It would adopt the first one's workers and run their tasks again beside them.
    first = daemon_factory().start()
    second = daemon_factory()
    second.state_dir = first.state_dir
    assert start_refused(second) == 1
    said = [line for line in second.logs().splitlines() if line.startswith("pmlmd: ")]
    assert said == [f"pmlmd: another pmlmd (pid {first.proc.pid}) uses the state in {first.state_dir}: stop it "
                    "first, or give this one a state directory of its own (--state-dir, state_dir in pmlmd.toml)"], \
        second.logs()
    assert first.ctl("submit", "--wait", "--", "true").returncode == 0
    # Once the first has stopped, however it stopped, the state is free for the next.
    first.stop(signal.SIGKILL)
    second.start()
    assert second.ctl("submit", "--wait", "--", "true").returncode == 0


def test_a_corrupt_page_is_told_in_one_line_not_a_traceback(daemon_factory):
    daemon = daemon_factory().start()
    for _ in range(3):
        assert daemon.ctl("submit", "--wait", "-n", "3", "--", "true").returncode == 0
    assert daemon.stop() == 0
    state = Path(daemon.state_dir)
    db = state / "state.db"
    pages = db.stat().st_size // 4096
    assert pages >= 4
    with open(db, "r+b") as f:  # garbage over a page in the middle: no valid b-tree page starts with 0xff
        f.seek(pages // 2 * 4096)
        f.write(b"\xff" * 4096)
    (state / "state.db.backup").unlink(missing_ok=True)
    before = len(daemon.logs())
    assert start_refused(daemon) == 1
    logs = daemon.logs()[before:]
    assert "Traceback" not in logs, logs
    (said,) = [line for line in logs.splitlines() if line.startswith("pmlmd: ")]
    assert "is damaged (database disk image is malformed)" in said and "state.db.damaged-" in said, logs


def fill(path: Path) -> None:
    """Write ``path`` until its file system has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == 28, e
                size //= 2
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_keeps_the_daemon_running_and_the_state_catches_up(daemon_factory, tmp_path):
    fifo = tmp_path / "go"
    daemon = daemon_factory()
    state = Path(daemon.state_dir)
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", str(state)], check=True)
    filler = state / "filler"
    try:
        daemon.start()
        batch = daemon.ctl("submit", *blocked_task(fifo)).stdout.strip()
        pid = running_worker(daemon, batch)
        fill(filler)

        refused = daemon.ctl("submit", "--", "true")
        assert refused.returncode != 0
        assert f"no space in STATE_DIR ({state}): free space, then submit again" in refused.stderr, refused.stderr
        # The worker is still governed: pause stops it, resume continues it (their writes wait for space).
        assert daemon.ctl("pause", batch).returncode == 0
        wait_for(lambda: process_state(pid) == "T", what="the worker stopped")
        assert daemon.ctl("resume", batch).returncode == 0
        wait_for(lambda: process_state(pid) != "T", what="the worker continued")
        release(fifo)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the worker reaped")
        assert ping(daemon)["pid"] == daemon.proc.pid
        assert daemon.proc.poll() is None
        assert "pmlmd goes on, refuses submits and writes the state again once it can" in daemon.logs()

        # Ended while its end cannot be written: status, list and report answer from memory.
        assert succeeded(daemon, batch)["counts"]["succeeded"] == 1
        assert [b["batch"] for b in json.loads(daemon.ctl("list", "--json").stdout)] == [batch]
        assert json.loads(daemon.ctl("report", batch).stdout)["exit_status"] == 0

        os.unlink(filler)  # space returns: the end is written without a restart

        def written():
            with closing(sqlite3.connect(state / "state.db")) as db:  # closed: it would keep the WAL index
                return db.execute("SELECT state FROM batches WHERE id=?", (batch,)).fetchone() == ("finished",)
        wait_for(written, what="the batch's end written to the state")
        with closing(sqlite3.connect(state / "state.db")) as db:
            assert db.execute("SELECT end IS NOT NULL, exit_code FROM attempts WHERE batch_id=?",
                              (batch,)).fetchall() == [(1, 0)]
        after = daemon.ctl("submit", "--wait", "--", "true")
        assert after.returncode == 0, after.stderr + daemon.logs()
        assert "Traceback" not in daemon.logs()

        # A start on a full disk comes up degraded: it answers, refuses submits, and takes them once there is space.
        assert daemon.stop() == 0
        fill(filler)
        daemon.start()
        assert ping(daemon)["pid"] == daemon.proc.pid
        wait_for(lambda: "the state cannot be written yet" in daemon.logs(), what="a retry that failed")
        listed = daemon.ctl("list")  # the state is still read after a retry failed
        assert listed.returncode == 0 and batch in listed.stdout, listed.stderr
        refused = daemon.ctl("submit", "--", "true")
        assert refused.returncode != 0 and "no space in STATE_DIR" in refused.stderr, refused.stderr
        os.unlink(filler)
        later = daemon.ctl("submit", "--wait", "--", "true")
        assert later.returncode == 0, later.stderr + daemon.logs()
        assert "Traceback" not in daemon.logs()
    finally:
        filler.unlink(missing_ok=True)
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
        daemon.cleanup()  # ends the workers it recorded, while the state can still be read
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_backup_or_kept_output_is_a_sign_that_a_state_existed(daemon_factory):
    daemon = daemon_factory().start()
    ids = [daemon.ctl("submit", "--wait", "--", "echo", "hi").stderr.split()[1] for _ in range(2)]
    assert daemon.stop() == 0  # a clean stop writes the backup
    state = Path(daemon.state_dir)
    assert (state / "state.db.backup").exists()
    for name in ("state.db", "state.db-wal", "state.db-shm", "last-batch-id"):
        if (state / name).exists():
            (state / name).unlink()
    daemon.start()
    # Not an empty state over the old one: restored from the backup, and no id handed out again.
    assert [b["batch"] for b in json.loads(daemon.ctl("list", "--json").stdout)] == ids
    assert daemon.ctl("log", ids[0]).stdout == "hi\n"  # its output was not removed either
    new = daemon.ctl("submit", "--", "true").stdout.strip()
    assert int(new) > max(int(i) for i in ids)


def test_a_last_batch_id_that_is_not_a_number_costs_no_traceback(daemon_factory):
    daemon = daemon_factory().start()
    first = daemon.ctl("submit", "--wait", "--", "true").stderr.split()[1]
    assert daemon.stop() == 0
    (Path(daemon.state_dir) / "last-batch-id").write_bytes(b"\xff\xfe")
    daemon.start()
    assert "Traceback" not in daemon.logs()
    assert "holds no batch id" in daemon.logs()
    assert int(daemon.ctl("submit", "--", "true").stdout.strip()) > int(first)
