"""The VM tier on the host: boot the VM once and require that every guest test passed inside.

The guest tests themselves are in tests/vm/guest (run there by guest.sh). To run one of them
alone: ``python3 tests/vm/vm.py run tests/vm/guest/FILE.py::NAME``.
"""

from __future__ import annotations

import os

import pytest

import vm


def require_host() -> None:
    """Fail (no skip: CI must run this tier) on a machine without what the tier needs."""
    missing = vm.missing_host_packages()
    if missing:
        pytest.fail(f"the VM tier needs the host packages {', '.join(missing)}; `.ci/run` installs them "
                    f"(apt-get install --no-install-recommends {' '.join(missing)})", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the VM tier needs root (mmdebstrap builds its image as root, cached under "
                    f"{vm.CACHE_DIR}); CI runs it as root", pytrace=False)


def test_guest_suite_passes():
    require_host()
    try:
        run = vm.run_guest()
    except (vm.VMError, vm.testbed.TestbedError) as e:
        raise AssertionError(f"the VM could not be built or booted: {e}") from None
    if run.returncode is None:
        reason = f"was killed after {vm.RUN_TIMEOUT:.0f}s" if run.timed_out else "never wrote its exit status"
        raise AssertionError(f"the guest {reason}; its console:\n{run.tail(120)}")
    assert run.returncode == 0, (f"the guest tests failed (pytest's exit status {run.returncode} in the VM); "
                                 f"the end of its console:\n{run.tail(120)}")
