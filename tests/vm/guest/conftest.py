"""Fixtures of the guest tests, which run inside the test VM only (tests/vm/guest.sh runs them).

The guest boots with no systemd: cgroup2 alone is mounted at /sys/fs/cgroup, the test process
is in the root cgroup ("0::/" in /proc/self/cgroup), and the root's cgroup.subtree_control
starts empty, as the kernel made it. The repository is /mnt/src (read-only) and on PYTHONPATH.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

CGROUP_ROOT = Path("/sys/fs/cgroup")
HERE = Path(__file__).resolve().parent


def in_the_vm() -> bool:
    """Whether this is the test VM: its kernel was started with the VM's own init (tests/vm/vm.py)."""
    try:
        return "init=/sbin/pmlm-vm-init" in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    # The host's pytest never collects this directory (tests/vm/conftest.py), unless it is named
    # on the command line: then say where these tests run instead of running them on a host whose
    # cgroups are not what they test.
    if in_the_vm():
        return
    skip = pytest.mark.skip(reason="a guest test: it runs inside the VM (python3 tests/vm/vm.py run PATH)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def _write(path: Path, text: str) -> None:
    # One write(2) per call: cgroupfs takes each write as one command.
    with open(path, "w") as f:
        f.write(text)


def remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Kill everything in ``path`` and its children (cgroup.kill) and remove them, deepest first."""
    if not path.is_dir():
        return
    _write(path / "cgroup.kill", "1")
    deadline = time.monotonic() + timeout
    # Killed processes leave asynchronously: "populated 0" in cgroup.events says they are gone.
    while "populated 1" in (path / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still populated {timeout}s after cgroup.kill")
        time.sleep(0.05)
    for sub, _, _ in os.walk(path, topdown=False):
        os.rmdir(sub)


@pytest.fixture
def scratch_cgroup():
    """A fresh child of the root cgroup with the memory and cpu controllers on; gone after the test.

    The controllers are enabled in the root's subtree_control for the test and the ones this
    fixture enabled are disabled again afterwards, so every test starts from the kernel's state.
    """
    control = CGROUP_ROOT / "cgroup.subtree_control"
    enabled = [c for c in ("memory", "cpu") if c not in control.read_text().split()]
    if enabled:
        _write(control, " ".join("+" + c for c in enabled))
    path = CGROUP_ROOT / f"pmlm-test-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_cgroup(path)
        if enabled:
            _write(control, " ".join("-" + c for c in enabled))
