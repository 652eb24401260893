"""Fixtures of the host tiers: pmlmctl runs and pmlmd daemons, ended with the test whatever happens."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from support import Daemon, PmlmRun


@pytest.fixture
def pmlm(tmp_path):
    """Start ``pmlmctl run`` processes; all of them and their workers end with the test."""
    runs: list[PmlmRun] = []

    def start(*args: str, stdin: str | None = None) -> PmlmRun:
        run = PmlmRun(tmp_path, list(args), stdin=stdin)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill_everything()


@pytest.fixture
def daemon_factory():
    """Make daemons; each runs in a short private directory (socket paths must stay under 108 bytes)."""
    made: list[Daemon] = []

    def make(config: str = "", env: dict | None = None) -> Daemon:
        base = Path(tempfile.mkdtemp(prefix="pmlm-"))
        base.chmod(0o755)
        d = Daemon(base, config, env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
        shutil.rmtree(d.base, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory):
    """A running pmlmd with the default limits."""
    return daemon_factory().start()


@pytest.fixture(scope="module")
def _broker_node():
    """One private RabbitMQ per test module (it takes seconds to start), always closed at its end."""
    import broker as brokerlib

    brokerlib.need()
    node = brokerlib.Broker()
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def broker(_broker_node):
    """The module's private RabbitMQ, running: started again if an earlier test stopped it and
    failed before starting it. Tests use queue names of their own; the data is shared."""
    return _broker_node.start()
