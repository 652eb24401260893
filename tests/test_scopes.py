"""Placing workers: the gate that holds a worker until it is inside its batch's scope.

The systemd backend itself needs a real systemd and is tested in tests/systemd; here a
recording backend (a test double for the D-Bus calls, which cannot run on this host)
checks the order the engine keeps: the worker exists, is placed, and only then runs
the user's command.
"""

import os
import time

from pmlmd.batch import Batch, BatchSpec
from pmlmd.engine import BatchRun, Engine, Loop
from pmlmd.governor import Limits
from pmlmd.scopes import NoScopes, batch_of_scope, scope_name


class RecordingScopes(NoScopes):
    name = "recording"
    gated = True

    def __init__(self, marker_dir):
        self.marker_dir = marker_dir
        self.placed = []

    def place(self, batch_id, description, pid):
        # At this moment the worker must exist but must not have run the command yet.
        started_early = os.listdir(self.marker_dir)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        self.placed.append((batch_id, description, pid, started_early, cmdline[:1]))
        return True


def test_scope_names_round_trip():
    assert scope_name("42") == "pmlm-42.scope"
    assert batch_of_scope("pmlm-42.scope") == "42"
    assert batch_of_scope("ssh.service") is None


def test_a_gated_worker_runs_its_command_only_after_it_was_placed(tmp_path):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    scopes = RecordingScopes(str(marker_dir))
    loop = Loop()
    engine = Engine(Limits(), loop, scopes=scopes)
    # $$ is the worker's pid: the gate execs the command in its own place.
    spec = BatchSpec(batch_id="7", command=["/bin/sh", "-c", f"touch {marker_dir}/$$"],
                     tasks=[None, None], limits=Limits())
    engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits, description="pmlmd batch 7 of root"))
    try:
        deadline = time.monotonic() + 30
        while engine.busy() and time.monotonic() < deadline:
            loop.poll(engine.next_deadline() - time.monotonic())
            engine.tick()
    finally:
        engine.abandon()
        loop.close()
    placed_pids = [pid for _, _, pid, _, _ in scopes.placed]
    assert sorted(os.listdir(marker_dir)) == sorted(str(pid) for pid in placed_pids)  # each ran, once placed
    for batch_id, description, pid, early, argv0 in scopes.placed:
        assert (batch_id, description, argv0) == ("7", "pmlmd batch 7 of root", [b"/bin/sh"])
        assert str(pid) not in early  # it had not run the command when it was placed
