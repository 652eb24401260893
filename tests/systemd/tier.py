"""Helpers shared by the systemd tier's tests: looking at pmlmd.service from inside the container."""

from __future__ import annotations

import time

UNIT = "pmlmd"
READY_LINE = "ready on /run/pmlmd/control.sock"


def wait_inside(testbed, cmd, predicate, timeout=10.0, what="condition"):
    """Run ``cmd`` inside until predicate(CompletedProcess) holds; the last result otherwise fails."""
    deadline = time.monotonic() + timeout
    while True:
        proc = testbed.run(cmd, check=False)
        if predicate(proc):
            return proc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last output of {cmd!r}:\n"
                                 f"{proc.stdout}{proc.stderr}\n{diagnostics(testbed)}")
        time.sleep(0.1)


def diagnostics(testbed) -> str:
    """The unit's status and recent journal, for assertion messages."""
    status = testbed.run(["systemctl", "status", "--no-pager", "--full", UNIT], check=False)
    journal = testbed.run(["journalctl", "--no-pager", "-n", "40", "-u", UNIT], check=False)
    return f"--- systemctl status {UNIT} ---\n{status.stdout}\n--- journalctl -u {UNIT} ---\n{journal.stdout}"


def show(testbed, prop: str) -> str:
    return testbed.run(["systemctl", "show", "-p", prop, "--value", UNIT]).stdout.strip()
