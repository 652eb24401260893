"""Which processes belong to which worker when no cgroup per worker says it.

Signals go to a worker's process group, but a descendant can leave the group (setpgid) or
the session (setsid, the double fork of a daemon) and would then escape pause, continue
and termination. Two kernel facilities keep track of it at the cost of the workers' own
process trees, never of every process on the node:

- pmlmd (and ``pmlmctl run``) make themselves a *child subreaper* (PR_SET_CHILD_SUBREAPER,
  prctl(2)): a descendant whose parent exits is re-parented to pmlmd instead of init, so an
  escaped process is still pmlmd's to find, signal and reap;
- /proc/PID/task/TID/children (proc(5)) lists a process's children, so a worker's tree is
  walked from its leader without reading every /proc/PID/stat of the node.
- /proc/PID/task/TID/schedstat gives each thread's exact CPU time: a tree none of whose
  threads ran since it was walked has not changed (tree_runtimes), and is not walked again.

A process re-parented to pmlmd has lost its link to the worker's tree; it is attributed to
its worker by the identity pmlmd put in every worker's environment (PMLM_BATCH_ID,
PMLM_TASK_INDEX, PMLM_ATTEMPT), which a process inherits whatever group or session it moved
to. Every escaped process is held by a pidfd (procctl.open_pidfd), so a recycled pid is
never signalled.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Callable, Iterator

from .sampler import ProcReader

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def worker_id_of(environ: dict[bytes, bytes]) -> str | None:
    """The worker id ("BATCH.TASK.ATTEMPT") a process inherited from its worker, if any."""
    try:
        parts = [environ[k].decode("ascii") for k in (b"PMLM_BATCH_ID", b"PMLM_TASK_INDEX", b"PMLM_ATTEMPT")]
    except (KeyError, UnicodeDecodeError):
        return None
    return ".".join(parts)


def _walk(proc: ProcReader, pid: int) -> Iterator[int]:
    """``pid``, then its descendants, parents before their children. A process's children are
    read only when the caller asks for the next one after it: what the caller reads of a
    process when it gets it is read before its children list."""
    frontier = [pid]
    while frontier:
        nxt = []
        for parent in frontier:
            yield parent
            nxt += proc.children(parent)
        frontier = nxt


def descendants(proc: ProcReader, pid: int, limit: int = 100_000) -> list[int]:
    """Every descendant of ``pid`` (not ``pid`` itself), parents before their children.

    ``limit`` bounds the walk so that a fork bomb inside a worker cannot stall pmlmd.
    """
    return list(itertools.islice(_walk(proc, pid), 1, limit + 1))


def tree_runtimes(proc: ProcReader, pid: int, limit: int = 100_000,
                  runtimes: Callable[[int], dict[int, int] | None] | None = None) -> dict[int, dict[int, int] | None]:
    """``pid`` and every descendant (parents before their children), each with the CPU time each
    of its threads had used (``runtimes``, default ProcReader.runtimes) when its children were
    read: read before, so a child forked after the list was read has moved its parent's figure.
    Equal figures later mean that no thread of the tree has forked, exec'd, exited or touched a
    page since: the tree and what it uses are as they were."""
    read = runtimes or proc.runtimes
    return {member: read(member) for member in itertools.islice(_walk(proc, pid), limit)}
