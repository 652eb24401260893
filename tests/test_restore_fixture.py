"""A state.db as an older pmlmd left it restores in today's pmlmd: the upgrade a package install
makes, restart included. The file (tests/fixtures/state-v4/state.db, schema 4) was written by
pmlmd at commit 0eb28b5 and never changes; tests/fixtures/make_state_v4.py says how it was made
and what it holds. A change that breaks reading it (a column renamed, a stored submission no
longer accepted, a status spelled anew) fails here, as it would fail every node that upgrades
with batches in its state."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from support import wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "state-v4" / "state.db"
CONFIG = '[daemon]\nscope_backend = "none"\n'


def _restored(daemon_factory):
    d = daemon_factory(CONFIG)
    os.makedirs(d.state_dir)
    shutil.copy(FIXTURE, d.state_dir)
    return d.start()


def _status(d, batch: str) -> dict:
    with d.client() as c:
        return c.call("status", batch=batch)


def test_a_state_written_by_an_older_pmlmd_restores_every_batch_as_it_stood(daemon_factory):
    d = _restored(daemon_factory)
    with d.client() as c:
        batches = {b["batch"]: b for b in c.call("list")["batches"]}
    assert {b: (s["name"], s["tasks"]) for b, s in batches.items()} == {
        "1": ("finished", 3), "2": ("cancelled", 4), "3": ("running", 2), "4": ("held", 3)}
    assert batches["1"]["state"] == "failed" and batches["1"]["counts"]["failed"] == 1
    assert batches["2"]["state"] == "cancelled" and batches["2"]["counts"]["cancelled"] == 4
    # The finished batch's report is the one the older pmlmd stored, the task line that is not
    # UTF-8 included (surrogate-escaped, as in every report).
    report = json.loads(d.ctl("report", "1").stdout)
    assert [(t["task"], t["status"], t["attempts"][0]["exit_code"]) for t in report["tasks"]] == [
        ("alpha", "succeeded", 0), ("caf\udce9 latin-1", "failed", 3), ("omega", "succeeded", 0)]
    # New ids go on after the restored ones.
    new = d.ctl("submit", "--", "true")
    assert new.returncode == 0 and new.stdout.strip() == "5", new.stderr


def test_a_worker_lost_with_the_older_pmlmd_is_run_again_and_a_held_batch_stays_held(daemon_factory):
    d = _restored(daemon_factory)
    # Batch 3's task 1 was running when that pmlmd was killed; its worker is gone now.
    wait_for(lambda: _status(d, "3")["state"] == "finished", what="batch 3 finished", timeout=60)
    attempts = json.loads(d.ctl("report", "3").stdout)["tasks"][1]["attempts"]
    assert [(a["number"], a["cause"]) for a in attempts] == [(1, "daemon-restart"), (2, "exit")]
    assert "task 1 attempt 2" in d.ctl("log", "3", "1").stdout
    # Batch 4 was held (pmlmctl pause) with task 1's worker stopped: held it stays, that task
    # queued again, until resumed.
    held = _status(d, "4")
    assert held["state"] == "paused" and (held["counts"]["succeeded"], held["counts"]["queued"]) == (1, 2)
    assert d.ctl("resume", "4").returncode == 0
    wait_for(lambda: _status(d, "4")["state"] == "finished", what="batch 4 finished", timeout=60)
    assert _status(d, "4")["counts"]["succeeded"] == 3
    assert "task 1 attempt 2" in d.ctl("log", "4", "1").stdout


def test_a_batch_the_older_pmlmd_finished_is_retried_with_its_stored_submission(daemon_factory):
    """retry takes the command, line, directory and environment from the stored record."""
    d = _restored(daemon_factory)
    r = subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", "--socket", d.socket, "retry", "--failed", "1", "--wait"],
                       capture_output=True, timeout=120, env={**os.environ, "PMLM_FIXTURE": "not this one"}, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    # Renumbered from 0, so the task that failed as index 1 succeeds; the bytes of its line, the
    # submitter's environment (PMLM_FIXTURE=v4) and its directory (/) are those stored.
    assert r.stdout.splitlines()[0] == b"line: caf\xe9 latin-1 (v4 in /)"


def test_the_fixture_is_schema_4_and_restoring_it_leaves_it_untouched(daemon_factory):
    with sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("4",)
    before = FIXTURE.read_bytes()
    d = _restored(daemon_factory)
    assert d.ctl("list").returncode == 0
    assert FIXTURE.read_bytes() == before
