"""Starting workers (procctl.spawn): the identity, directory, environment and session a worker gets.

Real processes as a real other user (``nobody``, which every Debian system has): what the
kernel says of the child in /proc/PID/status is the oracle. Each child is ended and reaped
by its test.
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import tempfile
import time

import pytest

from pmlmd.node import procctl
from support import proc_limit

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: starts a worker as another user")


@pytest.fixture
def nobody() -> procctl.Credentials:
    entry = pwd.getpwnam("nobody")
    # Two supplementary groups, one of them not the primary: both must arrive, and only they.
    return procctl.Credentials(uid=entry.pw_uid, gid=entry.pw_gid, groups=(entry.pw_gid, 4))


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def wait_exec(child: procctl.Child, command: bytes) -> None:
    """Until the child runs ``command`` (a fork execs it a moment after it starts)."""
    for _ in range(2000):
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[0] == command:
                return
        time.sleep(0.005)  # an exec sends no event to wait for
    raise AssertionError(f"the child never ran {command!r}")


def wait_asleep(child: procctl.Child) -> None:
    """Until the child, a sleep(1), sleeps: its dynamic loader has done all it does (traces too)."""
    for _ in range(2000):
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"S":
                with open(f"/proc/{child.pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].endswith(b"sleep"):
                        return
        time.sleep(0.005)  # nothing to wait on for a process's state
    raise AssertionError("the child never went to sleep")


def through_gate(command: list, environ: dict, variables: bytes, credentials=None) -> tuple[dict, bytes, dict]:
    """Start a gated sleep (gate.gated's words) as pmlmd does, say go, and return what the
    sleeping command has: its environment, its cmdline and its /proc status. Ends it."""
    from pmlmd.node import gate as gate_module

    r, w = os.pipe2(os.O_CLOEXEC)
    env_fd = gate_module.memfd("pmlm-env", variables) if variables else None
    try:
        child = procctl.spawn(command, environ, stdin_fd=r, credentials=credentials, env_fd=env_fd)
    finally:
        os.close(r)
        if env_fd is not None:
            os.close(env_fd)
    try:
        os.write(w, b"go\n")
        os.close(w)
        wait_asleep(child)
        with open(f"/proc/{child.pid}/environ", "rb") as f:
            got = dict(entry.split(b"=", 1) for entry in f.read().split(b"\0") if entry)
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            return got, f.read(), status(child.pid)
    finally:
        end(child)


def end(child: procctl.Child) -> procctl.Exit:
    os.killpg(child.pid, signal.SIGKILL)
    os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOWAIT)
    result = procctl.reap(child)
    os.close(child.pidfd)
    return result


@needs_root
@pytest.mark.parametrize("env", [{}, {b"PATH": b"/usr/bin:/bin"}], ids=["setpriv", "fork"])
def test_a_worker_runs_as_its_owner_with_exactly_its_groups_in_its_directory(nobody, env, monkeypatch):
    """Both ways a worker of another user starts: posix_spawn of setpriv (no environment to hand
    over, as behind the gate) and a fork of pmlmd (an environment, which root must not see)."""
    if not env:
        monkeypatch.setattr(procctl, "_spawn_as", None)  # a fork would fail
    workdir = tempfile.mkdtemp(prefix="pmlmt-spawn-")
    os.chmod(workdir, 0o755)
    child = procctl.spawn([b"/bin/sleep", b"30"], env, cwd=workdir, credentials=nobody, umask=0o027)
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
def test_a_directory_the_owner_may_not_enter_starts_nothing(nobody):
    from pmlmd.node.workdir import DirectoryError

    private = tempfile.mkdtemp(prefix="pmlmt-spawn-")  # 0700, root's
    try:
        with pytest.raises(DirectoryError, match="permission denied"):
            procctl.spawn([b"/bin/true"], {}, cwd=private, credentials=nobody)
    finally:
        os.rmdir(private)


def test_pmlmds_own_identity_is_not_taken_on_again(monkeypatch):
    """A batch of pmlmd's own user starts with posix_spawn: no fork of pmlmd, no change of ids."""
    monkeypatch.setattr(procctl, "_spawn_as", None)  # a call would fail
    child = procctl.spawn([b"/bin/sleep", b"30"], {}, credentials=procctl.own_credentials())
    try:
        wait_exec(child, b"/bin/sleep")
    finally:
        end(child)


@needs_root
def test_no_variable_of_the_submitter_reaches_a_process_that_still_runs_as_root(nobody):
    """The dynamic loader of a root process would act on LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...:
    whatever runs before the credentials are taken on gets no environment. LD_DEBUG_OUTPUT shows
    who ran the loader: each process it traces writes a file of its own, owned by its user. And no
    value is in an argv, which every user may read (/proc/PID/cmdline)."""
    import pathlib
    import shutil

    traces = pathlib.Path(tempfile.mkdtemp(prefix="pmlmt-ld-"))  # where nobody may write too
    traces.chmod(0o1777)
    env = {b"LD_DEBUG": b"files", b"LD_DEBUG_OUTPUT": str(traces / "ld").encode(), b"PMLM_MARK": b"a b\xff"}
    child = procctl.spawn([b"/bin/sleep", b"30"], env, credentials=nobody)
    try:
        try:
            wait_asleep(child)
            with open(f"/proc/{child.pid}/environ", "rb") as f:
                environ = dict(entry.split(b"=", 1) for entry in f.read().split(b"\0") if entry)
            with open(f"/proc/{child.pid}/cmdline", "rb") as f:
                assert f.read() == b"/bin/sleep\x0030\x00"
        finally:
            end(child)
        owners = {path.stat().st_uid for path in traces.iterdir()}
    finally:
        shutil.rmtree(traces)
    assert environ == env  # exactly what was submitted, bytes as they are
    assert owners == {nobody.uid}, owners  # traced as the user only, never as root


@needs_root
def test_names_a_shell_cannot_hold_reach_the_command_exactly_and_in_no_argv(nobody, monkeypatch):
    """A-B, X.Y, a name with a byte that is not UTF-8, an OPTIND the shell refuses, a command
    word with "=": perl takes the variables from the gate's descriptor and becomes the command,
    with exactly the environment submitted and nothing of it in any argv."""
    from pmlmd.node import gate as gate_module

    monkeypatch.setattr(procctl, "_spawn_as", None)  # no fork of pmlmd
    env = {b"A-B": b"1", b"X.Y": b"two words", b"N\xff": b"\xfe", b"OPTIND": b"abc", b"SECRET": b"hunter2",
           b"PATH": b"/usr/bin:/bin", b"EMPTY": b""}
    command, environ, variables = gate_module.gated({}, [b"/bin/sleep", b"30"], env, carry=True)
    assert environ == {} and not any(b"hunter2" in word for word in command)
    got, cmdline, st = through_gate(command, environ, variables, nobody)
    assert got == env and b"hunter2" not in cmdline
    assert st["Uid"].split() == [str(nobody.uid)] * 4


def test_the_loaders_variables_skip_the_gate_and_reach_the_command():
    """The gate (a shell that sets the worker's limits and waits for pmlmd's go) must not run a
    submitter's LD_PRELOAD or GCONV_PATH: code loaded there would run before the limits and the
    scope placement, and could fork a process that has neither. They reach the command, exactly.
    LD_DEBUG (itself a loader variable) shows which programs the loader traced."""
    import pathlib
    import shutil

    from pmlmd.node import gate as gate_module

    traces = pathlib.Path(tempfile.mkdtemp(prefix="pmlmt-ld-"))
    env = {b"LD_DEBUG": b"libs", b"LD_DEBUG_OUTPUT": str(traces / "ld").encode(), b"PATH": b"/usr/bin:/bin",
           b"GCONV_PATH": b"it's \"quoted\" $(not run)\n"}
    command, environ, exports = gate_module.gated({}, [b"/bin/sleep", b"30"], env)
    assert not any(gate_module._loader_variable(name) for name in environ)
    try:
        environ, _, _ = through_gate(command, environ, exports)
        traced = b"".join(path.read_bytes() for path in traces.iterdir())
    finally:
        shutil.rmtree(traces)
    assert {name: environ.get(name) for name in env} == env  # exactly, quotes and all
    assert b"/bin/sleep" in traced and b"/bin/sh" not in traced and b"dash" not in traced, traced[:2000]


@needs_root
def test_a_members_gate_starts_with_no_environment_and_hands_on_exactly_the_submitted_one(nobody, monkeypatch):
    """A member's worker starts through setpriv, which runs as root until it has taken on the
    ids: it gets no environment; every variable reaches the command through the gate's stdin
    pipe, exactly as submitted (the shell's own PWD, PPID, IFS and OPTIND included), in no
    argv, and no loader ran as root (LD_DEBUG_OUTPUT files are owned by whoever was traced)."""
    import pathlib
    import shutil

    from pmlmd.node import gate as gate_module

    monkeypatch.setattr(procctl, "_spawn_as", None)  # no fork of pmlmd
    traces = pathlib.Path(tempfile.mkdtemp(prefix="pmlmt-ld-"))
    traces.chmod(0o1777)
    env = {b"LD_DEBUG": b"libs", b"LD_DEBUG_OUTPUT": str(traces / "ld").encode(), b"PATH": b"/usr/bin:/bin",
           b"PWD": b"/nowhere", b"PPID": b"1", b"IFS": b"x", b"OPTIND": b"5", b"MARK": b"it's \"quoted\" $(no)\n\xff"}
    command, environ, exports = gate_module.gated({}, [b"sleep", b"30"], env, carry=True)
    assert environ == {}
    try:
        got, cmdline, st = through_gate(command, environ, exports, nobody)
        owners = {path.stat().st_uid for path in traces.iterdir()}
        traced = b"".join(path.read_bytes() for path in traces.iterdir())
    finally:
        shutil.rmtree(traces)
    assert got == env
    assert cmdline == b"sleep\x0030\x00" and st["Uid"].split() == [str(nobody.uid)] * 4
    assert owners == {nobody.uid}, owners
    assert b"control: sleep" in traced and b"setpriv" not in traced and b"dash" not in traced, traced[:2000]


@pytest.mark.parametrize("as_nobody", [False, True], ids=["posix_spawn", "fork"])
def test_a_workers_start_time_is_the_one_the_kernel_reports(as_nobody):
    """The start time (with the pid, a worker's identity across a restart of pmlmd) is taken from
    the clock around the start, not read from /proc: it must be exactly what /proc/PID/stat says."""
    if as_nobody and os.geteuid() != 0:
        pytest.skip("needs root: starts a worker as another user")
    from pmlmd.node.sampler import ProcReader

    entry = pwd.getpwnam("nobody")
    credentials = procctl.Credentials(entry.pw_uid, entry.pw_gid, (entry.pw_gid,)) if as_nobody else None
    for _ in range(50):
        child = procctl.spawn([b"/bin/sleep", b"30"], {b"PATH": b"/bin"} if as_nobody else {},
                              credentials=credentials)
        try:
            assert child.start_ticks == ProcReader().pid_stat(child.pid).start_ticks
        finally:
            end(child)


@needs_root
def test_a_root_daemon_takes_roots_login_groups_so_roots_batches_start_as_it_is():
    """Started by a service manager, pmlmd as root has no supplementary groups, while root's
    batches carry root's groups from the group database: without taking them on, every worker of
    root would start through setpriv."""
    from pmlmd.daemon import service as daemon

    before = os.getgroups()
    try:
        os.setgroups([])
        daemon.take_login_groups()
        submitted = daemon.current_credentials(procctl.Credentials(0, os.getegid(), ()))
        assert procctl.own_credentials() == submitted
    finally:
        os.setgroups(before)


def test_a_carried_environment_has_no_size_limit_of_its_own_and_the_gate_none():
    """With ``carry`` every variable goes by the gate's descriptor however large (a memfd, not a
    pipe pmlmd would have to wait on); without, only the loader's variables do."""
    from pmlmd.node import gate as gate_module

    large = {b"PATH": b"/bin", b"BIG": b"x" * (1 << 20), b"LD_PRELOAD": b"x.so"}
    command, environ, variables = gate_module.gated({}, [b"true"], large, carry=True)
    assert environ == {} and b"export BIG='" + large[b"BIG"] + b"'\n" in variables
    command, environ, variables = gate_module.gated({}, [b"true"], large)
    assert environ == {b"PATH": b"/bin", b"BIG": large[b"BIG"]} and variables == b"export LD_PRELOAD='x.so'\n"
    command, environ, variables = gate_module.gated({}, [b"true"], {b"PATH": b"/bin"})
    assert variables == b"" and b"/dev/fd/" not in command[2]  # nothing to take on: the gate reads nothing


@needs_root
def test_the_gate_forks_nothing_so_a_process_limit_of_one_still_runs_the_command(nobody, monkeypatch):
    """The gate takes on the variables with the shell's own '.': under a batch's process limit
    (ulimit -u) a fork would fail and the task with it."""
    import resource

    from pmlmd.node import gate as gate_module

    monkeypatch.setattr(procctl, "_spawn_as", None)
    env = {b"PATH": b"/usr/bin:/bin", b"LD_LIBRARY_PATH": b"/nowhere", b"MARK": b"1"}
    command, environ, variables = gate_module.gated({resource.RLIMIT_NPROC: (1, 1)}, [b"sleep", b"30"], env, carry=True)
    got, _, st = through_gate(command, environ, variables, nobody)
    assert got == env


def test_limits_pmlmd_takes_on_for_a_start_are_the_childs_and_pmlmds_own_again_after():
    own = {r: resource.getrlimit(r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)}
    nofile_hard, core_hard = own[resource.RLIMIT_NOFILE][1], own[resource.RLIMIT_CORE][1]
    core = 0 if own[resource.RLIMIT_CORE][0] != 0 else 1 << 20 if core_hard == resource.RLIM_INFINITY else core_hard
    wanted = {resource.RLIMIT_NOFILE: (300, nofile_hard), resource.RLIMIT_CORE: (core, core_hard)}
    assert procctl.inheritable(wanted, 10) == wanted
    child = procctl.spawn([b"/bin/sleep", b"30"], {}, rlimits=wanted)
    try:
        assert proc_limit(child.pid, "Max open files") == ("300", str(nofile_hard))
        assert proc_limit(child.pid, "Max core file size")[0] == str(core)
    finally:
        end(child)
    assert {r: resource.getrlimit(r) for r in own} == own
    # A start that fails gives them back just the same.
    with pytest.raises(FileNotFoundError):
        procctl.spawn([b"/nonexistent/command"], {}, rlimits=wanted)
    assert {r: resource.getrlimit(r) for r in own} == own


def test_only_limits_pmlmd_can_take_on_harmlessly_are_handed_on_the_rest_need_the_gate():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    assert procctl.inheritable({resource.RLIMIT_NOFILE: (soft, hard), resource.RLIMIT_NPROC: nproc}, 10) == {}
    wanted = {resource.RLIMIT_NOFILE: (300, hard)}
    assert procctl.inheritable(wanted, 10) == wanted
    # A hard limit lowered could not be raised again by pmlmd without CAP_SYS_RESOURCE.
    assert procctl.inheritable({resource.RLIMIT_NOFILE: (300, 300)}, 10) is None
    # Another thread of pmlmd could be refused a descriptor while pmlmd has nearly that many open.
    assert procctl.inheritable(wanted, 301 - procctl.DESCRIPTOR_HEADROOM) is None
    # A soft limit outside SELF_SETTABLE (a process limit would refuse pmlmd's threads) goes through the gate.
    if nproc[1] != resource.RLIM_INFINITY or nproc[0] != resource.RLIM_INFINITY:
        assert procctl.inheritable({resource.RLIMIT_NPROC: (1, nproc[1])}, 10) is None



def test_a_command_name_is_found_through_the_workers_path_and_a_script_without_hashbang_runs_in_sh(tmp_path):
    """As the shell (the gate's exec) finds and runs it: through the PATH the worker gets, not
    pmlmd's, and a file without "#!" by /bin/sh (execvp(3)); posix_spawnp does neither."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "pmlm-test-tool"
    tool.write_text(f"echo ran > {tmp_path}/ran\n")  # no "#!": a shell script by convention only
    tool.chmod(0o755)
    assert str(bin_dir) not in os.environ.get("PATH", "")
    env = {b"PATH": os.fsencode(f"/nonexistent:{bin_dir}:/usr/bin:/bin")}
    assert procctl.command_path(b"pmlm-test-tool", env) == os.fsencode(tool)
    child = procctl.spawn([b"pmlm-test-tool"], env)
    os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOWAIT)
    assert procctl.reap(child).exit_code == 0
    os.close(child.pidfd)
    assert (tmp_path / "ran").read_text() == "ran\n"
    # Not on the worker's PATH: not found (127 in a shell), whatever pmlmd's own PATH holds.
    with pytest.raises(FileNotFoundError):
        procctl.spawn([b"sleep"], {b"PATH": os.fsencode(str(bin_dir))})
    # There but not executable: refused (126 in a shell).
    tool.chmod(0o644)  # no execute bit: root may not execute it either
    with pytest.raises(PermissionError):
        procctl.command_path(b"pmlm-test-tool", env)
