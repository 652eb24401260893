"""The systemd tier: tests against a real systemd booted in a container (see testbed.py).

pmlmd's Debian package is built once per session from the working tree (``make deb``). One
container serves most of the tier: it is booted, the .deb is installed in it with apt-get (whose
postinst enables and starts pmlmd.service), and it is powered off at the end of the session.
test_package.py, which removes and purges the package, boots a container of its own. Every test
here is marked ``systemd``, so ``-m "not systemd"`` leaves the tier out.
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


def require_host() -> None:
    """Fail (no skip: CI must run this tier) on a machine without what the tier needs."""
    missing = testbed_module.missing_host_tools()
    if missing:
        pytest.fail(f"the systemd tier needs {', '.join(missing)} on the host; `.ci/run` installs them "
                    "(apt-get install --no-install-recommends systemd-container mmdebstrap)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the systemd tier needs root (systemd-nspawn, cgroups); CI runs it as root", pytrace=False)


def _build_deb(out_dir: Path, bump_revision: bool = False) -> Path:
    try:
        return testbed_module.build_deb(REPO_ROOT, out_dir, bump_revision=bump_revision)
    except testbed_module.TestbedError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def pmlmd_deb(tmp_path_factory) -> Path:
    """pmlmd's .deb built from the working tree (`make deb`, into a temp dir: dist/ is left alone)."""
    return _build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def pmlmd_deb_upgrade(tmp_path_factory, pmlmd_deb) -> Path:
    """The same package with the next Debian revision (0.1.0-1 -> 0.1.0-2): an upgrade of pmlmd_deb."""
    return _build_deb(tmp_path_factory.mktemp("deb-upgrade"), bump_revision=True)


@pytest.fixture(scope="session")
def testbed(pmlmd_deb):
    """A booted container with pmlmd installed from its .deb (and so started), for the whole tier."""
    require_host()
    with testbed_module.Testbed() as tb:
        testbed_module.install_deb(tb, pmlmd_deb)
        yield tb


@pytest.fixture
def pmlmd(testbed):
    """pmlmd.service freshly started on an empty state: no batch or scope of an earlier test is left."""
    testbed.run(["systemctl", "stop", UNIT], check=False, timeout=120)
    testbed.run("systemctl stop 'pmlm-*.scope'; rm -rf /var/lib/pmlmd/* /var/lib/pmlmd/.[!.]*", check=False, timeout=120)
    testbed.run(["systemctl", "reset-failed", UNIT], check=False)
    proc = testbed.run(["systemctl", "start", UNIT], check=False, timeout=120)
    assert proc.returncode == 0, f"systemctl start {UNIT} failed:\n{proc.stderr}\n{diagnostics(testbed)}"
    return testbed
