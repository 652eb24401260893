"""Batches in transient scopes under a real systemd: placement, freezing, journal, restarts, strays.

Each test starts pmlmd.service (the ``pmlmd`` fixture) and drives it with pmlmctl inside the
container; what it asserts is what an operator would look at: systemctl show, /proc, journalctl.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tier import UNIT, diagnostics, show, wait_inside

# A busy loop bounded in time (60 s), all in the worker's own process group.
BUSY = "end=$(($(date +%s) + 60)); while [ $(date +%s) -lt $end ]; do :; done"


def submit(tb, *args: str) -> str:
    proc = tb.run(["pmlmctl", "submit", *args], check=False, timeout=60)
    assert proc.returncode == 0, f"{proc.stderr}\n{diagnostics(tb)}"
    return proc.stdout.strip()


def status(tb, batch: str) -> dict:
    return json.loads(tb.run(["pmlmctl", "status", "--json", batch]).stdout)


def freezer_state(tb, unit: str) -> str:
    return tb.run(["systemctl", "show", "-p", "FreezerState", "--value", unit]).stdout.strip()


def finished(p) -> bool:
    """For wait_inside on `pmlmctl status --json ID`: the batch has ended (a restarting pmlmd may not answer)."""
    return p.returncode == 0 and json.loads(p.stdout)["ended"] is not None


def running(count: int):
    return lambda p: p.returncode == 0 and json.loads(p.stdout)["counts"]["running"] == count


def worker_pids(tb, batch: str) -> list[int]:
    """The live pids of the batch's scope, as systemd accounts them (its cgroup and those below)."""
    group = tb.run(["systemctl", "show", "-p", "ControlGroup", "--value", f"pmlm-{batch}.scope"]).stdout.strip()
    if not group:
        return []
    proc = tb.run(f"find /sys/fs/cgroup{group} -name cgroup.procs -exec cat {{}} +", check=False)
    return sorted(int(pid) for pid in proc.stdout.split())


def worker_cgroups(tb, batch: str) -> dict[str, list[int]]:
    """The worker cgroups below the batch's scope (name -> its pids), where pmlmd makes them."""
    workers = f"/sys/fs/cgroup/pmlm.slice/pmlm-{batch}.scope/workers"
    proc = tb.run(f"for d in {workers}/*/; do echo \"$(basename $d) $(cat $d/cgroup.procs | tr '\\n' ' ')\"; done",
                  check=False)
    found = {}
    for line in proc.stdout.splitlines():
        name, *pids = line.split()
        if name != "*":
            found[name] = [int(pid) for pid in pids]
    return found


def session_of(tb, pid: int) -> int | None:
    proc = tb.run(["cat", f"/proc/{pid}/stat"], check=False)
    return int(proc.stdout.rsplit(")", 1)[1].split()[3]) if proc.returncode == 0 else None


def scope_gone(tb, batch: str) -> bool:
    state = tb.run(["systemctl", "show", "-p", "LoadState", "--value", f"pmlm-{batch}.scope"], check=False)
    return state.stdout.strip() == "not-found"


def proc_state(tb, pid: int) -> str:
    proc = tb.run(["cat", f"/proc/{pid}/stat"], check=False)
    return proc.stdout.rsplit(")", 1)[1].split()[0] if proc.returncode == 0 else "gone"


@pytest.fixture
def dropin(testbed):
    """Write a runtime drop-in for pmlmd.service for one test; removed (and reloaded) after."""
    path = "/run/systemd/system/pmlmd.service.d/test.conf"

    def write(text: str) -> None:
        testbed.run(f"mkdir -p /run/systemd/system/pmlmd.service.d && cat > {path}", input=text)
        testbed.run(["systemctl", "daemon-reload"])

    yield write
    testbed.run(["systemctl", "stop", UNIT], check=False, timeout=60)
    testbed.run(["rm", "-f", path])
    testbed.run(["systemctl", "daemon-reload"])
    testbed.run(["systemctl", "reset-failed", UNIT], check=False)


def test_workers_run_in_the_batch_scope_which_goes_when_the_batch_ends(pmlmd):
    batch = submit(pmlmd, "--name", "scoped", "-n", "2", "-j", "2", "--", "sleep", "2")
    pids = wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch],
                       running(2), what="two running workers") and \
        worker_pids(pmlmd, batch)
    assert len(pids) == 2, diagnostics(pmlmd)
    scope = f"pmlm-{batch}.scope"
    props = pmlmd.run(["systemctl", "show", "-p", "ControlGroup", "-p", "Slice", "-p", "Description", "-p",
                       "Delegate", scope]).stdout
    assert f"ControlGroup=/pmlm.slice/{scope}" in props and "Slice=pmlm.slice" in props
    assert f"Description=pmlmd batch {batch} (scoped) of root" in props and "Delegate=yes" in props
    # Each worker in a cgroup of its own below the scope (the scope's own cgroup is systemd's).
    assert worker_cgroups(pmlmd, batch) == {f"{batch}.{task}.1": [pid] for task, pid in enumerate(pids)}, \
        worker_cgroups(pmlmd, batch)
    for task, pid in enumerate(pids):
        lines = pmlmd.run(["cat", f"/proc/{pid}/cgroup"]).stdout.splitlines()
        assert f"0::/pmlm.slice/{scope}/workers/{batch}.{task}.1" in lines  # (the host adds v1 lines here)
        # The gate is gone: the cgroup holds the command itself.
        assert pmlmd.run(["cat", f"/proc/{pid}/comm"]).stdout.strip() == "sleep"
    assert pmlmd.run(["cat", f"/sys/fs/cgroup/pmlm.slice/{scope}/cgroup.procs"]).stdout == ""
    assert status(pmlmd, batch)["scope"] == scope
    assert "a cgroup each" in json.loads(pmlmd.run(["pmlmctl", "status", "--json"]).stdout)["workers"]
    assert "a cgroup each, in each batch's systemd scope" in pmlmd.run(["pmlmd", "--version"]).stdout
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished,
                timeout=30, what="the batch to finish")
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), what=f"{scope} to be collected")


def test_pausing_a_batch_freezes_its_scope(pmlmd):
    batch = submit(pmlmd, "--shell", "--", BUSY)
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running(1),
                what="a running worker")
    assert pmlmd.run(["pmlmctl", "pause", batch]).stdout.strip() == f"batch {batch}: paused"
    scope = f"pmlm-{batch}.scope"
    # pause answers once systemd has frozen the scope
    assert freezer_state(pmlmd, scope) == "frozen"
    assert status(pmlmd, batch)["freezer"] == "frozen"
    pids = worker_pids(pmlmd, batch)
    assert pids
    # Frozen, not stopped: /proc shows S, and the busy loops use no CPU while frozen.
    assert {proc_state(pmlmd, pid) for pid in pids} == {"S"}
    ticks = pmlmd.run(f"cat /sys/fs/cgroup/pmlm.slice/{scope}/cpu.stat | sed -n 's/^usage_usec //p'").stdout
    again = pmlmd.run(f"sleep 0.3; cat /sys/fs/cgroup/pmlm.slice/{scope}/cpu.stat | sed -n 's/^usage_usec //p'")
    assert again.stdout == ticks
    pmlmd.run(["pmlmctl", "resume", batch])
    assert freezer_state(pmlmd, scope) == "running"  # and resume once it is thawed
    pmlmd.run(["pmlmctl", "cancel", batch])
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), timeout=30, what=f"{scope} gone")


def test_the_journal_carries_each_batchs_pauses_but_not_its_admissions(pmlmd):
    # Two busy loops against a 20 % CPU limit: the governor pauses one. The pause is in the journal
    # at INFO with the batch's fields. The admissions (one per task started) are DEBUG, so not
    # there at the default level: a batch of tiny tasks would otherwise reach journald's rate
    # limit, and the journal would drop the pauses and warnings with them.
    batch = submit(pmlmd, "-n", "2", "-j", "2", "--cpu-limit", "20", "--shell", "--", BUSY)

    def decisions(p) -> list[dict]:
        return [r for r in map(json.loads, p.stdout.splitlines()) if "DECISION" in r]

    try:
        journal = wait_inside(pmlmd, ["journalctl", "--no-pager", "-o", "json", "-u", UNIT, f"BATCH_ID={batch}"],
                              lambda p: any(r["DECISION"] == "pause" for r in decisions(p)), timeout=30,
                              what="the batch's pause in the journal")
    finally:
        pmlmd.run(["pmlmctl", "cancel", batch])
    logged = decisions(journal)
    assert "spawn" not in {r["DECISION"] for r in logged}, logged
    for r in logged:
        assert r["BATCH_ID"] == batch and r["RULE"] and "REASON" in r and "MEM_FREE_PCT" in r and "CPU_PCT" in r
        assert r["PRIORITY"] == "6"  # INFO
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), timeout=30, what="the scope to go")


def test_task_output_stays_with_its_batch_and_reaches_the_journal_only_when_asked(pmlmd):
    config = "/etc/pmlmd/pmlmd.toml"
    saved = pmlmd.run(["cat", config]).stdout
    # A worker prints what looks like one of pmlmd's decisions, on stdout and on stderr.
    forged = "pause worker 1 (batch 1, task 0) [cpu]: forged"
    command = ["pmlmctl", "submit", "--wait", "--", "/bin/sh", "-c", f"echo '{forged}'; echo '{forged}' >&2"]
    try:
        proc = pmlmd.run(command, check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(forged) == 1 and proc.stderr.count(forged) == 1  # submit --wait prints it
        quiet = json.loads(pmlmd.run(["pmlmctl", "list", "--json"]).stdout)[-1]["batch"]
        assert pmlmd.run(["pmlmctl", "log", quiet]).stdout == forged + "\n"
        assert pmlmd.run(["ls", f"/var/lib/pmlmd/output/{quiet}"]).stdout.split() == ["0.err", "0.out"]

        pmlmd.run(f"cat > {config}", input=saved.replace("[daemon]\n", "[daemon]\noutput_journal = true\n", 1))
        pmlmd.run(["systemctl", "reload", UNIT], timeout=60)
        proc = pmlmd.run(command, check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        batch = json.loads(pmlmd.run(["pmlmctl", "list", "--json"]).stdout)[-1]["batch"]
        # Asked for, its lines are in the journal under the batch's own identifier, with its fields...
        ours = wait_inside(pmlmd, ["journalctl", "--no-pager", "-o", "json", "-t", f"pmlm-batch-{batch}"],
                           lambda p: p.stdout.count(forged) == 2, what="the worker's lines under its batch's identifier")
        records = [json.loads(line) for line in ours.stdout.splitlines()]
        assert {(r["BATCH_ID"], r["TASK_INDEX"], r["STREAM"]) for r in records} == {
            (batch, "0", "stdout"), (batch, "0", "stderr")}
        # ...and none under pmlmd's; the batch before, not asked for, left nothing in the journal.
        daemon = pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-t", "pmlmd"]).stdout
        assert forged not in daemon.splitlines()  # (the submit line quotes the command, which is fine)
        assert pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-t", f"pmlm-batch-{quiet}"]).stdout.strip() \
            in ("", "-- No entries --")
    finally:
        pmlmd.run(f"cat > {config}", input=saved)
        pmlmd.run(["systemctl", "reload", UNIT], check=False, timeout=60)


def test_workers_outlive_a_restart_of_pmlmd_and_are_adopted(pmlmd):
    batch = submit(pmlmd, "-n", "2", "-j", "2", "--", "sleep", "3")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running(2),
                what="two running workers")
    before = worker_pids(pmlmd, batch)
    pmlmd.run(["systemctl", "restart", UNIT], timeout=60)
    assert worker_pids(pmlmd, batch) == before  # not killed with the service: they live in the scope
    after = status(pmlmd, batch)
    assert after["counts"]["running"] == 2
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished,
                timeout=30, what="the batch to finish")
    report = json.loads(pmlmd.run(["pmlmctl", "report", batch]).stdout)
    assert report["counts"]["succeeded"] == 2
    assert all(t["attempts"][0]["reason"].startswith("adopted after a daemon restart") for t in report["tasks"])


def test_nothing_stays_frozen_or_stopped_when_pmlmd_is_killed(pmlmd, dropin):
    dropin("[Service]\nRestart=no\n")  # so that it stays down and we can look
    pmlmd.run(["systemctl", "restart", UNIT], timeout=60)
    batch = submit(pmlmd, "-n", "1", "--shell", "--", BUSY)
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running(1),
                what="a running worker")
    pmlmd.run(["pmlmctl", "pause", batch])
    scope = f"pmlm-{batch}.scope"
    wait_inside(pmlmd, ["systemctl", "show", "-p", "FreezerState", "--value", scope],
                lambda p: p.stdout.strip() == "frozen", what=f"{scope} frozen")
    pmlmd.run(["systemctl", "kill", "--signal=SIGKILL", UNIT])
    wait_inside(pmlmd, ["systemctl", "is-active", UNIT], lambda p: p.stdout.strip() in ("failed", "inactive"),
                what="pmlmd down")
    # ExecStopPost (pmlmd --release-workers) thawed the scope: the worker runs on.
    assert show(pmlmd, "Result") == "signal"
    wait_inside(pmlmd, ["systemctl", "show", "-p", "FreezerState", "--value", scope],
                lambda p: p.stdout.strip() == "running", what=f"{scope} thawed by ExecStopPost")
    journal = pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "released workers (continue): " in journal and "1 workers from the state database" in journal
    for pid in worker_pids(pmlmd, batch):
        pmlmd.run(["kill", str(pid)], check=False)


def test_a_hung_main_loop_is_killed_by_the_watchdog_and_restarted(pmlmd, dropin):
    dropin("[Service]\nWatchdogSec=1s\nRestartSec=0.2\n")
    pmlmd.run(["systemctl", "restart", UNIT], timeout=60)
    main_pid = show(pmlmd, "MainPID")
    pmlmd.run(["sleep", "2.5"])  # its pings keep it alive well past the watchdog period
    assert show(pmlmd, "MainPID") == main_pid
    pmlmd.run(["kill", "-STOP", main_pid])  # the test hook: a hung loop sends no WATCHDOG=1
    wait_inside(pmlmd, ["journalctl", "--no-pager", "-o", "cat", "-u", UNIT],
                lambda p: "Watchdog timeout" in p.stdout, timeout=15, what="the watchdog to fire")
    wait_inside(pmlmd, ["systemctl", "show", "-p", "MainPID", "--value", UNIT],
                lambda p: p.stdout.strip() not in ("0", main_pid), timeout=15, what="a restarted pmlmd")
    wait_inside(pmlmd, ["systemctl", "is-active", UNIT], lambda p: p.stdout.strip() == "active", what="active")
    assert pmlmd.run(["pmlmctl", "status"], check=False).returncode == 0


def test_killed_mid_batch_systemd_restarts_it_and_the_batch_completes(pmlmd):
    batch = submit(pmlmd, "-n", "4", "-j", "2", "--", "sleep", "2")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running(2),
                what="two running workers")
    stopped = worker_pids(pmlmd, batch)[0]
    pmlmd.run(["kill", "-STOP", str(stopped)])  # as a governor pause leaves it
    main_pid = show(pmlmd, "MainPID")
    pmlmd.run(["systemctl", "kill", "-s", "KILL", UNIT])
    wait_inside(pmlmd, ["systemctl", "show", "-p", "MainPID", "--value", UNIT],
                lambda p: p.stdout.strip() not in ("0", main_pid), timeout=15, what="systemd to restart pmlmd")
    assert proc_state(pmlmd, stopped) != "T"  # released by ExecStopPost, then adopted
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished,
                timeout=30, what="the batch to finish")
    report = json.loads(pmlmd.run(["pmlmctl", "report", batch]).stdout)
    assert report["counts"]["succeeded"] == 4, report
    assert scope_gone(pmlmd, batch) or not worker_pids(pmlmd, batch)


def test_workers_are_not_held_by_pmlmds_own_sandbox(pmlmd):
    """pmlmd.service denies itself the network and devices; its workers, in their scope, keep both.

    (Its process-wide hardening, which workers do share, is tested in test_hardening.py.)
    """
    script = ("python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(); "
              "socket.create_connection(s.getsockname()); print(\"net ok\")' > /root/net && "
              "head -c1 /dev/zero > /dev/null && touch /srv/pmlm-written")
    proc = pmlmd.run(["pmlmctl", "submit", "--wait", "--shell", "--", script], check=False, timeout=60)
    assert proc.returncode == 0, f"{proc.stderr}\n{diagnostics(pmlmd)}"
    assert pmlmd.run(["cat", "/root/net"]).stdout.strip() == "net ok"
    pmlmd.run(["rm", "-f", "/srv/pmlm-written", "/root/net"])


def test_what_escaped_its_workers_group_ends_with_the_batch(pmlmd):
    # timeout(1) puts itself and the loop in a new process group: signals to the worker's group miss them.
    batch = submit(pmlmd, "--shell", "--term-grace", "2", "--", "timeout 60 sleep 60 & sleep 0.5")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished,
                timeout=30, what="the batch to finish")
    # Stopping the scope at the end of the batch took the escaped processes with it.
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), timeout=30, what="the scope to go")
    assert "timeout 60 sleep 60" not in pmlmd.run(["ps", "-eo", "args"]).stdout


def test_what_leaves_its_workers_session_stays_in_its_cgroup_and_ends_with_it(pmlmd):
    # Each worker starts a sleep in a session of its own (setsid) and exits: out of its process
    # group, session and process tree, the sleep is still in its worker's cgroup, which is ended.
    batch = submit(pmlmd, "-n", "2", "-j", "2", "--term-grace", "1", "--shell", "--",
                   "setsid sleep 300 & sleep 3")
    apart = set()  # the worker cgroups seen holding a process of another session than their worker's

    def seen_apart(_) -> bool:
        for name, pids in worker_cgroups(pmlmd, batch).items():
            if len({session_of(pmlmd, pid) for pid in pids} - {None}) == 2:
                apart.add(name)
        return len(apart) == 2

    wait_inside(pmlmd, ["true"], seen_apart, what="each worker's cgroup holding its setsid sleep")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished, timeout=30, what="the batch to finish")
    report = json.loads(pmlmd.run(["pmlmctl", "report", batch]).stdout)
    assert report["counts"]["succeeded"] == 2, report
    assert all("left 1 processes behind in its cgroup" in t["attempts"][0]["reason"] for t in report["tasks"]), report
    assert "sleep 300" not in pmlmd.run(["ps", "-eo", "args"]).stdout
    # Re-parented to pmlmd (a subreaper) when their worker exited, they are reaped: no zombie stays.
    wait_inside(pmlmd, ["ps", "-eo", "stat="], lambda p: "Z" not in p.stdout, what="no zombie left")
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), timeout=30, what="the scope to go")


def test_the_governor_freezes_a_workers_own_cgroup(pmlmd):
    # Two busy loops against a 20 % CPU limit: the governor pauses workers by freezing their
    # cgroups (state S, not T: the kernel's freezer, no SIGSTOP), the busy loop in its own session
    # included.
    batch = submit(pmlmd, "-n", "2", "-j", "2", "--cpu-limit", "20", "--shell", "--", f"setsid sh -c '{BUSY}' & wait")
    frozen = wait_inside(
        pmlmd, ["sh", "-c", f"grep -l 'frozen 1' /sys/fs/cgroup/pmlm.slice/pmlm-{batch}.scope/workers/*/cgroup.events"],
        lambda p: p.returncode == 0, timeout=30, what="a worker cgroup frozen by the governor")
    cgroup = frozen.stdout.split()[0].rsplit("/", 1)[0]
    pids = [int(pid) for pid in pmlmd.run(["cat", f"{cgroup}/cgroup.procs"]).stdout.split()]
    assert len(pids) >= 2 and "T" not in {proc_state(pmlmd, pid) for pid in pids}
    pmlmd.run(["pmlmctl", "cancel", batch])
    wait_inside(pmlmd, ["true"], lambda p: scope_gone(pmlmd, batch), timeout=30, what="the scope to go")
    assert "while [" not in pmlmd.run(["ps", "-eo", "args"]).stdout


def test_a_worker_cgroup_left_frozen_by_a_killed_pmlmd_is_thawed(pmlmd, dropin):
    dropin("[Service]\nRestart=no\n")  # so that it stays down and we can look
    pmlmd.run(["systemctl", "restart", UNIT], timeout=60)
    batch = submit(pmlmd, "-n", "1", "--", "sleep", "60")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], running(1), what="a running worker")
    (name,) = worker_cgroups(pmlmd, batch)
    events = f"/sys/fs/cgroup/pmlm.slice/pmlm-{batch}.scope/workers/{name}/cgroup.events"
    # Frozen as a governor pause freezes it (written here, so that pmlmd dies with it frozen).
    pmlmd.run(f"echo 1 > {events.replace('cgroup.events', 'cgroup.freeze')}")
    wait_inside(pmlmd, ["cat", events], lambda p: "frozen 1" in p.stdout, what="the worker frozen")
    pmlmd.run(["systemctl", "kill", "--signal=SIGKILL", UNIT])
    wait_inside(pmlmd, ["systemctl", "is-active", UNIT], lambda p: p.stdout.strip() in ("failed", "inactive"),
                what="pmlmd down")
    # ExecStopPost (pmlmd --release-workers) thawed it: a frozen scope's ThawUnit alone would not.
    wait_inside(pmlmd, ["cat", events], lambda p: "frozen 0" in p.stdout, what="the worker thawed by ExecStopPost")
    for pid in worker_pids(pmlmd, batch):
        pmlmd.run(["kill", str(pid)], check=False)


def test_one_at_a_time_every_worker_is_in_its_own_cgroup_of_the_batchs_scope(pmlmd):
    # With -j 1 each worker ends before the next starts: systemd removes an emptied scope, and the
    # next worker must get one again (and its own cgroup below it), not run outside.
    batch = submit(pmlmd, "-j", "1", "-n", "4", "--shell", "--", "grep ^0:: /proc/self/cgroup; sleep 0.3")
    wait_inside(pmlmd, ["pmlmctl", "status", "--json", batch], finished, timeout=30, what="the batch to finish")
    lines = pmlmd.run(["pmlmctl", "log", batch]).stdout.split()
    assert lines == [f"0::/pmlm.slice/pmlm-{batch}.scope/workers/{batch}.{task}.1" for task in range(4)], lines
    journal = pmlmd.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "outside its scope" not in journal and "cannot start a worker in the cgroup" not in journal


def test_pmlmd_answers_while_systemd_is_slow_to_make_a_scope(pmlmd):
    # systemd stopped (SIGSTOP to the container's PID 1, from the host): a new batch's scope cannot
    # be made, nor an ended one's stopped, until it goes on. pmlmd asks for both off its loop, so
    # requests are still answered and the limits still enforced meanwhile; the new batch's workers
    # wait at their gates, and go below their scope once systemd has made it.
    tb = pmlmd
    ending = submit(tb, "-n", "1", "--", "sleep", "1")
    wait_inside(tb, ["pmlmctl", "status", "--json", ending], running(1), what="a worker in its scope")
    os.kill(tb.leader, signal.SIGSTOP)
    try:
        # A batch that ends meanwhile: its scope is stopped once systemd goes on.
        wait_inside(tb, ["timeout", "3", "pmlmctl", "status", "--json", ending], finished,
                    what="the batch to end while systemd is stopped")
        batch = tb.run(["timeout", "3", "pmlmctl", "submit", "-n", "2", "-j", "2", "--shell", "--",
                        "grep ^0:: /proc/self/cgroup"], check=False, timeout=10)
        assert batch.returncode == 0, batch.stderr
        batch = batch.stdout.strip()
        for _ in range(3):  # each a loop turn that a synchronous StartTransientUnit would have held for 5 s
            answer = tb.run(["timeout", "3", "pmlmctl", "status", "--json", batch], check=False, timeout=10)
            assert answer.returncode == 0, f"status waited on systemd: {answer.stderr}"
            assert json.loads(answer.stdout)["ended"] is None
        wait_inside(tb, ["timeout", "3", "pmlmctl", "status", "--json", batch], running(2),
                    what="both workers started, at their gates")
        # Still no scope: systemd has not run since.
        assert tb.run(["test", "-e", f"/sys/fs/cgroup/pmlm.slice/pmlm-{batch}.scope"], check=False).returncode != 0
    finally:
        os.kill(tb.leader, signal.SIGCONT)
    wait_inside(tb, ["pmlmctl", "status", "--json", batch], finished, timeout=30, what="the batch to finish")
    lines = sorted(tb.run(["pmlmctl", "log", batch]).stdout.split())
    assert lines == [f"0::/pmlm.slice/pmlm-{batch}.scope/workers/{batch}.{task}.1" for task in range(2)], lines
    journal = tb.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "outside its scope" not in journal
    wait_inside(tb, ["true"], lambda p: scope_gone(tb, ending) and scope_gone(tb, batch), what="both scopes gone")


def test_a_pause_waits_for_systemd_to_freeze_the_scope_while_pmlmd_answers_others(pmlmd):
    # FreezeUnit is asked for off pmlmd's loop: with systemd stopped (SIGSTOP to the container's
    # PID 1, from the host), `pmlmctl pause` waits for its answer while status is answered; once
    # systemd goes on, the pause is answered and the scope is frozen.
    tb = pmlmd
    batch = submit(tb, "--shell", "--", BUSY)
    wait_inside(tb, ["pmlmctl", "status", "--json", batch], running(1), what="a running worker")
    scope = f"pmlm-{batch}.scope"
    pause = None
    os.kill(tb.leader, signal.SIGSTOP)
    try:
        pause = tb.background(["pmlmctl", "pause", batch])
        # Within 4 s: after JOB_TIMEOUT (5 s) without systemd's answer pmlmd holds the workers by
        # signals and answers the pause.
        wait_inside(tb, ["timeout", "3", "pmlmctl", "status", "--json", batch],
                    lambda p: p.returncode == 0 and json.loads(p.stdout)["state"] == "paused", timeout=4,
                    what="the batch paused, as status says while systemd is stopped")
        assert json.loads(tb.run(["pmlmctl", "status", "--json", batch]).stdout)["freezer"] == "freezing"
        assert pause.poll() is None, "pause answered before systemd froze the scope"
    finally:
        os.kill(tb.leader, signal.SIGCONT)
        if pause is not None:
            out, err = pause.communicate(timeout=30)
    assert pause.returncode == 0 and out.strip() == f"batch {batch}: paused", err
    assert freezer_state(tb, scope) == "frozen"
    assert status(tb, batch)["freezer"] == "frozen"
    tb.run(["pmlmctl", "cancel", batch])
    wait_inside(tb, ["true"], lambda p: scope_gone(tb, batch), timeout=30, what=f"{scope} gone")


def test_a_pause_overtaken_by_a_resume_says_the_batch_runs(pmlmd):
    # Both wait for systemd (stopped, as above): the FreezeUnit is answered first, then the
    # ThawUnit. The pause, answered once its FreezeUnit is, says what the batch is by then.
    tb = pmlmd
    batch = submit(tb, "--shell", "--", BUSY)
    wait_inside(tb, ["pmlmctl", "status", "--json", batch], running(1), what="a running worker")
    scope = f"pmlm-{batch}.scope"
    asked = []
    os.kill(tb.leader, signal.SIGSTOP)
    try:
        for command in ("pause", "resume"):
            asked.append(tb.background(["pmlmctl", command, batch]))
            wait_inside(tb, ["timeout", "3", "pmlmctl", "status", "--json", batch],
                        lambda p, held=command == "pause": p.returncode == 0 and
                        (json.loads(p.stdout)["state"] == "paused") == held, timeout=4, what=f"the {command} taken")
    finally:
        os.kill(tb.leader, signal.SIGCONT)
        answers = [p.communicate(timeout=30) for p in asked]
    assert [p.returncode for p in asked] == [0, 0], answers
    assert answers[0][0].strip() == f"batch {batch}: running: resumed before the pause was done"
    assert answers[1][0].strip() == f"batch {batch}: resumed"
    assert freezer_state(tb, scope) == "running" and status(tb, batch)["freezer"] == "running"
    tb.run(["pmlmctl", "cancel", batch])
    wait_inside(tb, ["true"], lambda p: scope_gone(tb, batch), timeout=30, what=f"{scope} gone")
