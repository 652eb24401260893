"""Process control: spawn workers as process-group leaders, signal their groups, reap them.

Each worker leads its own session and process group, so pausing, continuing and
terminating reach every process a worker started (the children of a shell script too).
Its own session, not just its own group: when pmlmd dies while a worker is stopped,
the kernel would otherwise find the worker's group newly orphaned and send it SIGHUP,
killing work that a restarted pmlmd could have adopted. The leader is
not reaped before pmlmd has seen its exit through its pidfd, so its pid (and with it
the group id) cannot be reused while pmlmd may still signal it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping

from . import workdir
from .sampler import CLOCK_TICKS, ProcReader

log = logging.getLogger("pmlmd.procctl")

# The descriptor on which a gated worker finds its variables (gate.gated).
ENV_FD = 3
# util-linux's setpriv(1), Essential in Debian: where it is missing, a worker of another user can
# be started only with its environment given as such (a fork of pmlmd, see spawn).
SETPRIV = next((path for path in (b"/usr/bin/setpriv", b"/bin/setpriv") if os.access(path, os.X_OK)), None)
PERL = b"/usr/bin/perl"  # perl-base, Essential in Debian
# perl: execute @ARGV as it is (the PATH is searched for a name without "/"); exit like a shell when it cannot.
EXEC_ARGV = rb'exec {$ARGV[0]} @ARGV; print STDERR "$ARGV[0]: $!\n"; exit($!{ENOENT} ? 127 : 126)'
# Limits pmlmd can take on for the instant of a posix_spawn, for the child to inherit, without
# harm to its other threads (the D-Bus caller, libzmq's I/O thread): the core size, read only when a
# process dumps core; and the descriptor limit while fewer descriptors are open than it allows by
# DESCRIPTOR_HEADROOM, since a new descriptor takes the lowest free number (open(2)).
SELF_SETTABLE = frozenset({resource.RLIMIT_CORE, resource.RLIMIT_NOFILE})
DESCRIPTOR_HEADROOM = 64
# Python ignores SIGPIPE and SIGXFSZ for itself; workers get the default back.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True)
class Credentials:
    """Who a worker runs as: a submitter's uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass
class Child:
    pid: int  # also the process group id
    start_ticks: int  # with the pid, the worker's identity
    pidfd: int
    started: float  # monotonic seconds
    popen: subprocess.Popen | None = None  # kept so that Popen never reaps the child behind our back
    adopted: bool = False  # started by an earlier pmlmd: not our child, its exit status is out of reach


@dataclass(frozen=True)
class Exit:
    exit_code: int | None  # set when the leader exited on its own
    signal: int | None  # set when a signal ended it
    cpu_seconds: float  # user + system of the leader and the children it waited for
    max_rss: int  # bytes, largest resident set of the leader or a waited-for child
    known: bool = True  # False for an adopted worker: it ended, but how is unknown


def spawn(argv: list, env: Mapping, *, stdout_fd: int | None = None, stdin_fd: int | None = None,
          stderr_fd: int | None = None, cwd: str | None = None, credentials: Credentials | None = None,
          umask: int | None = None, proc: ProcReader | None = None, env_fd: int | None = None,
          rlimits: Mapping[int, tuple[int, int]] | None = None) -> Child:
    """Start ``argv`` in a new session and process group with stdin from ``stdin_fd`` (default /dev/null).

    ``env_fd`` (a worker's variables for its gate, see gate.gated) becomes its descriptor ENV_FD.

    ``stdout_fd`` and ``stderr_fd`` (default: pmlmd's own) become its stdout and stderr,
    ``umask`` (default: pmlmd's) its file mode creation mask, ``rlimits`` (resource.RLIMIT_* ->
    (soft, hard), only what ``inheritable`` returned, and never with ``credentials``) its resource
    limits.

    With ``credentials`` the child takes on that identity before it executes the command.
    With ``cwd`` it starts in that directory, entered with the permissions of
    ``credentials`` (pmlmd's own without), never with root's (see workdir); raises
    workdir.DirectoryError when it cannot be entered. Raises OSError (FileNotFoundError,
    PermissionError, ...) when the command cannot be executed. No child is left behind
    when either is raised.

    A worker is started with posix_spawn(3), which glibc implements with a vfork-like clone:
    pmlmd's memory is not copied, so a start costs the same for a 30 MiB daemon as for a small
    program. The working directory, the umask and ``rlimits`` are pmlmd's own for the duration of
    the call, which the child inherits (getrlimit(2): a child created by fork inherits its parent's
    limits). A worker of another user starts as setpriv(1), which takes on the
    credentials and executes ``argv``: as setpriv still runs as root, that is done only with an
    empty ``env`` (LD_PRELOAD, GCONV_PATH, ... of a submitter must never act in a root process;
    the engine's gate hands the worker its variables on ``env_fd``, see gate.gated). With
    an environment, or without setpriv, a worker of another user is started by a fork of pmlmd
    that takes on the credentials before it executes anything (_spawn_as), the environment as
    envp only: /proc/PID/cmdline is readable by every user, /proc/PID/environ is not.
    """
    if credentials is not None and credentials == own_credentials():
        credentials = None  # nothing to take on (root's own batches)
    if credentials is not None:
        if env or SETPRIV is None:
            if env_fd is not None:  # the fork cannot hand it over on ENV_FD
                raise OSError(errno.ENOENT, "setpriv(1) of util-linux is missing: a worker of another user "
                                            "cannot start")
            return _spawn_as(argv, env, stdout_fd=stdout_fd, stdin_fd=stdin_fd, stderr_fd=stderr_fd, cwd=cwd,
                             credentials=credentials, umask=umask, proc=proc)
        argv = setpriv_argv(credentials) + list(argv)
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0) if stdin_fd is None
               else (os.POSIX_SPAWN_DUP2, stdin_fd, 0)]
    if stdout_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stdout_fd, 1))
    if stderr_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stderr_fd, 2))
    if env_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, env_fd, ENV_FD))
    # Entered as the user (pmlmd's own credentials are back before the call): the child inherits it.
    with workdir.entered(cwd, credentials) if cwd is not None else contextlib.nullcontext():
        # posix_spawn has no umask attribute: the child inherits pmlmd's, set for this one call.
        previous = os.umask(umask) if umask is not None else None
        own = {resource_id: resource.getrlimit(resource_id) for resource_id in rlimits or ()}
        before = _boot_ticks()
        try:
            for resource_id, pair in (rlimits or {}).items():
                resource.setrlimit(resource_id, pair)
            # Found as the shell finds it (execvp(3)): through the worker's PATH, not pmlmd's,
            # which posix_spawnp would search; a file without "#!" run by /bin/sh.
            path = command_path(argv[0], env)
            try:
                pid = os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                                     setsigdef=_RESET_SIGNALS, setsigmask=())
            except OSError as e:
                if e.errno != errno.ENOEXEC:
                    raise
                pid = os.posix_spawn(SHELL, [SHELL, path, *argv[1:]], env, file_actions=actions, setsid=True,
                                     setsigdef=_RESET_SIGNALS, setsigmask=())
        finally:
            if previous is not None:
                os.umask(previous)
            for resource_id, pair in own.items():
                try:
                    resource.setrlimit(resource_id, pair)
                except (OSError, ValueError) as e:  # fs.nr_open lowered meanwhile, say
                    log.error("cannot take back pmlmd's own limit %d %s after a start: %s", resource_id, pair, e)
    return _watched(pid, None, proc, before)


SHELL = b"/bin/sh"


def command_path(name: bytes, env: Mapping) -> bytes:
    """Where execvp(3) and the shell find the command ``name`` with ``env``'s PATH: a name with a
    "/" as it is; else the first directory of the PATH (unset: os.defpath, as glibc's) holding an
    executable regular file of that name. Raises FileNotFoundError (exit 127 in a shell) when
    there is none, PermissionError (126) when only one not executable."""
    if b"/" in name or not name:
        return name
    denied = None
    for directory in os.get_exec_path(env):
        candidate = os.path.join(os.fsencode(directory), name)
        try:
            info = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = candidate
    if denied is not None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def inheritable(rlimits: Mapping[int, tuple[int, int]], descriptors: int) -> dict[int, tuple[int, int]] | None:
    """What spawn's ``rlimits`` must be for a worker to start with ``rlimits``
    (resource.RLIMIT_* -> (soft, hard)) by inheriting them from pmlmd, which has ``descriptors``
    open (counted, not remembered: other threads open them too); {} when pmlmd's own are those
    already. None when only a gate can set them (gate.gate): a hard limit other than pmlmd's
    (lowered, pmlmd could not raise its own again without CAP_SYS_RESOURCE), a soft limit other
    than pmlmd's outside SELF_SETTABLE, or a descriptor limit too close to what pmlmd has open.

    Without a gate a worker is one exec, not two: a tiny task costs the node about a third less.
    """
    change = {}
    for resource_id, (soft, hard) in rlimits.items():
        own_soft, own_hard = resource.getrlimit(resource_id)
        if (soft, hard) == (own_soft, own_hard):
            continue
        if hard != own_hard or resource_id not in SELF_SETTABLE:
            return None
        if resource_id == resource.RLIMIT_NOFILE and soft < descriptors + DESCRIPTOR_HEADROOM:
            return None
        change[resource_id] = (soft, hard)
    return change


def own_credentials() -> Credentials:
    """pmlmd's effective uid, gid and supplementary groups (sorted, without duplicates)."""
    return Credentials(uid=os.geteuid(), gid=os.getegid(), groups=tuple(sorted(set(os.getgroups()))))


def setpriv_argv(credentials: Credentials) -> list[bytes]:
    """The setpriv(1) words that run what follows as ``credentials``: real, effective and saved uid
    and gid, and exactly those supplementary groups (util-linux setpriv: --reuid, --regid, --groups).

    Each id is written with a leading space: setpriv looks a word up as a user or group *name*
    first and reads it as a number only if no such name exists, and no name has a space, so an
    account named "1000" cannot stand in for uid 1000."""
    groups = ([b"--groups=" + b",".join(b" %d" % g for g in credentials.groups)] if credentials.groups
              else [b"--clear-groups"])
    return [SETPRIV, b"--reuid= %d" % credentials.uid, b"--regid= %d" % credentials.gid, *groups, b"--"]


def _spawn_as(argv, env, *, stdout_fd, stdin_fd, stderr_fd, cwd, credentials, umask, proc) -> Child:
    """spawn as another user: a fork of pmlmd (subprocess; no vfork, since the child changes its ids)
    that takes on the credentials, then executes ``argv`` with ``env`` as its environment."""
    ids = dict(user=credentials.uid, group=credentials.gid, extra_groups=list(credentials.groups))
    # Popen's own cwd= would chdir in the child while it is still root: the child inherits
    # the directory pmlmd entered as the user instead.
    with workdir.entered(cwd, credentials) if cwd is not None else contextlib.nullcontext():
        before = _boot_ticks()
        popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL if stdin_fd is None else stdin_fd,
                                 stdout=stdout_fd, stderr=stderr_fd, umask=-1 if umask is None else umask,
                                 start_new_session=True, close_fds=True, restore_signals=True, **ids)
    return _watched(popen.pid, popen, proc, before)


def _boot_ticks() -> int:
    """Now, in the unit of a process's start time in /proc/PID/stat: clock ticks (USER_HZ) of
    CLOCK_BOOTTIME, the clock the kernel stamps a new process with (proc(5), field 22)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // (1_000_000_000 // CLOCK_TICKS)


def _watched(pid: int, popen: subprocess.Popen | None, proc: ProcReader | None, before: int) -> Child:
    """The Child of a process started since ``before`` (_boot_ticks): its pidfd and start time.

    The start time is the tick the clock showed both before the start and after it, when it
    did not move on meanwhile (nearly always: a tick is 10 ms, a start well under one): reading
    /proc/PID/stat right after posix_spawn would wait for the child's exec to finish."""
    started = time.monotonic()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        # Without its pidfd pmlmd could not watch it: it must not run on unsupervised.
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if popen is not None:
            popen.returncode = -signal.SIGKILL
        raise
    start_ticks = _boot_ticks()
    if start_ticks != before:
        stat = (proc or ProcReader()).pid_stat(pid)
        # The child is ours and not reaped, so its stat is readable even if it already exited.
        start_ticks = stat.start_ticks if stat else 0
    return Child(pid=pid, start_ticks=start_ticks, pidfd=pidfd, started=started, popen=popen)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to every process of the group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def group_alive(pgid: int) -> bool:
    """True while any process (a zombie counts) is still in the group."""
    return signal_group(pgid, 0)


def pidfd_signal(pidfd: int, sig: int) -> None:
    """Send ``sig`` to the process of the pidfd (pidfd_send_signal(2)); nothing once it has exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # it has exited (not yet reaped)


def reap_if_ours(pid: int) -> None:
    """Reap the process if it is our child (re-parented to us) and has exited."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent reaps it


def signal_cgroup(cgroup, sig: int) -> None:
    """A signal to a worker in a cgroup of its own (cgroup.Worker): SIGSTOP freezes the cgroup,
    SIGCONT thaws it (and continues what anyone else stopped), SIGKILL is cgroup.kill, any other
    goes to each member. A cgroup already gone takes nothing; another failure is logged."""
    try:
        if sig == signal.SIGSTOP:
            cgroup.freeze()
        elif sig == signal.SIGCONT:
            cgroup.thaw()
            cgroup.signal(signal.SIGCONT)
        elif sig == signal.SIGKILL:
            cgroup.kill()
        else:
            cgroup.signal(sig)
    except FileNotFoundError:
        pass  # gone with its last process
    except OSError as e:
        log.warning("cannot %s the worker cgroup %s: %s", {signal.SIGSTOP: "freeze", signal.SIGCONT: "thaw",
                    signal.SIGKILL: "kill"}.get(sig, "signal"), cgroup.path, e.strerror)


def reap(child: Child) -> Exit | None:
    """Reap the child if it has exited (its pidfd is readable); None if it still runs.

    The caller closes ``child.pidfd`` once it has stopped watching it.
    """
    if child.adopted:
        # Only its parent may wait for it; a readable pidfd already says it has ended.
        return Exit(exit_code=None, signal=None, cpu_seconds=0.0, max_rss=0, known=False)
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid == 0:
        return None
    if child.popen is not None:
        child.popen.returncode = os.waitstatus_to_exitcode(status)
    return Exit(
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss=usage.ru_maxrss * 1024,
    )


def open_pidfd(pid: int, start_ticks: int, proc: ProcReader | None = None) -> int | None:
    """A pidfd for the process, only if it still runs and is the one that started at ``start_ticks``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    stat = (proc or ProcReader()).pid_stat(pid)
    # Checked after the pidfd is open: from then on the pidfd refers to this very process.
    if stat is None or stat.start_ticks != start_ticks or stat.state == "Z":
        os.close(pidfd)
        return None
    return pidfd


def adopt(pid: int, start_ticks: int, proc: ProcReader | None = None) -> Child | None:
    """Watch a process started by an earlier pmlmd, if it is still that same process."""
    pidfd = open_pidfd(pid, start_ticks, proc)
    if pidfd is None:
        return None
    return Child(pid=pid, start_ticks=start_ticks, pidfd=pidfd, started=time.monotonic(), adopted=True)


class Processes:
    """Process control as the engine uses it: one method per kind of call it makes on workers'
    processes. The real one calls this module's functions; a test overrides them (a fake that
    records signals and hands out exits), as oomd puts its kill calls behind overridable methods."""

    spawn = staticmethod(spawn)
    reap = staticmethod(reap)
    signal_group = staticmethod(signal_group)
    group_alive = staticmethod(group_alive)
    pidfd_signal = staticmethod(pidfd_signal)
    reap_if_ours = staticmethod(reap_if_ours)
    signal_cgroup = staticmethod(signal_cgroup)
    open_pidfd = staticmethod(open_pidfd)
