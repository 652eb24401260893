"""Working directories and groups against a live pmlmd: a member's workers start in their
directory only where the member's own ``cd`` gets in, and get the groups the member has when
they start, not those of submit time.

The clients and oracles really run as a temporary member (a forked child of the test
process, as in test_daemon_auth). The directory tree the requests point into is made per
module: a member's directory, a root-only (0700) directory with a world-writable directory
inside, symlinks to each, and /proc magic links. A directory is checked twice by the
daemon: at submit (the request is refused) and at each spawn, as the submitter again. The
spawn-time check is reached by changing what the path names after submit, the way a member
would try to get past the first check: a symlink in the member's own directory that they
re-point once their first worker has started.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pmlmd.node import procctl, workdir

from pmlmd.core import protocol
from pmlmd.daemon.service import GROUPS_TTL

from support import Daemon, wait_for
# no_batch_outlives_the_test: the autouse cleanup of test_daemon_auth, for this module's daemon too.
from test_daemon_auth import (SH_PATH, as_root, as_user, no_batch_outlives_the_test, outdir, run_as,  # noqa: F401
                              submitted, wait_event)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and changes uid")


# --- users, the daemon and the directory tree --------------------------------------------------

@dataclass(frozen=True)
class Accounts:
    group: str  # the daemon's group
    member: str

    def credentials(self, user: str) -> procctl.Credentials:
        entry = pwd.getpwnam(user)
        return procctl.Credentials(entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(user, entry.pw_gid)))


def add_group(name: str) -> None:
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)


def add_user(name: str, groups: list[str]) -> None:
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G",
                    ",".join(groups), name], check=True, capture_output=True)


@pytest.fixture(scope="module")
def accounts():
    suffix = secrets.token_hex(3)  # several runs (and engineers) on one machine must not collide
    names = Accounts(group=f"pmlmp-grp-{suffix}", member=f"pmlmp-m-{suffix}")
    made_group = made_user = False
    try:
        add_group(names.group)
        made_group = True
        add_user(names.member, [names.group])
        made_user = True
        yield names
    finally:
        if made_user:
            subprocess.run(["userdel", names.member], capture_output=True)  # also its private group
        if made_group:
            subprocess.run(["groupdel", names.group], capture_output=True)


@pytest.fixture(scope="module")
def served(accounts):
    """One pmlmd for the module; its limits never hold a worker back (these tests are not about load)."""
    base = Path(tempfile.mkdtemp(prefix="pmlm-"))
    base.chmod(0o755)  # the member must reach the socket inside
    daemon = Daemon(base, f'[daemon]\ngroup = "{accounts.group}"\n'
                          '[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n')
    try:
        yield daemon.start()
    finally:
        daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class Tree:
    base: Path  # root's, 0755
    mine: Path  # the member's, 0755; mine/d is theirs too
    secret: Path  # root's, 0700; secret/d is 0777 and holds a marker file the member may read once inside
    root_pid: int  # a root process standing in secret/d
    member_pid: int  # a process of the member standing in mine/d

    @property
    def marker(self) -> Path:
        return self.secret / "d" / "marker"


@pytest.fixture(scope="module")
def tree(accounts):
    """base/{mine/{d, up -> ..}, secret/d/marker, lm -> mine, ls -> secret, lsd -> secret/d,
    lp -> /proc/ROOT_PID/cwd, f}: every name the path strategy below combines."""
    member = accounts.credentials(accounts.member)
    base = Path(tempfile.mkdtemp(prefix="pmlmp-tree-"))
    base.chmod(0o755)
    mine, secret = base / "mine", base / "secret"
    (mine / "d").mkdir(parents=True)
    (mine / "up").symlink_to("..")
    for path in (mine / "d", mine / "up", mine):
        os.lchown(path, member.uid, member.gid)
    (secret / "d").mkdir(parents=True)
    secret.chmod(0o700)
    (secret / "d").chmod(0o777)
    (secret / "d" / "marker").write_text("root's secret\n")
    (secret / "d" / "marker").chmod(0o644)
    (base / "f").write_text("not a directory\n")
    (base / "lm").symlink_to("mine")
    (base / "ls").symlink_to("secret")
    (base / "lsd").symlink_to("secret/d")
    sleepers = []
    try:
        sleepers.append(subprocess.Popen(["sleep", "600"], cwd=secret / "d"))
        sleepers.append(subprocess.Popen(["sleep", "600"], cwd=mine / "d", user=member.uid, group=member.gid,
                                         extra_groups=list(member.groups)))
        (base / "lp").symlink_to(f"/proc/{sleepers[0].pid}/cwd")
        yield Tree(base=base, mine=mine, secret=secret, root_pid=sleepers[0].pid, member_pid=sleepers[1].pid)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        shutil.rmtree(base, ignore_errors=True)


# --- helpers ---------------------------------------------------------------------------------------

def prying(out: Path) -> list[str]:
    """A worker that records where it runs and tries what its directory would give it."""
    return ["/bin/sh", "-c", f"pwd -P > {out}/pwd; [ -r marker ] && cat marker > {out}/leak && touch pwned; true"]


def untouched(tree: Tree, out: Path) -> None:
    """Nothing of the root-only directory reached a worker."""
    assert not (out / "pwd").exists(), (out / "pwd").read_text()
    assert not (out / "leak").exists()
    assert not (tree.secret / "d" / "pwned").exists()


def refused_at_submit(reply: dict, path, why: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == protocol.BAD_FIELD, reply
    assert reply["error"]["message"] == f"submit: cannot enter working directory {path}: {why}", reply


def plant_symlink(user: str, link: Path, target) -> None:
    """As ``user``, make ``link`` point at ``target`` (replacing what it pointed at, in one step)."""
    def plant():
        fresh = f"{link}.new"
        os.symlink(str(target), fresh)
        os.replace(fresh, link)
    run_as(user, plant)


def attempts_of(report: dict, index: int) -> list[dict]:
    return report["tasks"][index]["attempts"]


def through_a_flipped_link(daemon: Daemon, accounts: Accounts, tree: Tree, out: Path, target) -> tuple[Path, dict]:
    """Get a path past the submit check, then make it name ``target`` for the second task.

    The member submits two tasks (one at a time) in a symlink of theirs pointing at their
    own directory; once the first worker runs, they re-point it at ``target``. Returns the
    link and the second task's report entry.
    """
    link = tree.mine / f"flip-{secrets.token_hex(3)}"
    plant_symlink(accounts.member, link, tree.mine / "d")
    script = (f'if [ "$PMLM_TASK_INDEX" = 0 ]; then : > {out}/first; while [ ! -e {out}/go ]; do sleep 0.02; done; '
              f'else {prying(out)[2]}; fi')
    batch = submitted(as_user(daemon, accounts.member, "submit", command=["/bin/sh", "-c", script], tasks=2,
                              max_workers=1, cwd=str(link), env=SH_PATH))
    wait_for(lambda: (out / "first").exists(), what="the first worker")
    plant_symlink(accounts.member, link, target)
    (out / "go").touch()
    assert wait_event(daemon, batch, "finished")["exit_status"] == 1
    report = as_root(daemon, "report", batch=batch)
    assert report["tasks"][0]["status"] == "succeeded", report
    return link, report["tasks"][1]


MAGIC = "refused, {path} goes through a /proc magic link"

# Where a member's request may point, and why the member's own cd would not get in.
TARGETS = {
    "root-only dir": (lambda t: t.secret / "d", "permission denied"),
    "member's symlink into it": (lambda t: t.mine / "evil", "permission denied"),
    "/root": (lambda t: "/root", "permission denied"),
    # The member may not follow a root process's magic links at all: the kernel says EACCES first.
    "root process's cwd": (lambda t: f"/proc/{t.root_pid}/cwd", "permission denied"),
    "member process's cwd": (lambda t: f"/proc/{t.member_pid}/cwd", MAGIC),
    "/proc/self/cwd": (lambda t: "/proc/self/cwd", MAGIC),
    "missing": (lambda t: t.base / "nope", "no such directory"),
    "a file": (lambda t: t.base / "f", "not a directory"),
}


@pytest.fixture(scope="module")
def evil_link(accounts, tree):
    plant_symlink(accounts.member, tree.mine / "evil", tree.secret / "d")


# --- the working directory -------------------------------------------------------------------------

@pytest.mark.usefixtures("evil_link")
@pytest.mark.parametrize("name", list(TARGETS))
def test_submit_is_refused_where_the_member_cannot_enter(served, accounts, tree, outdir, name):
    target, why = TARGETS[name]
    path = target(tree)
    reply = as_user(served, accounts.member, "submit", command=prying(outdir), cwd=str(path), env=SH_PATH)
    refused_at_submit(reply, path, why.format(path=path))
    assert "cannot execute" not in reply["error"]["message"]
    untouched(tree, outdir)


@pytest.mark.usefixtures("evil_link")
@pytest.mark.parametrize("name", list(TARGETS))
def test_spawn_is_refused_where_the_member_cannot_enter(served, accounts, tree, outdir, name):
    target, why = TARGETS[name]
    link, task = through_a_flipped_link(served, accounts, tree, outdir, target(tree))
    assert task["status"] == "failed", task
    [attempt] = task["attempts"]  # a directory that cannot be entered is not retried (retry_failed is 0)
    assert attempt["cause"] == "cwd" and attempt["pid"] is None, attempt
    assert attempt["reason"] == f"cannot enter working directory {link}: {why.format(path=link)}", attempt
    untouched(tree, outdir)


def test_directory_closed_after_submit_is_refused_at_spawn(served, accounts, tree, outdir):
    # No symlink involved: the directory is open at submit, and its parent is made root-only after.
    parent = tree.base / f"closing-{secrets.token_hex(3)}"
    (parent / "d").mkdir(parents=True)
    parent.chmod(0o755)
    (parent / "d").chmod(0o777)
    (parent / "d" / "marker").write_text("root's secret\n")
    script = (f'if [ "$PMLM_TASK_INDEX" = 0 ]; then : > {outdir}/first; while [ ! -e {outdir}/go ]; do sleep 0.02; '
              f'done; else pwd -P > {outdir}/pwd; cat marker > {outdir}/leak; fi')
    cwd = parent / "d"
    batch = submitted(as_user(served, accounts.member, "submit", command=["/bin/sh", "-c", script], tasks=2,
                              max_workers=1, cwd=str(cwd), env=SH_PATH))
    wait_for(lambda: (outdir / "first").exists(), what="the first worker")
    parent.chmod(0o700)
    (outdir / "go").touch()
    assert wait_event(served, batch, "finished")["exit_status"] == 1
    [attempt] = attempts_of(as_root(served, "report", batch=batch), 1)
    assert attempt["cause"] == "cwd", attempt
    assert attempt["reason"] == f"cannot enter working directory {cwd}: permission denied"
    assert not (outdir / "pwd").exists() and not (outdir / "leak").exists()


@pytest.mark.parametrize("cwd", ["mine/d", "lm/d", "mine/up/mine/d"])
def test_member_works_where_they_may_enter(served, accounts, tree, outdir, cwd):
    batch = submitted(as_user(served, accounts.member, "submit", command=["/bin/sh", "-c", f"pwd -P > {outdir}/pwd"],
                              cwd=str(tree.base / cwd), env=SH_PATH))
    assert wait_event(served, batch, "finished")["exit_status"] == 0
    assert (outdir / "pwd").read_text() == f"{tree.mine / 'd'}\n"


def test_root_may_work_in_its_own_home(served, tree, outdir):
    reply = as_root(served, "submit", command=["/bin/sh", "-c", f"pwd -P > {outdir}/pwd"], cwd="/root", env=SH_PATH)
    assert wait_event(served, reply["batch"], "finished")["exit_status"] == 0
    assert (outdir / "pwd").read_text() == "/root\n"


COMPONENTS = [".", "..", "mine", "secret", "d", "up", "lm", "ls", "lsd", "lp", "f", "nope"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4))
def test_daemon_enters_exactly_where_the_members_cd_does(served, accounts, tree, parts):
    """The oracle: the member's own chdir, in a forked child. The daemon's verdict: its worker
    started in that same directory, or it refused (at submit or at spawn) and nothing ran."""
    path = os.path.join(tree.base, *parts)

    def cd():
        try:
            os.chdir(path)
        except OSError:
            return None
        return os.getcwd()

    expected = run_as(accounts.member, cd)
    out = Path(tempfile.mkdtemp(prefix="pmlmp-hyp-"))
    try:
        out.chmod(0o777)
        reply = as_user(served, accounts.member, "submit", command=prying(out), cwd=path, env=SH_PATH)
        if reply["ok"]:
            batch = reply["result"]["batch"]
            finished = wait_event(served, batch, "finished")
            [attempt] = attempts_of(as_root(served, "report", batch=batch), 0)
            started = attempt["cause"] != "cwd"
        else:
            assert "cannot enter working directory" in reply["error"]["message"], reply
            started = False
        event("the member may enter it" if expected is not None else "the member may not enter it")
        if expected is None:
            assert not started, (path, reply)
            untouched(tree, out)
        else:
            assert started and finished["exit_status"] == 0, (path, reply)
            assert (out / "pwd").read_text() == expected + "\n", path
        # The same verdict without openat2, from the fallback a kernel before 5.6 would use.
        def fallback():
            workdir._openat2_works = False
            try:
                workdir.check(path)
            except workdir.DirectoryError:
                return False
            return True
        assert run_as(accounts.member, fallback) == (expected is not None), path
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_acting_as_the_member_gives_roots_credentials_back(accounts, tree):
    member = accounts.credentials(accounts.member)

    def enter_and_come_back():
        before = (os.getresuid(), os.getresgid(), sorted(os.getgroups()), os.getcwd())
        refused = None
        try:
            workdir.check(str(tree.secret / "d"), member)
        except workdir.DirectoryError as e:
            refused = str(e)
        inside = None
        with workdir.entered(str(tree.mine / "d"), member):
            inside = os.getcwd()
        after = (os.getresuid(), os.getresgid(), sorted(os.getgroups()), os.getcwd())
        return before == after, refused, inside

    same, refused, inside = run_as("root", enter_and_come_back)
    assert same
    assert refused == f"cannot enter working directory {tree.secret / 'd'}: permission denied"
    assert inside == str(tree.mine / "d")


# --- groups ------------------------------------------------------------------------------------------

@pytest.fixture
def grouped(accounts, served):
    """A fresh member of the daemon's group with two more supplementary groups, x and y."""
    suffix = secrets.token_hex(3)
    user, x, y = f"pmlmp-g-{suffix}", f"pmlmp-x-{suffix}", f"pmlmp-y-{suffix}"
    made = []
    try:
        for group in (x, y):
            add_group(group)
            made.append(("groupdel", group))
        add_user(user, [accounts.group, x, y])
        made.insert(0, ("userdel", user))
        yield user, x, y
    finally:
        # userdel refuses while the user has processes: end the user's workers first.
        if served.proc.poll() is None:
            for summary in as_root(served, "status")["batches"]:
                as_root(served, "cancel", batch=summary["batch"])
                wait_event(served, summary["batch"], "finished")
        for command, name in made:
            # A worker's last process may still be on its way out.
            wait_for(lambda: subprocess.run([command, name], capture_output=True).returncode == 0, timeout=10,
                     poll=0.1, what=f"{command} {name}")


def gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def recorded_groups(out: Path, task: int, attempt: int) -> set[int]:
    path = out / f"groups-{task}-{attempt}"
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), timeout=30, what=str(path))
    return {int(g) for g in path.read_text().split()}


@pytest.mark.slow
def test_workers_get_the_groups_their_user_has_when_they_start(served, accounts, outdir, grouped):
    user, x, y = grouped
    script = (f"id -G > {outdir}/groups-$PMLM_TASK_INDEX-$PMLM_ATTEMPT; "
              f"while [ ! -e {outdir}/go-$PMLM_TASK_INDEX ]; do sleep 0.02; done")
    # Naming themselves with --user makes it no batch root vouches for: it is cancelled all the
    # same when they leave the group (below).
    batch = submitted(as_user(served, user, "submit", command=["/bin/sh", "-c", script], tasks=5, max_workers=1,
                              cwd=str(outdir), env=SH_PATH, user=user))
    assert {gid(x), gid(y), gid(accounts.group)} <= recorded_groups(outdir, 0, 1)

    # Taken away while the daemon runs: the first worker started after the cache's time lacks it.
    subprocess.run(["gpasswd", "-d", user, x], check=True, capture_output=True)
    time.sleep(GROUPS_TTL + 0.3)
    (outdir / "go-0").touch()
    groups = recorded_groups(outdir, 1, 1)
    assert gid(x) not in groups and gid(y) in groups

    # Taken away while no daemon runs: the next daemon reads the database, not the groups of submit.
    subprocess.run(["gpasswd", "-d", user, y], check=True, capture_output=True)
    served.stop()
    served.start()
    (outdir / "go-1").touch()
    # Task 1's worker was adopted; how it ended cannot be read, so the task runs again.
    for task, attempt in ((1, 2), (2, 1)):
        groups = recorded_groups(outdir, task, attempt)
        assert gid(x) not in groups and gid(y) not in groups and gid(accounts.group) in groups

    # Out of the daemon's group: nothing more starts, the running worker goes on.
    subprocess.run(["gpasswd", "-d", user, accounts.group], check=True, capture_output=True)
    status = wait_for(lambda: (s := as_root(served, "status", batch=batch))["counts"]["cancelled"] == 2 and s,
                      timeout=10, what="the queued tasks to be cancelled")
    assert status["counts"]["running"] == 1 and status["counts"]["queued"] == 0, status
    assert status["state"] == "finishing", status  # nothing more starts; the running worker goes on
    (outdir / "go-2").touch()
    assert wait_event(served, batch, "finished")["exit_status"] == 1
    report = as_root(served, "report", batch=batch)
    assert [t["status"] for t in report["tasks"]] == ["succeeded"] * 3 + ["cancelled"] * 2, report
    reason = f"owner {user} is no longer a member of group {accounts.group}"
    assert report["error_message"] == f"cancelled: {reason}"
    assert not (outdir / "groups-3-1").exists()
    assert served.logs().count(reason) == 1
