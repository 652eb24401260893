"""The foreground runner behind ``pmlmctl run``: one batch, one engine, one loop.

Exits arrive through pidfds and signals through a wakeup fd, so the loop sleeps in
one poll until the next sample is due, a worker exits, a grace runs out or the user
presses Ctrl-C. No thread per worker, no polling of ``ps``.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Callable, TextIO

import zmq

from ..node import cgroup

from ..core import events
from ..node.agentchannel import AgentChannels
from ..core.batch import CANCELLED, FINISHED, Batch, BatchSpec
from ..engine import BatchRun, Engine
from ..node.loop import Loop
from ..node.joblog import Joblog
from ..core.governor import PAUSED, RUNNING, free_bytes
from ..node.output import Pipes
from ..core.progress import eta_seconds
from ..node.sampler import ProcReader

log = logging.getLogger("pmlmd.runner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Runner:
    def __init__(self, spec: BatchSpec, *, proc: ProcReader | None = None, stdout_fd: int | None = None,
                 trace: TextIO | None = None, on_progress: Callable[["Runner"], None] | None = None,
                 sinks_for: Callable | None = None, joblog: Joblog | None = None, worker_backend: str = "auto"):
        """With ``sinks_for(run, task, attempt_no) -> [output.Sink]`` workers write into pipes that
        pmlmctl reads and hands to those sinks; without, to ``stdout_fd`` (default pmlmctl's
        stdout) and pmlmctl's stderr, directly. ``joblog``: an open --joblog, written a line per
        ended attempt (the caller closes it). ``worker_backend``: cgroup.BACKENDS; raises
        cgroup.Unusable for "cgroup" where no cgroup2 subtree can be had."""
        self.trace = trace
        self.joblog = joblog
        self.on_progress = on_progress
        self.loop = Loop()
        self.pipes = Pipes(self.loop, sinks_for) if sinks_for is not None else None
        # A subtree of its own for its workers' cgroups, removed on the way out (Engine.abandon).
        self.cgroups = cgroup.choose(worker_backend, cgroup.subtree_name("pmlmctl", str(os.getpid())))
        if self.cgroups is not None:
            self.cgroups.remove_stale_siblings("pmlmctl")  # what runs killed with SIGKILL left
        self.engine = Engine(spec.limits, self.loop, proc=proc, stdout_fd=stdout_fd, on_event=self._on_event,
                             subreaper=True, output=self.pipes, cgroups=self.cgroups)
        log.info("workers in %s", cgroup.containment(self.cgroups))
        self.batch_run = self.engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits))
        self.batch = self.batch_run.batch
        self.interrupted_by: int | None = None
        self.task_times: list[float] = []  # wall times of finished tasks' last attempts, sorted (for the ETA)
        self.agent_dir = None
        if spec.uses_agent:
            # A private directory (mode 0700): only this user's workers reach the channel.
            self.agent_dir = tempfile.mkdtemp(prefix="pmlm-agent-")
            self.zmq = zmq.Context()
            self.engine.agent = AgentChannels(self.zmq, self.agent_dir, self.engine.on_agent_ack, self.loop,
                                              dir_mode=0o700)

    def run(self) -> Batch:
        self.loop.handle_signals(STOP_SIGNALS, self._on_signal)
        try:
            while self.engine.busy():
                self.loop.poll(self.engine.next_deadline() - time.monotonic())
                self.engine.tick()
                if self.on_progress:
                    self.on_progress(self)
        finally:
            self.engine.abandon()
            if self.pipes is not None:
                self.pipes.close_all()
            self.loop.close()
            if self.agent_dir is not None:
                self.engine.agent.close()
                self.zmq.term()
                shutil.rmtree(self.agent_dir, ignore_errors=True)
        return self.batch

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.interrupted_by is None:
            self.interrupted_by = signum
            log.warning("%s: cancelling the batch, terminating %d workers", name, len(self.engine.workers))
            self.engine.cancel(self.batch_run, f"received {name}")
        else:  # asked twice: no more grace
            self.engine.kill_all("batch cancelled")

    def progress(self) -> dict:
        """The numbers of the live status line. The ETA (progress.eta_seconds) comes from the wall
        times of the finished tasks' last attempts (``task_times``) and the start of the newest
        running worker; None until a task has finished."""
        total, done = len(self.batch.tasks), self.batch.done()
        starts = [w.attempt.start for w in self.engine.workers.values() if w.state == RUNNING]
        sample = self.engine.last_sample
        free_pct = None
        if sample is not None:
            free_pct = 100.0 * free_bytes(sample, self.engine.limits) / sample.mem_total
        youngest_age = time.time() - max(starts) if starts else None
        return {"done": done, "total": total, "running": len(starts),
                "paused": self.engine.count(PAUSED), "queued": len(self.batch.queue),
                "cpu_pct": sample.cpu_pct if sample else None, "free_pct": free_pct,
                "eta_s": eta_seconds(self.task_times, total - done, len(starts), youngest_age)}

    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, events.End) and event.status in FINISHED and event.status != CANCELLED:
            # A cancelled task was cut short: its time says nothing about the others'.
            attempt = self.batch.tasks[event.task].attempts[-1]
            if attempt.end is not None:
                bisect.insort(self.task_times, attempt.end - attempt.start)  # kept sorted: the median stays cheap
        self._trace(event)

    def _trace(self, event: events.Event) -> None:
        if self.joblog is not None and isinstance(event, events.End) and event.batch == self.batch_run.id:
            task = self.batch_run.batch.tasks[event.task]
            self.joblog.attempt_ended(self.batch_run.batch.spec, task, task.attempts[event.attempt - 1])
        if self.trace is None:
            return
        fields = event.wire().items()
        record = {"t": round(time.time(), 4), **{k: v for k, v in fields if v is not None and k != "batch"}}
        self.trace.write(json.dumps(record) + "\n")
        self.trace.flush()
