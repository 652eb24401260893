"""First tests of the systemd tier: the container's systemd itself, and pmlmd.service's life cycle.

Everything is looked at from inside, the way an operator would: systemctl, journalctl, pmlmctl.
The tests share one container (the session's ``testbed``); each one that needs a running pmlmd
starts it itself, so they do not depend on each other's order.
"""

from __future__ import annotations

from tier import READY_LINE, UNIT, diagnostics, show, wait_inside


def test_container_runs_systemd_on_cgroup2_only(testbed):
    state = testbed.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    failed = testbed.run(["systemctl", "--failed", "--no-legend", "--no-pager"], check=False).stdout
    assert state == "running", f"is-system-running: {state}; failed units:\n{failed}"
    assert testbed.run(["stat", "-fc", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
    assert testbed.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"


def test_start_returns_only_after_ready(testbed):
    testbed.run(["systemctl", "stop", UNIT], timeout=120)
    # One script, so nothing but the shell stands between start returning and the two checks.
    proc = testbed.run(f"systemctl start {UNIT} && systemctl is-active {UNIT} && pmlmctl status",
                       check=False, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{diagnostics(testbed)}"
    assert proc.stdout.splitlines()[0] == "active"


def test_status_shows_the_status_line(pmlmd):
    def has_line(proc):
        return "0 batches, 0 running, 0 paused" in proc.stdout
    # STATUS= comes with READY=1 and then every second: poll rather than guess.
    proc = wait_inside(pmlmd, ["systemctl", "status", "--no-pager", "--full", UNIT], has_line,
                       what="the STATUS= line in systemctl status")
    status_line = next(line for line in proc.stdout.splitlines() if "Status:" in line)
    assert "0 batches, 0 running, 0 paused" in status_line


def test_submit_wait_as_root(pmlmd):
    proc = pmlmd.run(["pmlmctl", "submit", "--wait", "-n", "4", "--", "sleep", "0.5"], check=False, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{diagnostics(pmlmd)}"


def test_journal_has_the_ready_line(pmlmd):
    wait_inside(pmlmd, ["journalctl", "--no-pager", "-o", "cat", "-u", UNIT],
                lambda proc: READY_LINE in proc.stdout, what=f"{READY_LINE!r} in the journal")


def test_reload_with_a_broken_config_fails_and_pmlmd_keeps_running(pmlmd):
    config = "/etc/pmlmd/pmlmd.toml"
    saved = pmlmd.run(["cat", config]).stdout
    main_pid = show(pmlmd, "MainPID")
    try:
        pmlmd.run(f"cat > {config}", input="[limits]\ncpu_limt = 50\n")
        proc = pmlmd.run(["systemctl", "reload", UNIT], check=False, timeout=60)
        assert proc.returncode != 0, "reload reported success for a file pmlmd refuses"
        check = pmlmd.run(["pmlmd", "--check-config"], check=False)
        assert check.returncode == 1 and "limits.cpu_limt: unknown key" in check.stderr, check.stderr
        assert pmlmd.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active"
        assert show(pmlmd, "MainPID") == main_pid
    finally:
        pmlmd.run(f"cat > {config}", input=saved)
    assert pmlmd.run(["systemctl", "reload", UNIT], check=False, timeout=60).returncode == 0


def test_reload_then_stop(pmlmd):
    main_pid = show(pmlmd, "MainPID")
    proc = pmlmd.run(["systemctl", "reload", UNIT], check=False, timeout=60)
    assert proc.returncode == 0, f"{proc.stderr}\n{diagnostics(pmlmd)}"
    wait_inside(pmlmd, ["systemctl", "is-active", UNIT], lambda p: p.stdout.strip() == "active",
                what="pmlmd active again after reload")
    assert show(pmlmd, "MainPID") == main_pid, "reload restarted the daemon instead of reloading it"
    assert pmlmd.run(["pmlmctl", "status"], check=False).returncode == 0

    proc = pmlmd.run(["systemctl", "stop", UNIT], check=False, timeout=120)
    assert proc.returncode == 0, f"{proc.stderr}\n{diagnostics(pmlmd)}"
    assert pmlmd.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
    # Stopped by its own clean exit on SIGTERM, not killed after the stop timeout.
    assert show(pmlmd, "Result") == "success", diagnostics(pmlmd)
