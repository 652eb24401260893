"""The batch runner: one event loop that samples, asks the governor, and acts.

Exits arrive through pidfds and signals through a wakeup fd, so the loop sleeps in
one ``select`` until the next sample is due, a worker exits, a grace runs out or
the user presses Ctrl-C. No thread per worker, no polling of ``ps``.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shlex
import signal
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from . import procctl
from .batch import (CAUSE_CANCELLED, CAUSE_EXIT, CAUSE_GOVERNOR_MEMORY, CAUSE_SPAWN_FAILED, Attempt, Batch,
                    BatchSpec, Task)
from .governor import (CONTINUE, CRITICAL, KILL, KILLED, PAUSE, PAUSED, RELEASING, RUNNING, SPAWN, TERMINATE,
                       TERMINATING, Decision, NodeSample, WorkerView, Workload, decide, free_bytes, next_interval)
from .sampler import CLOCK_TICKS, NodeSampler, ProcReader, group_usage

log = logging.getLogger("pmlmd.runner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FAST_REFRESH = 0.05  # near the memory limit, worker sizes are refreshed at least this often
STRAGGLER_POLL = 0.05  # how often to look whether leftover group members are gone


@dataclass
class Worker:
    child: procctl.Child
    task: Task
    attempt: Attempt
    state: str = RUNNING
    rss: int = 0
    peak_rss: int = 0
    rss_growth: float | None = None
    cpu: float | None = None
    ticks: int | None = None
    measured_at: float | None = None
    paused_at: float | None = None
    cpu_at_pause: float | None = None
    kill_at: float | None = None
    end_cause: str | None = None

    def view(self) -> WorkerView:
        return WorkerView(key=(self.child.pid, self.child.start_ticks), started=self.child.started, state=self.state, rss=self.rss,
                          rss_growth=self.rss_growth, cpu=self.cpu, paused_at=self.paused_at,
                          cpu_at_pause=self.cpu_at_pause)


def worker_argv(spec: BatchSpec, line: str | None) -> list[str]:
    """The command for one task: ``{}`` replaced by the task line (shell-quoted with --shell)."""
    if spec.shell:
        script = " ".join(spec.command)
        if line is not None:
            script = script.replace("{}", shlex.quote(line))
        return ["/bin/sh", "-c", script]
    if line is None:
        return list(spec.command)
    return [arg.replace("{}", line) for arg in spec.command]


class Runner:
    def __init__(self, spec: BatchSpec, *, proc: ProcReader | None = None, stdout_fd: int | None = None,
                 trace: TextIO | None = None, on_progress: Callable[["Runner"], None] | None = None):
        self.spec = spec
        self.limits = spec.limits
        self.proc = proc or ProcReader()
        self.node = NodeSampler(self.proc)
        self.stdout_fd = stdout_fd
        self.trace = trace
        self.on_progress = on_progress
        self.batch = Batch(spec, time.time())
        self.workers: dict[int, Worker] = {}
        self.stragglers: dict[int, float] = {}  # pgid -> when to SIGKILL what is left of the group
        self.selector = selectors.DefaultSelector()
        self.stop_signals: list[int] = []
        self.interrupted_by: int | None = None
        self.last_sample: NodeSample | None = None
        self.previous_sample: NodeSample | None = None
        self.next_sample_at = 0.0
        self.last_refresh = float("-inf")
        self.finished_rss = [0, 0]  # sum of peak RSS, count
        self.finished_cpu = [0.0, 0]  # sum of lifetime CPU share, count
        self.base_env = dict(os.environ)

    # --- the loop ------------------------------------------------------------------
    def run(self) -> Batch:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            while self.batch.queue or self.workers or self.stragglers:
                now = time.monotonic()
                for key, _ in self.selector.select(max(0.0, self._next_deadline() - now)):
                    if key.data is None:
                        _drain(wake_r)
                    else:
                        self._reap(key.data)
                self._handle_stop_signals()
                self._enforce_deadlines(time.monotonic())
                if time.monotonic() >= self.next_sample_at:
                    self._step()
                if self.on_progress:
                    self.on_progress(self)
        finally:
            self._abandon()
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self.selector.close()
            os.close(wake_r)
            os.close(wake_w)
        self.batch.finished = time.time()
        return self.batch

    def _next_deadline(self) -> float:
        deadline = self.next_sample_at
        for w in self.workers.values():
            if w.kill_at is not None:
                deadline = min(deadline, w.kill_at)
        if self.stragglers:
            deadline = min(deadline, time.monotonic() + STRAGGLER_POLL)
        return deadline

    def _on_signal(self, signum, frame):
        self.stop_signals.append(signum)

    # --- one governor step --------------------------------------------------------------
    def _step(self) -> None:
        sample = self.node.sample()
        free = free_bytes(sample, self.limits)
        self.batch.record_sample(sample.cpu_pct, free, sample.mem_total)
        limit = self.limits.memory_limit_bytes(sample.mem_total)
        near_memory_limit = free < limit + self.limits.memory_gap
        since_refresh = sample.time - self.last_refresh
        if self.workers and (since_refresh >= self.limits.window or (near_memory_limit and since_refresh >= FAST_REFRESH)):
            self._refresh_workers(sample.time)
        decisions: list[Decision] = []
        if self.interrupted_by is None and self.batch.critical_reason is None:
            views = [w.view() for w in self.workers.values()]
            decisions = decide(sample, views, self._workload(), self.limits)
            for decision in decisions:
                self._apply(decision, sample)
        if self.trace:
            self._trace({"event": "sample", "cpu_pct": _round(sample.cpu_pct), "free": free,
                         "free_pct": round(100.0 * free / sample.mem_total, 2), "running": self._count(RUNNING),
                         "paused": self._count(PAUSED), "queued": len(self.batch.queue)})
        if self.previous_sample is None or sample.time - self.previous_sample.time >= 0.005:
            interval = next_interval(self.previous_sample, sample, self.limits)
            self.previous_sample = sample
        else:  # samples taken right after a worker exit carry no rate information
            interval = next_interval(None, sample, self.limits)
        self.last_sample = sample
        self.next_sample_at = sample.time + interval

    def _workload(self) -> Workload:
        rss_sum, rss_n = self.finished_rss
        cpu_sum, cpu_n = self.finished_cpu
        for w in self.workers.values():
            if w.measured_at is not None:
                rss_sum += w.peak_rss
                rss_n += 1
            if w.state == RUNNING and w.cpu is not None:
                cpu_sum += w.cpu
                cpu_n += 1
        return Workload(queued=len(self.batch.queue), avg_rss=rss_sum / rss_n if rss_n else None,
                        avg_cpu=cpu_sum / cpu_n if cpu_n else None)

    def _refresh_workers(self, now: float) -> None:
        usage = group_usage(self.proc.all_pid_stats(), set(self.workers))
        for pgid, w in self.workers.items():
            u = usage.get(pgid)
            if u is None:
                continue
            if w.ticks is not None and w.measured_at is not None and now > w.measured_at:
                elapsed = now - w.measured_at
                w.cpu = 100.0 * (u.cpu_ticks - w.ticks) / CLOCK_TICKS / elapsed / self.node.cpu_count
                w.rss_growth = (u.rss - w.rss) / elapsed
            w.ticks, w.rss, w.measured_at = u.cpu_ticks, u.rss, now
            w.peak_rss = max(w.peak_rss, u.rss)
        self.last_refresh = now

    # --- carrying decisions out ------------------------------------------------------------
    def _apply(self, d: Decision, sample: NodeSample) -> None:
        if d.action == SPAWN:
            for _ in range(d.count):
                if not self.batch.queue:
                    break
                self._spawn(self.batch.next_task())
            self._record(d, sample, None)
            return
        if d.action == CRITICAL:
            self.batch.critical_reason = d.reason
            self.batch.cancel_queued()
            self._record(d, sample, None)
            return
        pid, start_ticks = d.worker
        w = self.workers.get(pid)
        if w is None or w.child.start_ticks != start_ticks:
            return
        if d.action == PAUSE:
            procctl.signal_group(w.child.pid, signal.SIGSTOP)
            w.state, w.paused_at, w.cpu_at_pause = PAUSED, sample.time, w.cpu
            w.attempt.pauses += 1
        elif d.action == CONTINUE:
            procctl.signal_group(w.child.pid, signal.SIGCONT)
            # Measure it afresh: its last reading covers the time it stood still.
            w.state, w.paused_at, w.cpu, w.ticks, w.measured_at = RUNNING, None, None, None, None
        elif d.action == TERMINATE:
            self._terminate(w, CAUSE_GOVERNOR_MEMORY, d.reason)
        elif d.action == KILL:
            self._kill(w, CAUSE_GOVERNOR_MEMORY, d.reason)
        self._record(d, sample, w)

    def _spawn(self, task: Task) -> None:
        attempt_no = len(task.attempts) + 1
        env = dict(self.base_env, PMLM_BATCH_ID=self.spec.batch_id, PMLM_TASK_INDEX=str(task.index),
                   PMLM_ATTEMPT=str(attempt_no))
        if task.line is not None:
            env["PMLM_TASK"] = task.line
        argv = worker_argv(self.spec, task.line)
        try:
            child = procctl.spawn(argv, env, stdout_fd=self.stdout_fd, proc=self.proc)
        except OSError as e:
            attempt = self.batch.start_attempt(task, None, time.time())
            attempt.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
            attempt.reason = f"cannot execute {argv[0]!r}: {e.strerror}"
            self.batch.end_attempt(task, attempt, attempt.start, CAUSE_SPAWN_FAILED)
            self._trace({"event": "end", "task": task.index, "attempt": attempt.number, "cause": CAUSE_SPAWN_FAILED,
                         "status": task.status, "reason": attempt.reason})
            return
        attempt = self.batch.start_attempt(task, child.pid, time.time())
        worker = Worker(child=child, task=task, attempt=attempt)
        self.workers[child.pid] = worker
        self.selector.register(child.pidfd, selectors.EVENT_READ, worker)
        self._trace({"event": "start", "task": task.index, "attempt": attempt.number, "pid": child.pid,
                     "start_ticks": child.start_ticks})

    def _terminate(self, w: Worker, cause: str, reason: str | None) -> None:
        procctl.signal_group(w.child.pid, signal.SIGTERM)
        # A stopped process cannot act on SIGTERM; it may be paused by us or stopped by anyone.
        procctl.signal_group(w.child.pid, signal.SIGCONT)
        w.state, w.kill_at, w.end_cause = TERMINATING, time.monotonic() + self.spec.term_grace, cause
        w.attempt.reason = reason

    def _kill(self, w: Worker, cause: str, reason: str | None) -> None:
        procctl.signal_group(w.child.pid, signal.SIGKILL)
        w.state, w.kill_at = KILLED, None
        if w.end_cause is None:
            w.end_cause, w.attempt.reason = cause, reason

    def _enforce_deadlines(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.state == TERMINATING and w.kill_at is not None and now >= w.kill_at:
                log.info("worker %d still alive %.1fs after SIGTERM: SIGKILL", w.child.pid, self.spec.term_grace)
                self._kill(w, w.end_cause, w.attempt.reason)
                w.attempt.reason = f"{w.attempt.reason or ''} (SIGKILL after {self.spec.term_grace:g}s grace)".strip()
        for pgid, deadline in list(self.stragglers.items()):
            if not procctl.group_alive(pgid):
                del self.stragglers[pgid]
            elif now >= deadline:
                procctl.signal_group(pgid, signal.SIGKILL)
                self.stragglers[pgid] = float("inf")

    def _reap(self, w: Worker) -> None:
        ended = procctl.reap(w.child)
        if ended is None:
            return
        self.selector.unregister(w.child.pidfd)
        os.close(w.child.pidfd)
        del self.workers[w.child.pid]
        now = time.time()
        a = w.attempt
        a.exit_code, a.signal, a.cpu_seconds = ended.exit_code, ended.signal, ended.cpu_seconds
        a.peak_rss = max(w.peak_rss, ended.max_rss)
        self.finished_rss[0] += a.peak_rss
        self.finished_rss[1] += 1
        wall = max(now - a.start, 1e-3)
        self.finished_cpu[0] += 100.0 * ended.cpu_seconds / wall / self.node.cpu_count
        self.finished_cpu[1] += 1
        self.batch.end_attempt(w.task, a, now, w.end_cause or CAUSE_EXIT)
        self._trace({"event": "end", "task": w.task.index, "attempt": a.number, "pid": w.child.pid,
                     "exit_code": a.exit_code, "signal": a.signal, "cause": a.cause, "status": w.task.status})
        # Whatever the leader left behind in its group goes with it (like a scope's KillMode).
        if procctl.group_alive(w.child.pid):
            procctl.signal_group(w.child.pid, signal.SIGTERM)
            procctl.signal_group(w.child.pid, signal.SIGCONT)
            self.stragglers[w.child.pid] = time.monotonic() + self.spec.term_grace
        self.next_sample_at = 0.0  # a slot is free: decide again now

    # --- stopping ------------------------------------------------------------------
    def _handle_stop_signals(self) -> None:
        while self.stop_signals:
            signum = self.stop_signals.pop(0)
            if self.interrupted_by is None:
                self.interrupted_by = signum
                name = signal.Signals(signum).name
                log.warning("%s: cancelling the batch, terminating %d workers", name, len(self.workers))
                self.batch.cancel_reason = f"received {name}"
                self.batch.cancel_queued()
                for w in list(self.workers.values()):
                    if w.state not in RELEASING:
                        self._terminate(w, CAUSE_CANCELLED, f"batch cancelled ({name})")
            else:  # asked twice: no more grace
                for w in list(self.workers.values()):
                    self._kill(w, CAUSE_CANCELLED, "batch cancelled")
                for pgid in self.stragglers:
                    procctl.signal_group(pgid, signal.SIGKILL)

    def _abandon(self) -> None:
        """On the way out for any reason, leave nothing running and nothing stopped."""
        for w in list(self.workers.values()):
            procctl.signal_group(w.child.pid, signal.SIGKILL)
            procctl.signal_group(w.child.pid, signal.SIGCONT)
            os.waitpid(w.child.pid, 0)
            os.close(w.child.pidfd)
        self.workers.clear()
        for pgid in self.stragglers:
            procctl.signal_group(pgid, signal.SIGKILL)
            procctl.signal_group(pgid, signal.SIGCONT)
        self.stragglers.clear()

    # --- reporting ------------------------------------------------------------------
    def _count(self, state: str) -> int:
        return sum(1 for w in self.workers.values() if w.state == state)

    def progress(self) -> dict:
        total, done = len(self.batch.tasks), self.batch.done()
        elapsed = time.time() - self.batch.started
        sample = self.last_sample
        free_pct = None
        if sample is not None:
            free_pct = 100.0 * free_bytes(sample, self.limits) / sample.mem_total
        return {"done": done, "total": total, "running": self._count(RUNNING), "paused": self._count(PAUSED),
                "queued": len(self.batch.queue), "cpu_pct": sample.cpu_pct if sample else None,
                "free_pct": free_pct, "eta_s": elapsed * (total - done) / done if done else None}

    def _record(self, d: Decision, sample: NodeSample, w: Worker | None) -> None:
        latency_ms = (time.monotonic() - sample.time) * 1000
        target = f" worker {w.child.pid} (task {w.task.index})" if w else ""
        count = f" {d.count}" if d.action == SPAWN else ""
        log.info("%s%s%s [%s]: %s", d.action, count, target, d.rule, d.reason)
        self._trace({"event": "decision", "decision": d.action, "count": d.count or None,
                     "pid": w.child.pid if w else None, "task": w.task.index if w else None, "rule": d.rule,
                     "reason": d.reason, "latency_ms": round(latency_ms, 3)})

    def _trace(self, record: dict) -> None:
        if self.trace is None:
            return
        record = {"t": round(time.time(), 4), **{k: v for k, v in record.items() if v is not None}}
        self.trace.write(json.dumps(record) + "\n")
        self.trace.flush()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
