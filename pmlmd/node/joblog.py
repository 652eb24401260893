"""--joblog: one line per ended attempt, in GNU parallel's joblog format.

The file is tab-separated, with the header ``HEADER`` and then, for every attempt that
ended (a requeued attempt too), the columns GNU parallel writes, in its order and number
formats (its ``print_joblog``):

=============  ==================================================================
``Seq``        the task's number, from 1 (its index + 1)
``Host``       ``:`` (the local machine, as GNU parallel writes it)
``Starttime``  when the attempt started, seconds since the epoch, 3 decimals
``JobRuntime`` how long it ran, in seconds truncated to 3 decimals, right-aligned
               in 10 characters (``printf "%10.3f"``)
``Send``       0 (bytes transferred to a remote host: none)
``Receive``    0
``Exitval``    the exit status; -1 when pmlmd ended the attempt (timeout,
               cancel, halt, the governor) and the worker did not exit with a
               non-zero status of its own, or when pmlmd could not see it end
               (restarted meanwhile), as GNU parallel writes -1 for a job it
               killed; 126 or 127 when the command could not be started
``Signal``     the signal that ended the worker, else 0
``Command``    the command as it ran: the ``/bin/sh -c`` script with ``--shell``,
               else the words shell-quoted and joined by spaces, with ``{}``
               replaced (or the task line appended); a newline in it is written
               as a NUL byte, as GNU parallel does, so each attempt stays one line
=============  ==================================================================

The command's bytes are written as they are (a task line that is not UTF-8 stays so).
``pmlmctl run`` writes the file itself; for ``pmlmctl submit`` the daemon opens it as the
batch's owner at submit and writes it (see pmlmd.daemon.service).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex

from ..core import tasklines
from ..core.batch import CAUSE_CWD, CAUSE_EXIT, CAUSE_SPAWN_FAILED, Attempt, BatchSpec, Task

log = logging.getLogger("pmlmd.joblog")

HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
# Causes under which the exit status is the worker's own (or the failed exec's).
OWN_END = (CAUSE_EXIT, CAUSE_SPAWN_FAILED, CAUSE_CWD)


def command_line(spec: BatchSpec, line: str | None) -> str:
    """The task's command as one line of text (surrogate-escaped bytes, see tasklines)."""
    argv = tasklines.worker_argv(spec.command, spec.shell, line, spec.append)
    text = argv[2] if spec.shell else " ".join(shlex.quote(word) for word in argv)
    return text.replace("\n", "\0")


def exit_value(attempt: Attempt) -> int:
    if attempt.cause in OWN_END:
        return attempt.exit_code or 0
    # Ended by pmlmd, or unseen: GNU parallel's -1, unless the worker exited non-zero by itself.
    return attempt.exit_code or -1


def entry(spec: BatchSpec, task: Task, attempt: Attempt) -> bytes:
    """The joblog line of an ended attempt, newline included."""
    end = attempt.end if attempt.end is not None else attempt.start
    runtime = int(max(end - attempt.start, 0.0) * 1000) / 1000
    fields = [str(task.index + 1), ":", f"{attempt.start:.3f}", f"{runtime:10.3f}", "0", "0",
              str(exit_value(attempt)), str(attempt.signal or 0)]
    return ("\t".join(fields) + "\t").encode() + tasklines.raw(command_line(spec, task.line)) + b"\n"


class Joblog:
    """An open joblog: a descriptor that lines are appended to. Owns and closes the descriptor.

    A write that fails (a full disk, a file size limit) is logged once and the batch goes on
    without its joblog: the batch matters more than its log.
    """

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.failed = False

    def _write(self, data: bytes) -> None:
        if self.fd < 0 or self.failed:
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            self.failed = True
            if e.errno != errno.EAGAIN:
                log.warning("cannot write the joblog %s: %s; no more lines are written to it", self.path,
                            e.strerror)
            else:
                log.warning("the joblog %s takes no more data now; no more lines are written to it", self.path)

    def header(self) -> None:
        self._write(HEADER.encode())

    def attempt_ended(self, spec: BatchSpec, task: Task, attempt: Attempt) -> None:
        self._write(entry(spec, task, attempt))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
