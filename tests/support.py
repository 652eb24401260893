"""Test support shared by the host tiers: real pmlmctl and pmlmd processes, and waiting on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pmlmd.node.sampler import ProcReader
from pmlmd.node.scopes import NoScopes

HELPERS = Path(__file__).parent / "helpers"
BURN = str(HELPERS / "burn.py")
HOG = str(HELPERS / "hog.py")


def wait_for(predicate, timeout: float = 10.0, poll: float = 0.01, what: str = "condition"):
    """Wait until predicate() is truthy (an event we can only observe by looking)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def meminfo() -> dict[str, int]:
    return ProcReader().meminfo()


def read_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the last line may be half written
    return records


def group_states(pgid: int) -> str:
    """State letters of every live process in a process group; T also for one frozen with its cgroup
    (the cgroup backend pauses a worker with the cgroup freezer; a frozen process shows S or D)."""
    return "".join("T" if frozen(st.pid) else st.state for st in ProcReader().all_pid_stats()
                   if st.pgrp == pgid and st.state != "Z")


def process_state(pid: int) -> str:
    """The state letter of one process, T also when it is frozen with its cgroup (see group_states)."""
    with open(f"/proc/{pid}/stat") as f:
        letter = f.read().rsplit(")", 1)[1].split()[0]
    return "T" if letter != "Z" and frozen(pid) else letter


def frozen(pid: int) -> bool:
    """Is the process in a cgroup v2 that is frozen (cgroup.events "frozen 1")?"""
    from pmlmd.node import cgroup

    relative, mount = cgroup.own_cgroup(str(pid)), cgroup.cgroup2_mount()
    if not relative or relative == "/" or mount is None:
        return False
    try:
        with open(os.path.join(mount, relative.lstrip("/"), "cgroup.events")) as f:
            return "frozen 1" in f.read().splitlines()
    except OSError:
        return False


class PmlmRun:
    """One ``pmlmctl run`` process with a trace file, ended by the test or by teardown."""

    def __init__(self, tmp_path: Path, args: list[str], stdin=None):
        self.trace_path = tmp_path / f"trace-{id(self)}.jsonl"
        self.report_path = tmp_path / f"report-{id(self)}.json"
        cmd = [sys.executable, "-m", "pmlmd.client.ctl", "run", "--trace", str(self.trace_path),
               "--report", str(self.report_path), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
            self.proc.stdin = None
        self.stdout = self.stderr = None

    def wait(self, timeout: float = 60.0) -> int:
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def trace(self) -> list[dict]:
        return read_trace(self.trace_path)

    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def started_workers(self) -> list[dict]:
        return [r for r in self.trace() if r.get("event") == "start"]

    def kill_everything(self) -> None:
        """Teardown: end pmlmctl and every worker it started that is still the same process."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        reader = ProcReader()
        for start in self.started_workers():
            stat = reader.pid_stat(start["pid"])
            if stat is not None and stat.start_ticks == start["start_ticks"]:
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.killpg(start["pid"], sig)
                    except ProcessLookupError:
                        pass
        remove_cgroups("pmlmctl", str(self.proc.pid))


class EngineRun:
    """An engine on a loop of its own with one batch of ``tasks`` runs of ``command``, for tests
    that drive the engine step by step; every worker ends with the ``with``."""

    def __init__(self, command: list[str], tasks: int, limits=None, batch_id: str = "t", **engine_kw):
        from pmlmd.core.batch import Batch, BatchSpec
        from pmlmd.engine import BatchRun, Engine
        from pmlmd.node.loop import Loop
        from pmlmd.core.governor import Limits

        limits = limits or Limits(cpu_limit=100)
        self.loop = Loop()
        self.engine = Engine(limits, self.loop, **engine_kw)
        spec = BatchSpec(batch_id=batch_id, command=command, tasks=[None] * tasks, limits=limits)
        self.run = self.engine.add(BatchRun(batch=Batch(spec, time.time()), limits=spec.limits))

    def turn(self) -> None:
        self.loop.poll(0.05)
        self.engine.tick()

    def until(self, predicate, what: str, timeout: float = 30.0):
        """Turn the loop until ``predicate()`` holds."""
        return wait_for(lambda: (self.turn(), predicate())[1], timeout=timeout, what=what)

    def workers(self, n: int) -> list:
        """Turn the loop until ``n`` workers run; them, by task."""
        self.until(lambda: len(self.engine.workers) >= n, what=f"{n} workers started")
        return sorted(self.engine.workers.values(), key=lambda w: w.task.index)

    def __enter__(self) -> "EngineRun":
        return self

    def __exit__(self, *exc) -> None:
        self.engine.cancel(self.run, "the test ends")
        self.engine.abandon()
        self.loop.close()


def remove_cgroups(kind: str, key: str) -> None:
    """Teardown: kill what is left in the worker cgroups of a pmlmd or pmlmctl run (cgroup backend)
    and remove them, so that no test leaves cgroups behind."""
    from pmlmd.node import cgroup

    subtree = cgroup.existing(cgroup.subtree_name(kind, key))
    if subtree is not None:
        subtree.discard()


class CgroupScopes(NoScopes):
    """Stands in for systemd's transient scopes (scopes.SystemdScopes) where systemd is not PID 1
    (this host's unified hierarchy, the VM tier): a batch's scope is the cgroup
    ``SLICE/pmlm-ID.scope``, made as systemd makes it, with the batch's first worker in it (no
    freezing of whole scopes: NoScopes's). What systemd itself does is tested in the systemd
    tier (tests/systemd). ``discard`` kills whatever is left in the slice and removes it."""

    name = "systemd"
    gated = True

    def __init__(self, mount: str, slice_name: str):
        self.mount = mount
        self.slice = os.path.join(mount, slice_name)
        os.makedirs(self.slice, exist_ok=True)
        # systemd turns the controllers a delegated scope may have on down to it; so does this.
        for path in (mount, self.slice):
            with open(os.path.join(path, "cgroup.controllers")) as f:
                available = f.read().split()
            if "memory" in available:
                with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")

    def _path(self, batch_id: str) -> str:
        return os.path.join(self.slice, f"pmlm-{batch_id}.scope")

    def place(self, batch_id: str, description: str, pid: int, attach: bool = True) -> str | None:
        path = self._path(batch_id)
        new = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        if new or attach:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        return "/" + os.path.relpath(path, self.mount)

    def stop(self, batch_id: str) -> None:
        """As StopUnit: what is left in the scope is killed, and the scope goes once empty."""
        self._remove(self._path(batch_id))

    def scopes(self) -> list[str]:
        return [name[len("pmlm-"):-len(".scope")] for name in os.listdir(self.slice)]

    def _remove(self, path: str) -> None:
        if not os.path.isdir(path):
            return
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        for directory, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):  # deepest first
            wait_for(lambda: _rmdir(directory), timeout=10, what=f"{directory} emptied")

    def discard(self) -> None:
        for name in os.listdir(self.slice):
            self._remove(os.path.join(self.slice, name))
        os.rmdir(self.slice)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class MemorySampler:
    """Reads MemAvailable every few milliseconds in a thread, to see what the governor may miss."""

    def __init__(self, period: float = 0.002):
        self.period = period
        self.lowest = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        reader = ProcReader()
        while not self._stop.is_set():
            available = reader.meminfo()["MemAvailable"]
            if self.lowest is None or available < self.lowest:
                self.lowest = available
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Daemon:
    """A pmlmd process on a private socket and state dir, as an ordinary process (no systemd).

    Readiness is read from a real NOTIFY_SOCKET, the way systemd learns it, so tests
    wait for READY=1 instead of sleeping.
    """

    def __init__(self, base: Path, config: str = "", env: dict | None = None):
        import socket as socketlib

        self.base = base
        self.socket = str(base / "ctl.sock")
        self.state_dir = str(base / "state")
        self.config_path = base / "pmlmd.toml"
        self.config_path.write_text(config)
        self.log_path = base / "pmlmd.log"
        self.notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
        self.notify.bind(str(base / "notify.sock"))
        self.env = {**os.environ, "NOTIFY_SOCKET": str(base / "notify.sock"), **(env or {})}
        self.proc = None
        self.messages: list[str] = []

    def start(self, timeout: float = 20.0, prefix: tuple[str, ...] = ()) -> "Daemon":
        """Start pmlmd (behind ``prefix``, a command such as prlimit that execs the rest)."""
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pmlmd", "--config", str(self.config_path),
                                      "--socket", self.socket, "--state-dir", self.state_dir,
                                      "--log-target", "console"], stdout=self.log, stderr=self.log, env=self.env)
        self._listen()
        self.wait_notify("READY=1", timeout)
        return self

    def _listen(self) -> None:
        """Read notify messages for as long as the daemon runs, as systemd does.

        Unread, the socket fills (net.unix.max_dgram_qlen, 10 here) and pmlmd's next
        sd_notify blocks: the daemon would stop answering after some STATUS= updates.
        """
        import queue

        if getattr(self, "_reader", None) is not None:
            return
        self._queue = queue.Queue()
        self.notify.settimeout(0.2)

        def read():
            while self._reader is not None:
                try:
                    self._queue.put(self.notify.recv(4096).decode())
                except TimeoutError:
                    continue
                except OSError:  # closed at cleanup
                    return

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def wait_notify(self, wanted: str, timeout: float = 20.0) -> str:
        """Block until the daemon sends a notify message containing ``wanted``."""
        import queue

        self._listen()
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc is not None and self.proc.poll() is not None
            try:
                # Once it has exited, what it sent is still queued: read that without waiting.
                message = self._queue.get(timeout=0.3 if exited else max(0.01, min(deadline - time.monotonic(), 0.5)))
            except queue.Empty:
                if exited or time.monotonic() > deadline:
                    raise AssertionError(f"pmlmd sent no {wanted!r} (exit {self.proc.poll()}):\n{self.logs()}")
                continue
            self.messages.append(message)
            if wanted in message.split("\n"):
                return message

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def ctl(self, *args: str, timeout: float = 60.0, stdin: str | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", "--socket", self.socket, *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout, **kw)

    def client(self):
        from pmlmd.client.connection import Client
        return Client(self.socket)

    def worker_pids(self) -> list[tuple[int, int]]:
        """(pid, start ticks) of every worker the daemon recorded, for cleanup and checks."""
        import sqlite3

        db = Path(self.state_dir) / "state.db"
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            return [(pid, ticks) for pid, ticks in conn.execute(
                "SELECT pid, start_ticks FROM attempts WHERE pid IS NOT NULL AND start_ticks IS NOT NULL")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        reader = ProcReader()
        for pid, ticks in self.worker_pids():
            stat = reader.pid_stat(pid)
            if stat is not None and stat.start_ticks == ticks:
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.killpg(pid, sig)
                    except ProcessLookupError:
                        pass
        remove_cgroups("pmlmd", os.path.realpath(self.state_dir))
        self._reader = None
        self.notify.close()


def proc_limit(pid: int, name: str) -> tuple[str, str]:
    """(soft, hard) of a process's limit as /proc/PID/limits shows it, ``name`` e.g. "Max open files"."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith(name))
    return tuple(line[len(name):].split()[:2])
