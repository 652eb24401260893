"""Starting workers (procctl.spawn): the identity, directory and session a worker gets.

Real processes as a real other user (``nobody``, which every Debian system has): what the
kernel says of the child in /proc/PID/status is the oracle. Each child is ended and reaped
by its test.
"""

from __future__ import annotations

import os
import pwd
import signal
import tempfile
import time

import pytest

from pmlmd import procctl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: starts a worker as another user")


@pytest.fixture
def nobody() -> procctl.Credentials:
    entry = pwd.getpwnam("nobody")
    # Two supplementary groups, one of them not the primary: both must arrive, and only they.
    return procctl.Credentials(uid=entry.pw_uid, gid=entry.pw_gid, groups=(entry.pw_gid, 4))


@pytest.fixture(params=["setpriv", "fork"])
def path(request, monkeypatch):
    """Either way of taking on credentials: setpriv(1) after posix_spawn, or a fork where setpriv is missing."""
    if request.param == "fork":
        monkeypatch.setattr(procctl, "SETPRIV", None)
    elif procctl.SETPRIV is None:
        pytest.skip("no setpriv(1) on this system")
    return request.param


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def wait_exec(child: procctl.Child, command: bytes) -> None:
    """Until the child runs ``command`` (a start through setpriv execs twice)."""
    for _ in range(2000):
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[0] == command:
                return
        time.sleep(0.005)  # an exec sends no event to wait for
    raise AssertionError(f"the child never ran {command!r}")


def end(child: procctl.Child) -> procctl.Exit:
    os.killpg(child.pid, signal.SIGKILL)
    os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOWAIT)
    result = procctl.reap(child)
    os.close(child.pidfd)
    return result


@needs_root
def test_a_worker_runs_as_its_owner_with_exactly_its_groups_in_its_directory(nobody, path):
    workdir = tempfile.mkdtemp(prefix="pmlmt-spawn-")
    os.chmod(workdir, 0o755)
    child = procctl.spawn([b"/bin/sleep", b"30"], {b"PATH": b"/usr/bin:/bin"}, cwd=workdir, credentials=nobody,
                          umask=0o027)
    try:
        wait_exec(child, b"/bin/sleep")
        st = status(child.pid)
        assert st["Uid"].split() == [str(nobody.uid)] * 4  # real, effective, saved, filesystem
        assert st["Gid"].split() == [str(nobody.gid)] * 4
        assert sorted(map(int, st["Groups"].split())) == sorted(nobody.groups)
        assert st["Umask"] == "0027"
        assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
        assert os.readlink(f"/proc/{child.pid}/cwd") == workdir
        assert os.getsid(child.pid) == child.pid and os.getpgid(child.pid) == child.pid
    finally:
        end(child)
        os.rmdir(workdir)
    assert os.getcwd() != workdir and os.geteuid() == 0  # pmlmd's own directory and identity are back


@needs_root
def test_a_directory_the_owner_may_not_enter_starts_nothing(nobody, path):
    from pmlmd.workdir import DirectoryError

    private = tempfile.mkdtemp(prefix="pmlmt-spawn-")  # 0700, root's
    try:
        with pytest.raises(DirectoryError, match="permission denied"):
            procctl.spawn([b"/bin/true"], {}, cwd=private, credentials=nobody)
    finally:
        os.rmdir(private)


@needs_root
def test_a_command_the_owner_cannot_run_ends_with_the_shells_status(nobody):
    if procctl.SETPRIV is None:
        pytest.skip("no setpriv(1) on this system")
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        child = procctl.spawn([b"/nonexistent/command"], {}, credentials=nobody, stderr_fd=devnull)
    finally:
        os.close(devnull)
    os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOWAIT)
    ended = procctl.reap(child)
    os.close(child.pidfd)
    assert ended.exit_code == 127


def test_pmlmds_own_identity_is_not_taken_on_again(monkeypatch):
    """A batch of pmlmd's own user starts its command directly: no setpriv, no fork."""
    monkeypatch.setattr(procctl, "SETPRIV", b"/nonexistent/setpriv")
    child = procctl.spawn([b"/bin/sleep", b"30"], {}, credentials=procctl.own_credentials())
    try:
        wait_exec(child, b"/bin/sleep")
    finally:
        end(child)


@needs_root
def test_no_variable_of_the_submitter_reaches_a_process_that_still_runs_as_root(nobody):
    """The dynamic loader of a root process would act on LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...:
    whatever runs before the credentials are taken on gets no environment. LD_DEBUG_OUTPUT shows
    who ran the loader: each process it traces writes a file of its own, owned by its user."""
    import pathlib
    import shutil

    traces = pathlib.Path(tempfile.mkdtemp(prefix="pmlmt-ld-"))  # where nobody may write too
    traces.chmod(0o1777)
    env = {b"LD_DEBUG": b"files", b"LD_DEBUG_OUTPUT": str(traces / "ld").encode(), b"PMLM_MARK": b"a b\xff"}
    child = procctl.spawn([b"/bin/sleep", b"30"], env, credentials=nobody)
    try:
        try:
            wait_exec(child, b"/bin/sleep")
            with open(f"/proc/{child.pid}/environ", "rb") as f:
                environ = dict(entry.split(b"=", 1) for entry in f.read().split(b"\0") if entry)
        finally:
            end(child)
        owners = {path.stat().st_uid for path in traces.iterdir()}
    finally:
        shutil.rmtree(traces)
    assert environ == env  # exactly what was submitted, bytes as they are
    assert owners == {nobody.uid}, owners  # traced as the user only, never as root
