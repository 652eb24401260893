"""The systemd tier: tests against a real systemd booted in a container (see testbed.py).

One container serves the whole tier: it is booted, pmlmd is installed in it from the working
tree, and it is powered off at the end of the session. Every test here is marked ``systemd``,
so ``-m "not systemd"`` leaves the tier out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

# pytest's default import mode already puts this directory on sys.path; other modes do not.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import testbed as testbed_module  # noqa: E402
from tier import UNIT, diagnostics  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session, not just ours: mark only tests under here.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.systemd)


@pytest.fixture(scope="session")
def testbed():
    """A booted container with pmlmd installed (not started), for the whole tier."""
    # No skip: CI must run this tier, so a machine without the tools is a failure to fix.
    missing = testbed_module.missing_host_tools()
    if missing:
        pytest.fail(f"the systemd tier needs {', '.join(missing)} on the host; `.ci/run` installs them "
                    "(apt-get install --no-install-recommends systemd-container mmdebstrap)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the systemd tier needs root (systemd-nspawn, cgroups); CI runs it as root", pytrace=False)
    with testbed_module.Testbed() as tb:
        testbed_module.install_pmlmd(tb, REPO_ROOT)
        yield tb


@pytest.fixture
def pmlmd(testbed):
    """pmlmd.service freshly started on an empty state: no batch or scope of an earlier test is left."""
    testbed.run(["systemctl", "stop", UNIT], check=False, timeout=120)
    testbed.run("systemctl stop 'pmlm-*.scope'; rm -f /var/lib/pmlmd/state.db*", check=False, timeout=120)
    testbed.run(["systemctl", "reset-failed", UNIT], check=False)
    proc = testbed.run(["systemctl", "start", UNIT], check=False, timeout=120)
    assert proc.returncode == 0, f"systemctl start {UNIT} failed:\n{proc.stderr}\n{diagnostics(testbed)}"
    return testbed
