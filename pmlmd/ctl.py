"""pmlmctl: the command-line client. ``pmlmctl run`` runs one batch in the foreground."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import time

from . import __version__
from .batch import BatchSpec
from .governor import MEMORY_METRICS, VICTIM_POLICIES, Limits
from .runner import Runner
from .units import format_size, parse_size

EXIT_STATUS_HELP = """\
exit status:
  0  every task succeeded
  1  some task failed, was given up or cancelled
  2  usage error (bad option, missing or unknown command, unreadable tasks file)
  3  critical finish: free memory fell below --min-free with no worker left to terminate
  128+N  the batch was cancelled by signal N (130 for Ctrl-C); workers were terminated first
"""


def _ranged(kind, low, high, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, not {text}")
        return value
    return parse


def _size(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _max_workers(text):
    if text == "auto":
        return None
    return _ranged(int, 1, 100000, "--max-workers")(text)


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """The options that describe a batch (shared by run and, later, submit)."""
    tasks = p.add_argument_group("tasks")
    source = tasks.add_mutually_exclusive_group()
    source.add_argument("-n", "--tasks", type=_ranged(int, 1, 10_000_000, "--tasks"), default=None, metavar="N",
                        help="run the command N times, one worker per task (default 1)")
    source.add_argument("--tasks-file", metavar="FILE",
                        help="one task per line ('-' for stdin); a line reaches its worker as $PMLM_TASK and "
                             "replaces {} in the arguments; blank lines are skipped")
    tasks.add_argument("--shell", action="store_true",
                       help="run the command words as one /bin/sh -c script ({} is replaced shell-quoted)")
    tasks.add_argument("--retries", type=_ranged(int, 0, 1000, "--retries"), default=3, metavar="N",
                       help="requeue a task terminated by the governor up to N times (default 3)")
    tasks.add_argument("--retry-failed", type=_ranged(int, 0, 1000, "--retry-failed"), default=0, metavar="N",
                       help="requeue a task that failed on its own (non-zero exit) up to N times (default 0)")

    limits = p.add_argument_group("limits")
    limits.add_argument("-j", "--max-workers", type=_max_workers, default=None, metavar="N|auto",
                        help="cap on concurrent workers; auto (default) lets the governor decide, up to 8 x CPUs")
    limits.add_argument("--cpu-limit", type=_ranged(float, 1, 100, "--cpu-limit"), default=90.0, metavar="PCT",
                        help="node-wide CPU utilisation over all cores to stay under (default 90)")
    limits.add_argument("--cpu-margin", type=_ranged(float, 0, 99, "--cpu-margin"), default=10.0, metavar="PCT",
                        help="CPU must fall this many points below the limit before workers are continued or "
                             "admitted while others run (default 10)")
    limits.add_argument("--memfree-limit", type=_ranged(float, 0, 99, "--memfree-limit"), default=20.0,
                        metavar="PCT", help="share of total memory that must stay free (default 20)")
    limits.add_argument("--memory-metric", choices=MEMORY_METRICS, default="available",
                        help="what counts as free: MemAvailable (default; includes reclaimable cache) or MemFree")
    limits.add_argument("--memory-gap", type=_size, default=200 << 20, metavar="SIZE",
                        help="band above the memory limit where workers are paused, not terminated; also the "
                             "headroom a new worker needs (default 200M)")
    limits.add_argument("--min-free", type=_size, default=300 << 20, metavar="SIZE",
                        help="critical floor: below it workers are killed at once (default 300M)")
    limits.add_argument("--victim", choices=VICTIM_POLICIES, default="newest",
                        help="which worker pays first (default newest)")
    limits.add_argument("--term-grace", type=_ranged(float, 0, 3600, "--term-grace"), default=10.0,
                        metavar="SECONDS", help="SIGTERM, then SIGKILL after this grace (default 10)")
    limits.add_argument("--interval", type=_ranged(float, 0.01, 60, "--interval"), default=0.5, metavar="SECONDS",
                        help="base sampling interval; pmlmd samples faster near a limit (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmlmctl", description="Run batches of workers within a node's CPU and free-memory limits.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    out.add_argument("--task-id", metavar="ID", help="an id of your own, echoed as task_id in the report")
    out.add_argument("-v", "--verbose", action="count", default=0, help="log decisions on stderr (-vv: more)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run, subparser=run)
    return parser


def _read_tasks(parser, path: str) -> list[str]:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read tasks file {path!r}: {getattr(e, 'strerror', None) or e}")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        parser.error(f"tasks file {path!r} holds no tasks (one task per line)")
    return lines


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


def spec_from_args(parser, args) -> BatchSpec:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    _check_command(parser, argv, args.shell)
    tasks: list[str | None] = _read_tasks(parser, args.tasks_file) if args.tasks_file else [None] * (args.tasks or 1)
    cpus = os.cpu_count() or 1
    limits = Limits(cpu_limit=args.cpu_limit, memfree_limit=args.memfree_limit, memory_metric=args.memory_metric,
                    memory_gap=args.memory_gap, min_free=args.min_free, victim=args.victim,
                    max_workers=args.max_workers or 8 * cpus, cpu_margin=args.cpu_margin, window=args.interval)
    return BatchSpec(batch_id=secrets.token_hex(6), command=argv, tasks=tasks, limits=limits, shell=args.shell,
                     term_grace=args.term_grace, retries=args.retries, retry_failed=args.retry_failed,
                     task_id=args.task_id)


class StatusLine:
    """A one-line live status on a terminal, redrawn at most five times a second."""

    def __init__(self, stream):
        self.stream = stream
        self.last = 0.0

    def __call__(self, runner: Runner) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        p = runner.progress()
        parts = [f"{p['done']}/{p['total']} done", f"{p['running']} running", f"{p['paused']} paused",
                 f"{p['queued']} queued"]
        if p["cpu_pct"] is not None:
            parts.append(f"cpu {p['cpu_pct']:.0f}%")
        if p["free_pct"] is not None:
            parts.append(f"free {p['free_pct']:.0f}%")
        if p["eta_s"] is not None:
            eta = int(p["eta_s"])
            parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        self.stream.write("\r\033[K" + " · ".join(parts))
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def cmd_run(parser, args) -> int:
    spec = spec_from_args(parser, args)
    if args.verbose:
        logging.basicConfig(stream=sys.stderr, format="pmlmctl: %(message)s",
                            level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    # Open output files before any work starts, so a bad path costs nothing.
    try:
        report_file = open(args.report, "w", encoding="utf-8") if args.report else None
        trace_file = open(args.trace, "w", encoding="utf-8") if args.trace else None
    except OSError as e:
        parser.error(f"cannot write {e.filename!r}: {e.strerror}")
    status = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    runner = Runner(spec, stdout_fd=2 if args.json else None, trace=trace_file, on_progress=status)
    batch = runner.run()
    if status:
        status.clear()
    report = batch.report()
    if report_file:
        json.dump(report, report_file, indent=2)
        report_file.write("\n")
        report_file.close()
    if trace_file:
        trace_file.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(batch.summary_line())
        print(f"lowest free memory {format_size(batch.lowest_free or 0)} "
              f"({report['lowest_free_memory_pct']}%), highest cpu {report['highest_cpu_pct']}%")
    if report["error_message"]:
        print(f"pmlmctl: {report['error_message']}", file=sys.stderr)
    if runner.interrupted_by is not None:
        return 128 + runner.interrupted_by
    return batch.exit_status()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
