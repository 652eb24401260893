"""Where workers' stdout and stderr go: files the daemon keeps per task, or pipes pmlmctl run reads.

Two ports with the same four calls, made by the engine around each attempt:
``open(run, task, attempt_no)`` gives the worker's stdout and stderr descriptors (or None:
the engine's own), ``spawned``/``failed`` tell how the spawn went, ``ended`` that the
worker was reaped.

``TaskFiles`` (the daemon). Each task's stdout and stderr go straight into a file of its
own, ``STATE_DIR/output/BATCH/TASK.out`` and ``.err`` (root's, mode 0600), opened with
O_APPEND by pmlmd and inherited by the worker; later attempts append. The worker writes
with no copy through pmlmd and no pipe that a restart of pmlmd would break: a worker
adopted after a restart goes on writing where it was. Only the tail is kept: when a file
holds more than ``limit`` bytes, pmlmd punches a hole over the head (fallocate(2)
FALLOC_FL_PUNCH_HOLE, whole 4 KiB blocks), which frees the disk blocks and keeps every
offset; the first offset that still holds data is where the kernel's SEEK_DATA lands
(lseek(2)). Offsets are therefore positions in everything the task ever wrote, and a
reader that asks for a dropped one is told how many bytes it missed. The check runs at
``enforce()`` (the daemon's housekeeping, every second), so a file may pass the limit by
what a worker writes in between. Files that stay empty are removed when the attempt ends.

``Pipes`` (pmlmctl run). The worker writes into pipes that the loop reads and hands to
sinks: the terminal above the status line (``--tag``, ``--group``), ``--results DIR``.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

from . import workdir

log = logging.getLogger("pmlmd.output")

STREAMS = ("stdout", "stderr")
SUFFIX = {"stdout": "out", "stderr": "err"}
BLOCK = 4096  # holes are punched in whole blocks: the file system frees nothing smaller
READ_CHUNK = 65536  # what one readable pipe gives per loop turn: no worker holds the loop long
MAX_LINE = 65536  # bytes: a longer line is forwarded (or printed with --tag) in pieces
LOG_EVERY = 60.0  # seconds between two log lines about the same kind of write failure

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_head(fd: int, upto: int) -> None:
    """Free the file's bytes before ``upto`` (rounded down to a block); its size stays. Raises OSError."""
    upto -= upto % BLOCK
    if upto <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, upto) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def first_kept(fd: int) -> int:
    """The first offset of the file that holds data (its size when it holds none)."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only holes, or empty
            return os.fstat(fd).st_size
        raise


@dataclass
class Chunk:
    """Bytes of one task's stream: ``data`` starts at ``offset``; ``skipped`` bytes before it were dropped."""

    task: int
    stream: str
    offset: int
    data: bytes
    skipped: int = 0


@dataclass
class _BatchFiles:
    directory: str
    present: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in STREAMS})  # sorted task indices
    scanned: bool = False
    made: bool = False  # its directory exists (made by this pmlmd): no look at the disk per task


class TaskFiles:
    """The daemon's port: each task's output in files under ``root`` (see the module's docstring)."""

    def __init__(self, root: str, limit: int, *, forward: Callable[[str, int, str, bytes], None] | None = None):
        """``limit``: bytes kept per task and stream. ``forward(batch, task, stream, line)``, when
        given, is handed each complete line (the journal, if the operator asked for it)."""
        self.root = root
        self.limit = limit
        self.forward = forward
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.batches: dict[str, _BatchFiles] = {}
        # (batch, task) -> [[fd, stream, forwarded, partial, bytes on disk at open], ...]
        self.open_files: dict[tuple[str, int], list] = {}
        self.kept: dict[str, int] = {}  # batch -> bytes on disk of its ended tasks' output (see measure)
        self.failure_logged_at: dict[str, float] = {}
        self.devnull: int | None = None  # where a worker writes whose files cannot be opened

    # --- the engine's port -------------------------------------------------------------------
    def open(self, run, task, attempt_no: int) -> tuple[int, int] | None:
        files = self._files(run.id, task.index, create=True)
        if files is None:
            # Logged. The worker's output is lost: never pmlmd's own stdout and stderr, which
            # are its log (the journal), where a worker could write lines that look like pmlmd's.
            if self.devnull is None:
                self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            return self.devnull, self.devnull
        return files[0][0], files[1][0]

    def spawned(self, run, task, attempt) -> None:
        pass  # pmlmd keeps its descriptors: it watches the files' size (enforce) while the task runs

    def failed(self, run, task) -> None:
        self.ended(run, task, None)

    def adopted(self, run, task, attempt) -> None:
        """A worker a previous pmlmd started: watch its files again."""
        self._files(run.id, task.index, create=True)

    def ended(self, run, task, attempt) -> None:
        files = self.open_files.pop((run.id, task.index), None)
        if files is None:
            return
        if attempt is not None and getattr(run, "results", None):
            try:
                write_results(run.results, task.index, {s: self._path(run.id, task.index, s) for s in STREAMS},
                              attempt, run.owner if os.geteuid() == 0 else None)
            except OSError as e:
                self._failure("results", f"batch {run.id}: cannot write the results of task {task.index} to "
                                         f"{e.filename or run.results}: {e.strerror}")
        for entry in files:
            fd, stream = entry[0], entry[1]
            try:
                self._forward(run.id, task.index, entry, final=True)
                self._trim(fd)
                info = os.fstat(fd)
                empty = info.st_size == 0
                self.kept[run.id] = self.kept.get(run.id, 0) + info.st_blocks * 512 - entry[4]
            except OSError as e:
                self._failure("size", f"batch {run.id} task {task.index}: {e.strerror}")
                empty = False
            finally:
                os.close(fd)
            if empty:  # no output: no file, and a batch of quiet tasks leaves no files behind
                try:
                    os.unlink(self._path(run.id, task.index, stream))
                    self._forget(run.id, task.index, stream)
                except OSError:
                    pass

    # --- housekeeping ------------------------------------------------------------------------
    def enforce(self) -> None:
        """Keep each running task's files within the limit, and forward new lines (every second)."""
        for (batch_id, index), files in list(self.open_files.items()):
            for entry in files:
                try:
                    self._forward(batch_id, index, entry, final=False)
                    self._trim(entry[0])
                except OSError as e:
                    self._failure("trim", f"batch {batch_id} task {index}: {e.strerror}")

    def _trim(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size > self.limit:
            try:
                punch_head(fd, size - self.limit)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # A file system without holes (rare for a state directory): drop it all instead.
                self._failure("holes", f"cannot punch holes in output files ({e.strerror}): a task's "
                                       "output is emptied when it passes the limit")
                os.ftruncate(fd, 0)

    def _forward(self, batch_id: str, index: int, entry: list, final: bool) -> None:
        if self.forward is None:
            return
        fd, stream, done, partial = entry[:4]
        size = os.fstat(fd).st_size
        start = max(done, first_kept(fd))
        data = partial + (os.pread(fd, min(size - start, 1 << 20), start) if size > start else b"")
        entry[2] = start + (len(data) - len(partial))
        lines = data.split(b"\n")
        rest = lines.pop()  # an unfinished line waits for its end, unless the task has ended
        if rest and (final or len(rest) > MAX_LINE):  # a line that does not end goes in pieces
            lines.append(rest)
            rest = b""
        entry[3] = rest
        try:
            for line in lines:
                self.forward(batch_id, index, stream, line)
        except Exception as e:  # the journal gone, say: the task's files still hold every line
            self._failure("forward", f"cannot forward output lines: {type(e).__name__}: {e}")

    def _failure(self, kind: str, what: str) -> None:
        now = time.monotonic()
        if now >= self.failure_logged_at.get(kind, 0.0):
            log.warning("task output: %s", what)
            self.failure_logged_at[kind] = now + LOG_EVERY

    # --- files -------------------------------------------------------------------------------
    def _path(self, batch_id: str, index: int, stream: str) -> str:
        return os.path.join(self.root, batch_id, f"{index}.{SUFFIX[stream]}")

    def _batch(self, batch_id: str) -> _BatchFiles:
        entry = self.batches.get(batch_id)
        if entry is None:
            entry = self.batches[batch_id] = _BatchFiles(os.path.join(self.root, batch_id))
        if not entry.scanned:
            # Once per batch and daemon: which tasks have output already (before a restart, say).
            entry.scanned = True
            try:
                names = os.listdir(entry.directory)
            except OSError:
                names = []
            for name in names:
                index, _, suffix = name.partition(".")
                for stream in STREAMS:
                    if suffix == SUFFIX[stream] and index.isdigit():
                        bisect.insort(entry.present[stream], int(index))
        return entry

    def _files(self, batch_id: str, index: int, create: bool) -> list | None:
        files = self.open_files.get((batch_id, index))
        if files is not None:
            return files
        batch = self._batch(batch_id)
        files = []
        try:
            if not batch.made:
                os.makedirs(batch.directory, mode=0o700, exist_ok=True)
                batch.made = True
            for stream in STREAMS:
                # Read and write: pmlmd reads what it forwards through the descriptor it holds anyway.
                fd = os.open(self._path(batch_id, index, stream), os.O_RDWR | os.O_APPEND | os.O_CREAT
                             | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                info = os.fstat(fd)
                # Lines already there were forwarded by then; the blocks it took count already (kept).
                files.append([fd, stream, info.st_size, b"", info.st_blocks * 512])
                present = batch.present[stream]
                at = bisect.bisect_left(present, index)
                if at == len(present) or present[at] != index:
                    present.insert(at, index)
        except OSError as e:
            for entry in files:
                os.close(entry[0])
            self._failure("open", f"cannot open the output files of batch {batch_id} task {index} in "
                                  f"{batch.directory}: {e.strerror}; what its workers write is lost")
            return None
        self.open_files[(batch_id, index)] = files
        return files

    def _forget(self, batch_id: str, index: int, stream: str) -> None:
        present = self._batch(batch_id).present[stream]
        at = bisect.bisect_left(present, index)
        if at < len(present) and present[at] == index:
            del present[at]

    # --- reading -----------------------------------------------------------------------------
    def tasks_with_output(self, batch_id: str, stream: str, start: int = 0) -> list[int]:
        """The tasks of the batch that have ``stream`` output, from task ``start`` on, in order."""
        present = self._batch(batch_id).present[stream]
        return present[bisect.bisect_left(present, start):]

    def read(self, batch_id: str, index: int, stream: str, offset: int, size: int) -> Chunk:
        """At most ``size`` bytes of the task's ``stream`` from ``offset`` (a position in all it wrote).

        Offsets before what is kept are skipped (``Chunk.skipped`` says how many); a task with
        no file reads as empty.
        """
        try:
            fd = os.open(self._path(batch_id, index, stream), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return Chunk(index, stream, offset, b"")
        try:
            kept = first_kept(fd)
            skipped = max(kept - offset, 0)
            offset += skipped
            return Chunk(index, stream, offset, os.pread(fd, size, offset), skipped)
        finally:
            os.close(fd)

    def size(self, batch_id: str, index: int, stream: str) -> int:
        try:
            return os.stat(self._path(batch_id, index, stream)).st_size
        except OSError:
            return 0

    def measure(self) -> None:
        """What each batch's output takes on disk (at start: what earlier runs of pmlmd left)."""
        self.kept.clear()
        try:
            batches = os.listdir(self.root)
        except OSError:
            return
        for batch_id in batches:
            total = 0
            try:
                with os.scandir(os.path.join(self.root, batch_id)) as entries:
                    for entry in entries:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
            self.kept[batch_id] = total

    def remove(self, batch_id: str) -> None:
        """Delete a batch's output (when the batch itself is pruned)."""
        self.batches.pop(batch_id, None)
        self.kept.pop(batch_id, None)
        shutil.rmtree(os.path.join(self.root, batch_id), ignore_errors=True)

    def keep_only(self, batch_ids: set[str]) -> int:
        """Delete the output of every batch not in ``batch_ids``; returns how many went."""
        removed = 0
        try:
            names = os.listdir(self.root)
        except OSError:
            return 0
        for name in names:
            if name not in batch_ids:
                self.remove(name)
                removed += 1
        return removed


def exit_text(attempt) -> str:
    """An attempt's end as a shell reports it: the exit code, or 128 + the signal that ended it."""
    if attempt.signal is not None:
        return str(128 + attempt.signal)
    return str(attempt.exit_code if attempt.exit_code is not None else "")


def results_file(directory: str, index: int, name: str, credentials) -> int:
    """``DIRECTORY/TASK/NAME`` opened for writing (emptied), made and opened as ``credentials``."""
    task_dir = os.path.join(directory, str(index))
    workdir.make_directories(task_dir, credentials)
    return workdir.open_file(os.path.join(task_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666,
                             credentials)


def _send(source: int, target: int, count: int, offset: int) -> int:
    """copy_file_range's call, made with sendfile(2)."""
    return os.sendfile(target, source, offset, count)


def write_results(directory: str, index: int, sources: dict[str, str], attempt, credentials) -> None:
    """``--results`` for a daemon batch: DIRECTORY/TASK/stdout and stderr get what the task's files
    kept (see TaskFiles), DIRECTORY/TASK/exit its exit status; all made as the submitting user
    (``credentials``; None: pmlmd's own). Raises OSError."""
    for stream, path in sources.items():
        target = results_file(directory, index, stream, credentials)
        try:
            source = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:  # it wrote nothing there
            os.close(target)
            continue
        try:
            offset, size = first_kept(source), os.fstat(source).st_size
            copy = os.copy_file_range
            while offset < size:
                try:
                    copied = copy(source, target, size - offset, offset)
                except OSError as e:
                    # copy_file_range(2) copies within one file system type only (EXDEV from the
                    # state's to a results directory on another, EINVAL or ENOSYS elsewhere):
                    # sendfile(2) takes any regular file, as copy_file_range advances the target.
                    if copy is _send or e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                                               errno.EOPNOTSUPP):
                        raise
                    copy = _send
                    continue
                if copied == 0:
                    break
                offset += copied
        finally:
            os.close(source)
            os.close(target)
    target = results_file(directory, index, "exit", credentials)
    try:
        os.write(target, (exit_text(attempt) + "\n").encode())
    finally:
        os.close(target)


class Sink:
    """Where pmlmctl run sends one attempt's output (see Pipes)."""

    def write(self, stream: str, data: bytes) -> None:
        raise NotImplementedError

    def close(self, attempt) -> None:
        """Both pipes are at their end and the worker was reaped (``attempt`` has its exit status)."""


class Terminal(Sink):
    """Lines on pmlmctl's stdout and stderr, each written whole (never half a line of two tasks).

    ``emit(stream, data)`` writes complete lines (above the status line, if one is drawn).
    ``tag``: each line starts with it and a tab (--tag). ``group``: a task's whole output is
    written when it ends, its stdout then its stderr (--group); otherwise line by line as it
    comes (lines of different tasks interleave, never mix).
    """

    def __init__(self, emit: Callable[[str, bytes], None], tag: bytes | None = None, group: bool = False):
        self.emit = emit
        self.tag = tag
        self.group = group
        self.partial = {s: b"" for s in STREAMS}
        self.midline = {s: False for s in STREAMS}  # what went out last ended inside a line
        self.grouped: dict[str, list[bytes]] = {s: [] for s in STREAMS}

    def write(self, stream: str, data: bytes) -> None:
        data = self.partial[stream] + data
        end = data.rfind(b"\n") + 1
        if len(data) - end > MAX_LINE:
            end = len(data)  # a line too long to hold goes out in pieces, the rest of it untagged
        self.partial[stream] = data[end:]
        if end:
            self._out(stream, data[:end])

    def _out(self, stream: str, data: bytes) -> None:
        if self.tag is not None:
            # The last piece is empty when the data ends a line, else the start of an unfinished one.
            pieces = data.split(b"\n")
            lead = self.tag + b"\t"
            tagged = [(b"" if i == 0 and self.midline[stream] else lead) + piece
                      for i, piece in enumerate(pieces) if piece or i < len(pieces) - 1]
            out = b"\n".join(tagged) + (b"\n" if data.endswith(b"\n") else b"")
        else:
            out = data
        self.midline[stream] = not data.endswith(b"\n")
        if self.group:
            self.grouped[stream].append(out)
        else:
            self.emit(stream, out)

    def close(self, attempt) -> None:
        for stream in STREAMS:
            if self.partial[stream] or self.midline[stream]:
                # The last line ends here, so the next output (or the status line) starts afresh.
                self._out(stream, self.partial[stream] + b"\n")
                self.partial[stream] = b""
        if self.group:
            for stream in STREAMS:
                if self.grouped[stream]:
                    self.emit(stream, b"".join(self.grouped[stream]))
                    self.grouped[stream] = []


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Results(Sink):
    """``--results DIRECTORY`` for pmlmctl run: DIRECTORY/TASK/stdout, stderr, and exit at the end."""

    def __init__(self, directory: str, index: int):
        self.directory, self.index = directory, index
        self.fds = {stream: results_file(directory, index, stream, None) for stream in STREAMS}

    def write(self, stream: str, data: bytes) -> None:
        write_all(self.fds[stream], data)

    def close(self, attempt) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        target = results_file(self.directory, self.index, "exit", None)
        try:
            os.write(target, (exit_text(attempt) + "\n").encode())
        finally:
            os.close(target)


class _Capture:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.read_fds: dict[str, int] = {}
        self.write_fds: dict[str, int] = {}
        self.attempt = None
        self.reaped = False


class Pipes:
    """pmlmctl run's port: each attempt's stdout and stderr through pipes that the loop reads.

    ``sinks_for(run, task, attempt_no)`` gives the sinks of one attempt. Each readable pipe
    gives at most READ_CHUNK bytes per loop turn. An attempt's sinks are closed when the
    worker was reaped and both pipes are at their end (a process it left behind may hold
    them a little longer; ``close_all`` ends that at the end of the run).
    """

    def __init__(self, loop, sinks_for: Callable[..., list[Sink]]):
        self.loop = loop
        self.sinks_for = sinks_for
        self.captures: dict[tuple[str, int], _Capture] = {}

    def open(self, run, task, attempt_no: int) -> tuple[int, int] | None:
        capture = _Capture(self.sinks_for(run, task, attempt_no))
        try:
            for stream in STREAMS:
                r, w = os.pipe2(os.O_CLOEXEC)
                capture.read_fds[stream], capture.write_fds[stream] = r, w
        except OSError:
            self._close_fds(capture)
            raise
        self.captures[(run.id, task.index)] = capture
        return capture.write_fds["stdout"], capture.write_fds["stderr"]

    def spawned(self, run, task, attempt) -> None:
        capture = self.captures[(run.id, task.index)]
        capture.attempt = attempt
        for fd in capture.write_fds.values():
            os.close(fd)  # the worker holds them now: the pipe ends when it (and what it started) closes them
        capture.write_fds = {}
        for stream, fd in capture.read_fds.items():
            self.loop.watch(fd, lambda c=capture, s=stream, k=(run.id, task.index): self._readable(k, c, s))

    def failed(self, run, task) -> None:
        capture = self.captures.pop((run.id, task.index), None)
        if capture is not None:
            self._close_fds(capture)

    def adopted(self, run, task, attempt) -> None:
        pass

    def ended(self, run, task, attempt) -> None:
        key = (run.id, task.index)
        capture = self.captures.get(key)
        if capture is not None:
            capture.reaped = True
            self._finish_if_done(key, capture)

    def _readable(self, key, capture: _Capture, stream: str) -> None:
        fd = capture.read_fds[stream]
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError:
            data = b""
        if data:
            for sink in capture.sinks:
                sink.write(stream, data)
            return
        self.loop.unwatch(fd)
        os.close(fd)
        del capture.read_fds[stream]
        self._finish_if_done(key, capture)

    def _finish_if_done(self, key, capture: _Capture) -> None:
        if capture.reaped and not capture.read_fds and self.captures.get(key) is capture:
            del self.captures[key]
            for sink in capture.sinks:
                sink.close(capture.attempt)

    def close_all(self) -> None:
        """At the end of the run: what the pipes still hold goes out, then every sink is closed."""
        for key, capture in list(self.captures.items()):
            for stream, fd in list(capture.read_fds.items()):
                os.set_blocking(fd, False)
                try:
                    while data := os.read(fd, READ_CHUNK):
                        for sink in capture.sinks:
                            sink.write(stream, data)
                except OSError:
                    pass
                if capture.attempt is not None:  # spawned: the loop watches it
                    self.loop.unwatch(fd)
                os.close(fd)
            capture.read_fds = {}
            capture.reaped = True
            if capture.attempt is None:
                self._close_fds(capture)
                self.captures.pop(key, None)
                continue
            self._finish_if_done(key, capture)

    @staticmethod
    def _close_fds(capture: _Capture) -> None:
        for fd in [*capture.read_fds.values(), *capture.write_fds.values()]:
            os.close(fd)
        capture.read_fds, capture.write_fds = {}, {}
