"""The engine: batches, their workers and the node-wide governor, on one event loop.

The engine owns every worker process. Each step it samples the node, refreshes the
worker table from /proc, asks the governor and carries the decisions out; exits
arrive through pidfds. It is shared by the foreground runner (``pmlmctl run``, one
batch) and the daemon (many batches, priorities, users). It reports what happens
as typed events (pmlmd.core.events) through ``on_event``; it writes no files and owns no sockets.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import math
import os
import resource
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Callable


from .node import cgroup as cgroups_module, lineage, procctl
from .node.gate import gated, memfd, open_gate
from .node.loop import Loop

from .core import events, lifecycle, tasklines
from .core.supervisor import Supervisor
from .core.batch import (CAUSE_BAD_MESSAGE, FAILED, FINISHED, HALT_NOW, QUEUED, RETURNED, SUCCEEDED, CAUSE_CANCELLED, CAUSE_CWD,
                    CAUSE_DAEMON_RESTART, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, CAUSE_SPAWN_FAILED,
                    Attempt, Batch, Task, describe_end)
from .broker.intake import REFUSED
from .core.governor import (CONTINUE, CRITICAL, ENDING, PAUSE, PAUSED, RUNNING, SPAWN, Decision, Finished, Limits,
                       NodeSample, WorkerView, Workload, decide_batches, free_bytes, give_back, held_back,
                       intake_credit, next_interval, node_cpu, rate_reference, refresh_due, sampling_pace,
                       within_backlog, workload)
from .core.governor import quiet as governor_quiet
from .node.sampler import (CLOCK_TICKS, GroupUsage, NodeSampler, PressureTrigger, ProcReader, ThreadClocks, group_usage,
                      usage_of)
from .node.scopes import NoScopes
from .node.systemd import decision_fields
from .node.workdir import DirectoryError

log = logging.getLogger("pmlmd.engine")

# A step starts workers for at most this many seconds, then lets the loop serve its sockets (a
# status, a pause, an ack) and goes on in the next step: admitting 1,000 workers is not one stall.
SPAWN_BUDGET = 0.02
ORPHAN_SCAN = 5.0  # seconds between looks for orphans to reap when every worker has a cgroup
STRAGGLER_POLL = 0.05  # how often to look whether leftover group members are gone
ABANDON_WAIT = 2.0  # seconds the way out waits for killed workers' cgroups to empty
STRAY_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a process whose worker is not known
# Admission keeps descriptors in hand: a worker holds one (its pidfd) for its life and a spawn
# needs a few more for a moment (pipes); clients, the store and the log need the reserve.
CLOCKS_MAX = 4096  # descriptors kept open on workers' threads' schedstat at most (sampler.ThreadClocks)
FDS_PER_WORKER = 1  # its pidfd; 2 more where pmlmd holds its stdout and stderr (files or pipes, see output)
FD_RESERVE = 24
# A spawn that failed for want of fds, processes or memory is retried after this many seconds.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
RESOURCE_BACKOFF = 0.2
RESOURCE_LOG_EVERY = 10.0
CAUSE_RESOURCE = "resource"  # in "deferred" events: a task that could not start yet, and waits
NONCOMPLIANT_NOTE = "did not comply with an agent pause: stopped by pmlmd (SIGSTOP, or its cgroup frozen)"
# A queue batch (see intake) asks admission for as many workers as it will give: its queue is the
# broker's. What the governor admits becomes its credit, the deliveries it may hold.
OPEN_DEMAND = 1 << 20
SCOPE_REMAKES = 3  # times a batch's scope is made again when it was gone as soon as made


class Clock:
    """Time as the engine reads it (a port: tests hand in a fake): ``monotonic`` seconds for
    deadlines, rates and samples; ``wall`` seconds since the epoch for what is recorded."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


@dataclass
class BatchRun:
    """A batch inside the engine, with what the engine needs beyond the bookkeeping."""

    batch: Batch
    limits: Limits  # the node's, tightened by what the batch asked
    priority: int = 0
    seq: int = 0  # submission order: FIFO within a priority
    max_workers: int | None = None  # the batch's own cap, within the node's
    owner: procctl.Credentials | None = None  # run workers as this user (daemon)
    cwd: str | None = None
    env: dict[str, str] | None = None  # the workers' base environment; None: the engine's own
    held: bool = False  # paused by a user
    frozen: bool = False  # held through its scope's cgroup freezer rather than signals
    # Its scope's freezer, asked off the loop (Engine._freezer_call): each hold and resume is a new
    # turn (a FreezeUnit's answer for an earlier turn is stale); FreezeUnit calls under way; whether
    # the scope may be frozen (a FreezeUnit done or unanswered, and no ThawUnit done since).
    hold_turn: int = 0
    held_told: bool = False  # a Held event went out, and no Released since
    freezing: int = 0
    may_be_frozen: bool = False
    description: str = ""  # for its scope: which batch, whose
    umask: int | None = None  # the workers' file mode creation mask; None: the engine's own
    rlimits: dict[int, tuple[int, int]] | None = None  # resource.RLIMIT_* -> (soft, hard) for its workers
    results: str | None = None  # --results: an absolute directory, written as the owner (see output)
    finished: Finished = field(default_factory=Finished)  # what its ended workers measured (its profile)
    halted: bool = False  # the engine has acted on the batch's --halt
    intake: object | None = None  # intake.Intake of a queue batch, made by Engine.add
    deliveries: dict = field(default_factory=dict)  # task index -> intake.Delivery, until it is settled
    intake_done: str | None = None  # why the batch takes no more messages (--until-empty, a cancel)
    intake_closing: bool = False  # asked the intake to close
    fit: object | None = None  # tasklines.Fit of a queue batch, made at its first message
    # What every worker of the batch starts with, as exec takes it (Engine._environ), made once.
    environ: dict[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.batch.spec.batch_id

    @property
    def thaw_owed(self) -> bool:
        """Its scope may be frozen, or is being frozen: a resume or its end asks for a ThawUnit."""
        return bool(self.freezing) or self.may_be_frozen

    @property
    def scope_description(self) -> str:
        """The Description= of its systemd scope."""
        return self.description or f"pmlmd batch {self.id}"


@dataclass
class Worker:
    child: procctl.Child
    run: BatchRun
    task: Task
    attempt: Attempt
    life: lifecycle.Life  # running, paused, held, terminating or killed, with what each carries (lifecycle)
    rss: int = 0
    peak_rss: int = 0
    rss_growth: float | None = None
    cpu: float | None = None
    ticks: int | None = None
    measured_at: float | None = None
    escaped: dict[int, int] = field(default_factory=dict)  # pid -> pidfd of its processes outside its group
    cgroup: cgroups_module.Worker | None = None  # its own cgroup (cgroup backend); None: its process group and tree
    # proc backend: the cpu.stat of the cgroup its leader is in (its batch's systemd scope), "" where
    # that is pmlmd's own or the root; None until looked up (see Engine._idle_scopes)
    scope_stat: str | None = None
    # proc backend: the processes of its tree at the last walk, each with the CPU time of each of
    # its threads then (pid -> tid -> ns, lineage.tree_runtimes); {} when unknown
    runtimes: dict[int, dict[int, int]] = field(default_factory=dict)
    marks: tuple = ()  # proc backend: its threads' clocks at the walk (ThreadClocks.marks)
    runtime_usec: int = 0  # proc backend: the sum of ``runtimes``, in microseconds

    @property
    def state(self) -> str:
        """governor.RUNNING, PAUSED, HELD, TERMINATING or KILLED."""
        return self.life.phase.STATE

    @property
    def worker_id(self) -> str:
        return f"{self.run.id}.{self.task.index}.{self.attempt.number}"

    @property
    def key(self) -> tuple[int, int]:
        return (self.child.pid, self.child.start_ticks)

    def view(self) -> WorkerView:
        return WorkerView(key=self.key, started=self.child.started, rss=self.rss, rss_growth=self.rss_growth,
                          cpu=self.cpu, priority=self.run.priority, batch=self.run.id,
                          **lifecycle.governor_fields(self.life))


def worker_argv(run: BatchRun, line: str | None) -> list[str]:
    """The command for one task: ``{}`` replaced by the task line (shell-quoted with --shell), or
    the line appended (see tasklines.worker_argv)."""
    spec = run.batch.spec
    return tasklines.worker_argv(spec.command, spec.shell, line, spec.append)


class Engine:
    def __init__(self, limits: Limits, loop: Loop, *, proc: ProcReader | None = None, stdout_fd: int | None = None,
                 critical_finish: bool = True, on_event: Callable[[events.Event], None] | None = None, scopes=None,
                 worker_rlimits: dict[int, tuple[int, int]] | None = None, subreaper: bool = False,
                 output=None, cgroups: cgroups_module.Subtree | None = None, clock: "Clock | None" = None,
                 processes: procctl.Processes | None = None):
        """``output`` (output.TaskFiles or output.Pipes) gives each worker its stdout and stderr;
        without it workers write to ``stdout_fd`` (default: the engine's own stdout) and stderr.
        ``worker_rlimits`` (resource.RLIMIT_* -> (soft, hard)) are set on every worker before its
        command runs, under what its batch sets (BatchRun.rlimits). With ``subreaper`` the calling
        process becomes its workers' descendants' reaper (pmlmctl run, pmlmd; not a test).
        With ``cgroups`` (the cgroup backend, see cgroup) each worker runs in a cgroup of its own
        below it: the kernel says which processes are the worker's, freezes them all to pause it
        and kills them all to end it, with no process tree to walk; processes re-parented to the
        subreaper from such a cgroup are only reaped. A worker that could not get a cgroup (or an
        adopted one started without) is followed as without ``cgroups``.

        Ports, for tests to replace: ``clock`` (Clock: every time the engine reads), ``processes``
        (procctl.Processes: spawn, reap and signal calls), ``proc`` (ProcReader: /proc, also under
        another root), ``scopes``."""
        self.clock = clock or Clock()
        self.processes = processes or procctl.Processes()
        self.limits = limits
        self.scopes = scopes or NoScopes()
        self.agent = None  # AgentChannels, for batches in agent mode
        self.loop = loop
        self.proc = proc or ProcReader()
        self.node = NodeSampler(self.proc, clock=self.clock.monotonic)
        self.stdout_fd = stdout_fd
        self.output = output
        self.worker_rlimits = worker_rlimits or {}
        self.critical_finish = critical_finish  # False in the daemon: wait out a floor breach instead
        self.on_event = on_event or (lambda event: None)
        self.runs: dict[str, BatchRun] = {}
        # Every worker's lifecycle, by pid, with the count in each state and the deadlines kept as
        # workers come, change and go (so that a step costs nothing per idle worker).
        self.supervisor: Supervisor[Worker] = Supervisor()
        self.cgroups = cgroups
        # The node stalling on memory wakes the loop for a sample (a PSI trigger), where PSI exists.
        self.pressure: PressureTrigger | None = None
        try:
            self.pressure = PressureTrigger()
        except OSError as e:
            log.info("memory pressure (PSI) does not wake pmlmd: /proc/pressure/memory: %s", e.strerror)
        else:
            loop.watch(self.pressure.fileno(), self._memory_event, select.EPOLLPRI)
            log.info("memory pressure (PSI) wakes pmlmd: %g ms of stall within %g s", self.pressure.stall_us / 1000,
                     self.pressure.window_us / 1e6)
        # The kernel's line under the memory limit, where the memory controller allows one.
        # One per subtree (by its root): pmlmd's own, or under systemd each batch scope's (Scoped).
        self.guards: dict[str, cgroups_module.MemoryGuard] = {}
        self.unguarded: set[str] = set()  # subtrees the memory controller cannot be had for
        if cgroups is not None and not cgroups.gated:
            self._guard(cgroups)
        self.subtree_usec: int | None = None  # the cgroups subtree's CPU time at the last refresh
        self.scope_usec: dict[str, int | None] = {}  # proc backend: cpu.stat path -> CPU time at the last refresh
        self.cgroup_mount = cgroups_module.cgroup2_mount()
        self.own_cgroup = cgroups_module.own_cgroup()
        # pgid or cgroup.Worker -> when to SIGKILL what an ended worker left of its group or cgroup
        self.stragglers: dict[int | cgroups_module.Worker, float] = {}
        self.strays: dict[int, Stray] = {}  # pid -> a process that left its ended worker's group
        self.spawn_blocked_until = 0.0  # monotonic: no spawn before, after one failed for want of a resource
        self.resource_log_at = 0.0  # monotonic: when a shortage may be logged again
        # Batches whose scope systemd is making (off the loop: scopes.OffLoop) -> the gated
        # workers that wait for it, each with its gate's write end.
        self.placing: dict[str, list[tuple[Worker, int]]] = {}
        self.remade: dict[str, int] = {}  # batch id -> times its scope was lost as it was made (SCOPE_REMAKES)
        if self.scopes.fd is not None:
            loop.watch(self.scopes.fd, self.scopes.deliver)
        # Escaped descendants are re-parented to pmlmd rather than init (see lineage).
        self.subreaper = subreaper and lineage.become_subreaper()
        # Workers' trees from /proc/PID/task/TID/children: O(workers' processes) per refresh.
        self.walk_trees = self.proc.has_children_lists()
        # Their threads' CPU times through kept descriptors, an eighth of the descriptors at most.
        self.clocks = ThreadClocks(self.proc, min(CLOCKS_MAX, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8))
        self.last_sample: NodeSample | None = None
        # The samples a fall of free memory is measured against (governor.rate_reference), oldest first.
        self.recent_samples: collections.deque[NodeSample] = collections.deque()
        self.next_sample_at = 0.0
        self.spawn_cut = False  # this step stopped starting workers when its time was up (SPAWN_BUDGET)
        # Descriptors pmlmd has open: counted at each admission (_spawn_room), plus what each start
        # of it took since.
        self.descriptors: float = math.inf
        self.spawn_backlog: dict[str, int] = {}  # batch id -> workers admitted but not started by a cut step
        self.last_refresh = float("-inf")
        self.orphans_due = float("-inf")  # monotonic: the next look for orphans (see _refresh_workers)
        self.settled = -1  # how many workers stood still at the last refresh, all of them; else -1
        self.still = False  # at the last step: every worker still, none paused, none to admit (see step)
        self.uncontained = 0  # how many workers have no cgroup of their own (followed through /proc)
        self.workers_due = -math.inf  # monotonic: the workers' first deadline, as next_deadline saw it
        self.still_at = -math.inf  # monotonic: the last refresh that found every worker standing still
        self.base_env = tasklines.environment()  # as pmlmd carries bytes, like a submitted env
        self._seq = 0

    # --- batches ------------------------------------------------------------------------
    def add(self, run: BatchRun) -> BatchRun:
        if not run.seq:
            self._seq += 1
            run.seq = self._seq
        self.runs[run.id] = run
        self.next_sample_at = 0.0
        spec = run.batch.spec.intake
        if spec is not None and run.intake is None:
            from .broker.intake import Intake  # pika: only for a queue batch

            run.intake = Intake(spec.url, spec.queue, dead_letter=spec.dead_letter, watch_depth=spec.until_empty)
            _restored_counters(run)
            self.loop.watch(run.intake.fileno(), lambda: self._on_intake(run))
            run.intake.start()
        return run

    def busy(self) -> bool:
        return not self.idle()

    def cancel(self, run: BatchRun, reason: str, *, running: bool = True) -> None:
        """Start no more of the batch's tasks; with ``running`` also terminate its workers."""
        if run.batch.cancel_reason is None:
            run.batch.cancel_reason = reason
        run.batch.cancel_queued()
        self._settle(run)
        if running:
            self._stop_workers(run, f"batch cancelled ({reason})")
        self._finish_if_done(run)

    def _stop_workers(self, run: BatchRun, reason: str, cause: str = CAUSE_CANCELLED) -> None:
        """Terminate every worker of the batch (SIGTERM, SIGKILL after the grace; as a cancel does);
        their attempts end with ``cause``."""
        if run.held:
            self.resume(run)  # a frozen or paused worker could act on no request to stop
        for w in self.workers_of(run):
            if w.state not in ENDING:
                self._terminate(w, cause, reason)

    def end_adopted(self, run: BatchRun, reason: str) -> None:
        """A restored queue batch: terminate the workers adopted from the pmlmd before, whose
        messages the broker has given out again; their tasks end returned."""
        self._stop_workers(run, reason, CAUSE_DAEMON_RESTART)

    def end_leftovers(self) -> None:
        """After adoption: the worker cgroups no adopted worker owns hold what ended workers left
        (a pmlmd stopped within their grace) or nothing; the processes get SIGTERM now and SIGKILL
        after STRAY_GRACE, as stragglers, and the empty cgroups are removed."""
        if self.cgroups is None:
            return
        owned = {w.cgroup.path for w in self.workers.values() if w.cgroup is not None}
        now, ended = self.clock.monotonic(), 0
        for cg in self.cgroups.workers():
            if cg.path in owned or cg.remove():
                continue
            ended += len(cg.pids())
            self.processes.signal_cgroup(cg, signal.SIGTERM)
            self.processes.signal_cgroup(cg, signal.SIGCONT)  # thawed too: a frozen process cannot act on SIGTERM
            self.stragglers[cg] = now + STRAY_GRACE
        if ended:
            log.warning("ending %d processes that ended workers left in their cgroups", ended)

    def kill_all(self, reason: str) -> None:
        for w in list(self.workers.values()):
            self._kill(w, CAUSE_CANCELLED, reason)
        for rest in self.stragglers:
            self._kill_rest(rest)
        for stray in self.strays.values():
            self.processes.pidfd_signal(stray.pidfd, signal.SIGKILL)

    def hold(self, run: BatchRun, done: Callable[[], None] | None = None) -> None:
        """A user's pause: stop every worker of the batch and admit none until it is resumed.

        Where the batch has a scope, its cgroup freezer stops it whole, children the workers
        forked included; systemd is asked off the loop, and the workers are held once it answers
        (by signals, should it fail). ``done()`` then: the batch is held."""
        run.held = True
        run.hold_turn += 1
        # Not where a worker is being ended: frozen, it could not act on its SIGTERM in its grace.
        if self._modes(run).pause_by_agent or any(w.state in ENDING for w in self.workers_of(run)):
            self._held(run, False, done)
            return
        turn = run.hold_turn
        self._freezer_call(run, True, lambda answer: self._frozen(run, turn, answer is True, done))

    def _frozen(self, run: BatchRun, turn: int, frozen: bool, done: Callable[[], None] | None) -> None:
        if turn != run.hold_turn or run.id not in self.runs:
            # Resumed (and maybe held again) or ended meanwhile: a ThawUnit was asked for after
            # this FreezeUnit, and a later hold asks for its own.
            if done is not None:
                done()
            return
        if frozen and any(w.state in ENDING for w in self.workers_of(run)):
            self._thaw(run)  # one is being ended since: it must act on its SIGTERM
            frozen = False
        self._held(run, frozen, done)

    def _freezer_call(self, run: BatchRun, freeze: bool, then: Callable[[bool | None], None] | None) -> None:
        """FreezeUnit (``freeze``) or ThawUnit of the batch's scope, off the loop, keeping what
        pmlmd knows of the scope's freezer (BatchRun.freezing, may_be_frozen) as answers come.
        Answers come in the order the calls were asked for (scopes.OffLoop), so when a ThawUnit is
        answered, the FreezeUnits still under way are those asked for after it."""
        if freeze:
            run.freezing += 1

        def answered(answer: bool | None) -> None:
            if freeze:
                run.freezing -= 1
                run.may_be_frozen = run.may_be_frozen or answer is not False
            elif answer is True and not run.freezing:
                run.may_be_frozen = False  # thawed after every FreezeUnit asked for
            if then is not None:
                then(answer)

        (self.scopes.freeze_later if freeze else self.scopes.thaw_later)(run.id, answered)

    def _thaw(self, run: BatchRun, done: Callable[[], None] | None = None, again: bool = True) -> None:
        """ThawUnit of the batch's scope, off the loop; asked once more where it failed while the
        scope may still be frozen (a FreezeUnit systemd took but did not answer in time fails the
        calls queued behind it), then logged with the command that thaws it by hand."""
        def answered(answer: bool | None) -> None:
            if answer is not True and run.may_be_frozen and not run.held and not run.freezing:
                if again:
                    self._thaw(run, done, again=False)
                    return
                log.warning("the scope of batch %s may stay frozen: systemd did not thaw it (systemctl thaw "
                            "pmlm-%s.scope)", run.id, run.id)
            if done is not None:
                done()

        self._freezer_call(run, False, answered)

    def _held(self, run: BatchRun, frozen: bool, done: Callable[[], None] | None) -> None:
        run.frozen = frozen
        now = self.clock.monotonic()
        for w in self.workers_of(run):
            self._carry(w, lifecycle.Hold(frozen=frozen, cpu=w.cpu), now)
        run.held_told = True
        self.on_event(events.Held(run.id))
        if done is not None:
            done()

    def resume(self, run: BatchRun, done: Callable[[], None] | None = None) -> None:
        """Undo ``hold``: every worker continued (SIGCONT whatever holds it) and the scope thawed,
        off the loop; ``done()`` once it is thawed (at once where it was not frozen)."""
        run.held = False
        run.hold_turn += 1
        run.frozen = False
        now = self.clock.monotonic()
        for w in self.workers_of(run):
            self._carry(w, lifecycle.Resume(), now)
        self.next_sample_at = 0.0
        if run.held_told:  # a hold resumed before it took hold was never told: nor is its end
            run.held_told = False
            self.on_event(events.Released(run.id))
        if run.thaw_owed:
            self._thaw(run, done)
        elif done is not None:
            done()

    def freezer(self, run: BatchRun) -> str:
        """The batch scope's freezer as pmlmd knows it, named as systemd's FreezerState: "frozen",
        "freezing" (a hold's FreezeUnit under way), "thawing" (resumed, the scope maybe still
        frozen) or "running"."""
        if run.held:
            return "frozen" if run.frozen else "freezing" if run.freezing else "running"
        return "thawing" if run.thaw_owed else "running"

    def cpu_mark(self) -> int | None:
        """The CPU time the workers' processes have used, in microseconds: the cgroup subtree's
        cpu.stat, plus, for each worker followed through /proc, its threads' CPU times at the last
        refresh (Worker.runtimes). None where that cannot be told (a tree not walked whole, a
        process that left its worker). Two equal marks: no worker ran between the refreshes
        before them, so none wrote anything either."""
        if self.strays:
            return None
        total = 0
        if self.uncontained:
            for w in self.workers.values():
                if w.cgroup is not None:
                    continue
                if not w.runtimes or w.escaped:
                    return None
                total += w.runtime_usec
        if self.uncontained < len(self.workers):
            usec = self.cgroups.cpu_usec()
            if usec is None:
                return None
            total += usec
        return total

    def workers_of(self, run: BatchRun) -> list[Worker]:
        return [w for w in self.workers.values() if w.run is run]

    def waiting(self, run: BatchRun, sample: NodeSample) -> str | None:
        """Why the node starts none of ``run``'s waiting tasks at ``sample`` while none of its
        workers is there (governor.held_back, by the rules of decide_batches); None otherwise, or
        when the node is not the reason."""
        if run.held or not run.batch.queue or self.workers_of(run):
            return None
        views = [w.view() for w in self.workers.values()]
        return held_back(sample, node_cpu(sample, views), self.limits, run.limits,
                         any(v.state == RUNNING for v in views), self._workload(run).peak_rss is not None, len(views))

    @property
    def workers(self) -> dict[int, Worker]:
        """The workers being supervised, by pid (read only: Supervisor.add and remove change it)."""
        return self.supervisor.records

    # --- time ---------------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing to govern: no batch and no process of one. An idle engine takes no samples."""
        return not (self.runs or self.workers or self.stragglers or self.strays)

    def next_deadline(self) -> float:
        """When ``tick`` has something to do (monotonic seconds; inf: nothing but events)."""
        workers_due = self.supervisor.next_deadline()
        # The next tick looks at the workers only from then on: a deadline set meanwhile (by a
        # callback of this loop turn) lies after the moment it was set, so after that tick.
        self.workers_due = workers_due
        deadline = min(workers_due, self.next_sample_at if not self.idle() else math.inf)
        if self.agent is not None:
            deadline = min(deadline, self.agent.next_deadline())
        if self.stragglers:
            deadline = min(deadline, self.clock.monotonic() + STRAGGLER_POLL)
        for stray in self.strays.values():
            deadline = min(deadline, stray.kill_at)
        return deadline

    def tick(self) -> None:
        """Do whatever is due: grace deadlines, then a governor step."""
        now = self.clock.monotonic()
        self._enforce_deadlines(now)
        if now >= self.next_sample_at and not self.idle():
            self.step()

    # --- one governor step ----------------------------------------------------------------
    def step(self) -> None:
        sample = self.node.sample()
        limits = self.limits
        free = free_bytes(sample, limits)
        for guard in self.guards.values():  # several batches' scopes share what the node may still give
            guard.update(free, limits.memory_limit_bytes(sample.mem_total), limits.memory_gap, limits.min_free,
                         share=len(self.guards))
        for run in self.runs.values():
            run.batch.record_sample(sample.cpu_pct, free, sample.mem_total)
        paused = self.supervisor.tally[PAUSED] > 0
        if self.workers and refresh_due(sample, limits, sample.time - self.last_refresh, paused):
            self._refresh_workers(sample.time)
        decisions = self._decide(sample, paused)
        if self.spawn_backlog:
            backlog, self.spawn_backlog = self.spawn_backlog, {}
            decisions = within_backlog(decisions, backlog, {run.id for run in self.runs.values()
                                                            if run.intake is not None})
        # Queue batches: the deliveries their running tasks hold before this step's spawns.
        holding = {run.id: _running_deliveries(run) for run in self.runs.values() if run.intake is not None}
        for decision in decisions:
            self._apply(decision, sample)
        for run in list(self.runs.values()):
            if run.id in holding:
                self._credit(run, decisions, holding[run.id])
        tally = self.supervisor.tally
        self.on_event(events.Sample(cpu_pct=None if sample.cpu_pct is None else round(sample.cpu_pct, 2), free=free,
                                    free_pct=round(100.0 * free / sample.mem_total, 2), running=tally[RUNNING],
                                    paused=tally[PAUSED]))
        pace = sampling_pace(limits, [run.limits.interval for run in self.runs.values()])
        watching = bool(self.workers)
        # Nothing moves and nothing waits: samples may stretch (governor.next_interval).
        self.still = (watching and self.settled == len(self.workers) and not self.supervisor.tally[PAUSED]
                      and not any(run.batch.queue or self._taking(run) for run in self.runs.values()))
        if self.recent_samples and sample.time < self.recent_samples[-1].time:
            self.recent_samples.clear()  # a clock that went back (a test's): older samples say nothing
        reference = rate_reference(self.recent_samples, sample.time)
        interval = next_interval(reference, sample, pace, watching=watching, still=self.still)
        while reference is not None and self.recent_samples[0] is not reference:
            self.recent_samples.popleft()  # older than the reference: no longer needed
        self.recent_samples.append(sample)
        self.last_sample = sample
        self.next_sample_at = sample.time + interval
        if self.spawn_cut:  # admission goes on at once, after the loop has looked at its sockets
            self.spawn_cut, self.next_sample_at = False, sample.time

    def _memory_event(self) -> None:
        """The node stalled on memory (PressureTrigger), or the workers reached a guard line
        (memory.high, memory.max) or lost a process to the OOM killer (MemoryGuard): sample now,
        so the governor acts on it by policy."""
        for guard in self.guards.values():
            guard.events()  # reading clears the descriptor's POLLPRI
        self.next_sample_at = 0.0

    def _guard(self, tree: cgroups_module.Subtree) -> None:
        """Keep the kernel's lines under the memory limit for ``tree`` (MemoryGuard), where the
        memory controller allows; said once in the log where it does not."""
        if tree.root in self.guards or tree.root in self.unguarded:
            return
        try:
            guard = cgroups_module.MemoryGuard.enable(tree)
        except (cgroups_module.Unusable, OSError) as e:
            if not self.unguarded:
                log.info("no memory.high guard under the memory limit: %s", e)
            self.unguarded.add(tree.root)
            return
        self.guards[tree.root] = guard
        self.loop.watch(guard.fileno(), self._memory_event, select.EPOLLPRI)

    def _unguard(self, root: str) -> None:
        guard = self.guards.pop(root, None)
        self.unguarded.discard(root)
        if guard is not None:
            self.loop.unwatch(guard.fileno())
            guard.lift()

    def close(self) -> None:
        """Stop the kernel's wake-ups, lift the guard's lines (MemoryGuard.lift) and close the
        kept schedstat descriptors: pmlmd stops governing. Workers are left as they are."""
        self.clocks.close()
        if self.pressure is not None:
            self.loop.unwatch(self.pressure.fileno())
            self.pressure.close()
            self.pressure = None
        for root in list(self.guards):
            self._unguard(root)

    def _admission_order(self) -> list[BatchRun]:
        runs = [r for r in self.runs.values()
                if (r.batch.queue or self._taking(r)) and not r.held and r.batch.cancel_reason is None]
        return sorted(runs, key=lambda r: (-r.priority, r.seq))

    def _workload(self, run: BatchRun) -> Workload:
        mine = self.workers_of(run)
        room = None if run.max_workers is None else max(0, run.max_workers - len(mine))
        queued = len(run.batch.queue) + (OPEN_DEMAND if self._taking(run) else 0)
        return workload(run.id, queued, room, run.finished, (w.peak_rss for w in mine if w.measured_at is not None),
                        (w.cpu for w in mine if w.state == RUNNING and w.cpu is not None))

    def _decide(self, sample: NodeSample, paused: bool) -> list[Decision]:
        """The node-wide decision, narrowed by batches that asked for stricter limits. ``paused``:
        whether any worker stands paused."""
        admitting = self._admission_order()
        if all(governor_quiet(sample, limits, paused, bool(admitting))
               for limits in {self.limits, *(run.limits for run in self.runs.values())}):
            return []  # nothing to decide under any batch's limits: no table of every worker
        views = [w.view() for w in self.workers.values()]
        loads = {run.id: self._workload(run) for run in self.runs.values()}
        demands = [loads[run.id] for run in admitting]
        # The other batches' workers are measured against their batch's profile too (rule 3).
        others = dict.fromkeys(w.run.id for w in self.workers.values())
        for run in admitting:
            others.pop(run.id, None)
        demands += [dataclasses.replace(loads[batch], queued=0) for batch in others]
        stricter = {run.id: (run.limits, loads[run.id]) for run in self.runs.values() if run.limits != self.limits}
        return decide_batches(sample, views, demands, self.limits, stricter)

    def _refresh_workers(self, now: float) -> None:
        total = self.cgroups.cpu_usec() if self.cgroups is not None and self.uncontained < len(self.workers) else None
        if (total is not None and total == self.subtree_usec and not self.uncontained
                and self.settled == len(self.workers)):
            # Every worker in a cgroup of its own stood still at the last refresh, and the subtree
            # has used no CPU since (one read, whatever their number): their figures hold.
            self._adopt_orphans_due(now)
            self.last_refresh = self.still_at = now
            return
        usage: dict[int, GroupUsage | None] = self._cgroup_usage(total)
        if len(usage) == len(self.workers):
            # Every worker in a cgroup of its own: orphans are only reaped (they hold nothing but a
            # pid meanwhile), at housekeeping's pace.
            self._adopt_orphans_due(now)
        elif self.walk_trees:
            usage.update(self._tree_usage())
        else:  # no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN): every process of the node
            stats = {st.pid: st for st in self.proc.all_pid_stats()}
            if self.subreaper:
                self._adopt_orphans()
                for w in self.workers.values():
                    self._find_escaped(w, stats, lineage.descendants(self.proc, w.child.pid))
            usage.update((pgid, u) for pgid, u in group_usage(stats.values(), set(self.workers)).items()
                         if self.workers[pgid].cgroup is None)
        if self.settled == len(self.workers) == len(usage) and all(u is None for u in usage.values()):
            # Every worker stood still at the last refresh and has used no CPU since: their figures
            # (no CPU, no growth) hold.
            self.last_refresh = self.still_at = now
            return
        still = 0
        for pgid, w in self.workers.items():
            if pgid not in usage:
                continue
            u = usage[pgid]
            # None: a cgroup that used no CPU since its last reading, so it cannot have grown either.
            memory, ticks = (w.rss, w.ticks) if u is None else (self._memory(w, u), u.cpu_ticks)
            if w.ticks is not None and w.measured_at is not None and now > w.measured_at:
                # What it used since it was measured, it used after the last refresh that found every
                # worker standing still (still_at): a rate over the whole span would read low.
                elapsed = now - max(w.measured_at, self.still_at)
                w.cpu = 100.0 * (ticks - w.ticks) / CLOCK_TICKS / elapsed / self.node.cpu_count
                w.rss_growth = (memory - w.rss) / elapsed
            previous_measurement = w.measured_at
            w.ticks, w.rss, w.measured_at = ticks, memory, now
            w.peak_rss = max(w.peak_rss, memory)
            if w.life.verifying and previous_measurement is not None:
                self._carry(w, lifecycle.Measured(previous_measurement, (w.cpu or 0.0) * self.node.cpu_count,
                                                  w.rss_growth or 0.0), now)
            still += w.cpu == 0 and w.rss_growth == 0 and not w.life.verifying
        self.settled = still if still == len(self.workers) else -1
        self.last_refresh = now

    def _cgroup_usage(self, total: int | None) -> dict[int, GroupUsage | None]:
        """What each worker in a cgroup of its own uses: its members (cgroup.procs), with the CPU
        time the kernel counted for the cgroup, which includes members that have exited.

        None for a worker whose cgroup used no CPU since it was last read: a process cannot
        fault in a page, fork or exit without CPU time, so its memory and members are as they
        were, and are not read again. The subtree's own cpu.stat counts every worker's CPU
        time, so when it has not moved no worker's cgroup is read at all (idle workers cost
        one read per refresh, whatever their number). ``total``: that cpu.stat's usage_usec, as
        just read."""
        usage: dict[int, GroupUsage | None] = {}
        if self.cgroups is None or self.uncontained == len(self.workers):
            return usage
        contained = [(pgid, w) for pgid, w in self.workers.items() if w.cgroup is not None]
        all_still = total is not None and total == self.subtree_usec
        self.subtree_usec = total
        for pgid, w in contained:
            if w.ticks is not None and all_still:
                usage[pgid] = None
                continue
            usec = w.cgroup.cpu_usec()
            ticks = usec * CLOCK_TICKS / 1_000_000 if usec is not None else None
            if ticks is not None and ticks == w.ticks:
                usage[pgid] = None
                continue
            stats = [st for st in map(self.proc.pid_stat, w.cgroup.pids()) if st is not None]
            if not stats:
                continue
            u = usage_of(stats)
            if ticks is not None:
                u = dataclasses.replace(u, cpu_ticks=ticks)
            if self.cgroups.charges(w.cgroup):  # the kernel's count: a shared page once, page cache and tmpfs too
                charged = w.cgroup.memory_bytes()
                if charged is not None:
                    u = dataclasses.replace(u, rss=charged)
            usage[pgid] = u
        return usage

    def _idle_scopes(self) -> set[str]:
        """The cgroups (their cpu.stat paths) that workers followed through /proc live in and that
        used no CPU since the last refresh: under systemd each batch's scope. A process there
        cannot fork, exit or fault in a page without CPU time, so their trees need no new look.
        Workers in pmlmd's own cgroup (or the root) have none and are always read."""
        paths = set()
        for w in self.workers.values():
            if w.cgroup is not None:
                continue
            if w.scope_stat is None:
                w.scope_stat = self._scope_stat(w.child.pid)
            if w.scope_stat:
                paths.add(w.scope_stat)
        idle, seen = set(), {}
        for path in paths:
            usec = cgroups_module.usage_usec(path)
            if usec is not None and self.scope_usec.get(path) == usec:
                idle.add(path)
            seen[path] = usec
        self.scope_usec = seen
        return idle

    def _scope_stat(self, pid: int) -> str:
        relative = cgroups_module.own_cgroup(str(pid), self.proc.root)
        if self.cgroup_mount is None or relative in (None, "/", self.own_cgroup):
            return ""
        return os.path.join(self.cgroup_mount, relative.lstrip("/"), "cpu.stat")

    def _tree_usage(self) -> dict[int, GroupUsage | None]:
        """What each worker uses: its leader and every descendant (lineage.tree_runtimes, from
        /proc/PID/task/TID/children), whatever group or session they moved to, and the processes
        re-parented to pmlmd that it left (Worker.escaped). The cost is that of the workers' own
        processes: other processes of the node are never read. None for a worker none of whose
        processes ran since its tree was last walked (its scope's cpu.stat, or each process's
        schedstat, says so): it is as it was."""
        usage: dict[int, GroupUsage | None] = {}
        idle = self._idle_scopes()
        walked = False
        for pgid, w in self.workers.items():
            if w.cgroup is not None:
                continue
            if w.ticks is not None and w.scope_stat in idle:
                usage[pgid] = None  # nothing in its scope used CPU: its processes are as they were
                continue
            if w.ticks is not None and w.runtimes and not w.escaped and self.clocks.unmoved(w.marks):
                usage[pgid] = None  # no process of its tree ran since the walk: nothing changed
                continue
            walked = True
            runtimes = lineage.tree_runtimes(self.proc, pgid, runtimes=self.clocks.runtimes)
            before = _threads(w.runtimes)
            w.runtimes = runtimes if None not in runtimes.values() else {}
            self.clocks.forget(before - _threads(w.runtimes))
            w.marks = self.clocks.marks(w.runtimes)
            w.runtime_usec = sum(ns for threads in w.runtimes.values() for ns in threads.values()) // 1000
            tree = list(runtimes)
            stats = {}
            for pid in dict.fromkeys(tree + list(w.escaped)):
                st = self.proc.pid_stat(pid)
                if st is not None:
                    stats[pid] = st
            if self.subreaper:
                self._find_escaped(w, stats, tree[1:])
            if stats:
                usage[pgid] = usage_of(stats.values())
        # A process is re-parented to pmlmd when its parent exits, which takes a thread of a tree
        # that ran: with no tree walked there are no new orphans to look for, but at ORPHAN_SCAN.
        if self.subreaper:
            self._adopt_orphans_due(self.clock.monotonic(), force=walked)
        return usage

    def _adopt_orphans_due(self, at: float, force: bool = False) -> None:
        """Look for orphans (``_adopt_orphans``) with ``force``, or once ORPHAN_SCAN has passed
        since the last look (``at``: monotonic seconds, now)."""
        if force or at >= self.orphans_due:
            self._adopt_orphans()
            self.orphans_due = at + ORPHAN_SCAN

    def _memory(self, w: Worker, u) -> int:
        """The worker's memory in bytes: its group's RSS, or, when several processes may share pages
        (children forked over the same memory, escaped members), the sum of their PSS, which
        counts a shared page once. RSS summed per process would count it once per process.
        A worker cgroup with the memory controller has the kernel's count already (memory.current)."""
        pids = list(dict.fromkeys([*u.pids, *w.escaped]))
        if len(pids) < 2 or (w.cgroup is not None and self.cgroups.charges(w.cgroup)):
            return u.rss
        total = 0
        for pid in pids:
            pss = self.proc.pss(pid)
            if pss is None:
                stat = self.proc.pid_stat(pid)
                if stat is not None and stat.state != "Z":
                    return u.rss  # one unreadable member: the per-process sum is the safe side
                continue
            total += pss
        return total

    # --- carrying decisions out --------------------------------------------------------------
    def _apply(self, d: Decision, sample: NodeSample) -> None:
        if d.action == SPAWN:
            run = self.runs.get(d.batch)
            spawned = 0
            if run is not None:
                for _ in range(min(d.count, self._spawn_room())):
                    if not run.batch.queue or self.clock.monotonic() < self.spawn_blocked_until:
                        break
                    if spawned and self.clock.monotonic() - sample.time > SPAWN_BUDGET:
                        # The rest after the loop has served what waits (see step), if the next decision
                        # still admits them: never more than this one did (the ramp does not speed up).
                        self.spawn_cut = True
                        self.spawn_backlog[run.id] = d.count - spawned
                        d = dataclasses.replace(d, count=spawned, reason=f"{d.reason}; {spawned} started in this "
                                                f"turn's {SPAWN_BUDGET * 1000:.0f} ms, more at the next")
                        break
                    self._spawn(run, run.batch.next_task())
                    spawned += 1
            if spawned or run is None or run.intake is None:  # a queue batch's admission is its credit (_credit)
                self._record(d, sample, None, run)
            return
        if d.action == CRITICAL:
            self._record(d, sample, None, None)
            if self.critical_finish:
                for run in list(self.runs.values()):
                    if run.batch.queue or self._taking(run):
                        run.batch.critical_reason = d.reason
                        run.batch.cancel_queued()
                        self._settle(run)
                        self._finish_if_done(run)
            return
        pid, start_ticks = d.worker
        w = self.workers.get(pid)
        if w is None or w.child.start_ticks != start_ticks:
            return
        # A pause or continue is the sample's (the governor counts its interval from it); a grace
        # runs from when its signal goes out.
        self._carry(w, lifecycle.decided(d, w.cpu), sample.time if d.action in (PAUSE, CONTINUE) else
                    self.clock.monotonic())
        if d.action == PAUSE:
            w.attempt.pauses += 1
        self._record(d, sample, w, w.run)

    # --- processes that left their worker's process group ----------------------------------------
    def _signal(self, w: Worker, sig: int) -> None:
        """Signal the worker: its process group and every process known to have left it; or, in a
        cgroup of its own, every member of that (SIGSTOP freezes it, SIGCONT thaws it)."""
        if w.cgroup is not None:
            self.processes.signal_cgroup(w.cgroup, sig)
            return
        self.processes.signal_group(w.child.pid, sig)
        for pidfd in w.escaped.values():
            self.processes.pidfd_signal(pidfd, sig)

    def _find_escaped(self, w: Worker, stats: dict, descendants: list[int]) -> None:
        """Hold the worker's ``descendants`` that are outside its process group by pidfds.

        ``stats`` (pid -> ProcStat) is the refresh's snapshot; a process newer than it is found
        at the next refresh."""
        for pid in descendants:
            stat = stats.get(pid)
            if pid in w.escaped or stat is None or stat.pgrp == w.child.pid or stat.state == "Z":
                continue
            pidfd = self.processes.open_pidfd(pid, stat.start_ticks, self.proc)
            if pidfd is not None:
                self._hold_escaped(w, pid, pidfd)

    def _hold_escaped(self, w: Worker, pid: int, pidfd: int) -> None:
        w.escaped[pid] = pidfd
        self.loop.watch(pidfd, lambda: self._escaped_exited(w, pid))
        log.info("worker %d (batch %s, task %d): process %d left its process group; it is paused, continued and "
                 "ended with the worker", w.child.pid, w.run.id, w.task.index, pid)
        if w.life.signal_stopped:
            self.processes.pidfd_signal(pidfd, signal.SIGSTOP)  # it belongs to a stopped worker

    def _escaped_exited(self, w: Worker, pid: int) -> None:
        pidfd = w.escaped.pop(pid, None)
        if pidfd is not None:
            self.loop.unwatch(pidfd)
            self.processes.reap_if_ours(pid)
            os.close(pidfd)

    def reap_orphans(self) -> None:
        """Housekeeping: processes that left their worker's tree were re-parented to pmlmd (the
        subreaper); those that have ended since are reaped here while no worker is left, whose
        refresh would look for them (_adopt_orphans_due), so that none stays a zombie."""
        if not self.workers:
            self._adopt_orphans()

    def _adopt_orphans(self, exited: Worker | None = None) -> None:
        """Take charge of the processes re-parented to pmlmd: each belongs to a worker (or a past one).

        A process is attributed by the worker identity in its environment. One whose environment
        cannot be read (it is in the middle of an execve) and that shows up as ``exited`` is
        reaped belongs to that worker: its exit is what re-parented it.
        """
        if not self.subreaper:
            return
        known = set(self.workers) | set(self.strays)
        for w in self.workers.values():
            known.update(w.escaped)
        by_id = None
        for pid in self.proc.children(os.getpid()):
            if pid in known:
                continue
            stat = self.proc.pid_stat(pid)
            if stat is None:
                continue
            if stat.state == "Z":
                self.processes.reap_if_ours(pid)  # an orphan that ended before anyone looked
                continue
            if self.cgroups is not None and self.cgroups.member_of(pid) is not None:
                continue  # its worker's cgroup holds it: it is paused, counted and ended with it
            pidfd = self.processes.open_pidfd(pid, stat.start_ticks, self.proc)
            if pidfd is None:
                continue
            if by_id is None:
                by_id = {w.worker_id: w for w in self.workers.values()}
            identity = lineage.worker_id_of(self.proc.environ(pid))
            owner = by_id.get(identity) if identity is not None else exited
            if owner is not None and owner.child.pid in self.workers:
                self._hold_escaped(owner, pid, pidfd)
            else:
                log.info("process %d, left behind by an ended worker, is ended too", pid)
                self._add_stray(pid, pidfd, STRAY_GRACE)

    def _add_stray(self, pid: int, pidfd: int, grace: float) -> None:
        """End a process its worker left behind: SIGTERM now, SIGKILL after ``grace`` seconds."""
        if pidfd in self.loop.callbacks:
            self.loop.unwatch(pidfd)  # it was watched as an escaped process of a live worker
        self.strays[pid] = Stray(pidfd=pidfd, kill_at=self.clock.monotonic() + grace)
        self.loop.watch(pidfd, lambda: self._stray_exited(pid))
        self.processes.pidfd_signal(pidfd, signal.SIGTERM)
        self.processes.pidfd_signal(pidfd, signal.SIGCONT)

    def _stray_exited(self, pid: int) -> None:
        stray = self.strays.pop(pid, None)
        if stray is not None:
            self.loop.unwatch(stray.pidfd)
            self.processes.reap_if_ours(pid)
            os.close(stray.pidfd)

    def _modes(self, run: BatchRun) -> lifecycle.Modes:
        spec, agent = run.batch.spec, self.agent is not None
        return lifecycle.Modes(pause_by_agent=agent and spec.pause_mode == "agent",
                               terminate_by_agent=agent and spec.term_mode == "agent", grace=spec.term_grace,
                               agent_timeout=spec.agent_timeout, timeout=spec.timeout)

    def _carry(self, w: Worker, event: lifecycle.Event, now: float) -> None:
        """Hand ``event`` to the worker's lifecycle (Supervisor.handle) and carry out what it says."""
        self._do(w, self.supervisor.handle(w.child.pid, w, event, now))

    def _do(self, w: Worker, effects: list[lifecycle.Effect]) -> None:
        """Carry out what the worker's lifecycle said, in order."""
        for effect in effects:
            match effect:
                case lifecycle.Signal(sig):
                    self._signal(w, sig)
                case lifecycle.Ask(command):
                    self.agent.request(w.worker_id, w.child.pid, command, w.run.batch.spec.agent_timeout, _uid(w), w)
                case lifecycle.Remeasure():  # its last reading covers the time it stood still
                    w.cpu, w.ticks, w.measured_at = None, None, None
                    self.settled = -1  # not known to stand still until measured again
                case lifecycle.Reason(text, append):
                    w.attempt.reason = f"{w.attempt.reason or ''} {text}".strip() if append else text
                case lifecycle.Log(text):
                    log.info("worker %d %s", w.child.pid, text)
                case lifecycle.TimedOut():
                    self.on_event(events.Timeout(w.run.id, w.task.index, w.child.pid))
                case lifecycle.Disobeyed(one_cpu, growth):
                    log.warning("worker %d acknowledged an agent pause but kept working (%.0f%% of a CPU, %+.1f MiB/s): "
                                "SIGSTOP", w.child.pid, one_cpu, growth / (1 << 20),
                                extra=decision_fields(batch_id=w.run.id, task_index=w.task.index,
                                                      worker_pid=w.child.pid, decision=PAUSE,
                                                      rule="agent-noncompliant",
                                                      reason="kept working while paused through the agent channel"))
                    self.on_event(events.Noncompliant(w.run.id, w.task.index, w.child.pid, round(one_cpu, 1)))

    def let_go(self, w: Worker) -> None:
        """pmlmd stops watching: a paused or held worker is continued (and told so in agent mode)."""
        self._carry(w, lifecycle.Resume(), self.clock.monotonic())

    def on_agent_ack(self, req) -> None:
        """A worker acknowledged a request of the agent channel."""
        w = req.context
        if self.workers.get(w.child.pid) is not w:
            return  # it has gone meanwhile
        log.debug("worker %d acknowledged %s", w.child.pid, req.command)
        self._carry(w, lifecycle.AgentAck(req.command), self.clock.monotonic())

    def _agent_expired(self, now: float) -> None:
        for req in self.agent.expired(now):
            w = req.context
            if self.workers.get(w.child.pid) is w:
                self._carry(w, lifecycle.AgentExpired(req.command), now)

    def _spawn(self, run: BatchRun, task: Task) -> None:
        attempt_no = len(task.attempts) + 1
        env = {b"PMLM_TASK_INDEX": b"%d" % task.index, b"PMLM_ATTEMPT": b"%d" % attempt_no}
        if task.line is not None:
            env[b"PMLM_TASK"] = tasklines.raw(task.line)
        if self.agent is not None and run.batch.spec.uses_agent:
            env.update(self._environ(self.agent.environment(f"{run.id}.{task.index}.{attempt_no}", _owner_uid(run))))
        if run.environ is None:
            run.environ = self._environ(dict(self.base_env if run.env is None else run.env, PMLM_BATCH_ID=run.id))
        # As bytes, converted once per batch: exec gets exactly the bytes that were submitted,
        # whatever encoding pmlmd's locale would have chosen (see tasklines).
        environ = {**run.environ, **env}
        argv = worker_argv(run, task.line)
        credentials = run.owner if run.owner is not None and os.geteuid() == 0 else None
        if credentials == procctl.own_credentials():
            credentials = None  # nothing to take on (root's own batches)
        # Another user's worker starts through setpriv, as root until it has taken on the ids: its
        # variables then reach it through the gate (see gated).
        carry = credentials is not None
        rlimits = {**self.worker_rlimits, **(run.rlimits or {})}
        # Limits pmlmd can hand on by taking them on itself for the start spare the gate's exec.
        inherited = (procctl.inheritable(rlimits, self.descriptors) if rlimits and not carry
                     and not self.scopes.gated else None)
        gate_r = gate_w = env_fd = None
        outputs = None
        try:
            if self.output is not None:
                outputs = self.output.open(run, task, attempt_no)
            if self.scopes.gated or carry or (rlimits and inherited is None):
                # The worker waits at the gate until it is in its scope and has its limits.
                gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            command = [tasklines.raw(word) for word in argv]
            if gate_r is not None:
                command, environ, variables = gated(rlimits, command, environ, carry=carry)
                if variables:
                    env_fd = memfd("pmlm-env", variables)
            with (self.cgroups.starting(f"{run.id}.{task.index}.{attempt_no}")
                  if self.cgroups is not None and not self.cgroups.gated else contextlib.nullcontext()) as cgroup:
                child = self.processes.spawn(command, environ, stdout_fd=outputs[0] if outputs else self.stdout_fd,
                                      stderr_fd=outputs[1] if outputs else None, stdin_fd=gate_r, cwd=run.cwd,
                                      credentials=credentials, umask=run.umask, proc=self.proc,
                                      env_fd=env_fd, rlimits=inherited or None)
            self.descriptors += FDS_PER_WORKER + (2 if outputs else 0)
        except (OSError, DirectoryError) as e:  # a cgroup made for it is gone again (cgroup.Subtree.starting)
            if self.output is not None:
                self.output.failed(run, task)
            for fd in (gate_r, gate_w, env_fd):
                if fd is not None:
                    os.close(fd)
            if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
                self._defer(run, task, attempt_no, e)
                return
            attempt = run.batch.start_attempt(task, None, self.clock.wall())
            # Either fails the attempt like an exit status would: the task counts it against --retry-failed.
            if isinstance(e, DirectoryError):
                cause, attempt.exit_code, attempt.reason = CAUSE_CWD, 126, str(e)
            else:
                cause, attempt.exit_code = CAUSE_SPAWN_FAILED, 127 if isinstance(e, FileNotFoundError) else 126
                attempt.reason = f"cannot execute {argv[0]!r}: {e.strerror}"
                if e.errno == errno.E2BIG:
                    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
                    room = "" if stack == resource.RLIM_INFINITY else f" ({stack // 4} bytes here)"
                    attempt.reason += (": its arguments and environment together exceed what exec takes, a quarter "
                                       f"of pmlmd's stack limit{room}; pass fewer or smaller arguments or variables")
            run.batch.end_attempt(task, attempt, attempt.start, cause)
            self.on_event(events.End(run.id, task.index, attempt.number, pid=None, exit_code=None, signal=None,
                                     cause=cause, status=task.status, reason=attempt.reason))
            self._settle(run)
            self._finish_if_done(run)
            return
        if gate_r is not None:
            os.close(gate_r)
            if env_fd is not None:
                os.close(env_fd)
        attempt = run.batch.start_attempt(task, child.pid, self.clock.wall())
        if self.output is not None:
            self.output.spawned(run, task, attempt)
        worker = Worker(child=child, run=run, task=task, attempt=attempt, life=self._born(run, attempt, child),
                        cgroup=cgroup)
        self._watch(worker)
        if gate_w is None:
            return
        if self.scopes.gated:
            self._place(worker, gate_w)  # opens the gate once placed: now, or when systemd has made the scope
        else:
            open_gate(gate_w)

    @staticmethod
    def _environ(env: dict[str, str]) -> dict[bytes, bytes]:
        return {tasklines.raw(name): tasklines.raw(value) for name, value in env.items()}

    def _place(self, w: Worker, gate_w: int) -> None:
        """Put a gated worker into its batch's scope, then open its gate (``gate_w``): into a cgroup
        of its own below the scope where the scopes' cgroups are pmlmd's (cgroup.Scoped), with no
        D-Bus call once the batch's first worker has made the scope; else into the scope itself
        (followed through /proc). Calls to systemd are made off the loop (scopes.OffLoop): the
        worker waits at its gate meanwhile, watched like any other, and so do the batch's workers
        started before its scope is there."""
        run = w.run
        if self.cgroups is None:
            self._attach(w, gate_w)
            return
        waiting = self.placing.get(run.id)
        if waiting is not None:
            waiting.append((w, gate_w))
            return
        tree = self.cgroups.tree(run.id)
        if tree is not None:
            self._into_tree(w, gate_w, tree)  # (made again with this worker, should systemd have removed it)
            return
        self.placing[run.id] = [(w, gate_w)]
        self.scopes.place_later(run.id, run.scope_description, w.child.pid, False,
                                lambda scope: self._scope_made(run, scope))

    def _scope_made(self, run: BatchRun, scope: str | None) -> None:
        """systemd made the batch's scope (``scope``: its cgroup) with its first worker, or did not
        (None, logged): the workers that waited for it go below it, or run where they are."""
        waiting = self.placing.pop(run.id, [])
        if self.runs.get(run.id) is not run:
            # The batch ended while systemd made its scope (its workers were ended before they ran).
            self.remade.pop(run.id, None)
            if scope is not None:
                self.scopes.stop(run.id)
            for _, gate_w in waiting:
                os.close(gate_w)
            return
        tree = self.cgroups.open(run.id, scope) if scope is not None else None
        if tree is None:
            self.scopes.forget(run.id)
            live = []
            for w, gate_w in waiting:
                if self.workers.get(w.child.pid) is w:
                    live.append((w, gate_w))
                else:
                    os.close(gate_w)  # it ended at its gate
            # The process the scope was made with (or was to be) ended at its gate, and the scope
            # with it; or systemd was still removing the scope of the batch's last worker, and
            # pmlmd joined that one: made again with the first worker that waits (a few times).
            lost = scope is not None and self.remade.get(run.id, 0) < SCOPE_REMAKES
            if live and (live[0] is not waiting[0] or lost):
                self.remade[run.id] = self.remade.get(run.id, 0) + 1
                self.placing[run.id] = live
                self.scopes.place_later(run.id, run.scope_description, live[0][0].child.pid, False,
                                        lambda made: self._scope_made(run, made))
                return
            waiting = live  # systemd did not make it (logged): they run where they are
        self.remade.pop(run.id, None)
        for w, gate_w in waiting:
            if tree is None:
                open_gate(gate_w)
            else:
                self._into_tree(w, gate_w, tree)

    def _into_tree(self, w: Worker, gate_w: int, tree: cgroups_module.Subtree) -> None:
        """Move a gated worker into a cgroup of its own below its batch's scope, then let it go;
        into the scope itself where that fails (logged by tree.place)."""
        if self.workers.get(w.child.pid) is not w:
            os.close(gate_w)  # it ended at its gate
            return
        cgroup = tree.place(w.worker_id, w.child.pid) if os.path.isdir(tree.root) else None
        if cgroup is None and not os.path.isdir(tree.root) and self.cgroups.tree(w.run.id) is tree:
            # systemd removed (or is removing) the scope once the batch's last worker had gone:
            # made again with this one.
            self.scopes.forget(w.run.id)
            self._drop_tree(w.run.id)
            self._place(w, gate_w)
            return
        if cgroup is None:
            self._attach(w, gate_w)
            return
        w.cgroup = cgroup
        self.uncontained -= 1
        # Its CPU time is now the new cgroup's (from zero), its memory the kernel's count: the
        # next reading starts its rates afresh rather than against the /proc figures of its gate.
        w.cpu, w.ticks, w.measured_at = None, None, None
        self.settled = -1
        self._guard(tree)  # once its first worker has left the scope's own cgroup
        open_gate(gate_w)

    def _attach(self, w: Worker, gate_w: int) -> None:
        """Put a gated worker into its batch's scope itself (followed through /proc there). Once
        it is in (or logged why not), the cgroup whose cpu.stat says it is idle is looked up again
        (Worker.scope_stat), and it goes on."""
        def attached(path: str | None) -> None:
            w.scope_stat = None
            open_gate(gate_w)

        self.scopes.place_later(w.run.id, w.run.scope_description, w.child.pid, True, attached)

    def _drop_tree(self, batch_id: str) -> None:
        """The batch's scope is over (or gone, or no longer pmlmd's): its subtree and guard go."""
        if self.cgroups is not None and self.cgroups.gated:
            tree = self.cgroups.drop(batch_id)
            if tree is not None:
                self._unguard(tree.root)

    def _spawn_room(self) -> int:
        """How many workers pmlmd can start and still supervise: a descriptor each, and a reserve."""
        if self.clock.monotonic() < self.spawn_blocked_until:
            return 0
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            in_use = self.descriptors = len(os.listdir("/proc/self/fd"))
        except OSError:
            return 0  # not even a descriptor to look: no room
        room = (soft - in_use - FD_RESERVE) // (FDS_PER_WORKER + (2 if self.output is not None else 0))
        if room <= 0:
            self._log_shortage(f"{in_use} of {soft} open files in use")
        return max(room, 0)

    def _defer(self, run: BatchRun, task: Task, attempt_no: int, error: OSError) -> None:
        """A spawn failed for want of a resource pmlmd or the user needs (fds, processes, memory):
        the task goes back to the front of its queue, with no attempt counted, and admission
        waits a moment before it tries again."""
        task.status = QUEUED
        run.batch.queue.appendleft(task)
        if self.agent is not None:
            self.agent.worker_gone(f"{run.id}.{task.index}.{attempt_no}", _owner_uid(run))
        self.spawn_blocked_until = self.clock.monotonic() + RESOURCE_BACKOFF
        self._log_shortage(f"cannot start a worker for task {task.index} of batch {run.id}: {error.strerror}")
        self.on_event(events.Deferred(run.id, task.index, CAUSE_RESOURCE, error.strerror))

    def _log_shortage(self, what: str) -> None:
        now = self.clock.monotonic()
        if now >= self.resource_log_at:
            log.warning("admitting no more workers for now: %s (tasks wait in their queue)", what)
            self.resource_log_at = now + RESOURCE_LOG_EVERY

    def adopt(self, run: BatchRun, task: Task, attempt: Attempt, child: procctl.Child, terminate: bool = False) -> None:
        """Watch a worker that a previous daemon started (it is not our child): running, whatever
        that daemon left it in (lifecycle.adopted); with ``terminate`` (stranded = "terminate")
        ended as pmlmd ends a worker, its attempt with cause daemon-restart."""
        task.status = "running"
        worker = Worker(child=child, run=run, task=task, attempt=attempt, life=self._born(run, attempt, child))
        cgroup = self.cgroups.cgroup_of(child.pid) if self.cgroups is not None else None
        if cgroup is not None and cgroup.worker_id == worker.worker_id:
            worker.cgroup = cgroup
            if self.cgroups.gated:
                self._guard(self.cgroups.adopt(run.id, cgroup))
        if self.output is not None:
            self.output.adopted(run, task, attempt)
        self._watch(worker)
        self._do(worker, self.supervisor.adopt(worker.child.pid, worker, self.clock.monotonic(), terminate))

    def _born(self, run: BatchRun, attempt: Attempt, child: procctl.Child) -> lifecycle.Life:
        modes = self._modes(run)
        timeout_at = None
        if modes.timeout is not None:
            # From the attempt's start: an adopted worker's time before the restart counts (its pauses too).
            timeout_at = self.clock.monotonic() + modes.timeout - max(0.0, self.clock.wall() - attempt.start)
        return lifecycle.born(modes, child.started, timeout_at)

    def _watch(self, worker: Worker) -> None:
        self.settled = -1  # a new worker, not measured yet: not known to stand still
        self.supervisor.add(worker.child.pid, worker)
        self.uncontained += worker.cgroup is None
        self.loop.watch(worker.child.pidfd, lambda: self._reap(worker))
        self.on_event(events.Start(worker.run.id, worker.task.index, worker.attempt.number, worker.child.pid,
                                   worker.child.start_ticks))

    def _terminate(self, w: Worker, cause: str, reason: str | None) -> None:
        self._carry(w, lifecycle.Terminate(cause, reason), self.clock.monotonic())

    def _kill(self, w: Worker, cause: str, reason: str | None) -> None:
        self._carry(w, lifecycle.Kill(cause, reason), self.clock.monotonic())

    def _enforce_deadlines(self, now: float) -> None:
        if self.agent is not None:
            self._agent_expired(now)
        due, self.workers_due = self.workers_due, -math.inf  # a tick without next_deadline looks at all
        for pid in self.supervisor.due(now) if now >= due else ():
            w = self.workers.get(pid)  # one ended by an earlier Tick's effects is gone
            if w is not None and w.life.due is not None and now >= w.life.due:
                self._carry(w, lifecycle.Tick(), now)
        for rest, deadline in list(self.stragglers.items()):
            if self._gone(rest):
                del self.stragglers[rest]
            elif now >= deadline:
                self._kill_rest(rest)
                self.stragglers[rest] = float("inf")
        for stray in self.strays.values():
            if now >= stray.kill_at:
                self.processes.pidfd_signal(stray.pidfd, signal.SIGKILL)
                stray.kill_at = float("inf")

    def _reap(self, w: Worker) -> None:
        ended = self.processes.reap(w.child)
        if ended is None:
            return
        self.loop.unwatch(w.child.pidfd)
        os.close(w.child.pidfd)
        # Its children were re-parented to pmlmd when it exited: attribute them while it is still known
        # (in its cgroup, if it had one: they are ended with it below).
        if w.cgroup is None:
            self._adopt_orphans(exited=w)
        self._forget(w)
        self.clocks.forget(_threads(w.runtimes))
        if self.agent is not None:
            self.agent.worker_gone(w.worker_id, _uid(w))
        now = self.clock.wall()
        run, a = w.run, w.attempt
        end_cause = w.life.cause
        a.stop_path = w.life.stop_path if end_cause else None
        a.exit_code, a.signal, a.cpu_seconds = ended.exit_code, ended.signal, ended.cpu_seconds
        a.peak_rss = max(w.peak_rss, ended.max_rss)
        run.finished.add(a.peak_rss, 100.0 * ended.cpu_seconds / max(now - a.start, 1e-3) / self.node.cpu_count)
        if w.life.noncompliant:
            a.reason = "; ".join(filter(None, [NONCOMPLIANT_NOTE, a.reason]))
        if w.escaped:
            a.reason = "; ".join(filter(None, [a.reason, f"left {len(w.escaped)} processes outside its process "
                                                         "group behind: ended with it"]))
        left = w.cgroup.pids() if w.cgroup is not None else []
        if left:
            a.reason = "; ".join(filter(None, [a.reason, f"left {len(left)} processes behind in its cgroup: "
                                                         "ended with it"]))
        if end_cause is None and w.cgroup is not None and self.guards and w.cgroup.oom_kills():
            # The kernel ended it at the guard's memory.max (free memory at the floor): a memory
            # termination like the governor's, requeued by the same rule.
            end_cause = CAUSE_GOVERNOR_MEMORY
            a.reason = "; ".join(filter(None, [a.reason, "ended by the kernel's OOM killer at pmlmd's memory.max "
                                                         "line (free memory at the floor)"]))
        cause = end_cause or (CAUSE_EXIT if ended.known else CAUSE_DAEMON_RESTART)
        if not ended.known and end_cause is None:
            a.reason = "adopted after a daemon restart: its exit status could not be read"
        run.batch.end_attempt(w.task, a, now, cause)
        self._settle(run)
        if self.output is not None:
            self.output.ended(run, w.task, a)
        self.on_event(events.End(run.id, w.task.index, a.number, pid=w.child.pid, exit_code=a.exit_code,
                                 signal=a.signal, cause=a.cause, status=w.task.status, reason=a.reason))
        # Whatever the leader left behind in its group goes with it (like a scope's KillMode).
        if w.cgroup is not None:
            if left or not self._gone(w.cgroup):
                self.processes.signal_cgroup(w.cgroup, signal.SIGTERM)
                self.processes.signal_cgroup(w.cgroup, signal.SIGCONT)
                self.stragglers[w.cgroup] = self.clock.monotonic() + run.batch.spec.term_grace
        elif self.processes.group_alive(w.child.pid):
            self.processes.signal_group(w.child.pid, signal.SIGTERM)
            self.processes.signal_group(w.child.pid, signal.SIGCONT)
            self.stragglers[w.child.pid] = self.clock.monotonic() + run.batch.spec.term_grace
        # And so does what left the group.
        for pid, pidfd in w.escaped.items():
            self._add_stray(pid, pidfd, run.batch.spec.term_grace)
        self.next_sample_at = 0.0  # a slot is free: decide again now
        self._finish_if_done(run)

    def _finish_if_done(self, run: BatchRun) -> None:
        self._halt_if_due(run)
        if run.batch.queue or any(w.run is run for w in self.workers.values()) or run.id not in self.runs:
            return
        if run.intake is not None and not run.intake.closed:
            # Open until it takes no more and holds nothing; then it finishes once the intake has closed.
            if not self._taking(run) and not run.held and not run.deliveries and not run.intake_closing:
                run.intake_closing = True
                run.intake.close()
            return
        run.batch.finished = self.clock.wall()
        self.on_event(events.Finished(run.id, run.batch.exit_status(), run.batch.summary_line()))
        del self.runs[run.id]
        if run.thaw_owed:
            self._thaw(run)
        self.scopes.stop(run.id)
        self._drop_tree(run.id)  # the scope goes with its cgroups

    def _halt_if_due(self, run: BatchRun) -> None:
        """--halt: once the batch's bookkeeping says it halts (its queue already cancelled there),
        say so once and, for ``now``, terminate its running workers as a cancel does."""
        reason = run.batch.halt_reason
        if reason is None or run.halted:
            return
        run.halted = True
        log.info("batch %s: %s", run.id, reason)
        self.on_event(events.Halted(run.id, reason))
        if run.batch.spec.halt == HALT_NOW:
            self._stop_workers(run, f"batch {reason}")

    # --- queue batches (see intake) --------------------------------------------------------
    def _taking(self, run: BatchRun) -> bool:
        """Whether a queue batch still takes messages (admission counts it as wanting workers)."""
        b = run.batch
        return (run.intake is not None and run.intake_done is None and not run.intake_closing
                and b.cancel_reason is None and b.halt_reason is None and b.critical_reason is None)

    def _on_intake(self, run: BatchRun) -> None:
        intake = run.intake
        for event in intake.events():
            if event.kind == "delivery":
                self._delivered(run, event.delivery)
            elif event.kind == "depth":
                spec = run.batch.spec.intake
                if (spec.until_empty and event.depth == 0 and not run.deliveries and not run.batch.queue
                        and run.intake_done is None):
                    run.intake_done = "its queue is empty"
                    log.info("batch %s: queue %s is empty and nothing is in flight: taking no more", run.id,
                             spec.queue, extra={"BATCH_ID": run.id})
                    self._finish_if_done(run)
            elif event.kind == "state":
                spec = run.batch.spec.intake
                log.log(logging.WARNING if event.detail else logging.INFO, "batch %s: intake from queue %s: %s%s",
                        run.id, spec.queue, event.state, f" ({event.detail})" if event.detail else "",
                        extra={"BATCH_ID": run.id, "INTAKE_STATE": event.state, "INTAKE_QUEUE": spec.queue,
                               "INTAKE_CREDIT": str(intake.credit)})
                self.on_event(events.Intake(run.id, event.state, event.detail))
                if event.state == REFUSED and self.critical_finish and self._taking(run):
                    # In the foreground (pmlmctl run) nobody is there to put the broker right: give up.
                    run.batch.critical_reason = f"{REFUSED}: {event.detail}"
                    run.batch.cancel_queued()
                    self._settle(run)
                    self._finish_if_done(run)
            elif event.kind == "settled":
                d = event.delivery
                if d.task is not None and d.task < len(run.batch.tasks):
                    task = run.batch.tasks[d.task]
                    if task.message is not None:
                        task.message["settled"] = event.state
                    self.on_event(events.Settled(run.id, d.task, event.state, event.detail))
            elif event.kind == "closed":
                self.loop.unwatch(intake.fileno())
                intake.release()
                self._finish_if_done(run)
                return

    def _delivered(self, run: BatchRun, d) -> None:
        intake = run.intake
        if not self._taking(run):  # it came while the batch stopped taking: for another node
            intake.give_back(d)
            return
        line = tasklines.text(d.body)
        problem = "it holds a NUL byte" if "\0" in line else self._fit(run).problem(line)
        if problem is not None and len(d.body) > SHOWN_BODY:
            line = tasklines.text(d.body[:SHOWN_BODY]) + f"... ({len(d.body)} bytes)"  # kept: what it was, not all of it
        message = {"message_id": d.message_id, "redelivered": d.redelivered}
        task = run.batch.add_task(line, message, governor_ends=d.terminations)
        d.task = task.index
        run.deliveries[task.index] = d
        self.on_event(events.Added(run.id, task.index))
        if problem is not None:  # exec could not take it: not a task line, whichever node tries
            attempt = run.batch.fail_unrunnable(task, self.clock.wall(), CAUSE_BAD_MESSAGE,
                                                f"the message cannot be a task line: {problem}")
            self.on_event(events.End(run.id, task.index, attempt.number, pid=None, exit_code=None, signal=None,
                                     cause=CAUSE_BAD_MESSAGE, status=task.status, reason=attempt.reason))
            self._settle(run)
            self._finish_if_done(run)
            return
        self.next_sample_at = 0.0  # admit it now if there is room

    @staticmethod
    def _fit(run: BatchRun) -> tasklines.Fit:
        """Whether a message can be a task line of the batch (made once per batch)."""
        if run.fit is None:
            spec = run.batch.spec
            env = run.env if run.env is not None else tasklines.environment()
            limit = None
            if run.rlimits and resource.RLIMIT_STACK in run.rlimits:
                limit = tasklines.arg_max(run.rlimits[resource.RLIMIT_STACK][0])
            run.fit = tasklines.Fit(spec.command, spec.shell, env, limit, spec.append)
        return run.fit

    def _credit(self, run: BatchRun, decisions: list[Decision], running: int) -> None:
        """A queue batch's credit after a governor step (governor.intake_credit), and its
        deliveries that waited too long beyond it back to the queue (governor.give_back)."""
        intake = run.intake
        taking = self._taking(run)
        admitted = sum(d.count for d in decisions if d.action == SPAWN and d.batch == run.id)
        credit = intake_credit(run.held, taking, running, admitted, len(run.deliveries))
        before = intake.credit
        intake.set_credit(credit)
        if run.held or not taking:
            return
        if credit != before:
            log.debug("batch %s: intake credit %d (%d running, %d admitted)", run.id, credit, running, admitted,
                      extra={"BATCH_ID": run.id, "INTAKE_CREDIT": str(credit)})
        excess = len(run.deliveries) - credit
        if excess <= 0:
            return
        deliveries = run.deliveries
        queued = [(t.index, deliveries[t.index].received if t.index in deliveries else None) for t in run.batch.queue]
        for index in give_back(queued, excess, self.clock.monotonic()):
            task = run.batch.tasks[index]
            run.batch.queue.remove(task)
            task.status = RETURNED
            self.on_event(events.Returned(run.id, index, "waited for admission: back to its queue"))
        self._settle(run)
        self._finish_if_done(run)

    def _settle(self, run: BatchRun) -> None:
        """Settle the deliveries of a queue batch's tasks whose outcome is final (see intake)."""
        if not run.deliveries:
            return
        intake, tasks = run.intake, run.batch.tasks
        for index in [i for i in run.deliveries if tasks[i].status in FINISHED]:
            d, task = run.deliveries.pop(index), tasks[index]
            last = task.attempts[-1] if task.attempts else None
            if task.status == SUCCEEDED:
                intake.ack(d)
                settled = "acked"
            elif task.status == RETURNED and last is not None and last.cause == CAUSE_GOVERNOR_MEMORY:
                intake.send_back(d, task.governor_ends)
                settled = "sent back"
            elif task.status == RETURNED:
                intake.give_back(d)
                settled = "given back"
            else:
                cause = task.status if task.status != FAILED or last is None else last.cause
                reason = _end_text(task, run.batch.spec)
                intake.dead_letter(d, cause, reason, task.governor_ends)
                settled = "dead-lettered" if intake.exchange is not None else "rejected"
            task.message["settled"] = settled
            if settled in ("acked", "dead-lettered", "rejected"):  # final: a task sent back runs again somewhere
                intake.reply(d, self._outcome(run, task, settled))

    @staticmethod
    def _outcome(run: BatchRun, task: Task, settled: str) -> dict:
        """The result a queue batch publishes to a message's reply_to: the older tool's execution
        fields (task_id, error, critical, message) and what pmlmd knows of the task."""
        last = task.attempts[-1] if task.attempts else None
        ok = task.status == SUCCEEDED
        message = "succeeded" if ok else _end_text(task, run.batch.spec)
        return {"task_id": task.message.get("message_id"), "error": not ok, "critical": False, "message": message,
                "status": task.status, "settled": settled, "exit_status": last.exit_code if last else None,
                "signal": last.signal if last else None, "attempts": len(task.attempts),
                "cause": last.cause if last else None, "node": run.intake.node, "batch": run.id,
                "task_index": task.index,
                "duration_s": round(last.end - last.start, 3) if last and last.end is not None else None}

    # --- stopping ------------------------------------------------------------------------
    def _gone(self, rest: int | cgroups_module.Worker) -> bool:
        """Has an ended worker's rest (its process group, or its cgroup) gone? An empty cgroup is removed."""
        if isinstance(rest, int):
            return not self.processes.group_alive(rest)
        return rest.remove()

    def _kill_rest(self, rest: int | cgroups_module.Worker) -> None:
        if isinstance(rest, int):
            self.processes.signal_group(rest, signal.SIGKILL)
        else:
            self.processes.signal_cgroup(rest, signal.SIGKILL)

    def abandon(self) -> None:
        """On the way out for any reason, leave nothing running and nothing stopped."""
        for w in list(self.workers.values()):
            self._signal(w, signal.SIGKILL)
            self._signal(w, signal.SIGCONT)
            if w.child.adopted:
                continue
            os.waitpid(w.child.pid, 0)
            self.loop.unwatch(w.child.pidfd)
            os.close(w.child.pidfd)
        self.supervisor.clear()
        for rest in self.stragglers:
            self._kill_rest(rest)
            if isinstance(rest, int):
                self.processes.signal_group(rest, signal.SIGCONT)
        self.stragglers.clear()
        self.close()
        if self.cgroups is not None:
            self.cgroups.remove(wait=ABANDON_WAIT)  # each worker's cgroup, once the kernel has emptied it
        self._adopt_orphans()
        for pid in list(self.strays):
            stray = self.strays.pop(pid)
            self.processes.pidfd_signal(stray.pidfd, signal.SIGKILL)
            self.processes.pidfd_signal(stray.pidfd, signal.SIGCONT)
            self.loop.unwatch(stray.pidfd)
            self.processes.reap_if_ours(pid)
            os.close(stray.pidfd)

    # --- reporting -------------------------------------------------------------------------
    def count(self, state: str, run: BatchRun | None = None) -> int:
        """How many workers (of ``run``) are in ``state``."""
        if run is None:
            return self.supervisor.tally[state]
        return sum(1 for w in self.workers.values() if w.state == state and w.run is run)

    def _forget(self, w: Worker) -> None:
        self.supervisor.remove(w.child.pid)
        self.uncontained -= w.cgroup is None

    def withdraw(self, run: BatchRun) -> None:
        """Stop watching the batch's workers, leaving them as they are, and drop the batch."""
        for w in self.workers_of(run):
            self.loop.unwatch(w.child.pidfd)
            os.close(w.child.pidfd)
            self._forget(w)
        self.runs.pop(run.id, None)
        self._drop_tree(run.id)

    def _record(self, d: Decision, sample: NodeSample, w: Worker | None, run: BatchRun | None) -> None:
        latency_ms = (self.clock.monotonic() - sample.time) * 1000
        target = f" worker {w.child.pid} (batch {run.id}, task {w.task.index})" if w else ""
        count = f" {d.count} for batch {d.batch}" if d.action == SPAWN else ""
        free = free_bytes(sample, self.limits)
        # Admissions are routine, one per task ended when tasks are tiny: at INFO they would reach
        # journald's default rate limit (10,000 messages in 30 s per service) within seconds of a
        # batch of tiny tasks, and the journal would then drop pmlmd's pauses, terminations and
        # warnings with them. They are DEBUG; every decision is an event (pmlmctl events).
        level = logging.WARNING if d.rule == "floor" else logging.DEBUG if d.action == SPAWN else logging.INFO
        if log.isEnabledFor(level):
            fields = decision_fields(batch_id=run.id if run else None, task_index=w.task.index if w else None,
                                     worker_pid=w.child.pid if w else None, decision=d.action, rule=d.rule,
                                     reason=d.reason,
                                     cpu_pct=None if sample.cpu_pct is None else f"{sample.cpu_pct:.1f}",
                                     mem_free_pct=f"{100.0 * free / sample.mem_total:.1f}",
                                     latency_ms=f"{latency_ms:.3f}")
            log.log(level, "%s%s%s [%s]: %s", d.action, count, target, d.rule, d.reason, extra=fields)
        self.on_event(events.Decision(
            d.action, d.count or None, run.id if run else None, w.child.pid if w else None,
            w.task.index if w else None, d.rule, d.reason, None if sample.cpu_pct is None else round(sample.cpu_pct, 2),
            round(100.0 * free / sample.mem_total, 2), round(latency_ms, 3)))


SHOWN_BODY = 200  # bytes of a message that cannot be a task line kept as its line in the report


def _end_text(task: Task, spec) -> str:
    """How a task that did not succeed ended, with its last attempt's reason when that adds to it."""
    text = describe_end(task, spec)
    last = task.attempts[-1] if task.attempts else None
    if last is not None and last.reason and last.reason not in text:
        text += f": {last.reason}"
    return text


def _restored_counters(run: BatchRun) -> None:
    """A restored queue batch's intake figures, from its tasks (Task.message["settled"])."""
    c = run.intake.counters
    for task in run.batch.tasks:
        if task.message is None:
            continue
        c.consumed += 1
        settled = task.message.get("settled")
        if settled == "acked":
            c.acked += 1
        elif settled in ("given back", "sent back"):
            c.returned += 1
        elif settled == "dead-lettered":
            c.dead_lettered += 1
        elif settled == "rejected":
            c.rejected += 1


def _running_deliveries(run: BatchRun) -> int:
    """How many of a queue batch's held deliveries belong to tasks that have left its local queue."""
    queued = sum(1 for task in run.batch.queue if task.index in run.deliveries)
    return len(run.deliveries) - queued


@dataclass
class Stray:
    """A process that outlived the worker it left: being ended."""

    pidfd: int
    kill_at: float  # monotonic: SIGKILL if it is still there


def _threads(runtimes: dict[int, dict[int, int]]) -> set[tuple[int, int]]:
    """The (pid, tid) pairs of a Worker.runtimes."""
    return {(pid, tid) for pid, threads in runtimes.items() for tid in threads}


def _owner_uid(run: BatchRun) -> int | None:
    """Whose acknowledgements count for the batch's workers (None: the engine's own user, anyone it trusts)."""
    return run.owner.uid if run.owner is not None else None


def _uid(w: Worker) -> int | None:
    return _owner_uid(w.run)
