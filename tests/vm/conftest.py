"""The VM tier: tests that need the kernel's cgroup2 memory and cpu controllers, run in a qemu VM.

The host's pytest runs one test here (test_vm_tier.py) that boots the VM once (vm.py) and asserts
that the guest suite, tests/vm/guest, passed inside. Those guest tests run under the guest's own
pytest only: the host never collects them. Every host test here is marked ``vm``, so
``-m "not vm"`` leaves the tier out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# test_vm_tier.py imports vm.py from here: pytest's default import mode already puts this
# directory on sys.path; other modes do not.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# The guest tests need the guest's kernel: they run there only (guest.sh), never under the host's pytest.
collect_ignore = ["guest"]


def pytest_collection_modifyitems(config, items):
    # This hook sees every item of the session: mark only the tests under this directory.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)

