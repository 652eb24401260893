"""The shipped systemd units: pmlmd.service's exposure as systemd-analyze rates it, and its limits.

The exposure is rated offline from the file in the tree, so a change to the unit that loosens
it fails here, on any machine with systemd-analyze, before the systemd tier boots a container
(which rates the installed unit again, tests/systemd/test_hardening.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pmlmd.daemon.config import Config

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = SYSTEMD_DIR / "pmlmd.service"
SLICE = SYSTEMD_DIR / "pmlm.slice"
MAX_EXPOSURE = 4.0
EXPOSURE_RE = re.compile(r"Overall exposure level for pmlmd\.service: (\d+\.\d)")


def settings(path: Path, section: str) -> dict[str, str]:
    """The last value of each key in ``section`` (a later assignment wins, as in systemd)."""
    found: dict[str, str] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


@pytest.fixture(scope="module")
def analysis() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    proc = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(SERVICE)],
                          capture_output=True, text=True, timeout=60)
    assert EXPOSURE_RE.search(proc.stdout), f"no overall exposure in the output:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_exposure_is_at_most_four(analysis):
    exposure = float(EXPOSURE_RE.search(analysis).group(1))
    assert exposure <= MAX_EXPOSURE, f"pmlmd.service is rated {exposure} (at most {MAX_EXPOSURE}):\n{analysis}"


def test_what_workers_need_is_not_taken(analysis):
    """The settings that would break ordinary batch work stay off (see the unit's comments)."""
    for setting in ("PrivateTmp=", "ProtectHome=", "PrivateNetwork=", "PrivateDevices=", "MemoryDenyWriteExecute=",
                    "PrivateUsers="):
        line = next(line for line in analysis.splitlines() if line[2:].startswith(setting))
        assert line.startswith("✗"), line


def test_limit_nofile_is_set():
    value = settings(SERVICE, "Service").get("LimitNOFILE")
    assert value is not None, "pmlmd.service sets no LimitNOFILE"
    soft, _, hard = value.partition(":")
    # Soft stays at 1024 for what workers inherit (select()); pmlmd raises its own to the hard limit.
    assert (int(soft), int(hard or soft)) == (1024, 524288)


def test_the_capability_set_is_the_one_documented():
    caps = settings(SERVICE, "Service")["CapabilityBoundingSet"].split()
    assert sorted(caps) == ["CAP_CHOWN", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_PTRACE"]


def test_the_shipped_slice_carries_the_config_defaults():
    """pmlmd sets the slice's limits from pmlmd.toml at start; before that the file must agree."""
    slice_settings = settings(SLICE, "Slice")
    assert slice_settings["TasksMax"] == Config.slice_tasks_max
    assert slice_settings["MemoryMax"] == Config.slice_memory_max
