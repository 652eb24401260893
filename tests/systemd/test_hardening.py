"""The installed unit's hardening and the cgroup backstops, under a real systemd.

pmlmd.service is rated by systemd-analyze as installed; the TasksMax and MemoryMax of pmlm.slice
and of a batch's scope are read back with systemctl show (the container accepts them but cannot
enforce them: the host binds those controllers to cgroup v1); and a worker of a non-root user is
shown to do ordinary batch work inside pmlmd's sandbox, with its files where its user sees them.
"""

from __future__ import annotations

import json
import re
import secrets

import pytest

from tier import UNIT, diagnostics, wait_inside

CONFIG = "/etc/pmlmd/pmlmd.toml"
USER = "hilda"


def submit(tb, *args: str) -> str:
    proc = tb.run(["pmlmctl", "submit", *args], check=False, timeout=60)
    assert proc.returncode == 0, f"{proc.stderr}\n{diagnostics(tb)}"
    return proc.stdout.strip()


def running(p) -> bool:
    return p.returncode == 0 and json.loads(p.stdout)["counts"]["running"] >= 1


def limits_of(tb, unit: str) -> dict[str, str]:
    out = tb.run(["systemctl", "show", "-p", "TasksMax", "-p", "MemoryMax", unit]).stdout
    return dict(line.split("=", 1) for line in out.split())


def as_systemd_resolves(tb, tasks_max: str, memory_max: str) -> dict[str, str]:
    """What systemd makes of these values in a unit file on this node (percentages resolve against it)."""
    path = f"/run/systemd/system/pmlm-reference-{secrets.token_hex(3)}.slice"
    tb.run(f"cat > {path} && systemctl daemon-reload", input=f"[Slice]\nTasksMax={tasks_max}\nMemoryMax={memory_max}\n")
    try:
        return limits_of(tb, path.rsplit("/", 1)[1])
    finally:
        tb.run(f"rm -f {path} && systemctl daemon-reload")


@pytest.fixture
def config(pmlmd):
    """Write [daemon] settings into pmlmd.toml and restart pmlmd; the shipped file comes back after."""
    saved = pmlmd.run(["cat", CONFIG]).stdout

    def write(daemon_settings: str) -> None:
        text = saved.replace("[daemon]\n", "[daemon]\n" + daemon_settings, 1)
        pmlmd.run(f"cat > {CONFIG}", input=text)
        pmlmd.run(["systemctl", "restart", UNIT], timeout=60)

    yield write
    pmlmd.run(f"cat > {CONFIG}", input=saved)
    pmlmd.run(["systemctl", "restart", UNIT], check=False, timeout=60)


def test_the_installed_unit_is_rated_at_most_four(testbed):
    out = testbed.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
    match = re.search(r"Overall exposure level for pmlmd\.service: (\d+\.\d)", out)
    assert match, out
    assert float(match.group(1)) <= 4.0, out
    print(f"\nsystemd-analyze security pmlmd (installed): {match.group(1)}")  # shown with -s


def test_the_sandbox_is_in_force(pmlmd):
    main_pid = pmlmd.run(["systemctl", "show", "-p", "MainPID", "--value", UNIT]).stdout.strip()
    status = dict(line.split(":", 1) for line in pmlmd.run(["cat", f"/proc/{main_pid}/status"]).stdout.splitlines())
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["Seccomp"]) == 2
    bounding = int(status["CapBnd"], 16)
    # CAP_CHOWN 0, CAP_KILL 5, CAP_SETGID 6, CAP_SETUID 7, CAP_SYS_PTRACE 19.
    assert bounding == (1 << 19) | 0b11100001, hex(bounding)


def test_memory_pressure_wakes_pmlmd_under_the_sandbox(pmlmd):
    # No CAP_SYS_RESOURCE in the unit: the kernel takes only a trigger with a 2 s window.
    journal = pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "memory pressure (PSI) wakes pmlmd: 100 ms of stall within 2 s" in journal, journal[-3000:]
    assert "memory pressure (PSI) does not wake pmlmd" not in journal


def test_slice_and_scopes_have_the_shipped_backstops(pmlmd):
    # pmlmd.toml as shipped: the defaults, which pmlmd also sets on the slice at start.
    slice_limits = limits_of(pmlmd, "pmlm.slice")
    assert slice_limits == as_systemd_resolves(pmlmd, "50%", "90%")
    assert "infinity" not in slice_limits.values()
    batch = submit(pmlmd, "--", "sleep", "30")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running, what="a running worker")
    scope = f"pmlm-{batch}.scope"
    scope_limits = limits_of(pmlmd, scope)
    assert scope_limits == as_systemd_resolves(pmlmd, "25%", "infinity")
    # A daemon-reload (any package installation does one) re-reads the scope's and the slice's
    # drop-ins: the limits stay what they were (a percentage sent over the bus would not).
    pmlmd.run(["systemctl", "daemon-reload"])
    assert limits_of(pmlmd, scope) == scope_limits and limits_of(pmlmd, "pmlm.slice") == slice_limits
    pmlmd.run(["pmlmctl", "cancel", batch])


def test_slice_and_scopes_take_their_backstops_from_the_config(pmlmd, config):
    config('slice_tasks_max = 4321\nslice_memory_max = "5G"\nscope_tasks_max = 777\nscope_memory_max = "3G"\n')
    assert limits_of(pmlmd, "pmlm.slice") == {"TasksMax": "4321", "MemoryMax": str(5 << 30)}
    batch = submit(pmlmd, "--", "sleep", "30")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running, what="a running worker")
    assert limits_of(pmlmd, f"pmlm-{batch}.scope") == {"TasksMax": "777", "MemoryMax": str(3 << 30)}
    journal = pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "-n", "30"]).stdout
    assert "cgroup backstops: pmlm.slice TasksMax=4321 MemoryMax=5368709120; each batch scope TasksMax=777 " \
           "MemoryMax=3221225472" in journal
    pmlmd.run(["pmlmctl", "cancel", batch])


# What a user's batch job does, each line reporting for itself; its files are looked at from outside.
USER_JOB = r"""
exec > "$HOME/job.log" 2>&1
echo home > "$HOME/from-batch" && echo home ok
echo tmp > "/tmp/pmlm-$USER-from-batch" && echo tmp ok
echo vartmp > "/var/tmp/pmlm-$USER-from-batch" && echo vartmp ok
echo srv > "/srv/pmlm-$USER/from-batch" && echo srv ok
python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
socket.create_connection(s.getsockname()); print("net ok")'
python3 -c 'import socket; socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG); print("resolver ok")'
head -c 16 /dev/urandom > /dev/null && echo devices ok
nice -n 5 true && echo nice ok
sh -c 'ulimit -n 256' && echo ulimit ok
grep -E '^(CapEff|NoNewPrivs):' /proc/self/status
unshare --user true 2>/dev/null || echo no user namespaces
# Its cgroup is pmlmd's to arrange, not the job's: it cannot leave it, or make one below it.
echo $$ > /sys/fs/cgroup/cgroup.procs 2>/dev/null || echo cannot leave its cgroup
mkdir "/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/mine" 2>/dev/null || echo cannot make a cgroup
sed -n 's/^0::/cgroup /p' /proc/self/cgroup
"""


def test_a_users_batch_job_works_and_its_files_are_where_its_user_sees_them(pmlmd):
    pmlmd.run(f"id {USER} >/dev/null 2>&1 || useradd --create-home --shell /bin/sh {USER}")
    pmlmd.run(["adduser", "--quiet", USER, "pmlm"])
    # Debian 12's adduser makes homes 0700: pmlmd, root without CAP_DAC_*, enters it as the user.
    pmlmd.run(["chmod", "0700", f"/home/{USER}"])
    pmlmd.run(f"rm -f /tmp/pmlm-{USER}-* /var/tmp/pmlm-{USER}-*; install -d -o {USER} /srv/pmlm-{USER}")
    pmlmd.run(f"cat > /home/{USER}/job.sh && chown {USER} /home/{USER}/job.sh", input=USER_JOB)
    proc = pmlmd.run(["runuser", "-l", USER, "-c", "pmlmctl submit --wait -- sh job.sh"], check=False, timeout=120)
    log = pmlmd.run(["cat", f"/home/{USER}/job.log"], check=False).stdout
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log}\n{diagnostics(pmlmd)}"
    for line in ("home ok", "tmp ok", "vartmp ok", "srv ok", "net ok", "resolver ok", "devices ok", "nice ok",
                 "ulimit ok", "CapEff:\t0000000000000000", "NoNewPrivs:\t1", "no user namespaces",
                 "cannot leave its cgroup", "cannot make a cgroup"):
        assert line in log.splitlines(), f"{line!r} missing from the job's log:\n{log}"
    cgroups = [line.split()[1] for line in log.splitlines() if line.startswith("cgroup ")]
    assert len(cgroups) == 1 and cgroups[0].startswith("/pmlm.slice/pmlm-") and "/workers/" in cgroups[0], log
    # From outside pmlmd's mount namespace (a login's view): the same files, owned by the user.
    for path, text in ((f"/home/{USER}/from-batch", "home"), (f"/tmp/pmlm-{USER}-from-batch", "tmp"),
                       (f"/var/tmp/pmlm-{USER}-from-batch", "vartmp"), (f"/srv/pmlm-{USER}/from-batch", "srv")):
        assert pmlmd.run(["stat", "-c", "%U %a", path]).stdout.split() == [USER, "644"], path
        assert pmlmd.run(["cat", path]).stdout.strip() == text
    seen_by_user = pmlmd.run(["runuser", "-l", USER, "-c", f"cat /tmp/pmlm-{USER}-from-batch"]).stdout
    assert seen_by_user.strip() == "tmp"
    pmlmd.run(f"rm -rf /tmp/pmlm-{USER}-* /var/tmp/pmlm-{USER}-* /srv/pmlm-{USER}")


def test_a_batch_root_submits_cannot_change_the_system(pmlmd):
    """/usr and /etc are read-only in pmlmd's sandbox, for root's batches as well (docs/security.md)."""
    proc = pmlmd.run(["pmlmctl", "submit", "--wait", "--shell", "--", "touch /etc/pmlm-from-batch"], check=False,
                     timeout=60)
    assert proc.returncode == 1, f"{proc.stdout}{proc.stderr}"
    assert pmlmd.run(["test", "-e", "/etc/pmlm-from-batch"], check=False).returncode != 0
