"""pmlmctl: the command-line client. ``pmlmctl run`` runs one batch in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import resource
import secrets
import shlex
import shutil
import stat
import sys
import time
from datetime import datetime
from typing import Callable

from .. import __version__

from ..node import cgroup, output

from ..core import events, protocol, replies, tasklines
from ..core.batch import CAUSE_CANCELLED, HALT_WHEN, BatchSpec, Blank, IntakeSpec
from ..core.bounds import BOUNDS, INTEGER, MAX_RLIMIT, MAX_TASKS, SIZE, size_text
from .connection import DEFAULT_SOCKET, Client, RemoteError, StreamEnded, Unreachable, socket_path
from ..core.options import LIMIT_OPTIONS, limits_from
from ..node.joblog import Joblog
from ..core.progress import StartFinishClock, eta_seconds
from ..core.units import format_size, parse_size

EXIT_STATUS_HELP = """\
exit status:
  0  every task succeeded
  1  some task failed (a timeout too), was given up or cancelled; or the batch halted (--halt)
  2  usage error (bad option, missing or unknown command, unreadable tasks file, a task line no
     worker could be given: one holding a NUL byte, or too long for exec; an ID that names no
     batch)
  3  critical finish: free memory fell below --min-free with no worker left to terminate
  128+N  the batch was cancelled by signal N (130 for Ctrl-C); workers were terminated first
"""


# What reads as a negative number (a size, a float, a number with a unit: -5M, -1e3, -5s, -inf)
# is a value, not an option: argparse takes only -5 and -.5 for values, and would call
# "--memory-gap -5M" a missing argument instead of saying what is wrong with the value, as
# "--cpu-limit -5" is told. (No option but -0 starts with a digit, and argparse finds "-0..."
# as that option, with what follows, before it asks this.)
_NEGATIVE = re.compile(r"^-\.?\d|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, the fix pointed to, exit 2: a script's log shows the whole reason
    in one line, and a person is told where the options are explained."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE

    def error(self, message):
        # Escaped: a message may quote what was read (a tasks file's name, a broker's reply).
        self.exit(2, f"{self.prog}: error: {_printable(message)} (see '{self.prog} --help')\n")


def _signed_size(text: str) -> int:
    """parse_size, and a negative size as the negative number it is (parse_size takes no sign),
    so that it is said to be out of range, as any other negative number is."""
    try:
        return parse_size(text)
    except ValueError:
        if text.startswith("-"):
            try:
                return -parse_size(text[1:])
            except ValueError:
                pass
        raise


def _ranged(name, what: str | None = None):
    """An argparse type for the option of that name, checked against its range in bounds.BOUNDS
    (the same the daemon and pmlmd.toml check), so a bad value is a usage error here, not later.
    ``what``: how the error names it (default: the option, --NAME)."""
    bound = BOUNDS[name]
    what = what or "--" + name.replace("_", "-")

    def parse(text):
        shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
        if not text.isascii():  # int(), float() and parse_size read any script's digits: '٣' as 3
            raise argparse.ArgumentTypeError(f"{what} takes a number in ASCII digits (0-9), not {shown}")
        try:
            if bound.kind == SIZE:
                value = _signed_size(text)
            else:
                value = (int if bound.kind == INTEGER else float)(text)
        except ValueError as e:
            # int() also refuses more than 4300 digits; that is "not a number" enough.
            raise argparse.ArgumentTypeError(str(e) if bound.kind == SIZE else f"{what} must be a number, "
                                             f"not {shown}")
        if not bound.admits(value):  # nan and inf too: float() reads them
            raise argparse.ArgumentTypeError(f"{what} must be between {bound.text(bound.low)} and "
                                             f"{bound.text(bound.high)}, not {shown}")
        return value
    return parse


def _batch_id(text):
    """A batch ID as pmlmd names batches: text. One that is not UTF-8 names no batch; refused here,
    so that the message names the command given (wait asks pmlmd through log and events)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8 (surrogate escapes)
        raise argparse.ArgumentTypeError(f"{tasklines.raw(text)!r} is not UTF-8 text, so it names no batch; "
                                         f"'pmlmctl list' shows the batch ids") from None
    return text


def _directory(text):
    if not text:
        raise argparse.ArgumentTypeError("--results needs a directory, not an empty string")
    return text


def _max_workers(text):
    if text == "auto":
        return None
    return _ranged("max_workers")(text)


def _halt(text):
    """--halt WHEN,fail=N or WHEN,fail=P% (WHEN: now or soon), or never: (when, count, percent)."""
    shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
    if text == "never":
        return None
    when, _, why = text.partition(",")
    if when not in HALT_WHEN or not why.startswith("fail="):
        raise argparse.ArgumentTypeError(f"--halt must be now,fail=N or soon,fail=N (N failed tasks, or N% of the "
                                         f"tasks), or never, not {shown}")
    value = why[len("fail="):]
    name = "halt_fail_pct" if value.endswith("%") else "halt_fail"
    bound = BOUNDS[name]
    try:
        number = None if not value.isascii() else float(value[:-1]) if name == "halt_fail_pct" else int(value)
    except ValueError:
        number = None
    if number is None or not bound.admits(number):
        unit = "a share of the tasks from 1% to 100%" if name == "halt_fail_pct" else \
            f"a count of failed tasks from {bound.low} to {bound.high}"
        raise argparse.ArgumentTypeError(f"--halt fail= takes {unit}, not {shown}")
    return (when, number, None) if name == "halt_fail" else (when, None, number)


def add_batch_options(p: argparse.ArgumentParser, for_daemon: bool = False) -> None:
    """The options that describe a batch, shared by run and submit.

    For submit, a limit left out is the daemon's (its pmlmd.toml); a batch can only
    make the node's limits stricter.
    """

    def default(value, shown=None):
        shown = value if shown is None else shown
        if for_daemon:
            return None, f" (default: the daemon's, normally {shown})"
        return value, f" (default {shown})"

    tasks = p.add_argument_group("tasks")
    source = tasks.add_mutually_exclusive_group()
    source.add_argument("-n", "--tasks", type=_ranged("tasks"), default=None, metavar="N",
                        help="run the command N times, one worker per task (default 1)")
    source.add_argument("--tasks-file", metavar="FILE",
                        help="one task per line ('-' for stdin): the bytes up to each newline, exactly as they "
                             "are (a carriage return is kept); a line reaches its worker as $PMLM_TASK and "
                             "replaces {} in the arguments; empty lines are skipped")
    source.add_argument("--amqp", metavar="URL",
                        help="take the tasks from a RabbitMQ queue instead (with --queue): each message body is "
                             "one task line; amqp://USER:PASSWORD@HOST:PORT/VHOST. The batch takes messages while "
                             "the node's limits admit workers, and runs until cancelled (or --until-empty)")
    queue = p.add_argument_group("queue (with --amqp; see 'Many nodes' in pmlmctl(1))")
    queue.add_argument("--queue", metavar="NAME", help="the queue to take tasks from (it must exist)")
    queue.add_argument("--until-empty", action="store_true",
                       help="end the batch once the queue is empty and no task of it is in flight")
    queue.add_argument("--dead-letter", metavar="EXCHANGE",
                       help="publish tasks that failed or were given up to EXCHANGE, with their cause in headers "
                            "(default: reject them without requeue, for the queue's own dead-letter exchange)")
    tasks.add_argument("-0", "--null", action="store_true",
                       help="tasks in --tasks-file end with a NUL byte instead of a newline (as find -print0 "
                            "writes them); a task may then hold newlines")
    # argparse takes an option that looks like a negative number ("-0") as a sign that negative
    # numbers are options too, and would then refuse "--priority -5": tell it they are not.
    p._has_negative_number_optionals.clear()
    tasks.add_argument("--shell", action="store_true",
                       help="run the command words as one /bin/sh -c script ({} is replaced shell-quoted)")
    value, shown = default(3)
    tasks.add_argument("--retries", type=_ranged("retries"), default=value, metavar="N",
                       help="requeue a task terminated by the governor up to N times" + shown)
    value, shown = default(0)
    tasks.add_argument("--retry-failed", type=_ranged("retry_failed"), default=value, metavar="N",
                       help="requeue a task that failed on its own (non-zero exit, or --timeout) up to N times"
                            + shown)
    tasks.add_argument("--no-append", dest="append", action="store_false",
                       help="with --tasks-file and no {} in the command, do not add the task line as the last "
                            "argument (it still reaches the worker as $PMLM_TASK)")
    tasks.add_argument("--timeout", type=_ranged("timeout"), default=None, metavar="SECONDS",
                       help="terminate an attempt that runs longer (SIGTERM, SIGKILL after --term-grace); it "
                            "counts as a failure of its task. Time paused by pmlmd does not count (default none)")
    tasks.add_argument("--halt", type=_halt, default=None, metavar="WHEN,fail=N[%]",
                       help="once N tasks (or N%% of them) have failed: soon = start no more tasks, let the "
                            "running ones finish; now = also terminate them (default never)")
    tasks.add_argument("--joblog", metavar="FILE",
                       help="write a line per ended attempt to FILE in GNU parallel's joblog format (TSV)"
                            + (", opened as you by pmlmd" if for_daemon else ""))

    limits = p.add_argument_group("limits")
    limits.add_argument("-j", "--max-workers", type=_max_workers, default=None, metavar="N|auto",
                        help="cap on concurrent workers; auto (default) lets the governor decide, up to 8 x CPUs")
    for option in LIMIT_OPTIONS:
        value, shown = default(option.default, option.text(option.default))
        kind = dict(choices=option.choices) if option.choices else dict(type=_ranged(option.name),
                                                                        metavar=option.metavar)
        limits.add_argument(option.flag, default=value, help=option.help + shown, **kind)
    value, shown = default(10.0, 10)
    limits.add_argument("--term-grace", type=_ranged("term_grace"), default=value,
                        metavar="SECONDS", help="SIGTERM, then SIGKILL after this grace" + shown)
    agent = p.add_argument_group("cooperative stop (for workers that block SIGTERM; see docs/agent-protocol.md)")
    agent.add_argument("--term-mode", choices=("signal", "agent"), default=None if for_daemon else "signal",
                       help="signal: SIGTERM, then SIGKILL; agent: ask the worker through the agent channel "
                            "first (default signal)")
    agent.add_argument("--pause-mode", choices=("signal", "agent"), default=None if for_daemon else "signal",
                       help="signal: SIGSTOP/SIGCONT; agent: ask the worker to stand still (default signal)")
    agent.add_argument("--agent-timeout", type=_ranged("agent_timeout"),
                       default=None if for_daemon else 5.0, metavar="SECONDS",
                       help="how long a request may go unacknowledged before signals take over (default 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pmlmctl", description="Run batches of workers within a node's CPU and free-memory limits.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    socket_help = f"pmlmd's control socket (default $PMLM_SOCKET, else {DEFAULT_SOCKET})"
    parser.add_argument("--socket", metavar="PATH", help=socket_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run", help="run one batch in the foreground and exit when it is finished",
        usage="pmlmctl run [options] -- COMMAND [ARG...]",
        description="Run COMMAND once per task, as many at once as the node's limits allow: pause workers "
                    "(SIGSTOP) when CPU or memory gets tight, continue them (SIGCONT) when it eases, terminate "
                    "them (SIGTERM, then SIGKILL) and requeue their tasks when free memory runs out.",
        epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_options(run)
    out = run.add_argument_group("output")
    out.add_argument("--report", metavar="FILE", help="write the execution report (JSON) to FILE")
    out.add_argument("--json", action="store_true",
                     help="print the execution report on stdout instead of the summary (workers' stdout then goes "
                          "to stderr)")
    out.add_argument("--trace", metavar="FILE", help="write every sample, decision and task end as JSON lines")
    out.add_argument("--tag", action="store_true",
                     help="start each line a task prints with its task line (its number with -n) and a tab")
    out.add_argument("--group", action="store_true",
                     help="print a task's whole output when it ends, not line by line as it comes")
    out.add_argument("--results", metavar="DIR", type=_directory,
                     help="also write each task's stdout, stderr and exit status to DIR/TASK/stdout, stderr, exit")
    out.add_argument("--task-id", metavar="ID", help="an id of your own, echoed as task_id in the report")
    out.add_argument("-v", "--verbose", action="count", default=0, help="log pauses, continues and terminations on stderr (-vv: admissions too, and more)")
    run.add_argument("--worker-backend", choices=cgroup.BACKENDS, default="auto",
                     help="how workers are contained and measured: cgroup (each in a cgroup v2 of its own: "
                          "frozen, killed and counted whole by the kernel), proc (process groups and trees from "
                          "/proc), auto (cgroup where pmlmctl may make one; default)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run, subparser=run)

    daemon = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the command it wins, left out it does not undo one given before.
    daemon.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=socket_help)
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--json", action="store_true", help="print JSON instead of text")
    json_always = argparse.ArgumentParser(add_help=False)
    json_always.add_argument("--json", action="store_true", help="accepted: the report is JSON in any case")

    submit = commands.add_parser(
        "submit", parents=[daemon], help="hand a batch to the pmlmd daemon",
        usage="pmlmctl submit [options] -- COMMAND [ARG...]",
        description="Submit a batch to pmlmd, which runs it as you, in your current directory and environment, "
                    "within the node's limits. Prints the batch id; with --wait, waits and exits like 'run'.",
        epilog=EXIT_STATUS_HELP + "  4  pmlmd is not running or cannot be reached\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_options(submit, for_daemon=True)
    batch = submit.add_argument_group("batch")
    batch.add_argument("--name", help="a name to recognise the batch by")
    batch.add_argument("--priority", type=_ranged("priority"), default=0,
                       help="higher runs first and pays last when the node is short (default 0)")
    batch.add_argument("--user", help="run the workers as this user, a name or a uid (root only; a member may "
                                      "name themselves)")
    batch.add_argument("--wait", action="store_true", help="wait for the batch to finish; show progress")
    batch.add_argument("--json", action="store_true", help="with --wait: print the report as JSON")
    batch.add_argument("--results", metavar="DIR", type=_directory,
                       help="pmlmd writes each task's stdout, stderr and exit status to DIR/TASK/stdout, stderr and "
                            "exit, as you (the last output_limit bytes of each, see pmlmd.toml(5))")
    submit.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    submit.set_defaults(handler=cmd_submit, subparser=submit)

    retry = commands.add_parser(
        "retry", parents=[daemon], help="submit the tasks of a finished batch that did not succeed, again",
        usage="pmlmctl retry [options] ID",
        description="Submit a new batch made of the tasks of batch ID that did not succeed (failed, given up or "
                    "cancelled; with --failed only failed and given up), with its command, options, environment, "
                    "directory and owner. The tasks are numbered from 0 in the new batch ($PMLM_TASK_INDEX); "
                    "a task's line is kept. Prints the new batch id; with --wait, waits and exits like 'run'.",
        epilog=EXIT_STATUS_HELP + "  4  pmlmd is not running or cannot be reached\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    retry.add_argument("batch", metavar="ID", type=_batch_id)
    retry.add_argument("--failed", action="store_true",
                       help="only tasks that failed or were given up, not cancelled ones")
    retry.add_argument("--joblog", metavar="FILE",
                       help="write the new batch's joblog to FILE (the original batch's is not carried over)")
    retry.add_argument("--wait", action="store_true", help="wait for the batch to finish; show progress")
    retry.add_argument("--json", action="store_true", help="with --wait: print the report as JSON")
    retry.set_defaults(handler=cmd_retry, subparser=retry)

    for name, handler, helptext, parents, needs_id in (
            ("status", cmd_status, "the node and its batches, or one batch", [daemon, reading], "optional"),
            ("list", cmd_list, "every batch pmlmd knows", [daemon, reading], None),
            ("cancel", cmd_control, "cancel a batch: terminate its workers, drop its queue", [daemon, reading],
             "required"),
            ("pause", cmd_control, "pause every worker of a batch and start no more", [daemon, reading], "required"),
            ("resume", cmd_control, "resume a paused batch", [daemon, reading], "required"),
            ("report", cmd_report, "a batch's execution report (JSON)", [daemon, json_always], "required"),
            ("events", cmd_events, "decisions and task ends, as they happen with --follow", [daemon, reading],
             "optional")):
        sub = commands.add_parser(name, parents=parents, help=helptext, description=helptext[0].upper() +
                                  helptext[1:] + ".")
        if needs_id == "required":
            sub.add_argument("batch", metavar="ID", type=_batch_id)
        elif needs_id == "optional":
            sub.add_argument("batch", metavar="ID", nargs="?", type=_batch_id)
        if name == "events":
            sub.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
            sub.add_argument("--kind", action="append", choices=events.STREAMED, metavar="KIND",
                             help="only events of this kind (again for more): " + ", ".join(events.STREAMED))
        sub.set_defaults(handler=handler, subparser=sub)

    log_cmd = commands.add_parser(
        "log", parents=[daemon], help="what a batch's tasks wrote (only its owner and root may read it)",
        description="Print what the tasks of batch ID wrote to stdout (or stderr), task after task in task order; "
                    "pmlmd keeps the last output_limit bytes of each (pmlmd.toml(5)).")
    log_cmd.add_argument("batch", metavar="ID", type=_batch_id)
    log_cmd.add_argument("task", metavar="TASK", nargs="?", type=_ranged("task_index", "TASK"),
                         help="only this task (numbered from 0, as $PMLM_TASK_INDEX)")
    log_cmd.add_argument("--stderr", action="store_true", help="print what the tasks wrote to stderr instead")
    log_cmd.add_argument("-f", "--follow", action="store_true",
                         help="keep printing as the tasks write, until the batch (or TASK) has finished")
    log_cmd.add_argument("--tag", action="store_true", help="start each line with its task's number and a tab")
    log_cmd.set_defaults(handler=cmd_log, subparser=log_cmd)

    wait = commands.add_parser(
        "wait", parents=[daemon], help="wait for a batch: progress and its output, then the summary",
        description="Wait for batch ID to finish: show its progress, print its tasks' output (stdout to stdout, "
                    "stderr to stderr) in task order, each task's as it is written, then the summary; exit like "
                    "'run'.",
        epilog=EXIT_STATUS_HELP + "  4  pmlmd is not running or cannot be reached\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    wait.add_argument("batch", metavar="ID", type=_batch_id)
    wait.add_argument("--json", action="store_true", help="print the report as JSON (the tasks' stdout goes to stderr)")
    wait.set_defaults(handler=cmd_wait, subparser=wait)

    enqueue = commands.add_parser(
        "enqueue", help="put task lines on a RabbitMQ queue, one message per line, for pmlmd nodes to take",
        usage="pmlmctl enqueue --amqp URL --queue NAME [-0] --tasks-file FILE",
        description="Publish each line of FILE ('-' for stdin) as one persistent message to queue NAME through "
                    "the broker's default exchange, each confirmed by the broker; the queue is declared durable "
                    "if it does not exist (one that exists is used as it is). Lines are split as for run "
                    "--tasks-file, empty ones skipped; each must be UTF-8 text.",
        epilog="exit status:\n  0  every task was enqueued (or there was none)\n  1  the broker did not take a "
               "task or refused the queue; the message says how many were enqueued\n  2  usage error (bad "
               "option or URL, unreadable tasks file, a line that is not UTF-8 or holds a NUL)\n  4  the broker "
               "cannot be reached, refused the login or the vhost, or the connection was lost\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    enqueue.add_argument("--amqp", metavar="URL", required=True,
                         help="the broker: amqp://USER:PASSWORD@HOST:PORT/VHOST (the default vhost / is %%2F)")
    enqueue.add_argument("--queue", metavar="NAME", required=True, help="the queue to put the tasks on")
    enqueue.add_argument("--tasks-file", metavar="FILE", required=True, help="one task per line ('-' for stdin)")
    enqueue.add_argument("-0", "--null", action="store_true",
                         help="tasks end with a NUL byte instead of a newline (as find -print0 writes them)")
    enqueue.set_defaults(handler=cmd_enqueue, subparser=enqueue)
    return parser


TASKS_CHUNK = 1 << 20  # bytes of a tasks file read at a time: it is split as it comes, never held whole
# The most of a tasks file each command reads (bytes, what takes no more, the fix). run holds
# every task line (and its report lists each), and input that never ends (/dev/zero, yes '')
# must end in a usage error, not in all of the memory: a thousand bytes for each of the most
# tasks a batch may have is beyond any real tasks file. submit sends its lines in one request,
# which pmlmd refuses beyond the protocol's MAX_MESSAGE_BYTES.
RUN_TASKS_LIMIT = (1 << 30, "pmlmctl run reads", "split it into several batches")
SUBMIT_TASKS_LIMIT = (protocol.MAX_MESSAGE_BYTES, "one submit request carries (its command and environment included)",
                      "split it into several batches, or run it with pmlmctl run")
# A separator run and the line after it (empty at the end of the data): one match per line, so
# a run of empty lines costs one match, not one Python step each.
_LINES = {False: re.compile(b"\n*([^\n]*)"), True: re.compile(b"\0*([^\0]*)")}


def _read_tasks(parser, args, command: list[str], env: dict[str, str],
                limit: tuple[int, str, str]) -> list[str] | None:
    """The tasks of --tasks-file as pmlmd carries them (see tasklines), or None without one.

    The file is read as bytes and split on newlines (on NULs with --null) and nothing else, so
    each task is exactly the bytes between (tasklines.split, a chunk at a time). Each is checked
    now against what a worker's exec takes with this command and environment, so that a line
    that could never be executed is a usage error naming it instead of a failing task. What is
    read is bounded: at most MAX_TASKS tasks, a line no longer than exec takes (however long it
    goes on), and at most ``limit`` bytes in all (RUN_TASKS_LIMIT, SUBMIT_TASKS_LIMIT).
    """
    path = args.tasks_file
    if path is None:
        if args.null:
            parser.error("--null says how --tasks-file is split: give --tasks-file FILE (or - for stdin) too")
        return None
    source = "standard input" if path == "-" else repr(path)
    unit = "item" if args.null else "line"
    fit = tasklines.Fit(command, args.shell, env, append=args.append)
    tasks: list[str] = []

    def take(number: int, line: bytes, whole: bool = True) -> None:
        if b"\0" in line:  # only without --null
            parser.error(f"line {number} of {source} contains a NUL byte, which no argument or environment "
                         f"variable can hold; use --null to split on NUL")
        task = tasklines.text(line)
        problem = fit.problem(task)
        if problem:
            size = f"{len(line)} bytes" if whole else f"{len(line)} bytes or more"
            parser.error(f"{unit} {number} of {source} is too long ({size}): {problem}")
        if len(tasks) == MAX_TASKS:
            parser.error(f"tasks file {path!r} holds more than the {MAX_TASKS} tasks a batch may have: split it into "
                         f"several batches")
        tasks.append(task)

    max_bytes, takes, fix = limit
    try:
        if path == "-":
            if sys.stdin is None:  # started with its standard input closed
                parser.error("cannot read tasks file '-': standard input is closed")
            opened = contextlib.nullcontext(sys.stdin.buffer)
        else:
            opened = open(path, "rb")
        with opened as stream:
            lines, total, rest = 0, 0, b""  # lines ended so far, bytes read, the line not ended yet
            while chunk := stream.read(TASKS_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    parser.error(f"tasks file {path!r} holds more than {max_bytes} bytes ({size_text(max_bytes)}), "
                                 f"more than {takes}: {fix}")
                data = rest + chunk if rest else chunk
                rest = b""
                for match in _LINES[args.null].finditer(data):
                    lines += match.start(1) - match.start(0)  # the separators before this line
                    line = match.group(1)
                    if not line:
                        continue  # an empty line, or the end of the data
                    if match.end(1) == len(data):
                        rest = line  # not ended yet: the next chunk goes on with it
                    else:
                        take(lines + 1, line)
                if len(rest) > tasklines.MAX_LINE_BYTES:  # no exec takes it, whatever comes after
                    take(lines + 1, rest, whole=False)
            if rest:
                take(lines + 1, rest)
    except OSError as e:
        parser.error(f"cannot read tasks file {path!r}: {e.strerror or e}")
    except MemoryError:
        count = len(tasks)
        tasks.clear()
        parser.error(f"not enough memory to hold the tasks of {source} ({count} read): split it into several "
                     f"batches, or raise ulimit -v")
    if not tasks:
        each = "NUL-terminated item" if args.null else unit
        parser.error(f"tasks file {path!r} holds no tasks (one task per {each})")
    return tasks


def _check_command(parser, argv: list[str], shell: bool) -> None:
    if not argv:
        parser.error("missing command: give it after --, e.g. pmlmctl run -n 4 -- sleep 1")
    if shell or "{}" in argv[0]:
        return
    if "/" in argv[0]:
        if not os.access(argv[0], os.X_OK):
            parser.error(f"cannot execute {argv[0]!r}: no such executable file")
    elif shutil.which(argv[0]) is None:
        parser.error(f"command not found: {argv[0]!r} is not in PATH ({os.environ.get('PATH', '')})")


def _command(parser, args) -> list[str]:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    _check_command(parser, argv, args.shell)
    # As pmlmd carries them (see tasklines): sys.argv holds them decoded with the locale's encoding.
    return [tasklines.text(os.fsencode(word)) for word in argv]


def intake_from_args(parser, args) -> IntakeSpec | None:
    """--amqp and its queue options, checked; None without --amqp (parser.error for misuse)."""
    given = [name for name, value in (("--queue", args.queue), ("--until-empty", args.until_empty),
                                      ("--dead-letter", args.dead_letter)) if value]
    if args.amqp is None:
        if given:
            parser.error(f"{given[0]} needs --amqp URL (the broker to take tasks from)")
        return None
    if not args.queue:
        parser.error("--amqp needs --queue NAME: the queue to take tasks from")
    from ..broker.intake import URLError, check_name, check_url  # pika: only for --amqp

    try:
        check_url(args.amqp)
        check_name(args.queue, "queue")
        if args.dead_letter is not None:
            check_name(args.dead_letter, "dead-letter exchange")
    except URLError as e:
        parser.error(f"--amqp: {e}")
    return IntakeSpec(url=args.amqp, queue=args.queue, until_empty=args.until_empty, dead_letter=args.dead_letter)


def spec_from_args(parser, args) -> BatchSpec:
    argv = _command(parser, args)
    intake = intake_from_args(parser, args)
    tasks: list[str | None] | Blank = [] if intake else \
        _read_tasks(parser, args, argv, tasklines.environment(), RUN_TASKS_LIMIT) or Blank(args.tasks or 1)
    cpus = os.cpu_count() or 1
    limits = limits_from(args, args.max_workers or 8 * cpus)
    halt, halt_fail, halt_fail_pct = args.halt or (None, None, None)
    return BatchSpec(batch_id=secrets.token_hex(6), command=argv, tasks=tasks, limits=limits, shell=args.shell,
                     term_grace=args.term_grace, retries=args.retries, retry_failed=args.retry_failed,
                     task_id=args.task_id, term_mode=args.term_mode, pause_mode=args.pause_mode,
                     agent_timeout=args.agent_timeout, timeout=args.timeout, halt=halt, halt_fail=halt_fail,
                     halt_fail_pct=halt_fail_pct, append=args.append, intake=intake)


STATUS_CLEAR = "\r\033[K"  # to the line's start, erase to its end


def fit_status(parts: list[tuple[str, int]], columns: int, separator: str = " · ") -> str:
    """The status parts, in their order, joined into at most ``columns - 1`` characters.

    Each part comes with its rank (0 the most important); while the line is too wide, the part
    of the highest rank is left out, whole. Only when the most important part alone does not fit
    is it cut. One column stays free so the cursor never wraps to a new row, where ``\\r\\033[K``
    could no longer reach what was drawn.
    """
    room = max(columns - 1, 0)
    kept = list(parts)
    while len(kept) > 1 and len(separator.join(text for text, _ in kept)) > room:
        kept.remove(max(kept, key=lambda part: part[1]))
    return separator.join(text for text, _ in kept)[:room]


def _fd(stream) -> int | None:
    if isinstance(stream, int):
        return stream
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class StatusLine:
    """A one-line live status on a terminal, redrawn at most five times a second.

    The line is never wider than the terminal: each draw reads the width of the stream's terminal
    (so a resized window counts from the next draw) and leaves out the least important parts until
    the line fits in the width less one column (fit_status). So ``\\r\\033[K`` always erases all
    of it. Other output meant for the same terminal goes through print_above, which erases the
    line, writes, and draws it again; then the two are never mixed on one row. One thread only:
    draw and print_above are called from pmlmctl's event loop.
    """

    def __init__(self, stream, columns: Callable[[], int] | None = None):
        """``columns`` returns the terminal's width (tests give a fixed one); by default it is read
        from the stream's terminal on every draw."""
        self.stream = stream
        self.columns = columns or self._terminal_columns
        self.last = 0.0
        self.parts: list[tuple[str, int]] | None = None  # the last status drawn
        self.shown = False  # the status is on the screen now
        try:  # the middle dot where the stream can carry it
            " · ".encode(getattr(stream, "encoding", None) or "ascii")
            self.separator = " · "
        except (LookupError, UnicodeError):
            self.separator = " | "

    def _terminal_columns(self) -> int:
        """The width of the stream's own terminal (not stdout's, as shutil.get_terminal_size would
        ask); for one that does not know its size (a fresh pty says 0), $COLUMNS, else 80."""
        fd = _fd(self.stream)
        try:
            columns = os.get_terminal_size(fd).columns if fd is not None else 0
        except OSError:
            columns = 0
        if columns <= 0:
            try:
                columns = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                columns = 0
        return columns if columns > 0 else 80

    def __call__(self, runner) -> None:  # runner.Runner
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        self.draw(runner.progress())

    def draw(self, p: dict) -> None:
        # (text, rank): shown in this order; when the terminal is too narrow the highest ranks go first.
        parts = [(f"{p['done']}/{p['total']} done", 0), (f"{p['running']} running", 2),
                 (f"{p['paused']} paused", 6), (f"{p['queued']} queued", 5)]
        if p["cpu_pct"] is not None:
            parts.append((f"cpu {p['cpu_pct']:.0f}%", 3))
        if p["free_pct"] is not None:
            parts.append((f"free {p['free_pct']:.0f}%", 4))
        if p["eta_s"] is not None:
            eta = math.ceil(p["eta_s"])  # never 0:00:00 while a fraction is left
            parts.append((f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", 1))
        self.parts = parts
        self._render()

    def _render(self) -> None:
        self.stream.write(STATUS_CLEAR + fit_status(self.parts or [], self.columns(), self.separator))
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the line; print_above draws it no more until the next draw."""
        self.stream.write(STATUS_CLEAR)
        self.stream.flush()
        self.shown = False

    def print_above(self, target, data: bytes) -> None:
        """Write ``data`` (complete lines) to ``target`` (a stream such as sys.stdout or sys.stderr,
        or a file descriptor) so it shows above the status line.

        When the status is on the screen and ``target`` is the status line's terminal: erase the
        line, write the data, draw the status again. Data that does not end in a newline gets one
        there, so the redrawn status cannot erase it. A ``target`` on anything else (a file, a pipe,
        another terminal) gets the data unchanged, and the status line stays as it is.
        """
        if not data:
            return
        over = self.shown and self._same_terminal(target)
        if over:
            self.stream.write(STATUS_CLEAR)
            self.stream.flush()
            if not data.endswith(b"\n"):
                data += b"\n"
        _write_bytes(target, data)
        if over:
            self._render()

    def _same_terminal(self, target) -> bool:
        if target is self.stream:
            return True
        mine, theirs = _fd(self.stream), _fd(target)
        if mine is None or theirs is None:
            return False
        try:
            if not os.isatty(theirs):
                return False
            a, b = os.fstat(mine), os.fstat(theirs)
        except OSError:
            return False
        # One terminal device, whichever path or descriptor reaches it.
        return stat.S_ISCHR(a.st_mode) and stat.S_ISCHR(b.st_mode) and a.st_rdev == b.st_rdev


def _write_bytes(target, data: bytes) -> None:
    """All of ``data`` to a text stream (through its buffer, after what its text layer holds), a
    binary stream or a file descriptor."""
    if isinstance(target, int):
        output.write_all(target, data)
        return
    buffer = getattr(target, "buffer", None)
    if buffer is not None:
        target.flush()
        target = buffer
    target.write(data)
    target.flush()


def cmd_run(parser, args) -> int:
    spec = spec_from_args(parser, args)
    if args.verbose:
        logging.basicConfig(stream=sys.stderr, format="pmlmctl: %(message)s",
                            level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    # Open output files before any work starts, so a bad path costs nothing.
    try:
        report_file = open(args.report, "w", encoding="utf-8") if args.report else None
        trace_file = open(args.trace, "w", encoding="utf-8") if args.trace else None
        joblog = None
        if args.joblog:
            joblog = Joblog(os.open(args.joblog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666),
                            args.joblog)
            joblog.header()
    except OSError as e:
        parser.error(f"cannot write {e.filename!r}: {e.strerror}")
    status = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    sinks_for = None
    if args.results:
        try:
            os.makedirs(args.results, exist_ok=True)
        except OSError as e:
            parser.error(f"cannot make the results directory {args.results!r}: {e.strerror}")
    if status or args.tag or args.group or args.results:
        # Through pmlmctl: whole lines, above the status line, tagged, grouped, or into DIR as well.
        emit = _emit_to(status, stdout_to_stderr=args.json)

        def sinks_for(run, task, attempt_no):
            tag = (tasklines.raw(task.line) if task.line is not None else str(task.index).encode()) if args.tag else None
            sinks = [output.Terminal(emit, tag=tag, group=args.group)]
            if args.results:
                sinks.append(output.Results(args.results, task.index))
            return sinks
    # Here, not at the top: the engine, the sampler and the process control are for run only;
    # the commands that talk to the daemon load the protocol and the client.
    from .runner import Runner

    try:
        runner = Runner(spec, stdout_fd=2 if args.json else None, trace=trace_file, on_progress=status,
                        sinks_for=sinks_for, joblog=joblog, worker_backend=args.worker_backend)
    except cgroup.Unusable as e:
        parser.error(f"--worker-backend cgroup: {e}; use --worker-backend proc or auto")
    stopped = None
    try:
        batch = runner.run()
    except Exception as e:  # the runner has ended every worker it started (Runner.run's finally)
        logging.getLogger("pmlmd.runner").debug("pmlmctl run could not go on", exc_info=True)
        stopped = (f"pmlmctl run could not go on ({type(e).__name__}: {e}); every worker it started was "
                   "ended; run with -vv for the details")
        batch = runner.batch
        batch.cancel_reason = batch.cancel_reason or stopped
        batch.cancel_queued()
        batch.finished = time.time()
        for task in batch.tasks.made:  # the attempts the fault left open end as cancelled (only taken tasks have any)
            if task.attempts and task.attempts[-1].end is None:
                task.attempts[-1].reason = stopped
                batch.end_attempt(task, task.attempts[-1], batch.finished, CAUSE_CANCELLED)
                if joblog is not None:
                    joblog.attempt_ended(spec, task, task.attempts[-1])
    if status:
        status.clear()
    report = batch.report()
    if report_file:
        json.dump(report, report_file, indent=2)
        report_file.write("\n")
        report_file.close()
    if trace_file:
        trace_file.close()
    if joblog is not None:
        joblog.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_printable(batch.summary_line()))
        print(f"lowest free memory {format_size(batch.lowest_free or 0)} "
              f"({report['lowest_free_memory_pct']}%), highest cpu "
              + ("n/a (no sample)" if report["highest_cpu_pct"] is None else f"{report['highest_cpu_pct']}%"))
    if report["error_message"]:
        print(_printable(f"pmlmctl: {report['error_message']}"), file=sys.stderr)
    if stopped is not None:
        print(_printable(f"pmlmctl: {stopped}"), file=sys.stderr)
        return 1
    if runner.interrupted_by is not None:
        return 128 + runner.interrupted_by
    return batch.exit_status()


# --- talking to the daemon ------------------------------------------------------------------
EXIT_UNREACHABLE = 4
# The request was wrong: exit 2, as for a bad option. Others (permission-denied, quota-exceeded, ...) exit 1.
# A batch id that names no batch is a usage error too: a typo must not read as "a task failed" (1).
USAGE_CODES = ("bad-field", "unknown-field", "missing-field", "no-such-batch")


def own_umask() -> int:
    """This process's file mode creation mask, left as it was (pmlmctl runs no other thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def own_rlimits() -> dict[str, list]:
    """This process's resource limits as submit carries them (see protocol.RLIMITS)."""
    carried = {}
    for name, resource_id in protocol.RLIMITS.items():
        carried[name] = [protocol.UNLIMITED if value == resource.RLIM_INFINITY else min(value, MAX_RLIMIT)
                         for value in resource.getrlimit(resource_id)]
    return carried


def _say_lowered(lowered: dict) -> None:
    """One line on stderr when the workers get lower limits than this shell has (see pmlmd(8))."""
    if lowered:
        shown = ", ".join(f"{name} {soft}:{hard}" for name, (soft, hard) in sorted(lowered.items()))
        print(f"pmlmctl: the workers get lower limits than this shell (soft:hard): {shown}; pmlmd lowers "
              "them to the owner's login limits (limits.conf) and to its own", file=sys.stderr)


def _cwd(parser, needed_for: str, fix: str = "cd to an existing directory and try again") -> bytes:
    """pmlmctl's current directory; a usage error when it is gone (removed while a shell stood in
    it: getcwd fails), saying what it was ``needed_for`` and the ``fix``."""
    try:
        return os.getcwdb()
    except OSError as e:
        gone = "no longer exists (it was removed)" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
        parser.error(f"the current directory {gone}, and {needed_for}: {fix}")


def _absolute(parser, path: str | None, option: str) -> str | None:
    """A path given to pmlmctl as the daemon gets it: absolute (from pmlmctl's directory), bytes as text."""
    if path is None:
        return None
    path = os.fsencode(path)
    if not os.path.isabs(path):
        path = os.path.join(_cwd(parser, f"{option} {os.fsdecode(path)!r} is relative to it",
                                 f"cd to an existing directory, or give {option} an absolute path"), path)
    return tasklines.text(os.path.normpath(path))


def cmd_submit(parser, args) -> int:
    argv = _command(parser, args)
    halt, halt_fail, halt_fail_pct = args.halt or (None, None, None)
    request = dict(command=argv, shell=args.shell, name=args.name, priority=args.priority, user=args.user,
                   cwd=tasklines.text(_cwd(parser, "pmlmd runs the workers there")), env=tasklines.environment(),
                   max_workers=args.max_workers, **{o.name: getattr(args, o.name) for o in LIMIT_OPTIONS},
                   term_grace=args.term_grace, retries=args.retries,
                   retry_failed=args.retry_failed, term_mode=args.term_mode, pause_mode=args.pause_mode,
                   agent_timeout=args.agent_timeout, timeout=args.timeout, halt=halt, halt_fail=halt_fail,
                   halt_fail_pct=halt_fail_pct, append=args.append, joblog=_absolute(parser, args.joblog, "--joblog"),
                   results=_absolute(parser, args.results, "--results"))
    # The workers start with this shell's umask and limits, as those of 'run' do.
    request.update(umask=own_umask(), rlimits=own_rlimits())
    intake = intake_from_args(parser, args)
    if intake is not None:
        request.update(amqp=intake.url, queue=intake.queue, until_empty=intake.until_empty,
                       dead_letter=intake.dead_letter)
    elif args.tasks_file:
        request["task_lines"] = _read_tasks(parser, args, argv, request["env"], SUBMIT_TASKS_LIMIT)
    else:
        request["tasks"] = args.tasks or 1
    with Client(socket_path(args.socket)) as client:
        result = replies.Started.from_json(client.call("submit", **request))
        batch_id = result.batch
        _say_lowered(result.rlimits_lowered)
        if not args.wait:
            print(batch_id)
            return 0
        print(f"batch {batch_id} submitted", file=sys.stderr)
        return _wait(client, batch_id, args.json)


def cmd_retry(parser, args) -> int:
    joblog = _absolute(parser, args.joblog, "--joblog")  # a usage error before pmlmd is asked anything
    with Client(socket_path(args.socket)) as client:
        result = replies.Started.from_json(client.call("retry", batch=args.batch, failed_only=args.failed,
                                                       joblog=joblog))
        batch_id = result.batch
        retried = result.retried or []
        shown = ", ".join(str(i) for i in retried[:10]) + (f" and {len(retried) - 10} more" if len(retried) > 10
                                                           else "")
        plural = "" if len(retried) == 1 else "s"
        print(_printable(f"batch {batch_id} retries {len(retried)} task{plural} of batch {args.batch} (its "
                         f"task{plural} {shown}, numbered from 0 in batch {batch_id})"), file=sys.stderr)
        _say_lowered(result.rlimits_lowered)
        if not args.wait:
            print(batch_id)
            return 0
        return _wait(client, batch_id, args.json)


WAIT_ROUND = 0.1  # seconds at least between two reads of the output: task ends in between are read at once
WAIT_OUTPUT = 0.25  # seconds between reads while no task ends: a running task's output, as it is written
WAIT_CHECK = 2.0  # seconds without an event before pmlmctl asks whether pmlmd restarted (its stream is then gone)


def _wait(client: Client, batch_id: str, as_json: bool) -> int:
    """Progress and the tasks' output as they finish (in task order), then the summary; exits like run.

    pmlmd pushes each task's end (an ``events`` stream of the batch's end and finished events):
    the output of a task that ended is read at once (at most every WAIT_ROUND), a running task's
    every WAIT_OUTPUT, and the wait ends with the batch. A restarted pmlmd has no stream for this
    client: after WAIT_CHECK without an event pmlmctl asks for pmlmd's pid and start, and
    follows the batch anew on a new one.

    The status reply has counts, not task times: the ETA's task times are inferred from how the
    counts move between draws (progress.StartFinishClock), not asked of the daemon."""
    status_line = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    clock = StartFinishClock()
    # Line by line only where a status line is drawn: elsewhere the bytes go out as they are.
    printer = TaskPrinter(_emit_to(status_line, stdout_to_stderr=as_json), lines=status_line is not None)
    following = [LogReader(client, batch_id, stream, None, True, printer) for stream in output.STREAMS]
    try:
        stream = _Following(client, batch=batch_id, kinds=["end", "finished"])
        ended, quiet_since = False, time.monotonic()
        while True:
            following = [reader for reader in following if reader.poll()]
            if ended:
                while following:  # what the last tasks wrote
                    following = [reader for reader in following if reader.poll()]
                printer.flush()
                break
            if status_line:
                _draw(status_line, clock, client.read("status", batch=batch_id))
            round_at = time.monotonic()
            try:
                event = stream.take(WAIT_OUTPUT)
                if event is None:
                    if time.monotonic() - quiet_since >= WAIT_CHECK:
                        quiet_since = time.monotonic()
                        if not stream.renewed() and client.read("status", batch=batch_id).get("ended") is not None:
                            ended = True  # its end did not come through the stream (a reader pmlmd let go)
                    continue
                # A task ended: take every end that comes until the round is due, for one read.
                quiet_since = time.monotonic()
                time.sleep(max(0.0, round_at + WAIT_ROUND - time.monotonic()))
                while event is not None:
                    event = stream.take(0)
            except StreamEnded:
                ended = True
    except KeyboardInterrupt:
        if status_line:
            status_line.clear()
        print(f"stopped waiting; batch {batch_id} goes on (pmlmctl status {batch_id})", file=sys.stderr)
        return 130
    if status_line:
        status_line.clear()
    report = client.read("report", batch=batch_id)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(_printable(report["execution_message"]))
    if report["error_message"]:
        print(_printable(f"pmlmctl: {report['error_message']}"), file=sys.stderr)
    return report["exit_status"]


class _Following:
    """An ``events`` stream with ``follow`` (Client.open_stream) that goes on when pmlmd restarts:
    a restarted pmlmd knows nothing of the streams the one before had open, so after a quiet
    spell the follower asks ``renewed``, which follows anew on a new pmlmd (whose events start
    with it: none comes twice)."""

    def __init__(self, client: Client, **args):
        self.client, self.args = client, args
        # Which pmlmd first: one that stops after it was asked for the stream would leave the
        # stream unanswered, and the next one would be taken for the one that has it.
        self.daemon = self._instance()
        self.id = client.open_stream("events", follow=True, **args)

    def _instance(self) -> tuple[int, float]:
        """Which pmlmd answers: its pid and when it started, in seconds on this host's monotonic
        clock (two readings of one pmlmd differ by about a request's time)."""
        ping = replies.Pong.from_json(self.client.read("ping"))
        return ping.pid, time.monotonic() - ping.uptime_s

    def take(self, timeout: float) -> dict | None:
        """Client.take of the stream: an event, None after ``timeout`` seconds, StreamEnded."""
        return self.client.take(self.id, timeout)

    def renewed(self) -> bool:
        """Whether another pmlmd answers now than the one followed; if so the stream is opened on it."""
        now = self._instance()
        if now[0] == self.daemon[0] and abs(now[1] - self.daemon[1]) <= 1.0:
            return False
        self.client.close_stream(self.id)
        self.daemon, self.id = now, self.client.open_stream("events", follow=True, **self.args)
        return True


def _draw(status_line, clock: StartFinishClock, status: dict) -> None:
    now = time.monotonic()
    node = status.get("node") or {}
    counts, total = status["counts"], status["tasks"]
    done = total - counts["running"] - counts["paused"] - counts["queued"]
    clock.observe(now, done, total - counts["queued"])
    eta = eta_seconds(clock.durations, total - done, counts["running"], clock.youngest_age(now))
    status_line.draw({**counts, "done": done, "total": total, "cpu_pct": node.get("cpu_pct"),
                      "free_pct": node.get("free_pct"), "eta_s": eta})


class LogReader:
    """Follows one stream of a batch's task output through ``log`` requests (see the daemon's _do_log).

    ``poll()`` fetches what there is now and hands it to ``printer(task, stream, data)``;
    it returns False once nothing more will come.
    """

    def __init__(self, client: Client, batch_id: str, stream: str, task: int | None, live: bool, printer,
                 note=None):
        self.client, self.batch_id, self.stream, self.task, self.live = client, batch_id, stream, task, live
        self.printer = printer
        self.note = note or (lambda text: print(f"pmlmctl: {text}", file=sys.stderr))
        self.from_task, self.offset = 0, 0

    def poll(self) -> bool:
        while True:
            reply = replies.LogSlice.from_json(self.client.read(
                "log", batch=self.batch_id, task=self.task, stream=self.stream, from_task=self.from_task,
                offset=self.offset, live=self.live))
            for chunk in reply.chunks:
                if chunk["skipped"]:
                    self.note(f"task {chunk['task']}: the first {chunk['skipped']} bytes of its {self.stream} were "
                              "not kept (output_limit in pmlmd.toml)")
                self.printer(chunk["task"], self.stream, tasklines.raw(chunk["data"]))
            self.from_task, self.offset = reply.from_task, reply.offset
            if reply.complete:
                return False
            if not reply.more:
                return True


class TaskPrinter:
    """Prints task output as it arrives; with ``tag`` or ``lines``, line by line through output.Terminal."""

    def __init__(self, emit, tag: bool = False, lines: bool = False):
        self.emit, self.tag, self.lines = emit, tag, lines
        self.sinks: dict[tuple[int, str], output.Terminal] = {}

    def __call__(self, task: int, stream: str, data: bytes) -> None:
        if not (self.tag or self.lines):
            self.emit(stream, data)
            return
        sink = self.sinks.get((task, stream))
        if sink is None:
            # Tasks come in task order: the ones before this one are complete (its other stream is not).
            self.flush(below=task)
            sink = self.sinks[(task, stream)] = output.Terminal(self.emit, str(task).encode() if self.tag else None)
        sink.write(stream, data)

    def flush(self, below: int | None = None) -> None:
        """End the last line of every task (of every task before ``below``)."""
        for key in [key for key in self.sinks if below is None or key[0] < below]:
            self.sinks.pop(key).close(None)


def _emit_to(status_line, stdout_to_stderr: bool = False) -> Callable[[str, bytes], None]:
    """Where workers' output goes in pmlmctl: stdout and stderr (with ``stdout_to_stderr``, as
    --json asks, both on stderr), above the status line when one is drawn."""
    def emit(stream: str, data: bytes) -> None:
        fd = 2 if stream == "stderr" or stdout_to_stderr else 1
        if status_line is not None:
            status_line.print_above(fd, data)
        else:
            _write_bytes(fd, data)
    return emit


def cmd_log(parser, args) -> int:
    streams = ["stderr"] if args.stderr else ["stdout"]
    # Either stream is printed on stdout: what was asked for is the output of this command.
    printer = TaskPrinter(lambda stream, data: _write_bytes(1, data), tag=args.tag)
    with Client(socket_path(args.socket)) as client:
        readers = [LogReader(client, args.batch, stream, args.task, args.follow, printer) for stream in streams]
        try:
            while any([reader.poll() for reader in readers]):
                time.sleep(0.25)  # a person watching; new output is looked for four times a second
        except KeyboardInterrupt:
            return 130
        finally:
            printer.flush()
    return 0


def cmd_wait(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        return _wait(client, args.batch, args.json)


def cmd_enqueue(parser, args) -> int:
    # Imported here: pika is loaded by this command only, not by status and the others.
    from ..broker import enqueue

    try:
        params = enqueue.parse_url(args.amqp)
        enqueue.check_queue(args.queue)
        bodies = enqueue.task_bodies(enqueue.read_source(args.tasks_file), args.null,
                                     enqueue.source_name(args.tasks_file))
    except ValueError as e:
        parser.error(str(e))
    except MemoryError:
        parser.error(f"not enough memory to hold the tasks of {enqueue.source_name(args.tasks_file)} (every line is "
                     "checked before any is sent): split it and enqueue each part, or raise ulimit -v")
    except enqueue.Failed as e:
        print(_printable(f"pmlmctl: {e}"), file=sys.stderr)
        return e.status
    if not bodies:
        print(_printable(f"pmlmctl: no tasks in {enqueue.source_name(args.tasks_file)}: nothing enqueued"),
              file=sys.stderr)
        return 0
    progress = enqueue.Progress(len(bodies))
    try:
        done = enqueue.publish(params, args.queue, bodies, progress)
    except enqueue.Failed as e:
        progress.clear()
        print(_printable(f"pmlmctl: {e}"), file=sys.stderr)
        return e.status
    progress.clear()
    print(_printable(f"enqueued {done} task{'' if done == 1 else 's'} to {args.queue}"), file=sys.stderr)
    return 0


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


# A batch summary's counts (see pmlmd/core/summary.py) in the words pmlmctl shows them with, in this order.
COUNT_WORDS = (("succeeded", "succeeded"), ("failed", "failed"), ("given_up", "given up"),
               ("cancelled", "cancelled"), ("returned", "returned to the queue"), ("running", "running"),
               ("paused", "paused"), ("queued", "queued"))


# What a terminal acts on instead of showing: the C0 controls (newline, carriage return, tab and
# escape among them), DEL and the C1 controls, the line and paragraph separators, and the
# bidirectional marks, embeddings, overrides and isolates, which reorder what follows them
# ("Trojan Source", CVE-2021-42574). Names, commands, task lines and reasons come from any user
# of the node and everyone may list them: raw, one could clear a reader's screen, set its
# title or forge rows of `pmlmctl list`.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _printable(text: str) -> str:
    """Text supplied by a user, made safe to print on a terminal, as ls and systemctl show names:
    what a terminal would act on (_UNSHOWABLE) escaped visibly (\\x1b, \\n, \\u202e), and a byte
    that is not UTF-8 (a surrogate, see tasklines) as \\udcNN. Every text line pmlmctl prints with
    such text in it goes through here; --json needs nothing (json.dumps escapes them all)."""
    return _UNSHOWABLE.sub(_escape, text).encode("utf-8", "backslashreplace").decode("utf-8")


def _tasks_text(b: dict) -> str:
    """The counts that add up to the tasks, those not 0: "6 tasks: 4 succeeded, 1 failed, 1 cancelled"."""
    counts = b.get("counts") or {}
    total = b.get("tasks", 0)
    shown = ", ".join(f"{counts[key]} {word}" for key, word in COUNT_WORDS if counts.get(key))
    return f"{total} task{'' if total == 1 else 's'}" + (f": {shown}" if shown else "")


def _local_time(stamp: str | None, seconds: bool = False) -> str:
    """An ISO 8601 time of the summary in local time, or "-"."""
    if not stamp:
        return "-"
    try:
        when = datetime.fromisoformat(stamp).astimezone()
    except ValueError:
        return stamp
    return when.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _owner_text(b: dict) -> str:
    owner = b.get("owner") or {}
    if owner.get("user") is not None:
        return owner["user"]
    return "-" if owner.get("uid") is None else str(owner["uid"])


def _batch_line(b: dict) -> str:
    """One batch summary as a line under BATCH_HEADER."""
    # Escaped, then cut to their columns: a long name may lose the end of an escape there, but no
    # control character reaches the terminal.
    name = _printable(str(b.get("name") or "-"))
    priority = "-" if b.get("priority") is None else b["priority"]
    return _printable(f"{b['batch']:>6}  {name[:16]:<16}  {_printable(_owner_text(b))[:10]:<10}  {priority:>4}  "
                      f"{b['state']:<9}  {_local_time(b.get('created')):<16}  {_duration(b.get('elapsed_s')):>9}  "
                      f"{_tasks_text(b)}")


BATCH_HEADER = (f"{'ID':>6}  {'NAME':<16}  {'OWNER':<10}  {'PRIO':>4}  {'STATE':<9}  {'CREATED':<16}  "
                f"{'ELAPSED':>9}  TASKS")


def _batch_details(b: dict) -> list[str]:
    """One batch summary, a line per field, for status ID."""
    owner = b.get("owner") or {}
    uid = "" if owner.get("uid") is None or owner.get("user") == str(owner["uid"]) else f" (uid {owner['uid']})"
    state = b["state"] + ("" if b.get("exit_status") is None else f", exit status {b['exit_status']}")
    rows = [("batch", b["batch"] + (f" ({b['name']})" if b.get("name") else "")), ("state", state),
            *([("waiting", b["waiting"])] if b.get("waiting") else []),
            ("owner", _owner_text(b) + uid), ("priority", "-" if b.get("priority") is None else str(b["priority"])),
            ("command", "-" if b.get("command") is None else shlex.join(b["command"])),
            ("tasks", _tasks_text(b))]
    retried = [f"{b[key]} {word}" for key, word in (("terminated_attempts", "terminated by the governor"),
                                                    ("requeued_attempts", "requeued")) if b.get(key)]
    if retried:
        rows.append(("attempts", ", ".join(retried)))
    rows += [("created", _local_time(b.get("created"), True)), ("started", _local_time(b.get("started"), True)),
             ("ended", _local_time(b.get("ended"), True)), ("elapsed", _duration(b.get("elapsed_s")))]
    if b.get("scope"):
        rows.append(("scope", b["scope"] + (f" (freezer: {b['freezer']})" if b.get("freezer") else "")))
    intake = b.get("intake")
    if intake:
        state = intake["state"] + (f": {intake['detail']}" if intake.get("detail") else "")
        rows += [("queue", f"{intake['queue']} at {intake['broker']}" + (", until empty" if intake["until_empty"]
                                                                         else "")),
                 ("intake", f"{state}; {intake['consumed']} consumed, {intake['acked']} acked, {intake['returned']} "
                            f"returned, {intake['dead_lettered']} dead-lettered"
                            + "".join(f", {intake[key]} {word}" for key, word in (
                                ("rejected", "rejected"), ("lost", "lost with a connection")) if intake.get(key))
                            + f", {intake['in_flight']} in flight")]
    return [_printable(f"{key:<9} {value}") for key, value in rows]


def cmd_status(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        status = client.call("status", batch=args.batch)
    if args.json:
        _print_json(status)
    elif args.batch:
        replies.BatchStatus.from_json(status)  # a reply it cannot read is said so (main), not a traceback
        print("\n".join(_batch_details(status)))
    else:
        node = replies.NodeStatus.from_json(status)
        print(_printable(f"pmlmd: {node.status}"))
        limits = node.limits
        print(f"limits: cpu {limits['cpu_limit']:g}%, free memory {limits['memfree_limit']:g}% + gap "
              f"{format_size(limits['memory_gap'])}, floor {format_size(limits['min_free'])}, "
              f"up to {limits['max_workers']} workers")
        if node.workers:
            print(f"workers: {node.workers}")
        if node.batches:
            print(BATCH_HEADER)
            for b in node.batches:
                print(_batch_line(b))
    return 0


def cmd_list(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        batches = replies.BatchList.from_json(client.call("list")).batches
    if args.json:
        _print_json(batches)
    else:
        print(BATCH_HEADER)
        for b in batches:
            print(_batch_line(b))
    return 0


# What the daemon's state after a control request is called for the user who asked.
CONTROL_WORDS = {("pause", "held"): "paused", ("resume", "active"): "resumed",
                 # Answered once systemd froze or thawed the scope: another request may have come first.
                 ("pause", "active"): "running: resumed before the pause was done",
                 ("resume", "held"): "paused: paused again before the resume was done",
                 ("cancel", "finished"): "has ended already: nothing to cancel"}


def cmd_control(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        result = client.call(args.command, batch=args.batch)
    if args.json:
        _print_json(result)
    else:
        control = replies.Control.from_json(result)
        print(_printable(f"batch {control.batch}: {CONTROL_WORDS.get((args.command, control.state), control.state)}"))
    return 0


def cmd_report(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        _print_json(client.call("report", batch=args.batch))
    return 0


ENGINE_WORDS = {"held": "paused", "released": "resumed"}


# How each event that is one line of its fields reads (pmlmctl events, submit --wait).
EVENT_TEXTS = {
    "start": "task {task} attempt {attempt} started as pid {pid}",
    "deferred": "task {task} cannot start yet ({cause}: {reason}): it waits",
    "noncompliant": "task {task} worker {pid} did not comply with an agent pause ({cpu_pct}% of a CPU after it): "
                    "SIGSTOP",
    "finished": "finished: {summary}",
    "timeout": "task {task} worker {pid} ran past its --timeout: terminating it",
    "halted": "{reason}",
    "added": "task {task} taken from the queue",
    "returned": "task {task} back to the queue: {reason}",
    "settled": "task {task} {settled}: {reason}",
}


class _Fields(dict):
    """An event's fields for str.format_map: one it lacks reads None."""

    def __missing__(self, key):
        return None


def describe_event(e: dict) -> str:
    """An event as one line of text (pmlmctl events, without --json)."""
    return _printable(_event_text(e))


def _event_text(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.get("time", time.time())))
    batch = f"batch {e['batch']}" if e.get("batch") else "node"
    kind = e.get("event")
    if kind == "decision":
        target = f" worker {e['pid']} (task {e['task']})" if e.get("pid") else ""
        count = f" {e['count']}" if e.get("count") else ""
        return f"{when} {batch}: {e['decision']}{count}{target} [{e['rule']}] {e['reason']}"
    if kind == "end":
        how = f"signal {e['signal']}" if e.get("signal") else (
            f"exit {e['exit_code']}" if e.get("exit_code") is not None else "exit status unknown")
        why = f" ({e['reason']})" if e.get("reason") else ""
        return (f"{when} {batch}: task {e['task']} attempt {e['attempt']} ended ({how}, {e['cause']}): "
                f"{e['status']}{why}")
    if kind in EVENT_TEXTS:
        return f"{when} {batch}: " + EVENT_TEXTS[kind].format_map(_Fields(e))
    if kind == "intake":
        return f"{when} {batch}: intake {e.get('state')}" + (f": {e['detail']}" if e.get("detail") else "")
    if kind == "dropped":  # the daemon could not keep up with this reader's pace (see pmlmd/daemon/outbox.py)
        return f"{when} events dropped: {e['count']} (the reader was too slow)"
    # The engine's words for a user's pause and resume; pmlmctl's commands are pause and resume.
    return f"{when} {batch}: {ENGINE_WORDS.get(kind, kind)}"


def cmd_events(parser, args) -> int:
    with Client(socket_path(args.socket)) as client:
        try:
            if not args.follow:
                for event in client.stream("events", batch=args.batch, follow=False, kinds=args.kind):
                    print(json.dumps(event) if args.json else describe_event(event), flush=True)
                return 0
            stream = _Following(client, batch=args.batch, kinds=args.kind)
            while True:
                try:
                    event = stream.take(WAIT_CHECK)
                except StreamEnded:
                    return 0
                if event is not None:
                    print(json.dumps(event) if args.json else describe_event(event), flush=True)
                else:
                    stream.renewed()  # a quiet spell: was pmlmd restarted?
        except KeyboardInterrupt:
            return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args.subparser, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (pmlmctl log ID | head): stop quietly, as cat does; what Python
        # still holds for stdout must not fail again at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 128 + 13  # SIGPIPE
    except Unreachable as e:
        print(_printable(f"pmlmctl: {e}"), file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as e:
        print(_printable(f"pmlmctl: {e.message}"), file=sys.stderr)
        return 2 if e.code in USAGE_CODES else 1
    except protocol.ProtocolError as e:  # a reply this pmlmctl cannot read (replies.Result.from_json)
        print(_printable(f"pmlmctl: cannot read pmlmd's reply: {e}; are pmlmd and pmlmctl of the same version "
                         f"(pmlmctl {__version__})?"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
