"""Process control: spawn workers as process-group leaders, signal their groups, reap them.

Each worker leads its own process group, so pausing, continuing and terminating reach
every process a worker started (the children of a shell script too). The leader is
not reaped before pmlmd has seen its exit through its pidfd, so its pid (and with it
the group id) cannot be reused while pmlmd may still signal it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Mapping

from .sampler import ProcReader

# Python ignores SIGPIPE and SIGXFSZ for itself; workers get the default back.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass
class Child:
    pid: int  # also the process group id
    start_ticks: int  # with the pid, the worker's identity
    pidfd: int
    started: float  # monotonic seconds


@dataclass(frozen=True)
class Exit:
    exit_code: int | None  # set when the leader exited on its own
    signal: int | None  # set when a signal ended it
    cpu_seconds: float  # user + system of the leader and the children it waited for
    max_rss: int  # bytes, largest resident set of the leader or a waited-for child


def spawn(argv: list[str], env: Mapping[str, str], *, stdout_fd: int | None = None,
          proc: ProcReader | None = None) -> Child:
    """Start ``argv`` in a new process group with stdin from /dev/null.

    Raises OSError (FileNotFoundError, PermissionError) when the command cannot be
    executed; no child is left behind in that case.
    """
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    if stdout_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stdout_fd, 1))
    pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setpgroup=0,
                          setsigdef=_RESET_SIGNALS, setsigmask=())
    started = time.monotonic()
    pidfd = os.pidfd_open(pid)
    stat = (proc or ProcReader()).pid_stat(pid)
    # The child is ours and not reaped, so its stat is readable even if it already exited.
    return Child(pid=pid, start_ticks=stat.start_ticks if stat else 0, pidfd=pidfd, started=started)


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


def reap(child: Child) -> Exit | None:
    """Reap the child if it has exited (its pidfd is readable); None if it still runs.

    The caller closes ``child.pidfd`` once it has stopped watching it.
    """
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid == 0:
        return None
    return Exit(
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss=usage.ru_maxrss * 1024,
    )
