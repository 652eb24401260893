"""pmlmd's Debian package, installed the way an operator installs it: `apt-get install ./pmlmd_*.deb`.

These tests change the container's package state (upgrade, remove, purge), so they boot a
container of their own (``pkgbed``) and leave the tier's shared one alone. They run in file
order: install and use, then upgrade, then remove, then purge. Each test that needs the package
installed (re)installs it if an earlier one left it removed, so any of them can also run alone.
"""

from __future__ import annotations

import json

import pytest

import testbed as testbed_module
from conftest import require_host
from tier import UNIT, diagnostics, show, wait_inside

CONFFILE = "/etc/pmlmd/pmlmd.toml"


@pytest.fixture(scope="module")
def pkgbed(pmlmd_deb):
    """A container of this module's own, with pmlmd_deb installed; ``install_log`` is apt's output."""
    require_host()
    with testbed_module.Testbed() as tb:
        proc = testbed_module.install_deb(tb, pmlmd_deb)
        tb.install_log = proc.stdout + proc.stderr
        yield tb


def package_status(tb) -> str:
    proc = tb.run(["dpkg-query", "-W", "-f=${Version} ${db:Status-Abbrev}", "pmlmd"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "not known"


@pytest.fixture
def installed(pkgbed, pmlmd_deb):
    """pkgbed with the package installed, whatever an earlier test did to it."""
    if not package_status(pkgbed).endswith("ii"):
        testbed_module.install_deb(pkgbed, pmlmd_deb)
    return pkgbed


def add_user(tb, name: str, *groups: str) -> None:
    tb.run(f"id {name} >/dev/null 2>&1 || useradd --create-home --shell /bin/sh {name}")
    for group in groups:
        tb.run(["adduser", "--quiet", name, group])


def as_user(tb, name: str, command: str, timeout: float = 120):
    """``command`` in a login shell of ``name`` (its home, its groups as of now)."""
    return tb.run(["runuser", "-l", name, "-c", command], check=False, timeout=timeout)


def test_install_enables_and_starts_the_service(pkgbed):
    assert "Setting up pmlmd (" in pkgbed.install_log, pkgbed.install_log
    assert pkgbed.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() == "enabled"
    state = pkgbed.run(["systemctl", "is-active", UNIT], check=False).stdout.strip()
    assert state == "active", f"{state}\n{pkgbed.install_log}\n{diagnostics(pkgbed)}"
    # The postinst made the group before the service started, so the socket got it.
    assert pkgbed.run(["getent", "group", "pmlm"], check=False).returncode == 0
    socket = pkgbed.run(["stat", "-c", "%a %U %G", "/run/pmlmd/control.sock"]).stdout.strip()
    assert socket == "660 root pmlm"


def test_files_are_where_the_package_promises(installed):
    for path in ("/usr/sbin/pmlmd", "/usr/bin/pmlmctl"):
        assert installed.run(["test", "-x", path], check=False).returncode == 0, f"{path} missing"
    assert installed.run(["test", "-e", "/usr/bin/pmlmd"], check=False).returncode != 0, "pmlmd in /usr/bin"
    for path in ("/lib/systemd/system/pmlmd.service", "/lib/systemd/system/pmlm.slice",
                 "/usr/share/bash-completion/completions/pmlmctl",
                 "/usr/share/doc/pmlmd/README.md.gz", "/usr/share/doc/pmlmd/changelog.Debian.gz"):
        assert installed.run(["test", "-f", path], check=False).returncode == 0, f"{path} missing"
    assert show(installed, "ExecStart").startswith("{ path=/usr/sbin/pmlmd ")


def test_man_pages(installed):
    for section, page in (("1", "pmlmctl"), ("8", "pmlmd"), ("5", "pmlmd.toml")):
        proc = installed.run(["man", "-w", section, page], check=False)
        assert proc.returncode == 0, f"man -w {section} {page}: {proc.stderr}"
        assert proc.stdout.strip() == f"/usr/share/man/man{section}/{page}.{section}.gz"
    page = installed.run(["man", "pmlmctl"])
    assert "SYNOPSIS" in page.stdout and "EXIT STATUS" in page.stdout, page.stdout[:500]


def test_conffile(installed):
    conffiles = installed.run(["dpkg-query", "-W", "-f=${Conffiles}", "pmlmd"]).stdout
    assert CONFFILE in conffiles.split(), conffiles
    assert "[daemon]" in installed.run(["cat", CONFFILE]).stdout


def test_group_member_submits(installed):
    add_user(installed, "alice", "pmlm")
    proc = as_user(installed, "alice", "pmlmctl submit --wait -n 4 -- sleep 1")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{diagnostics(installed)}"
    assert "4 succeeded" in proc.stdout + proc.stderr


def test_user_outside_the_group_is_refused(installed):
    add_user(installed, "bob")
    proc = as_user(installed, "bob", "pmlmctl submit --wait -n 1 -- true", timeout=60)
    assert proc.returncode == 4, f"{proc.returncode}: {proc.stdout}{proc.stderr}"
    assert "permission denied" in proc.stderr


def test_upgrade_keeps_running_batches(installed, pmlmd_deb_upgrade):
    before = package_status(installed)
    main_pid = show(installed, "MainPID")
    # The first attempt of each task sleeps through the upgrade and leaves a marker when it ends by
    # itself. (pmlmd runs a task again when an adopted worker ends, since its exit status is lost;
    # that quick second attempt is what makes the task "succeeded".)
    marker = "/tmp/pmlm-upgrade-$PMLM_TASK_INDEX-$PMLM_ATTEMPT"
    script = f'if [ "$PMLM_ATTEMPT" = 1 ]; then sleep 6; fi; touch {marker}'
    installed.run("rm -f /tmp/pmlm-upgrade-*")
    batch = installed.run(["pmlmctl", "submit", "-n", "4", "-j", "4", "--shell", "--", script]).stdout.strip()
    wait_inside(installed, ["pmlmctl", "status", "--json", batch],
                lambda p: p.returncode == 0 and json.loads(p.stdout)["counts"]["running"] == 4,
                what="4 running workers")

    proc = testbed_module.install_deb(installed, pmlmd_deb_upgrade, check=False)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{diagnostics(installed)}"
    early = installed.run("ls /tmp | grep -c '^pmlm-upgrade-' || true").stdout.strip()
    assert early == "0", "the first attempts ended before the upgrade was over: the test proves nothing"
    after = package_status(installed)
    assert before.split()[0] != after.split()[0] and after.endswith("ii"), f"{before} -> {after}"
    assert show(installed, "MainPID") != main_pid, "the upgrade did not restart pmlmd"
    assert installed.run(["systemctl", "is-active", f"pmlm-{batch}.scope"], check=False).stdout.strip() == "active"

    wait_inside(installed, ["pmlmctl", "status", "--json", batch],
                lambda p: p.returncode == 0 and json.loads(p.stdout)["state"] == "finished",
                timeout=60, what=f"batch {batch} to finish")
    report = json.loads(installed.run(["pmlmctl", "report", batch]).stdout)
    assert [t["status"] for t in report["tasks"]] == ["succeeded"] * 4, json.dumps(report["tasks"], indent=1)
    assert report["exit_status"] == 0
    markers = installed.run("ls /tmp | grep '^pmlm-upgrade-.*-1$' || true").stdout.split()
    assert sorted(markers) == [f"pmlm-upgrade-{i}-1" for i in range(4)], \
        f"first attempts that did not run to their end across the upgrade: {markers}"


def test_remove_stops_the_service(installed):
    installed.run(["systemctl", "start", UNIT], timeout=120)
    proc = installed.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y pmlmd", check=False, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
    assert installed.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
    assert installed.run(["pgrep", "-f", "/usr/sbin/pmlmd"], check=False).returncode == 1
    assert package_status(installed).endswith("rc")
    # Removal keeps what purge deletes: the configuration and the batches' state.
    assert installed.run(["test", "-f", CONFFILE], check=False).returncode == 0
    assert installed.run(["test", "-d", "/var/lib/pmlmd"], check=False).returncode == 0


def test_purge_removes_the_state(pkgbed, pmlmd_deb):
    if not package_status(pkgbed).endswith(("ii", "rc")):
        testbed_module.install_deb(pkgbed, pmlmd_deb)  # run alone: there is nothing to purge yet
    assert pkgbed.run(["test", "-f", "/var/lib/pmlmd/state.db"], check=False).returncode == 0
    proc = pkgbed.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y pmlmd", check=False, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
    assert package_status(pkgbed) in ("not known", "pn"), package_status(pkgbed)
    for path in ("/var/lib/pmlmd", "/etc/pmlmd", "/run/pmlmd",
                 "/etc/systemd/system/multi-user.target.wants/pmlmd.service"):
        assert pkgbed.run(["test", "-e", path], check=False).returncode != 0, f"{path} left after purge"
    assert pkgbed.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
    # The system group stays (files and memberships may still name it; a reinstall reuses it).
    assert pkgbed.run(["getent", "group", "pmlm"], check=False).returncode == 0
