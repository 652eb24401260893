#!/usr/bin/env python3
"""An example worker for agent mode: it ignores SIGTERM and stops when the manager asks it to.

Like a Gearman or AMQP consumer it must never drop a task half done, so it ignores SIGTERM and asks
the manager between tasks instead. Run a batch of them with:

    pmlmctl run -n 4 --term-mode agent --pause-mode agent -- python3 examples/agent_worker.py 100

or alone, where there is no agent channel and it simply does its tasks:

    python3 examples/agent_worker.py 20

Argument: the number of tasks (default 50); each takes 0.1 s.
"""

from __future__ import annotations

import signal
import sys
import time

from pmlmd.agent import Agent, TerminationRequested

TASK_SECONDS = 0.1


def do_task(task: int) -> None:
    time.sleep(TASK_SECONDS)  # stands for real work: a task that must not be interrupted


def main(argv: list[str]) -> int:
    tasks = int(argv[1]) if len(argv) > 1 else 50
    # A signal could land in the middle of a task; the agent channel lets the manager ask for a
    # stop between tasks instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with Agent.from_env() as agent:
        channel = f"agent channel as worker {agent.worker_id}" if agent.enabled else "no agent channel"
        print(f"started with {channel}", flush=True)
        task = 0
        try:
            for task in range(tasks):
                agent.checkpoint()  # may stand still here while paused
                do_task(task)
                print(f"did task {task}", flush=True)
        except TerminationRequested:
            # Task `task` was taken but not started: a real consumer would hand it back to its
            # queue here, then close its connections.
            print(f"cleaned up task {task}", flush=True)
            return 0
    print(f"finished {tasks} tasks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
