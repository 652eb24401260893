"""Sampling the node and the workers from /proc, without blocking and without psutil.

Everything reads from a ``root`` directory (``/proc`` by default) so that the parsers
can be tested against fake /proc trees. Parsing is kept in small pure functions.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..core.governor import NodeSample

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that pmlmd uses."""

    pid: int
    state: str  # R, S, D, T (stopped), t, Z, ...
    ppid: int
    pgrp: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    start_ticks: int  # since boot: with the pid, identifies a process for its whole life
    rss_pages: int


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into bytes per field (fields given in kB are scaled)."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        fields[name.strip()] = value
    return fields


def parse_pss(text: str) -> int | None:
    """The "Pss:" field of /proc/PID/smaps_rollup, in bytes (the file gives kB)."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


MEMORY_FIELDS = (b"MemTotal", b"MemFree", b"MemAvailable")


def parse_memory(raw: bytes) -> tuple[int, int, int]:
    """(MemTotal, MemFree, MemAvailable) in bytes from /proc/meminfo's text (proc(5): kB);
    MemAvailable is MemFree on a kernel that has none (before Linux 3.14). The lines after those
    three, which come first, are not parsed: this runs at every sample. Raises ValueError when
    MemTotal or MemFree is missing."""
    found: dict[bytes, int] = {}
    for line in raw.split(b"\n"):
        name, _, rest = line.partition(b":")
        if name in MEMORY_FIELDS:
            found[name] = int(rest.split()[0]) * 1024
            if len(found) == 3:
                break
    if b"MemTotal" not in found or b"MemFree" not in found:
        raise ValueError("no MemTotal or MemFree line in /proc/meminfo")
    return found[b"MemTotal"], found[b"MemFree"], found.get(b"MemAvailable", found[b"MemFree"])


def parse_cpu_line(text: str) -> tuple[int, int]:
    """From /proc/stat, return (busy, total) jiffies of the aggregate "cpu" line.

    Idle and iowait count as not busy; guest time is already inside user/nice.
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            values = values[:8]  # user nice system idle iowait irq softirq steal
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values)
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def count_cpus(text: str) -> int:
    """Number of per-CPU lines (cpu0, cpu1, ...) in /proc/stat."""
    return sum(1 for line in text.splitlines() if line.startswith("cpu") and line[3:4].isdigit()) or 1


def parse_pid_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat. The command name may hold spaces and parentheses."""
    pid_part, _, rest = text.partition(" (")
    fields = rest[rest.rindex(")") + 2:].split()
    # fields[0] is field 3 of proc(5) (state); field n of proc(5) is fields[n - 3].
    return ProcStat(
        pid=int(pid_part),
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        cpu_ticks=sum(int(v) for v in fields[11:15]),
        start_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def schedstat(pid: int, tid: int) -> str:
    """A thread's schedstat, relative to the /proc root."""
    return f"{pid}/task/{tid}/schedstat"


THREAD_LISTINGS = 5  # how often ProcReader.runtimes lists a process's threads before it gives up


class ThreadClocks:
    """Threads' CPU times (ProcReader.thread_runtime) read through descriptors kept open, at the
    cost of one pread(2) each instead of an open, a read and a close: the /proc backend checks
    every thread of every worker at each refresh, most of them asleep.

    A kept descriptor stays bound to the thread it was opened for: once that thread has exited,
    reading it fails (ESRCH) instead of reading a new thread that got the same id, and the
    descriptor is closed. At most ``limit`` are kept (they count against RLIMIT_NOFILE, as the
    workers' own descriptors do); past that a thread is read the plain way."""

    def __init__(self, proc: "ProcReader", limit: int):
        self.proc = proc
        self.limit = limit
        self.fds: dict[tuple[int, int], int] = {}  # (pid, tid) -> descriptor of its schedstat
        self.read: dict[int, bytes] = {}  # descriptor -> what its last runtime() read

    def runtime(self, pid: int, tid: int) -> int | None:
        """Nanoseconds the thread has run (ProcReader.thread_runtime); None when gone or unreadable."""
        fd = self.fds.get((pid, tid))
        if fd is None:
            if len(self.fds) >= self.limit:
                return self.proc.thread_runtime(pid, tid)
            try:
                fd = os.open(os.path.join(self.proc.root, schedstat(pid, tid)), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self.fds[(pid, tid)] = fd
        try:
            raw = self.proc.thread_schedstat(pid, fd)
            ran = int(raw.split()[0])
        except (OSError, ValueError, IndexError):
            self.forget([(pid, tid)])
            return None
        self.read[fd] = raw
        return ran

    def marks(self, runtimes: dict[int, dict[int, int]]) -> tuple[tuple[int, int, int, bytes | int], ...]:
        """What ``unmoved`` compares a tree's threads against later: for each thread of
        ``runtimes`` (pid -> thread id -> nanoseconds, as ``runtimes`` returned them) its pid, its
        thread id, its kept descriptor and the bytes read through it, or -1 and its nanoseconds
        for a thread read the plain way (past ``limit``)."""
        marks = []
        for pid, threads in runtimes.items():
            for tid, ran in threads.items():
                fd = self.fds.get((pid, tid))
                raw = self.read.get(fd) if fd is not None else None
                marks.append((pid, tid, fd, raw) if raw is not None else (pid, tid, -1, ran))
        return tuple(marks)

    def unmoved(self, marks: tuple[tuple[int, int, int, bytes | int], ...]) -> bool:
        """Whether no thread of ``marks`` has run since they were taken: each reads as it did.
        The check every refresh makes of every sleeping worker, so it compares the bytes read
        (all three fields of schedstat move when a thread runs) and parses nothing."""
        read = self.proc.thread_schedstat
        try:
            for pid, tid, fd, then in marks:
                if (read(pid, fd) if fd >= 0 else self.proc.thread_runtime(pid, tid)) != then:
                    return False
        except OSError:
            return False
        return True

    def runtimes(self, pid: int) -> dict[int, int] | None:
        """ProcReader.runtimes through the kept descriptors."""
        return self.proc.runtimes(pid, self.runtime)

    def forget(self, threads) -> None:
        """Close the descriptors of ``threads`` ((pid, tid) pairs): they ended, or left the watch."""
        for key in threads:
            fd = self.fds.pop(key, None)
            if fd is not None:
                self.read.pop(fd, None)
                os.close(fd)

    def close(self) -> None:
        self.forget(list(self.fds))


class ProcReader:
    """Reads /proc (or a fake tree laid out like it)."""

    def __init__(self, root: str = "/proc"):
        self.root = root
        self.kept: dict[str, int] = {}  # relative path -> descriptor, for the files read at each sample

    def __del__(self) -> None:
        for fd in getattr(self, "kept", {}).values():
            os.close(fd)
        self.kept = {}

    def _read(self, relpath: str) -> str:
        with open(os.path.join(self.root, relpath), "rb", buffering=0) as f:
            return f.read().decode("utf-8", "replace")

    def _pread(self, relpath: str, size: int) -> bytes:
        """The first ``size`` bytes of a file read at every sample, through a descriptor kept open
        (pread(2) at offset 0 makes the kernel produce the file afresh)."""
        fd = self.kept.get(relpath)
        if fd is None:
            fd = os.open(os.path.join(self.root, relpath), os.O_RDONLY | os.O_CLOEXEC)
            self.kept[relpath] = fd
        return os.pread(fd, size, 0)

    def meminfo(self) -> dict[str, int]:
        return parse_meminfo(self._read("meminfo"))

    def memory(self) -> tuple[int, int, int]:
        """(MemTotal, MemFree, MemAvailable) in bytes (parse_memory)."""
        return parse_memory(self._pread("meminfo", 16384))

    def cpu_times(self) -> tuple[int, int]:
        # The aggregate "cpu" line comes first and holds at most 10 numbers of 20 digits.
        return parse_cpu_line(self._pread("stat", 512).decode("ascii", "replace"))

    def cpu_count(self) -> int:
        return count_cpus(self._read("stat"))

    def pid_stat(self, pid: int) -> ProcStat | None:
        """The process's stat, or None when it is gone."""
        try:
            return parse_pid_stat(self._read(f"{pid}/stat"))
        except (OSError, ValueError, IndexError):
            return None

    def thread_runtime(self, pid: int, tid: int) -> int | None:
        """Nanoseconds one thread of the process has spent on a CPU (/proc/PID/task/TID/schedstat,
        first field: the scheduler's exact sum, where /proc/PID/stat counts whole clock ticks, so
        a fork or a page fault always moves it). Per thread: /proc/PID/schedstat is the thread
        group leader's alone, and stands still while other threads of the process run. None when
        gone or unreadable."""
        try:
            return int(self._read(schedstat(pid, tid)).split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def thread_schedstat(self, pid: int, fd: int) -> bytes:
        """A thread's schedstat as bytes, through ``fd``, a descriptor open on it (ThreadClocks),
        read with pread(2). Raises OSError (ESRCH once the thread is gone)."""
        return os.pread(fd, 128, 0)

    def runtimes(self, pid: int, read: Callable[[int, int], int | None] | None = None) -> dict[int, int] | None:
        """``thread_runtime`` of each thread of the process (or ``read(pid, tid)``: ThreadClocks), by
        thread id; None when the process or one of its threads could not be read (gone, or a
        thread that ended meanwhile).

        A thread is made by a thread of the same process, which ran to make it: when none of the
        threads listed here moved, the process has no new thread, child or page either. For that
        the threads are listed again after they were read, until a listing shows none that was
        not read: a thread made after that listing was made by one read before it, which has
        moved since. (Made between the first listing and its maker's read, it would otherwise
        be missed for as long as its maker sleeps.) None too when the list keeps changing."""
        read = read or self.thread_runtime
        found: dict[int, int] = {}
        for _ in range(THREAD_LISTINGS):
            try:
                tids = [int(name) for name in os.listdir(os.path.join(self.root, str(pid), "task"))]
            except OSError:
                return None
            new = [tid for tid in tids if tid not in found]
            if not new:
                return found
            for tid in new:
                ran = read(pid, tid)
                if ran is None:
                    return None
                found[tid] = ran
        return None

    def children(self, pid: int) -> list[int]:
        """The pids of the process's children, from /proc/PID/task/TID/children of each thread.

        proc(5): the kernel keeps these lists (CONFIG_PROC_CHILDREN); a child appears in the
        list of the thread that created it, or of the thread it was re-parented to. Gone: [].
        """
        found = []
        try:
            threads = os.listdir(os.path.join(self.root, str(pid), "task"))
        except OSError:
            return found
        for tid in threads:
            try:
                found += [int(v) for v in self._read(f"{pid}/task/{tid}/children").split()]
            except (OSError, ValueError):
                continue
        return found

    def has_children_lists(self) -> bool:
        """Whether the kernel keeps /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)."""
        pid = os.getpid()
        return os.path.exists(os.path.join(self.root, str(pid), "task", str(pid), "children"))

    def pss(self, pid: int) -> int | None:
        """The process's proportional set size in bytes (/proc/PID/smaps_rollup, proc(5)): each
        page it shares counts divided by the number of processes sharing it, so the members of a
        worker that forked children over the same memory add up to that memory once. None when
        unreadable (gone, a kernel thread, or no ptrace access to it)."""
        try:
            text = self._read(f"{pid}/smaps_rollup")
        except OSError:
            return None
        return parse_pss(text)

    def environ(self, pid: int) -> dict[bytes, bytes]:
        """The environment the process was started with (/proc/PID/environ); {} when unreadable."""
        try:
            with open(os.path.join(self.root, str(pid), "environ"), "rb", buffering=0) as f:
                raw = f.read()
        except OSError:
            return {}
        return dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if b"=" in item)

    def all_pid_stats(self) -> Iterable[ProcStat]:
        for name in os.listdir(self.root):
            if name.isdigit():
                stat = self.pid_stat(int(name))
                if stat is not None:
                    yield stat


@dataclass(frozen=True)
class GroupUsage:
    """What a worker's process group uses right now."""

    rss: int  # bytes
    cpu_ticks: int
    states: str  # one letter per process, e.g. "TT"
    processes: int
    pids: tuple[int, ...] = ()  # its members that are not zombies


def usage_of(stats: Iterable[ProcStat]) -> GroupUsage:
    """The sum of some processes; ``pids`` leaves out zombies, which hold no memory to measure."""
    stats = list(stats)
    return GroupUsage(rss=sum(st.rss_pages for st in stats) * PAGE_SIZE, cpu_ticks=sum(st.cpu_ticks for st in stats),
                      states="".join(st.state for st in stats), processes=len(stats),
                      pids=tuple(st.pid for st in stats if st.state != "Z"))


def group_usage(stats: Iterable[ProcStat], pgids: set[int]) -> dict[int, GroupUsage]:
    """Sum the members of each wanted process group."""
    members: dict[int, list[ProcStat]] = {}
    for st in stats:
        if st.pgrp in pgids:
            members.setdefault(st.pgrp, []).append(st)
    return {pgid: usage_of(group) for pgid, group in members.items()}


class PressureTrigger:
    """A PSI trigger on the node's memory pressure (kernel doc accounting/psi.rst): the kernel
    signals POLLPRI on the descriptor when tasks stalled on memory (reclaim, throttling, waiting
    for a page to be read back) for more than ``stall_us`` within ``window_us``. pmlmd samples
    at once then, whenever its next sample was due: a node short of memory stalls before its
    free memory is read again.

    The kernel resets the event when the descriptor is polled, and fires at most once per
    window, so a level-triggered watch does not spin.

    The first of ``triggers`` ((stall_us, window_us) pairs) the kernel accepts is used: without
    CAP_SYS_RESOURCE (an unprivileged user, or root in a sandbox without it) Linux 6.5 and later
    accept only windows that are whole multiples of 2 s, and check them at that pace. Raises
    OSError where none can be had: no /proc/pressure (a kernel without CONFIG_PSI, or booted
    with psi=0), or an unprivileged user on a kernel before 6.5."""

    TRIGGERS = ((20_000, 500_000), (100_000, 2_000_000))  # 20 ms stalled in 0.5 s; 100 ms in 2 s

    def __init__(self, path: str = "/proc/pressure/memory", triggers: tuple = TRIGGERS):
        refused = None
        for stall_us, window_us in triggers:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, f"some {stall_us} {window_us}".encode() + b"\0")
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                refused = e
                continue
            self.fd, self.stall_us, self.window_us = fd, stall_us, window_us
            return
        raise refused

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class NodeSampler:
    """Produces NodeSamples; node CPU is measured over windows of at least ``cpu_window`` s.

    Jiffies tick at 100 Hz, so shorter windows are too coarse to mean anything; when
    memory is sampled faster than that the last CPU reading is repeated.
    """

    def __init__(self, proc: ProcReader | None = None, cpu_window: float = 0.2,
                 clock: Callable[[], float] = time.monotonic):
        self.proc = proc or ProcReader()
        self.cpu_window = cpu_window
        self.clock = clock
        self.cpu_count = self.proc.cpu_count()
        self._mark: tuple[float, int, int] | None = None
        self._cpu_pct: float | None = None
        self._cpu_span: tuple[float | None, float | None] = (None, None)  # what _cpu_pct was measured over

    def sample(self) -> NodeSample:
        now = self.clock()
        mem_total, mem_free, mem_available = self.proc.memory()
        if self._mark is None or now - self._mark[0] >= self.cpu_window:
            busy, total = self.proc.cpu_times()
            if self._mark is not None and total > self._mark[2]:
                self._cpu_pct = 100.0 * (busy - self._mark[1]) / (total - self._mark[2])
                self._cpu_span = (self._mark[0], now)
            self._mark = (now, busy, total)
        return NodeSample(
            time=now,
            cpu_pct=self._cpu_pct,
            mem_total=mem_total,
            mem_available=mem_available,
            mem_free=mem_free,
            cpu_from=self._cpu_span[0],
            cpu_to=self._cpu_span[1],
        )
