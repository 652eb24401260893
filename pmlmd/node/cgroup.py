"""Workers in cgroups of their own (cgroup v2): containment and accounting by the kernel.

Each worker runs in a child cgroup of a subtree pmlmd owns. The kernel then answers what
pmlmd would otherwise reconstruct from /proc (kernel doc: admin-guide/cgroup-v2.rst):

- membership: ``cgroup.procs`` lists every process of the worker, whatever session or
  process group it moved to and whoever its parent is now; a child is in its parent's
  cgroup from the moment it is forked, so nothing escapes between two looks;
- pause: ``cgroup.freeze`` 1 stops every member at once (``frozen 1`` in cgroup.events once
  all are stopped), 0 lets them go on; new children of a frozen cgroup are frozen too;
- end: ``cgroup.kill`` 1 sends SIGKILL to every member in one write (Linux 5.14);
- CPU: ``cpu.stat`` usage_usec, which also counts members that have already exited;
- memory, where the memory controller is on the cgroup2 hierarchy (a pure cgroup2 host, not
  a hybrid one that binds it to v1): ``memory.current`` of a worker counts a page once however
  many of its processes map it, and counts its page cache, tmpfs and kernel memory too;
  ``memory.high`` of the subtree is the guard line (see ``MemoryGuard``), ``memory.events``
  says when it was reached and whether the OOM killer ended a member.

These work on any cgroup2 hierarchy, controllers or not: also on the unified hierarchy of
a host that mounts its controllers as cgroup v1 (hybrid). A worker is put in its cgroup
before it executes anything: pmlmd moves itself into the new cgroup, starts the worker
(which inherits it) and moves itself back (``Subtree.starting``).

Where pmlmd may not own a subtree (systemd as PID 1 manages the hierarchy and has not
delegated pmlmd's cgroup to it, a read-only /sys/fs/cgroup, a kernel without cgroup.kill)
``choose`` says why and pmlmd keeps its /proc backend (see engine).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import select
import signal
import time
from typing import Iterator

log = logging.getLogger("pmlmd.cgroup")

BACKENDS = ("auto", "cgroup", "proc")  # the worker_backend setting: cgroup v2 where usable, or /proc
MOUNTINFO = "/proc/self/mountinfo"
SYSTEMD_RUNNING = "/run/systemd/system"  # exists when systemd is PID 1 (sd_booted(3))
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # set by systemd on a unit with Delegate=yes
SCOPE_PREFIX = "pmlm-"  # each batch's systemd scope is SCOPE_PREFIX + batch id + ".scope" (scopes.py)
WARN_EVERY = 60.0  # seconds between two warnings that workers start outside their cgroups


class Unusable(Exception):
    """No cgroup2 subtree pmlmd may own here; str() says why, for the log and status."""


def cgroup2_mount(mountinfo: str = MOUNTINFO) -> str | None:
    """Where the cgroup2 hierarchy is mounted (proc(5), /proc/PID/mountinfo), or None."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return fields[4].replace("\\040", " ")
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_cgroup(pid: str = "self", proc_root: str = "/proc") -> str | None:
    """The cgroup2 path of a process relative to the mount ("0::PATH" in /proc/PID/cgroup, read
    under ``proc_root``), or None."""
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def usage_usec(cpu_stat: str) -> int | None:
    """usage_usec of a cgroup's cpu.stat (its path): the CPU time of every process that ever ran in
    the cgroup or below, in microseconds; None when it cannot be read."""
    try:
        with open(cpu_stat) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def read_int(path: str) -> int | None:
    """A cgroup file holding one number (memory.current, memory.peak); None when it cannot be read
    or holds "max"."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def counts(text: str) -> dict[str, int]:
    """A flat keyed file ("KEY VALUE" lines: cgroup.events, memory.events) as a dict; ValueError
    when it is not one."""
    return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


def memory_events(path: str) -> dict[str, int]:
    """A memory.events file as {key: count} (low, high, max, oom, oom_kill, ...); {} when unreadable.
    Every count only grows (kernel doc admin-guide/cgroup-v2.rst, "memory.events")."""
    try:
        with open(path) as f:
            return counts(f.read())
    except (OSError, ValueError):
        return {}


def controllers(path: str) -> list[str]:
    """The controllers a cgroup's children may have (its cgroup.controllers); OSError when unreadable."""
    with open(os.path.join(path, "cgroup.controllers")) as f:
        return f.read().split()


def _delegated(path: str) -> bool:
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(path, name) in (b"1", b"1\n"):
                return True
        except OSError:
            continue
    return False


class Worker:
    """One worker's cgroup: a directory of the cgroup2 hierarchy."""

    def __init__(self, path: str, relative: str):
        self.path = path  # the directory
        self.relative = relative  # the path as /proc/PID/cgroup shows it

    def __repr__(self) -> str:
        return f"cgroup.Worker({self.path!r})"

    @property
    def worker_id(self) -> str:
        """The id of the worker it was made for: its name without the "~N" Subtree.starting may add."""
        return os.path.basename(self.path).partition("~")[0]

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def pids(self) -> list[int]:
        """Every process in it (cgroup.procs); [] once it is gone."""
        try:
            return [int(word) for word in self._read("cgroup.procs").split()]
        except OSError:
            return []

    def events(self) -> dict[str, int]:
        """cgroup.events: populated (1 while any process is in it) and frozen."""
        try:
            return counts(self._read("cgroup.events"))
        except (OSError, ValueError):
            return {"populated": 0, "frozen": 0}

    def populated(self) -> bool:
        return bool(self.events().get("populated"))

    def freeze(self) -> None:
        """Stop every member, now and those it forks later (cgroup.freeze 1). The kernel reports
        ``frozen 1`` in cgroup.events once the last member has stopped."""
        self._write("cgroup.freeze", "1")

    def thaw(self) -> None:
        self._write("cgroup.freeze", "0")

    def kill(self) -> None:
        """SIGKILL to every member, in one write (cgroup.kill)."""
        self._write("cgroup.kill", "1")

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every member; how many got it. Each is held by a pidfd and checked to be
        in this cgroup still before it is signalled, so a pid reused meanwhile is left alone."""
        sent = 0
        for pid in self.pids():
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                # From here on the pidfd is that very process: is it (still) one of ours?
                if own_cgroup(str(pid)) != self.relative:
                    continue
                signal.pidfd_send_signal(pidfd, sig)
                sent += 1
            except OSError:
                continue
            finally:
                os.close(pidfd)
        return sent

    def cpu_usec(self) -> int | None:
        """CPU time of every process that ever ran in it, in microseconds (see usage_usec)."""
        return usage_usec(os.path.join(self.path, "cpu.stat"))

    def memory_bytes(self) -> int | None:
        """memory.current: every page charged to its processes (anonymous, page cache, tmpfs,
        kernel), a shared page once, in bytes; None without the memory controller."""
        return read_int(os.path.join(self.path, "memory.current"))

    def oom_kills(self) -> int:
        """How many of its processes the kernel's OOM killer ended (memory.events oom_kill); 0
        without the memory controller."""
        return memory_events(os.path.join(self.path, "memory.events")).get("oom_kill", 0)

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the last process to leave; True once none is in it.
        The kernel wakes a poll of cgroup.events (POLLPRI) when "populated" changes."""
        deadline = time.monotonic() + timeout
        try:
            fd = os.open(os.path.join(self.path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            while True:
                os.lseek(fd, 0, os.SEEK_SET)
                if b"populated 0" in os.read(fd, 4096):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(left * 1000)
        finally:
            os.close(fd)

    def remove(self) -> bool:
        """Remove the cgroup once it is empty; False while processes are still in it."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            # Not pmlmd's to fix (a read-only hierarchy, an outside change): no retry forever.
            log.warning("cannot remove the worker cgroup %s: %s", self.path, e.strerror)
        return True


class Subtree:
    """The cgroups pmlmd owns: ``root`` and one child per worker, named by the worker's id."""

    gated = False  # workers are started inside their cgroup (starting); Scoped places them from a gate

    def __init__(self, root: str, mount: str):
        self.root = root
        self.mount = mount
        self.warn_at = 0.0  # monotonic: when a failure to make a worker's cgroup may be logged again
        self.memory = False  # the memory controller is on for the worker cgroups (MemoryGuard.enable)

    def __repr__(self) -> str:
        return f"cgroup.Subtree({self.root!r})"

    def worker(self, name: str) -> Worker:
        path = os.path.join(self.root, name)
        return Worker(path, "/" + os.path.relpath(path, self.mount))

    def member_of(self, pid: int) -> str | None:
        """The worker id of the worker cgroup ``pid`` is in (Worker.worker_id), or None when it is in
        none of ours."""
        w = self.cgroup_of(pid)
        return w.worker_id if w is not None else None

    def cgroup_of(self, pid: int) -> Worker | None:
        """The worker cgroup ``pid`` is in, or None when it is in none of ours."""
        relative = own_cgroup(str(pid))
        if relative is None:
            return None
        path = os.path.join(self.mount, relative.lstrip("/"))
        return Worker(path, relative) if os.path.dirname(path) == self.root else None

    @contextlib.contextmanager
    def starting(self, name: str) -> Iterator[Worker | None]:
        """Make the worker's cgroup and stand in it for the duration: a process started inside the
        ``with`` is in it from its first instruction. Where the cgroup cannot be made or entered
        (cgroup.max.descendants reached, the hierarchy changed under pmlmd) this yields None, having
        logged why: the worker then starts outside, followed through its process group.

        A cgroup of that name may exist: left empty by a start that failed (it is reused), or
        holding what a worker of an attempt the state lost left behind (the name gets a "~N"; that
        cgroup is ended as leftovers, see engine.end_leftovers). If the body raises, the cgroup
        is removed again."""
        w = self._make(name)
        if w is None:
            yield None
            return
        own = os.path.dirname(self.root)  # pmlmd's own cgroup, where _usable made the subtree
        try:
            _move_self(w.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(w.path)
            self._cannot(w, e)
            yield None
            return
        try:
            yield w
        except BaseException:
            _move_self_back(own, w)
            with contextlib.suppress(OSError):
                os.rmdir(w.path)
            raise
        else:
            _move_self_back(own, w)

    def _make(self, name: str) -> Worker | None:
        """The worker's new, empty cgroup (see starting for the names); None, logged, when it cannot
        be made."""
        w = self.worker(name)
        for suffix in range(1, 100):
            try:
                os.mkdir(w.path)
                break
            except FileExistsError:
                # Never a frozen one: pmlmd would freeze itself stepping in.
                if not w.populated() and not w.events().get("frozen"):
                    break
                w = self.worker(f"{name}~{suffix}")
            except OSError as e:
                self._cannot(w, e)
                return None
        if self.memory:
            # The OOM killer, when memory.max is reached, ends a whole worker rather than one of
            # its processes, so no worker goes on without the child it depended on.
            with contextlib.suppress(OSError):
                w._write("memory.oom.group", "1")
        return w

    def place(self, name: str, pid: int) -> Worker | None:
        """Make the worker's cgroup and move ``pid`` into it: for a worker that waits at its gate
        (gate.gated) until it is placed, so that nothing it runs is outside. None, logged, when
        the cgroup cannot be made or entered: the worker stays where it is."""
        w = self._make(name)
        if w is None:
            return None
        try:
            w._write("cgroup.procs", str(pid))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(w.path)
            self._cannot(w, e)
            return None
        return w

    def _cannot(self, w: Worker, e: OSError) -> None:
        now = time.monotonic()
        if now >= self.warn_at:  # once per WARN_EVERY: a full hierarchy would refuse every start
            self.warn_at = now + WARN_EVERY
            log.warning("cannot start a worker in the cgroup %s (%s): it runs outside, followed through its "
                        "process group", w.path, e.strerror)

    def workers(self) -> list[Worker]:
        """Every worker cgroup in the subtree."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        return [self.worker(name) for name in names if os.path.isdir(os.path.join(self.root, name))]

    def remove(self, wait: float = 0.0) -> None:
        """Remove the subtree's worker cgroups, each once it is empty (waiting up to ``wait``
        seconds in all for processes that are being killed), then the subtree if it is empty."""
        deadline = time.monotonic() + wait
        for w in self.workers():
            w.wait_empty(max(0.0, deadline - time.monotonic()))
            w.remove()
        with contextlib.suppress(OSError):
            os.rmdir(self.root)

    def discard(self, wait: float = 5.0) -> None:
        """Kill whatever is left in every worker cgroup and remove the subtree (a harness's teardown)."""
        for w in self.workers():
            with contextlib.suppress(OSError):
                w.kill()
        self.remove(wait=wait)

    def remove_stale_siblings(self, kind: str) -> None:
        """Remove what ``kind``.PID subtrees beside this one left behind whose process has gone (a
        ``pmlmctl run`` that was killed): their empty worker cgroups, and each such subtree once empty.
        A worker still running in one keeps its cgroup, thawed: nothing stays frozen that nobody
        governs."""
        parent = os.path.dirname(self.root)
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            prefix, _, pid = name.partition(".")
            if prefix == kind and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                stale = Subtree(os.path.join(parent, name), self.mount)
                for w in stale.workers():
                    with contextlib.suppress(OSError):
                        w.thaw()
                stale.remove()

    def charges(self, worker: Worker) -> bool:
        """Whether the kernel counts ``worker``'s memory (memory.current): the memory controller is
        on for this subtree's worker cgroups."""
        return self.memory

    def cpu_usec(self) -> int | None:
        """CPU time of every worker cgroup below, in microseconds (the subtree's cpu.stat)."""
        return usage_usec(os.path.join(self.root, "cpu.stat"))

    def describe(self) -> str:
        guard = ", memory.high guard" if self.memory else ""
        return f"cgroup v2 ({self.root}{guard})"


class Scoped:
    """Worker cgroups inside each batch's systemd scope: ``SCOPE/workers/WORKER_ID``.

    Under systemd each batch is a transient scope made with ``Delegate=yes`` (scopes.py): the
    scope's own cgroup stays systemd's, what is below it is pmlmd's to arrange (systemd's cgroup
    delegation model; kernel doc admin-guide/cgroup-v2.rst, "Delegation"). Each worker gets a
    cgroup of its own there, with everything the cgroup backend gives (membership, freezer,
    cgroup.kill, cpu.stat, and with the memory controller memory.current and the guard), while
    the batch stays one unit for ``systemctl`` and survives a restart of pmlmd.

    A worker waits at its gate (gate.gated) until it is placed: the first of a batch is given to
    systemd to make the scope with, then moved down into its cgroup; the later ones are moved
    into theirs directly, with no D-Bus call. ``workers`` between the scope and the worker
    cgroups is where pmlmd's lines go (MemoryGuard): the scope's own memory.high is systemd's.

    The methods are Subtree's, over every batch's subtree (``trees``, by batch id).
    """

    LEAF = "workers"
    gated = True  # workers are placed from their gate (place), not started inside (Subtree.starting)

    def __init__(self, mount: str, slice_path: str):
        self.mount = mount
        self.slice = os.path.join(mount, slice_path.lstrip("/"))  # the directory of the scopes' slice
        self.trees: dict[str, Subtree] = {}
        self.warn_at = 0.0

    def __repr__(self) -> str:
        return f"cgroup.Scoped({self.slice!r})"

    @property
    def memory(self) -> bool:
        """The memory controller is on for some batch's worker cgroups."""
        return any(tree.memory for tree in self.trees.values())

    def tree(self, batch_id: str) -> Subtree | None:
        """The batch's subtree, once a worker of it has been placed (or adopted) by this pmlmd."""
        return self.trees.get(batch_id)

    def open(self, batch_id: str, scope: str) -> Subtree | None:
        """The batch's subtree below its scope (``scope``: its cgroup, below the mount), made if
        needed; None, logged, when it cannot be (the worker is then followed through /proc)."""
        root = os.path.join(self.mount, scope.lstrip("/"), self.LEAF)
        try:
            os.mkdir(root)  # not makedirs: a scope systemd removed is never made again here
        except FileExistsError:
            pass
        except OSError as e:
            now = time.monotonic()
            if now >= self.warn_at:
                self.warn_at = now + WARN_EVERY
                log.warning("cannot make %s (%s): the workers of batch %s are followed through /proc", root,
                            e.strerror, batch_id)
            return None
        tree = self.trees[batch_id] = Subtree(root, self.mount)
        return tree

    def drop(self, batch_id: str) -> Subtree | None:
        """Forget the batch's subtree (its batch is over; systemd removes the scope)."""
        return self.trees.pop(batch_id, None)

    def adopt(self, batch_id: str, worker: Worker) -> Subtree:
        """The batch's subtree, from the cgroup of a worker adopted after a restart (cgroup_of)."""
        if batch_id not in self.trees:
            self.trees[batch_id] = Subtree(os.path.dirname(worker.path), self.mount)
        return self.trees[batch_id]

    def cgroup_of(self, pid: int) -> Worker | None:
        """The worker cgroup ``pid`` is in (below any batch's scope), or None."""
        relative = own_cgroup(str(pid))
        if relative is None:
            return None
        path = os.path.join(self.mount, relative.lstrip("/"))
        root = os.path.dirname(path)
        scope = os.path.dirname(root)
        if os.path.basename(root) != self.LEAF or os.path.dirname(scope) != self.slice:
            return None
        if batch_of_scope(os.path.basename(scope)) is None:
            return None
        return Worker(path, relative)

    def member_of(self, pid: int) -> str | None:
        w = self.cgroup_of(pid)
        return w.worker_id if w is not None else None

    def roots(self) -> list[str]:
        """The worker subtrees (SCOPE/workers) of every pmlm scope in the slice (also of batches
        this pmlmd has not placed a worker of: what an earlier one left)."""
        try:
            names = sorted(os.listdir(self.slice))
        except OSError:
            return []
        return [os.path.join(self.slice, name, self.LEAF) for name in names
                if batch_of_scope(name) is not None and os.path.isdir(os.path.join(self.slice, name, self.LEAF))]

    def workers(self) -> list[Worker]:
        """Every worker cgroup of every pmlm scope in the slice (see roots)."""
        return [w for root in self.roots() for w in Subtree(root, self.mount).workers()]

    def charges(self, worker: Worker) -> bool:
        """Whether the kernel counts ``worker``'s memory: its batch's subtree has the memory controller."""
        root = os.path.dirname(worker.path)  # SCOPE/workers: the batch is the scope's
        tree = self.trees.get(batch_of_scope(os.path.basename(os.path.dirname(root))) or "")
        return tree is not None and tree.root == root and tree.memory

    def cpu_usec(self) -> int | None:
        """CPU time of every worker cgroup of the batches placed here, in microseconds."""
        total = 0
        for tree in self.trees.values():
            usec = tree.cpu_usec()
            if usec is None:
                return None
            total += usec
        return total

    def remove(self, wait: float = 0.0) -> None:
        """Remove each batch's empty worker cgroups (see Subtree.remove)."""
        for tree in list(self.trees.values()):
            tree.remove(wait=wait)

    def describe(self) -> str:
        guard = ", memory.high guard" if self.memory else ""
        return f"cgroup v2 in each batch's scope ({self.slice}/pmlm-ID.scope/{self.LEAF}{guard})"


def batch_of_scope(name: str) -> str | None:
    """The batch id of a batch scope's name (SCOPE_PREFIX + ID + ".scope", see scopes), or None."""
    if name.startswith(SCOPE_PREFIX) and name.endswith(".scope"):
        return name[len(SCOPE_PREFIX):-len(".scope")] or None
    return None


def scoped(slice_path: str) -> Scoped:
    """Worker cgroups in batch scopes (Scoped) below ``slice_path`` (the slice's cgroup, below the
    mount); Unusable when pmlmd may not write there (the unit's ProtectControlGroups=yes makes the
    hierarchy read-only) or the kernel has no cgroup.kill."""
    mount = cgroup2_mount()
    if mount is None:
        raise Unusable("no cgroup2 hierarchy is mounted")
    if not os.access(mount, os.W_OK):
        raise Unusable(f"{mount} is read-only here (ProtectControlGroups=yes in pmlmd.service?)")
    _check_kernel()
    return Scoped(mount, slice_path)


class MemoryGuard:
    """The kernel's part in keeping the memory limit: memory.high and memory.max of the subtree.

    pmlmd samples the node and decides by policy, but between two samples a worker may allocate
    at several GB/s. The guard keeps ``memory.high`` of the subtree at what its workers use now
    plus what the node may still give before free memory reaches the limit L: past that line the
    kernel throttles their allocations (reclaim, then sleep), so they stand at the line while
    pmlmd decides instead of running past L. ``memory.max`` sits at what they may use before free
    memory reaches the floor F: past it the OOM killer ends a worker inside the subtree (the
    whole worker: ``memory.oom.group`` of its cgroup is 1), never another process of the node.
    The lines are recomputed from every sample (``update``).

    Reaching either line counts in the subtree's memory.events ("high", "max"), and the kernel
    signals a change of that file as POLLPRI on a descriptor open on it (``fileno``): the loop
    samples at once and the governor pauses or terminates by policy. Kernel doc:
    admin-guide/cgroup-v2.rst, "Memory Interface Files" and "Core Interface Files" (file modified
    events).

    Needs the memory controller on the cgroup2 hierarchy, enabled down to the subtree
    (``enable``): the kernel allows that only where pmlmd's own cgroup holds no other process
    ("no internal processes" rule), or is the hierarchy's root.
    """

    QUANTUM = 1 << 20  # bytes: a line is rewritten when it moved at least this far
    # memory.high is where the kernel starts to throttle, not a wall: its penalty grows with the
    # square of the overage, so a fast allocator gets past the line by a few percent of it before
    # it sleeps (seen: 9 MiB in a second past a 292 MiB line). The line stands 1/OVERSHOOT of it
    # inside the limit, but no more than half the gap G above it: workers the governor lets run
    # in the upper half of the gap are not throttled.
    OVERSHOOT = 16

    def __init__(self, subtree: Subtree):
        self.subtree = subtree
        self.lines: dict[str, int | None] = {"memory.high": None, "memory.max": None}  # bytes as written; None: "max"
        self.fd = os.open(os.path.join(subtree.root, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def enable(cls, subtree: Subtree) -> MemoryGuard:
        """Turn the memory controller on for the subtree and its worker cgroups; Unusable says why
        it cannot be (not on the cgroup2 hierarchy, pmlmd's cgroup shares it with other processes)."""
        parent = os.path.dirname(subtree.root)
        try:
            available = controllers(parent)
        except OSError as e:
            raise Unusable(f"cannot read {parent}/cgroup.controllers: {e.strerror}") from None
        if "memory" not in available:
            raise Unusable("the memory controller is not on the cgroup2 hierarchy (the host binds it to cgroup v1)")
        for path in (parent, subtree.root):
            control = os.path.join(path, "cgroup.subtree_control")
            try:
                with open(control) as f:
                    if "memory" in f.read().split():
                        continue
                with open(control, "w") as f:
                    f.write("+memory")
            except OSError as e:
                why = (f"{path} holds processes besides pmlmd's subtree: run pmlmd in a cgroup of its own"
                       if e.errno == errno.EBUSY else e.strerror)
                raise Unusable(f"cannot enable the memory controller below {path}: {why}") from None
        subtree.memory = True
        for w in subtree.workers():  # made before the controller was on (a batch scope's first worker)
            with contextlib.suppress(OSError):
                w._write("memory.oom.group", "1")
        return cls(subtree)

    def fileno(self) -> int:
        """memory.events of the subtree: readable as POLLPRI (only) when a count changed."""
        return self.fd

    def events(self) -> dict[str, int]:
        """The subtree's memory.events counts; reading them also clears the descriptor's POLLPRI."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        try:
            return counts(os.read(self.fd, 4096).decode())
        except (OSError, ValueError):
            return {}

    def used(self) -> int | None:
        """memory.current of the subtree: what every worker uses, in bytes."""
        return read_int(os.path.join(self.subtree.root, "memory.current"))

    def update(self, free: int, limit: int, gap: int, floor: int, share: int = 1) -> tuple[int, int] | None:
        """Move the lines for a node with ``free`` bytes free, limit L = ``limit``, gap G = ``gap``
        and floor F = ``floor`` (bytes): high = line - min(line / OVERSHOOT, G / 2) with line =
        used + max(0, free - L) / share; max = used + max(0, free - F) / share. ``share``: how
        many subtrees (batch scopes) divide what the node may still give, so that together they
        stay inside it. Neither is set below what the workers use now: writing a line below the
        usage makes the writer reclaim (and at memory.max, OOM-kill) in its own time. Returns
        (high, max) as set, or None when memory.current cannot be read."""
        used = self.used()
        if used is None:
            return None
        line = used + max(0, free - limit) // share
        high = max(used, line - min(line // self.OVERSHOOT, gap // 2))
        hard = used + max(0, max(0, free - floor) // share, high - used)
        order = [("memory.max", hard), ("memory.high", high)]
        if self.lines["memory.max"] is not None and hard < self.lines["memory.max"]:
            order.reverse()  # raising: the hard line first, so high never stands above max; lowering: high first
        for name, value in order:
            last = self.lines[name]
            if last is not None and abs(value - last) < self.QUANTUM:
                continue
            try:
                self._set(name, value)
            except OSError as e:
                log.warning("cannot set %s of %s: %s", name, self.subtree.root, e.strerror)
            else:
                self.lines[name] = value
        return high, hard

    def _set(self, name: str, value: int | str) -> None:
        with open(os.path.join(self.subtree.root, name), "w") as f:
            f.write(str(value))

    @staticmethod
    def lift_lines(root: str) -> None:
        """Both lines of the subtree ``root`` to "max" (also where a killed pmlmd left them:
        --release-workers); a subtree without the memory controller has none."""
        for name in ("memory.high", "memory.max"):
            try:
                with open(os.path.join(root, name), "w") as f:
                    f.write("max")
            except OSError:
                continue

    def lift(self) -> None:
        """Lift both lines ("max") and close the descriptor: workers left running while pmlmd is
        away (a restart) are not throttled by a line nobody moves."""
        self.lift_lines(self.subtree.root)
        self.lines = dict.fromkeys(self.lines)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def containment(subtree: Subtree | None, held_by: str = "process groups") -> str:
    """How workers are held, in one line (the ready line, status, run -v): ``subtree`` where the
    cgroup backend holds them, else ``held_by`` and the /proc backend."""
    return f"a cgroup each, {subtree.describe()}" if subtree is not None else f"{held_by}, followed through /proc"


def _move_self_back(own: str, w: Worker) -> None:
    try:
        _move_self(own)
    except OSError:
        # Standing in a worker's cgroup, pmlmd would be frozen and killed with it.
        log.critical("cannot move pmlmd back out of the worker cgroup %s: aborting", w.path, exc_info=True)
        os.abort()


def _move_self(path: str) -> None:
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")  # 0: the writing process (cgroup-v2.rst, "cgroup.procs")
    finally:
        os.close(fd)


def choose(setting: str, name: str) -> Subtree | None:
    """The subtree for ``setting`` (BACKENDS): ``name`` below pmlmd's own cgroup, made if needed.

    "proc": None. "auto": a Subtree where it can be used, else None (the reason is logged at
    debug level). "cgroup": a Subtree, or Unusable saying why not.
    """
    if setting == "proc":
        return None
    try:
        return _usable(name)
    except Unusable as e:
        if setting == "cgroup":
            raise
        log.debug("workers are followed through /proc: %s", e)
        return None


def existing(name: str) -> Subtree | None:
    """The subtree ``name`` below this process's cgroup if an earlier process made it, else None."""
    mount, relative = cgroup2_mount(), own_cgroup()
    if mount is None or relative is None:
        return None
    root = os.path.join(mount, relative.lstrip("/"), name)
    return Subtree(root, mount) if os.path.isdir(root) else None


def _parent() -> tuple[str, str]:
    """(the cgroup2 mount, this process's cgroup) where a subtree may be made; Unusable otherwise."""
    mount = cgroup2_mount()
    if mount is None:
        raise Unusable("no cgroup2 hierarchy is mounted")
    relative = own_cgroup()
    if relative is None:
        raise Unusable("this process is in no cgroup2 cgroup")
    parent = os.path.join(mount, relative.lstrip("/"))
    if os.path.isdir(SYSTEMD_RUNNING) and not _delegated(parent):
        raise Unusable(f"systemd manages the cgroup hierarchy and has not delegated {parent} (Delegate=yes)")
    return mount, parent


def explain() -> str:
    """Where ``choose("auto")`` would put workers of this process, and whether the memory guard
    could be had, in one line (``pmlmd --version``); nothing is made or changed."""
    mount = cgroup2_mount()
    if mount is not None and os.path.isdir(SYSTEMD_RUNNING) and own_cgroup() is not None:
        # The daemon's batches are systemd scopes (scopes.choose) and their cgroups below them pmlmd's.
        try:
            scoped("/")
        except Unusable as e:
            return f"{containment(None, 'systemd scopes')} ({e})"
        return f"a cgroup each, in each batch's systemd scope (cgroup v2; {_guard_phrase(mount)})"
    try:
        _, parent = _parent()
        parent = os.path.normpath(parent)
        if not os.access(parent, os.W_OK):
            raise Unusable(f"{parent} is not writable")
        _check_kernel()
    except Unusable as e:
        return f"{containment(None)} ({e})"
    return f"a cgroup each, cgroup v2 (below {parent}; {_guard_phrase(parent)})"


def _guard_phrase(parent: str) -> str:
    """Whether the memory guard can be had below ``parent``, for explain."""
    try:
        memory = "memory" in controllers(parent)
    except OSError:
        memory = False
    return "memory.high guard" if memory else "no memory guard: the memory controller is not on the cgroup2 hierarchy"


def _check_kernel() -> None:
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if release is None or (int(release[1]), int(release[2])) < (5, 14):
        raise Unusable("Linux 5.14 or later is needed (cgroup.kill)")


def _usable(name: str) -> Subtree:
    mount, parent = _parent()
    root = os.path.join(parent, name)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise Unusable(f"cannot make {root}: {e.strerror}") from None
    for needed in ("cgroup.freeze", "cgroup.kill", "cgroup.procs"):
        if not os.path.exists(os.path.join(root, needed)):
            with contextlib.suppress(OSError):
                os.rmdir(root)
            raise Unusable(f"{root} has no {needed} (Linux 5.14 or later is needed)")
    return Subtree(root, mount)


def subtree_name(kind: str, key: str) -> str:
    """A subtree's name: ``kind`` (pmlmd, pmlmctl) and ``key``: a process id as it is, anything else
    (a state directory) as a short hash, so that daemons with different state directories never
    share one and a run's subtree says whose it was."""
    return f"{kind}.{key if key.isdigit() else hashlib.sha256(key.encode()).hexdigest()[:12]}"
