"""Where a batch's workers live: a transient systemd scope per batch, or plain process groups.

With the ``systemd`` backend each batch gets ``pmlm-<batch id>.scope`` in ``pmlm.slice``,
created over the system bus (jeepney) with the batch's first worker and joined by the
later ones. Operators then see and account a batch with ``systemctl status``,
``systemd-cgls`` and ``systemctl show``; the workers outlive a restart of pmlmd (they
are not in pmlmd.service's cgroup); and a whole batch can be frozen at once.

A worker must be inside its scope before it runs the user's command, so with this
backend a worker starts as a gate (``/bin/sh`` waiting on its stdin) that pmlmd
releases once the pid is attached; the gate then execs the command in its place.

The kernel also holds two backstops that do not depend on pmlmd's sampling: TasksMax
and MemoryMax on pmlm.slice (all batches together) and on each scope (one batch),
from pmlmd.toml (``CgroupLimits``). They catch what the governor cannot: a fork bomb,
which no memory or CPU limit stops in time, and growth faster than a sample, or while
pmlmd is down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

from jeepney import DBusAddress, MatchRule, Properties, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

from pmlmd.node.cgroup import SCOPE_PREFIX, batch_of_scope, own_cgroup

log = logging.getLogger("pmlmd.scopes")

SLICE = "pmlm.slice"
SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
MANAGER = "org.freedesktop.systemd1.Manager"
SCOPE = "org.freedesktop.systemd1.Scope"
JOB_TIMEOUT = 5.0  # seconds to wait for systemd (placing workers waits off the loop, see OffLoop)

UINT64_MAX = (1 << 64) - 1  # systemd's "infinity" for TasksMax and MemoryMax on the bus


@dataclass(frozen=True)
class CgroupLimits:
    """TasksMax and MemoryMax for pmlm.slice and for each batch's scope, as pmlmd.toml gives them.

    Each value is "infinity", a number (tasks, or bytes), or a percentage such as "25%": of
    the node's maximum number of tasks, or of its physical memory.
    """

    slice_tasks_max: int | str
    slice_memory_max: int | str
    scope_tasks_max: int | str
    scope_memory_max: int | str

    @classmethod
    def of(cls, config) -> "CgroupLimits":
        return cls(config.slice_tasks_max, config.slice_memory_max, config.scope_tasks_max, config.scope_memory_max)

    def slice_properties(self) -> list[tuple[str, tuple[str, int]]]:
        return [("TasksMax", ("t", tasks_max(self.slice_tasks_max))),
                ("MemoryMax", ("t", memory_max(self.slice_memory_max)))]

    def scope_properties(self) -> list[tuple[str, tuple[str, int]]]:
        return [("TasksMax", ("t", tasks_max(self.scope_tasks_max))),
                ("MemoryMax", ("t", memory_max(self.scope_memory_max)))]

    def describe(self) -> str:
        """One line for the log: each setting, and what a percentage comes to on this node."""
        def shown(value, resolve) -> str:
            return f"{value} ({resolve(value)})" if isinstance(value, str) and value.endswith("%") else str(value)
        return (f"pmlm.slice TasksMax={shown(self.slice_tasks_max, tasks_max)} "
                f"MemoryMax={shown(self.slice_memory_max, memory_max)}; each batch scope "
                f"TasksMax={shown(self.scope_tasks_max, tasks_max)} "
                f"MemoryMax={shown(self.scope_memory_max, memory_max)}")


# Percentages are resolved here, as systemd resolves them in a unit file, and sent as numbers:
# systemd 252 (Debian 12) writes a TasksMax percentage received over the bus (TasksMaxScale)
# into the unit's drop-in ten times too small ("25%" becomes "2.6%"), so after the next
# daemon-reload (any package installation) a running batch would be left a tenth of its
# tasks (systemd issue 41009). Numbers also leave one drop-in per property on pmlm.slice,
# where a percentage and a number would leave two, of which the percentage wins on reload.
def tasks_max(value: int | str, kernel: str = "/proc/sys/kernel", cgroup: str = "/sys/fs/cgroup") -> int:
    """TasksMax as a number for the bus; a percentage is of the node's maximum number of tasks."""
    if not isinstance(value, str):
        return value
    if value == "infinity":
        return UINT64_MAX
    return node_tasks_max(kernel, cgroup) * _permyriad(value) // 10000


def memory_max(value: int | str, meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int:
    """MemoryMax in bytes for the bus; a percentage is of physical memory, rounded down to pages."""
    if not isinstance(value, str):
        return value
    if value == "infinity":
        return UINT64_MAX
    page = os.sysconf("SC_PAGESIZE")
    return node_memory(meminfo, cgroup) // page * _permyriad(value) // 10000 * page


def _permyriad(percent: str) -> int:
    return int(Decimal(percent.rstrip("%")) * 100)  # systemd's own precision: 0.01 %


def node_tasks_max(kernel: str = "/proc/sys/kernel", cgroup: str = "/sys/fs/cgroup") -> int:
    """What systemd takes a TasksMax percentage of: the smallest of kernel.threads-max, the
    highest pid (kernel.pid_max - 1) and the pids.max of the root cgroup (in a container)."""
    limits = [_read_int(f"{kernel}/threads-max"), _read_int(f"{kernel}/pid_max")]
    if limits[1] is not None:
        limits[1] -= 1
    limits.append(_read_int(f"{cgroup}/pids.max"))
    return min(n for n in limits if n) if any(limits) else UINT64_MAX


def node_memory(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int:
    """What systemd takes a MemoryMax percentage of: MemTotal, or the root cgroup's memory.max if lower."""
    with open(meminfo) as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    limit = _read_int(f"{cgroup}/memory.max")
    return min(total, limit) if limit else total


def _read_int(path: str) -> int | None:
    """A number from a /proc or cgroup file; None when it is missing or says "max"."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def scope_name(batch_id: str) -> str:
    return f"{SCOPE_PREFIX}{batch_id}.scope"


# done(path): called in the loop with the scope's cgroup (below the cgroup2 mount) or None.
Placed = Callable[[str | None], None]
# A FreezeUnit's or ThawUnit's answer: True done, False refused (no such scope, no cgroup2
# freezer), None unknown (no answer within JOB_TIMEOUT, or the bus connection failed: systemd may
# still carry the call out).
Answered = Callable[[bool | None], None]


class NoScopes:
    """Process groups only: every feature works, nothing is placed anywhere."""

    name = "none"
    gated = False
    fd: int | None = None  # readable when calls made off the loop have results (deliver)

    def place(self, batch_id: str, description: str, pid: int, attach: bool = True) -> str | None:
        return None

    def place_later(self, batch_id: str, description: str, pid: int, attach: bool, done: Placed) -> None:
        """``place``, with its result handed to ``done``: here at once; SystemdScopes calls
        systemd off the loop and calls ``done`` from ``deliver``."""
        done(self.place(batch_id, description, pid, attach))

    def deliver(self) -> None:
        pass

    def close(self) -> None:
        pass

    def forget(self, batch_id: str) -> None:
        pass

    def adopted(self, batch_id: str) -> None:
        pass

    def freeze_later(self, batch_id: str, done: Answered) -> None:
        """Freeze the batch's scope; ``done(answer)``: True (frozen), False (it cannot be) or None
        (unknown: no answer came). Here: no scope, at once False."""
        done(False)

    def thaw_later(self, batch_id: str, done: Answered | None = None) -> None:
        if done is not None:
            done(False)

    def thaw(self, batch_id: str) -> bool:
        return False

    def freezer_state(self, batch_id: str, state: str) -> str | None:
        return None

    def stop(self, batch_id: str) -> None:
        pass

    def scopes(self) -> list[str]:
        return []

    def scope_pids(self, batch_id: str) -> list[int]:
        return []


class OffLoop:
    """Calls to systemd made by a thread of their own, on a bus connection of their own, so that
    the loop that enforces the limits never waits on systemd (a scope starts in milliseconds, but
    a busy or stuck manager may take each call's JOB_TIMEOUT).

    ``submit(call, done)``: ``call(bus)`` runs in the thread, calls in the order submitted; its
    return value (or the exception it raised) is handed to ``done(value, error)`` by ``deliver``,
    which the loop calls when ``fd`` (an eventfd) is readable. ``pending``: calls submitted
    whose result has not been handed on yet.

    The connection is opened by ``submit``, in the loop's thread, never by the thread itself:
    pmlmd takes on a user's effective ids for a moment to open that user's files, and glibc
    changes them for every thread (workdir._acting_as), so a connection the thread opened at
    that moment would authenticate as the user. Each call goes with the connection current when
    it was submitted; the thread closes one that failed (``failed``), and the next ``submit``
    opens another."""

    def __init__(self, connect: Callable[[], Any]):
        self.connect = connect
        self._fd: int | None = None
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.bus = None  # the connection calls are submitted with
        # The last connection the thread closed after a failure (set by the thread); at first one
        # that is no connection at all (a stand-in's connect may return None).
        self.failed: Any = object()
        self.pending = 0

    @property
    def fd(self) -> int:
        if self._fd is None:  # made when first asked for: a backend given up on at start keeps none
            self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._fd

    def submit(self, call: Callable[[Any], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        self.pending += 1
        if self.bus is None or self.bus is self.failed:
            try:
                self.bus = self.connect()
            except Exception as e:  # no bus: this call fails, the next one tries again
                self.bus = None
                self._hand_back(done, (None, e))
                return
        if self.thread is None:  # started with the first call: pmlmd --release-workers makes none
            self.thread = threading.Thread(target=self._serve, name="pmlmd-systemd", daemon=True)
            self.thread.start()
        self.calls.put((call, done, self.bus))

    def _serve(self) -> None:
        while True:
            call, done, bus = self.calls.get()
            if call is None:  # drain's mark: every call before it has been made
                done.set()
                continue
            try:
                if bus is self.failed:
                    raise OSError("the connection to the system bus failed on an earlier call")
                outcome = (call(bus), None)
            except Exception as e:  # handed to the loop, which logs it
                outcome = (None, e)
                if isinstance(e, (OSError, TimeoutError)) and bus is not self.failed:
                    self.failed = bus  # a reply may still come on it: the next submit opens another
                    with contextlib.suppress(Exception):
                        bus.close()
            self._hand_back(done, outcome)

    def _hand_back(self, done, outcome) -> None:
        self.results.put((done, outcome))
        os.eventfd_write(self.fd, 1)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the calls submitted so far to have been made."""
        if self.thread is not None:
            finished = threading.Event()
            self.calls.put((None, finished, None))
            finished.wait(timeout)

    def settle(self, timeout: float) -> None:
        """pmlmd stops: make and hand on every call, also those the results handed on ask for
        (a scope made again with the next worker, a StopUnit), for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.drain(deadline - time.monotonic())
            self.deliver()

    def deliver(self) -> None:
        """In the loop: hand every result ready to its ``done``. Should one raise, the eventfd is
        written again, so the results after it are handed on at the loop's next turn."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        try:
            while True:
                try:
                    done, (value, error) = self.results.get_nowait()
                except queue.Empty:
                    return
                self.pending -= 1
                done(value, error)
        finally:
            if not self.results.empty():
                os.eventfd_write(self.fd, 1)


class SystemdScopes:
    """Transient scopes over the system bus."""

    name = "systemd"
    gated = True

    def __init__(self, connection=None, limits: CgroupLimits | None = None):
        self.bus = connection or open_dbus_connection(bus="SYSTEM")
        self.started: set[str] = set()  # batches whose scope exists
        self.paths: dict[str, str] = {}  # batch id -> its scope's cgroup, below the cgroup2 mount
        self.limits = limits  # None: scopes get systemd's defaults, the slice is left alone
        self.off_loop = OffLoop(lambda: open_dbus_connection(bus="SYSTEM"))
        self.stopping: set[str] = set()  # batches whose StopUnit is asked for and not answered yet

    @property
    def fd(self) -> int:
        return self.off_loop.fd

    def deliver(self) -> None:
        self.off_loop.deliver()

    # --- D-Bus plumbing ----------------------------------------------------------------
    def _call(self, member: str, signature: str | None = None, body: tuple = (), *, path: str = SYSTEMD[1],
              interface: str = MANAGER, bus=None):
        address = DBusAddress(path, bus_name=SYSTEMD[0], interface=interface)
        reply = (bus or self.bus).send_and_get_reply(new_method_call(address, member, signature, body),
                                                      timeout=JOB_TIMEOUT)
        return unwrap_msg(reply)

    def _property(self, batch_id: str, interface: str, name: str, bus=None):
        (unit_path,) = self._call("GetUnit", "s", (scope_name(batch_id),), bus=bus)
        address = DBusAddress(unit_path, bus_name=SYSTEMD[0], interface=interface)
        (value,) = unwrap_msg((bus or self.bus).send_and_get_reply(Properties(address).get(name),
                                                                   timeout=JOB_TIMEOUT))
        return value[1]  # (signature, value)

    # --- scopes --------------------------------------------------------------------------
    def place_later(self, batch_id: str, description: str, pid: int, attach: bool, done: Placed) -> None:
        """Put ``pid`` into the batch's scope, creating the scope with it if needed, off the loop
        (OffLoop); ``done`` then gets the scope's cgroup (its path below the cgroup2 mount, as
        /proc/PID/cgroup shows it), or None, logged, when ``pid`` is not in it.

        With ``attach`` False a scope that exists already is only looked up, and ``pid`` is left
        where it is: the caller moves it below the scope itself (cgroup.Scoped), with no D-Bus
        call for each worker. A new scope is always made with ``pid`` in it (systemd makes no scope without a process).
        What pmlmd knows of its scopes (started, paths) changes in the loop only, in ``done``'s
        wrapper."""
        unit = scope_name(batch_id)
        new = batch_id not in self.started

        def call(bus) -> str | None:  # in the thread: D-Bus only
            if new:
                try:
                    self._start(unit, description, pid, bus)
                    return own_cgroup(str(pid)) or self._control_group(batch_id, bus)
                except DBusErrorResponse as e:
                    if e.name != "org.freedesktop.systemd1.UnitExists":
                        raise
                    # left by an earlier pmlmd (or made by a worker placed just before): join it
            if attach:
                try:
                    self._call("AttachProcessesToUnit", "ssau", (unit, "/", [pid]), bus=bus)
                except DBusErrorResponse as e:
                    if e.name != "org.freedesktop.systemd1.NoSuchUnit":
                        raise
                    return None  # gone with its last process (between two workers)
            return self._control_group(batch_id, bus)

        def placed(path: str | None, error: BaseException | None) -> None:  # in the loop
            if error is not None:
                log.warning("worker %d of batch %s runs outside its scope %s: %s", pid, batch_id, unit, error)
                path = None
            elif batch_id in self.stopping:
                pass  # a scope stopped since is neither remembered nor made again
            elif path is None:
                self.forget(batch_id)  # gone with its last process: made again with this worker
                self.place_later(batch_id, description, pid, attach, done)
                return
            else:
                self.started.add(batch_id)
                self.paths[batch_id] = path
            done(path)

        self.off_loop.submit(call, placed)

    def forget(self, batch_id: str) -> None:
        """The batch's scope is no more (stopped, or gone with its last process)."""
        self.started.discard(batch_id)
        self.paths.pop(batch_id, None)

    def adopted(self, batch_id: str) -> None:
        """A scope an earlier pmlmd made for an active batch: it exists (freezer_state)."""
        self.started.add(batch_id)

    def _control_group(self, batch_id: str, bus=None) -> str:
        return self._property(batch_id, SCOPE, "ControlGroup", bus)

    def _start(self, unit: str, description: str, pid: int, bus) -> None:
        """StartTransientUnit with ``pid`` in it, waiting for its job to end (on ``bus``, the
        OffLoop thread's connection)."""
        properties = [
            ("PIDs", ("au", [pid])),
            ("Slice", ("s", SLICE)),
            ("Description", ("s", description)),
            ("Delegate", ("b", True)),  # AttachProcessesToUnit works only on delegated units
            ("CollectMode", ("s", "inactive-or-failed")),  # gone once empty, even if a worker failed
            *(self.limits.scope_properties() if self.limits is not None else []),
        ]
        # No sender in the rule: signals carry systemd's unique bus name, which jeepney's local
        # filter would compare with the well-known one and never match.
        rule = MatchRule(type="signal", interface=MANAGER, member="JobRemoved", path=SYSTEMD[1])
        bus.send_and_get_reply(message_bus.AddMatch(rule), timeout=JOB_TIMEOUT)
        self._call("Subscribe", bus=bus)  # systemd sends job signals only to subscribers
        try:
            with bus.filter(rule, bufsize=64) as jobs:
                (job,) = self._call("StartTransientUnit", "ssa(sv)a(sa(sv))", (unit, "fail", properties, []),
                                    bus=bus)
                while True:
                    signal = bus.recv_until_filtered(jobs, timeout=JOB_TIMEOUT)
                    _, job_path, _, result = signal.body
                    if job_path == job:
                        if result != "done":
                            raise OSError(f"starting {unit} ended with {result!r}")
                        return
        finally:
            self._call("Unsubscribe", bus=bus)
            bus.send_and_get_reply(message_bus.RemoveMatch(rule), timeout=JOB_TIMEOUT)

    def limit_slice(self) -> None:
        """Set the configured TasksMax and MemoryMax on pmlm.slice, for this boot (a runtime drop-in).

        Runtime, not persistent: the values come from pmlmd.toml at every start, and nothing
        of pmlmd's is left in /etc. A failure is logged, not fatal: the slice keeps what its
        unit file says (the shipped pmlm.slice carries the same defaults).
        """
        if self.limits is None:
            return
        try:
            properties = self.limits.slice_properties()
            self._call("SetUnitProperties", "sba(sv)", (SLICE, True, properties))
        except (DBusErrorResponse, OSError, TimeoutError) as e:
            log.warning("cannot set TasksMax and MemoryMax on %s, it keeps those of its unit file: %s", SLICE, e)

    def stop(self, batch_id: str) -> None:
        """The batch is over: whatever its workers left running in the scope goes with it.

        Stopping the scope sends SIGTERM (SIGKILL after the unit's timeout) to every process
        still in it, also to those that left their worker's process group. Asked off the loop
        (OffLoop), after any call for the batch made before: a scope systemd was still making
        is stopped once made.
        """
        self.forget(batch_id)
        self.stopping.add(batch_id)
        unit = scope_name(batch_id)

        def stopped(_, error: BaseException | None) -> None:
            self.stopping.discard(batch_id)
            if error is None or getattr(error, "name", None) == "org.freedesktop.systemd1.NoSuchUnit":
                return  # stopped, or already gone with its last process
            log.warning("cannot stop %s: %s", unit, error)

        self.off_loop.submit(lambda bus: self._call("StopUnit", "ss", (unit, "replace"), bus=bus), stopped)

    def close(self, timeout: float = 2 * JOB_TIMEOUT) -> None:
        """pmlmd stops: the calls asked for (a new scope for workers at their gates, a finished
        batch's StopUnit) are made and their results handed on (OffLoop.settle), for up to
        ``timeout`` seconds. Workers still at their gates then end there, when pmlmd goes, and
        their tasks run again at its next start (cause daemon-restart)."""
        self.off_loop.settle(timeout)

    def freeze_later(self, batch_id: str, done: Answered) -> None:
        """FreezeUnit of the batch's scope, off the loop (it returns once the scope's cgroup is
        frozen); then, from ``deliver``, ``done(True)``, or ``done(False)`` where it cannot be (no
        scope yet, no cgroup2 freezer: the caller stops the workers with signals instead), or
        ``done(None)`` where systemd did not answer (it may freeze the scope later)."""
        self._freezer_later("FreezeUnit", batch_id, done)

    def thaw_later(self, batch_id: str, done: Answered | None = None) -> None:
        """ThawUnit, off the loop, after every call asked for before (a FreezeUnit still under way
        included); ``done`` as for freeze_later."""
        self._freezer_later("ThawUnit", batch_id, done)

    def _freezer_later(self, member: str, batch_id: str, done: Answered | None) -> None:
        unit = scope_name(batch_id)

        def result(_, error: BaseException | None) -> None:
            if error is not None:
                log.debug("%s %s: %s", member, unit, error)
            if done is not None:
                done(True if error is None else False if isinstance(error, DBusErrorResponse) else None)

        self.off_loop.submit(lambda bus: self._call(member, "s", (unit,), bus=bus), result)

    def thaw(self, batch_id: str) -> bool:
        """ThawUnit, waited for: for pmlmd's start and its ExecStopPost, when no loop runs."""
        return self._freezer("ThawUnit", batch_id)

    def _freezer(self, member: str, batch_id: str) -> bool:
        try:
            self._call(member, "s", (scope_name(batch_id),))
            return True
        except (DBusErrorResponse, OSError, TimeoutError) as e:
            # No scope (yet), or no cgroup2 freezer: the caller falls back to signals.
            log.debug("%s %s: %s", member, scope_name(batch_id), e)
            return False

    def freezer_state(self, batch_id: str, state: str) -> str | None:
        """The batch scope's FreezerState as pmlmd knows it (``state``: "running", "freezing",
        "frozen" or "thawing", as systemd names them; engine.Engine.freezer), None while it has no
        scope. Told from memory, not asked of systemd: status and list never wait on D-Bus in the
        loop that enforces the limits."""
        if batch_id not in self.started:
            return None
        return state

    def scopes(self) -> list[str]:
        """Batch ids of every pmlm scope systemd knows (also those of an earlier pmlmd)."""
        (units,) = self._call("ListUnitsByPatterns", "asas", ([], [SCOPE_PREFIX + "*.scope"]))
        return [b for b in (batch_of_scope(u[0]) for u in units) if b is not None]

    def scope_pids(self, batch_id: str) -> list[int]:
        """Every process in the scope, also in the worker cgroups below it (cgroup.Scoped)."""
        try:
            group = self._control_group(batch_id)
        except Exception:  # no such scope
            return []
        pids = []
        for directory, _, _ in os.walk(f"/sys/fs/cgroup{group}"):
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    pids += [int(line) for line in f if line.strip()]
            except (OSError, ValueError):
                continue
        return pids


def choose(setting: str = "auto", limits: CgroupLimits | None = None):
    """The backend for ``setting`` (auto, systemd, none); auto means systemd when it runs and answers.

    With ``limits`` (the daemon's start), the systemd backend gives its scopes their
    limits and sets the slice's at once; without (``--release-workers``) it changes nothing.
    """
    if setting == "none":
        return NoScopes()
    if setting == "auto" and not os.path.isdir("/run/systemd/system"):
        return NoScopes()
    try:
        backend = SystemdScopes(limits=limits)
        backend.scopes()  # does the manager answer?
    except Exception as e:
        if setting == "systemd":
            raise OSError(f"the systemd scope backend was asked for, but the system bus does not answer: {e}")
        log.warning("systemd runs but its bus does not answer (%s): workers stay in process groups only", e)
        return NoScopes()
    if limits is not None:
        backend.limit_slice()
        log.info("cgroup backstops: %s", limits.describe())
    return backend
