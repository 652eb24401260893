"""Persistence: the daemon's batches, tasks and attempts in one SQLite file (WAL).

A submitted batch is committed before the daemon replies, and every attempt's start
and end is committed as it happens, so a restarted daemon knows every task's state
and which workers it may find still running. Finished batches keep their report and
their summary (summary.BatchSummary) until they are pruned.

A full disk. A write that fails for want of space (or any other OperationalError of SQLite)
never reaches the daemon's loop: it is kept in memory, in order (one entry per attempt, task
list or batch, each re-reading the daemon's objects when it runs), and tried again by
``retry()`` at every housekeeping turn, so that once space returns the file again holds what
memory holds, with no restart. Meanwhile ``unwritable`` says why, and what must be
acknowledged first (``next_seq``, ``add_batch``: a submit) raises ``Unwritable`` instead: no
batch is acknowledged that is not in the file. A start on a full disk, when SQLite cannot even
make its WAL index, reads the file as it is (read-only) and writes once it can.

Damaged state. ``last-batch-id`` beside the database (written atomically, in blocks of
ID_BLOCK ids, before an id of a new block is handed out) says that a state existed and the
highest batch id that may have been handed out. ``state.db.backup`` is a copy made with
SQLite's backup API by ``backup()`` (at housekeeping, at most every BACKUP_INTERVAL seconds
when something changed, and at a clean stop). At start, a state.db that is missing or empty
while ``last-batch-id`` exists, or that is not a database or fails ``PRAGMA integrity_check``
(about 0.1 s for 100k tasks), is moved aside as ``state.db.damaged-TIMESTAMP`` (with its -wal
and -shm); then the state is restored from the backup when it passes the same check (the log
names the batches that may be missing: those handed out after the backup), else the start is
refused with one line that says what to do (``StoreError``). Either way batch ids go on above
the mark in ``last-batch-id``: an id is never handed out twice. An empty state is started over
a lost one only when asked: a file ``start-empty`` in the state directory, removed once used.
The mark a recovery goes on above is written into the restored (or empty) database at once, so
that later starts of a state that is whole again go on above it too.

One pmlmd per state. A Store holds an exclusive flock(2) on the state directory while it is open (the kernel lets go of it when its process ends, however it ends); a second
pmlmd on the same directory, which would adopt and run the first one's workers and tasks again,
is refused at start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from ..core import tasklines
from ..core.batch import CANCELLED, FINISHED, QUEUED, RETURNED, RUNNING, Attempt, Task
from ..core.bounds import BOUNDS
from ..core.summary import BatchSummary, from_record

log = logging.getLogger("pmlmd.store")

SCHEMA_VERSION = 4
MARKER = "last-batch-id"  # the highest batch id that may have been handed out; written atomically
BACKUP = "state.db.backup"
START_EMPTY = "start-empty"  # asks a start to go on with an empty state over a lost one
ID_BLOCK = 64  # last-batch-id is written once per this many ids
BACKUP_INTERVAL = 300.0  # seconds, at least, between backups made while the daemon runs

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    owner_groups TEXT NOT NULL,      -- JSON list of gids
    priority INTEGER NOT NULL,
    submission TEXT NOT NULL,        -- JSON: what the batch was submitted with
    state TEXT NOT NULL,             -- active | finished
    held INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL,
    cancel_reason TEXT,
    critical_reason TEXT,
    report TEXT,                     -- JSON execution report, once finished
    summary TEXT,                    -- JSON batch summary (summary.BatchSummary), once finished
    task_count INTEGER,              -- its number of tasks (NULL: a queue batch, or schema 3: count the rows)
    rest TEXT                        -- the status of each of its tasks that has no row (NULL: queued)
);
-- A task has a row once it was taken (its first attempt, a deferral, a queue batch's message),
-- not before: a batch of 1,000,000 tasks costs no row until its tasks run (see batch.TaskTable).
CREATE TABLE IF NOT EXISTS tasks (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    line TEXT,                       -- a BLOB of its bytes when they are not UTF-8 (kept as one)
    status TEXT NOT NULL,
    governor_ends INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    message TEXT,                    -- JSON: a queue batch's task's message (Task.message)
    PRIMARY KEY (batch_id, idx)
);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    number INTEGER NOT NULL,
    pid INTEGER,
    start_ticks INTEGER,
    start REAL NOT NULL,
    end REAL,
    exit_code INTEGER,
    signal INTEGER,
    cause TEXT,
    reason TEXT,
    peak_rss INTEGER NOT NULL DEFAULT 0,
    cpu_seconds REAL NOT NULL DEFAULT 0,
    pauses INTEGER NOT NULL DEFAULT 0,
    stop_path TEXT,
    PRIMARY KEY (batch_id, idx, number)
);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state, finished);
"""

# What takes a database of each older schema version to the next one. Version 1 had no summary
# column: its finished batches are summarized from their reports (summary.from_record). Version 2
# had no queue batches (see intake), so no task message. Version 3 wrote a row for every task at
# submit: its batches have no task_count (their rows are counted) and no rest (nothing lacks a row).
MIGRATIONS = {1: ("ALTER TABLE batches ADD COLUMN summary TEXT",),
              2: ("ALTER TABLE tasks ADD COLUMN message TEXT",),
              3: ("ALTER TABLE batches ADD COLUMN task_count INTEGER", "ALTER TABLE batches ADD COLUMN rest TEXT")}


class StoreError(Exception):
    """The state database cannot be used; the message names the file and the fix."""


class Unwritable(StoreError):
    """The state cannot be written now (a full disk): what needed it is refused, the daemon goes on."""


class Unusable(ValueError):
    """One stored batch's record cannot be used; the message says which value and why."""


# What a stored value may be. The file may have been written by an older pmlmd, restored from a
# backup or edited by hand, and SQLite keeps whatever type it is given: every value is checked
# before the daemon computes with it, so one bad record costs its batch, never the daemon.
MAX_ID = (1 << 32) - 2  # uid_t and gid_t; -1 means "no change" to the kernel
MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_INT64 = (1 << 63) - 1
MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z, the last moment a report's dates can show
MAX_GROUPS = 65536  # NGROUPS_MAX
TASK_STATES = (QUEUED, RUNNING, *FINISHED)


def _brief(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f"an integer of {value.bit_length()} bits"  # repr() of a huge one is slow, or refused
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _need(ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise Unusable(f"{what} is {_brief(value)}")


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value: Any, low: float, high: float) -> bool:
    # Range-checked, so nan and the infinities fail too.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _shown(raw: Any) -> str | None:
    """A text column read as bytes (CAST AS BLOB), decoded whatever it holds."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None


def _line_value(line: str | None) -> str | bytes | None:
    """A task line as stored: TEXT when it is UTF-8, else a BLOB of its bytes (sqlite3 cannot
    store the surrogates that stand for them as TEXT, and bytes are what the line is)."""
    if line is None:
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return tasklines.raw(line)
    return line


def _message(text: str | None) -> str | None:
    """A message for people as stored: where it quotes bytes that are not UTF-8 (a directory's
    name, say) it shows their surrogates as \\udcNN, since sqlite3 cannot store them as TEXT."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _plain(value: Any) -> int | float | None:
    """A number fit for a JSON reply, or None."""
    return value if _real(value, -MAX_INT64, MAX_INT64) else None


def _no_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def _utf8(data: bytes) -> str:
    # sqlite3 reports text that is not UTF-8 as an OperationalError, like a failing database;
    # decoded here it is a UnicodeDecodeError, which is the record's fault, not the file's.
    return data.decode("utf-8")


def looks_like_report(pieces: list[bytes]) -> bool:
    """Whether a stored report, read in ``pieces``, can go into a reply as it is: ASCII JSON
    (json.dumps' default) of an object. Not parsed: a damaged record fails here or at the client."""
    return bool(pieces) and pieces[0][:1] == b"{" and all(piece.isascii() for piece in pieces)


@dataclass
class StoredBatch:
    id: str
    seq: int
    name: str | None
    owner_uid: int
    owner_gid: int
    owner_groups: list[int]
    priority: int
    submission: dict
    held: bool
    created: float
    cancel_reason: str | None
    tasks: list[Task]  # those with a row, by index (there may be gaps)
    open_attempts: list[tuple[Task, Attempt, int | None]]  # attempts with no end: (task, attempt, start ticks)
    task_count: int = 0  # all its tasks, with a row or not
    rest: str = QUEUED  # the status of each task without a row
    # Set when the record cannot be used: why. Then only ``id`` and ``rowid`` mean anything.
    problem: str | None = None
    rowid: int | None = field(default=None, compare=False)


class Store:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "state.db")
        self.pending: dict[object, Any] = {}  # writes that failed, to try again (in order; see the docstring)
        # With ``grouping`` on, the writes of attempts' ends wait here (key -> the statements, without
        # a transaction) for ``flush``, which makes them one transaction: once per loop turn in the
        # daemon, not once per worker end. Off: each is written at once.
        self.grouping = False
        self.grouped: dict[object, Any] = {}
        self.unwritable: str | None = None  # why the state cannot be written now, or None
        self.read_only = False  # opened read-only (a start on a full disk): writes wait for retry()
        self.floor = 0  # after a recovery: batch ids go on above this
        self.changed = False  # written since the last backup
        self.last_backup = float("-inf")
        self.retrying = False  # a retry failed and was logged
        try:
            os.makedirs(state_dir, mode=0o750, exist_ok=True)
            self.lock_fd = self._lock()
        except OSError as e:
            raise self._cannot(e) from e
        try:
            self._start()
        except BaseException:
            os.close(self.lock_fd)
            raise

    def _lock(self) -> int:
        """The state directory's lock, taken (see the module's docstring): a flock(2) on the
        directory itself, which needs no file made or written (a start on a full disk runs);
        raises StoreError when another process holds it."""
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder is not None else ""
            raise StoreError(f"another pmlmd{who} uses the state in {self.state_dir}: stop it first, or give this "
                             "one a state directory of its own (--state-dir, state_dir in pmlmd.toml)") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _start(self) -> None:
        try:
            self.high_water = self._read_marker()
            self._check_damage()
        except OSError as e:
            raise self._cannot(e) from e
        try:
            version = self._open()
        except sqlite3.OperationalError as e:
            if not _space_trouble(e, self.state_dir):
                raise self._cannot(e) from e
            # A start on a full disk: read what the file holds and run it; write once there is space.
            self._fail_write(e)
            self.read_only = True
            self.db = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, isolation_level=None)
            self.db.text_factory = _utf8
            version = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            log.error("%s; pmlmd runs what its state holds, refuses submits and writes the state once there "
                      "is space", self.unwritable)
        except (OSError, sqlite3.Error) as e:
            raise self._cannot(e) from e
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, this pmlmd knows {SCHEMA_VERSION}: "
                             "use a pmlmd that matches it, or move the file away to start afresh")
        if self.high_water == 0 and not self.read_only:
            last = self._last_seq()
            if last:
                self._write_marker(last)  # a state of an older pmlmd: mark it as existing
        if self.floor > self._last_seq():
            # Recovered: the restored or empty database goes on above the mark from now on, not
            # only in this run (a later start finds it whole and takes its ids from it). On a full
            # disk the write waits with the others (retry); ids go on above the mark meanwhile.
            self._write(("floor",), self._write_floor)

    def _write_floor(self) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self._last_seq() < self.floor:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(self.floor),))

    def _cannot(self, e: Exception) -> StoreError:
        return StoreError(f"cannot use the state database {self.path}: {e}; check that --state-dir (state_dir "
                          f"in pmlmd.toml) names a directory pmlmd can write")

    def _open(self) -> int:
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        try:
            self.db.text_factory = _utf8
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of pmlmd; WAL keeps it consistent
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            if version in MIGRATIONS:
                version = self._migrate(version)
            return version
        except BaseException:
            self.db.close()
            raise

    # --- damage, the high-water mark and the backup ------------------------------------------
    def _file(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _read_marker(self) -> int:
        """The highest batch id that may have been handed out, from every sign of one kept outside
        the database: last-batch-id, and the batches whose output is kept (output/ID). 0: none."""
        mark = 0
        try:
            with open(self._file(MARKER), "rb") as f:
                text = f.read(64).strip()
        except FileNotFoundError:
            text = None
        if text is not None:
            try:
                mark = int(text)
                if not 0 <= mark < 2 ** 63:  # SQLite's integers: no id of pmlmd's is outside
                    raise ValueError(mark)
            except ValueError:
                mark = 1  # damaged too, but it says that a state existed
                log.warning("%s holds no batch id (%r): the highest id is taken from what else is kept",
                            self._file(MARKER), text[:20])
        try:
            seen = [int(name) for name in os.listdir(os.path.join(self.state_dir, "output")) if name.isdigit()]
        except OSError:
            seen = []
        return max([mark, *seen])

    def _write_marker(self, value: int) -> None:
        """Write last-batch-id atomically (temporary file, fsync, rename, fsync of the directory)."""
        path = self._file(MARKER)
        temp = path + ".tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.write(fd, f"{value}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
            fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        self.high_water = value

    def _check_damage(self) -> None:
        """At start: a state that existed and is lost or damaged is restored from the backup, or the start
        is refused (see the module's docstring)."""
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = None
        # Signs that a state existed: an id handed out (last-batch-id, kept output), or a backup.
        existed = self.high_water > 0 or os.path.exists(self._file(BACKUP))
        if size is None and not os.path.exists(self.path + "-wal") and not existed:
            return  # a first start
        if size == 0 and not existed:
            return  # an empty file and no sign that a state existed
        problem = _damage(self.path) if size else ("missing" if size is None else "empty")
        if problem is None:
            return
        start_empty = self._file(START_EMPTY)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = None
        if size is not None or os.path.exists(self.path + "-wal"):
            aside = f"{self.path}.damaged-{stamp}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.rename(self.path + suffix, aside + suffix)
        kept = f" (kept as {aside})" if aside else ""
        backup = self._file(BACKUP)
        backup_problem = _damage(backup) if os.path.exists(backup) else "missing"
        self.floor = self.high_water
        if backup_problem is None:
            temp = self.path + ".restoring"
            shutil.copyfile(backup, temp)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(temp, self.path)
            taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(backup)))
            last = _last_seq_of(self.path)
            log.error("the state database %s was %s%s: restored from the backup %s of %s; batches after %d "
                      "(up to %d) may be missing, their workers are not governed; new batch ids go on above %d",
                      self.path, problem, kept, backup, taken, last, self.high_water, self.high_water)
        elif os.path.exists(start_empty):
            os.unlink(start_empty)
            log.error("the state database %s was %s%s and the backup %s is %s: starting with an empty state, "
                      "as %s asked; new batch ids go on above %d", self.path, problem, kept, backup,
                      backup_problem, start_empty, self.high_water)
        else:
            mark = f" (last-batch-id says up to {self.high_water})" if self.high_water else ""
            raise StoreError(f"the state database {self.path} is {problem}{kept} and a state existed{mark}, but "
                             f"the backup {backup} is {backup_problem}: put a good copy of state.db in place, or "
                             f"create {start_empty} to start with an empty state (batch ids go on above "
                             f"{self.high_water})")

    def backup(self, force: bool = False) -> None:
        """Copy the state to state.db.backup, when it changed, at most every BACKUP_INTERVAL seconds
        (``force``: whenever it changed). A backup that cannot be made now is made later."""
        now = time.monotonic()
        if not self.changed or self.pending or self.read_only \
                or (not force and now - self.last_backup < BACKUP_INTERVAL):
            return
        path = self._file(BACKUP)
        temp = path + ".tmp"
        try:
            target = sqlite3.connect(temp)
            try:
                self.db.backup(target)
            finally:
                target.close()
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(temp, path)
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot back up the state to %s now: %s", path, e)
            try:
                os.unlink(temp)
            except OSError:
                pass
            self.last_backup = now  # not at every turn
            return
        self.changed = False
        self.last_backup = now

    # --- writes that wait for space --------------------------------------------------------------
    def _write(self, key: object, action) -> None:
        """Run a write now; when the state cannot be written, keep it to try again (``retry``).

        ``action`` reads the daemon's objects when it runs, so a later write of the same ``key``
        replaces an earlier one in its place, and the list stays as long as the things written.
        What waits in the group (``flush``) is written first, so writes keep their order.
        """
        self.flush()
        if self.pending or self.read_only:
            self.pending[key] = action
            return
        try:
            action()
        except sqlite3.OperationalError as e:
            self.pending[key] = action
            self._fail_write(e)
            log.error("%s; pmlmd goes on, refuses submits and writes the state again once it can",
                      self.unwritable)
        else:
            self.changed = True

    def _write_grouped(self, key: object, statements, group: bool) -> None:
        """``statements`` (a callable that executes them, in no transaction of its own) at the next
        ``flush`` with ``grouping`` on and ``group``, else at once in a transaction of their own
        (``_write``)."""
        if group and self.grouping and not self.pending and not self.read_only:
            self.grouped[key] = statements
            return
        self._write(key, lambda: self._transaction([statements]))

    def _transaction(self, bodies) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for body in bodies:
                body()

    def flush(self) -> None:
        """Write what waits in the group, in one transaction. The daemon calls it once its loop
        turn's callbacks have run: before the turn's events reach any client, before requests
        read the state, and before anything else is written."""
        if not self.grouped:
            return
        grouped, self.grouped = self.grouped, {}
        try:
            self._transaction(grouped.values())
        except sqlite3.OperationalError as e:
            for key, body in grouped.items():  # each kept to try again, as a write of its own
                self.pending[key] = lambda body=body: self._transaction([body])
            self._fail_write(e)
            log.error("%s; pmlmd goes on, refuses submits and writes the state again once it can", self.unwritable)
        else:
            self.changed = True

    def _fail_write(self, e: Exception) -> None:
        if _space_trouble(e, self.state_dir):
            self.unwritable = f"no space in STATE_DIR ({self.state_dir}): free space, then submit again"
        else:
            self.unwritable = (f"cannot write the state in STATE_DIR ({self.state_dir}): {e}: see the daemon's log, "
                               f"then submit again")

    def retry(self) -> bool:
        """Write what could not be written (at housekeeping); True once the state is written again."""
        if self.unwritable is None:
            return True
        try:
            if self.read_only:
                reading = self.db
                try:
                    version = self._open()
                except BaseException:
                    self.db = reading  # still read-only: reads go on as before
                    raise
                reading.close()
                self.read_only = False
                if version != SCHEMA_VERSION:
                    raise sqlite3.OperationalError(f"schema version {version}")
            while self.pending:
                key = next(iter(self.pending))
                self.pending[key]()
                del self.pending[key]
        except sqlite3.OperationalError as e:
            self._fail_write(e)
            if not self.retrying:
                self.retrying = True
                log.warning("the state cannot be written yet (%s): pmlmd tries again every second", e)
            return False
        self.unwritable = None
        self.retrying = False
        self.changed = True
        log.warning("the state in %s is written again; submits are taken again", self.state_dir)
        return True

    def check_writable(self) -> None:
        """Raise Unwritable while writes wait for space (a submit is refused then)."""
        if self.unwritable is not None and not self.retry():
            raise Unwritable(self.unwritable)

    def _migrate(self, version: int) -> int:
        """Bring a database of an older schema up to SCHEMA_VERSION, one version per transaction."""
        while version in MIGRATIONS:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for statement in MIGRATIONS[version]:
                    self.db.execute(statement)
                version += 1
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
        return version

    def close(self) -> None:
        self.flush()
        if self.pending:
            log.error("%d writes to the state could not be made (%s): the next pmlmd finds the state as it was "
                      "before them", len(self.pending), self.unwritable)
        self.db.close()
        os.close(self.lock_fd)

    # --- writes ---------------------------------------------------------------------
    def add_batch(self, batch_id: str, seq: int, name: str | None, owner: tuple[int, int, list[int]], priority: int,
                  submission: dict, created: float, task_count: int | None) -> None:
        """A new batch of ``task_count`` tasks (None: a queue batch, whose tasks are added as they
        come); its tasks get their rows as they are taken."""
        uid, gid, groups = owner
        self.flush()
        self.check_writable()
        try:
            self._add_batch(batch_id, seq, name, uid, gid, groups, priority, submission, created, task_count)
        except sqlite3.OperationalError as e:
            self._fail_write(e)
            raise Unwritable(self.unwritable) from None
        self.changed = True

    def _add_batch(self, batch_id, seq, name, uid, gid, groups, priority, submission, created, task_count) -> None:
        with self.db:
            self.db.execute("INSERT INTO batches (id, seq, name, owner_uid, owner_gid, owner_groups, priority, "
                            "submission, state, created, task_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?)",
                            (batch_id, seq, name, uid, gid, json.dumps(groups), priority, json.dumps(submission),
                             created, task_count))

    def attempt_started(self, batch_id: str, task: Task, attempt: Attempt, start_ticks: int | None) -> None:
        """An attempt's start, written at once (what waits in the group first): a restarted pmlmd
        adopts a running worker by its start row, so none may run whose row could be lost."""
        self._write_grouped(("attempt", batch_id, task.index, attempt.number),
                            lambda: self._attempt_started(batch_id, task, attempt, start_ticks), group=False)

    def _attempt_started(self, batch_id: str, task: Task, attempt: Attempt, start_ticks: int | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO attempts (batch_id, idx, number, pid, start_ticks, start) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (batch_id, task.index, attempt.number, attempt.pid, start_ticks, attempt.start))
        self._task_row(batch_id, task)

    def attempt_ended(self, batch_id: str, task: Task, attempt: Attempt, group: bool = True) -> None:
        """An attempt's end; ``group``: it may wait for ``flush`` (see ``grouping``). Lost in a
        crash before the flush, the end is found again: the restarted pmlmd finds the worker gone
        and runs the task again, as for any worker that ended while pmlmd was away."""
        # Of the same key as its start: written late, the end carries the start too.
        self._write_grouped(("attempt", batch_id, task.index, attempt.number),
                            lambda: self._attempt_ended(batch_id, task, attempt), group)

    def _attempt_ended(self, batch_id: str, task: Task, attempt: Attempt) -> None:
        self.db.execute(
            "INSERT INTO attempts (batch_id, idx, number, pid, start, end, exit_code, signal, cause, reason, "
            "peak_rss, cpu_seconds, pauses, stop_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (batch_id, idx, number) DO UPDATE SET end=excluded.end, exit_code=excluded.exit_code, "
            "signal=excluded.signal, cause=excluded.cause, reason=excluded.reason, peak_rss=excluded.peak_rss, "
            "cpu_seconds=excluded.cpu_seconds, pauses=excluded.pauses, stop_path=excluded.stop_path",
            (batch_id, task.index, attempt.number, attempt.pid, attempt.start, attempt.end, attempt.exit_code,
             attempt.signal, attempt.cause, _message(attempt.reason), attempt.peak_rss, attempt.cpu_seconds,
             attempt.pauses, attempt.stop_path))
        self._task_row(batch_id, task)

    def _task_row(self, batch_id: str, task: Task) -> None:
        self.db.execute(TASK_ROW, _task_values(batch_id, task))

    def task_added(self, batch_id: str, task: Task) -> None:
        """A queue batch's new task (see intake), queued."""
        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(TASK_ROW, _task_values(batch_id, task))

        self._write(("task", batch_id, task.index), write)

    def tasks_changed(self, batch_id: str, tasks: list[Task]) -> None:
        """Record the status of many tasks at once (a cancel marks the queue cancelled)."""
        tasks = list(tasks)

        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(TASK_ROW, (_task_values(batch_id, t) for t in tasks))
        self._write(("tasks", batch_id, tuple(t.index for t in tasks)), write)

    def queue_cancelled(self, batch_id: str, status: str = CANCELLED) -> None:
        """Record that the batch's queued tasks were cancelled, or ``status`` (a queue batch's are
        returned): two statements, whatever their number."""
        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("UPDATE tasks SET status=? WHERE batch_id=? AND status=?", (status, batch_id, QUEUED))
                self.db.execute("UPDATE batches SET rest=? WHERE id=? AND IFNULL(rest, ?)=?",
                                (status, batch_id, QUEUED, QUEUED))
        self._write(("queue-cancelled", batch_id), write)

    def set_held(self, batch_id: str, held: bool) -> None:
        def write():
            with self.db:
                self.db.execute("UPDATE batches SET held=? WHERE id=?", (int(held), batch_id))
        self._write(("held", batch_id), write)

    def set_cancelled(self, batch_id: str, reason: str) -> None:
        def write():
            with self.db:
                self.db.execute("UPDATE batches SET cancel_reason=? WHERE id=?", (reason, batch_id))
        self._write(("cancelled", batch_id), write)

    def finish(self, batch_id: str, finished: float, report: dict | bytes | list, summary: dict | None = None,
               critical_reason: str | None = None) -> None:
        """Mark a batch finished with its report and its summary (BatchSummary.to_json()), as it ended.

        ``report``: the report, or its ASCII JSON already encoded, whole or as pieces to be joined
        (then ``critical_reason`` is given apart, when the batch had a critical finish)."""
        if isinstance(report, dict):
            critical_reason = report.get("error_message") if report.get("critical_error") else None
            report = json.dumps(report).encode("ascii")
        pieces = report if isinstance(report, list) else [report]
        self._write(("finish", batch_id), lambda: self._finish(batch_id, finished, pieces, summary, critical_reason))

    def _finish(self, batch_id: str, finished: float, pieces: list, summary: dict | None,
                critical_reason: str | None) -> None:
        # The report is written into a blob of its size through incremental BLOB I/O, piece by
        # piece: bound as a parameter, SQLite would keep a copy of it (70 MB for a million tasks)
        # in the cached statement until that statement runs again.
        size = sum(len(piece) for piece in pieces)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE batches SET state='finished', finished=?, report=zeroblob(?), critical_reason=?, "
                            "summary=? WHERE id=?", (finished, size, critical_reason,
                                                     None if summary is None else json.dumps(summary), batch_id))
            row = self.db.execute("SELECT rowid FROM batches WHERE id=?", (batch_id,)).fetchone()
            if row is not None and size:
                with self.db.blobopen("batches", "report", row[0]) as blob:
                    for piece in pieces:
                        blob.write(piece)

    def prune(self, finished_before: float) -> int:
        """Delete the batches that finished before then; how many went."""
        return self._delete_finished("finished < ?", (finished_before,))

    def forget(self, batch_ids: list[str]) -> int:
        """Delete these finished batches now (a user's past quotas.state_bytes); how many went."""
        if not batch_ids:
            return 0
        return self._delete_finished(f"id IN ({', '.join('?' * len(batch_ids))})", tuple(batch_ids))

    def _delete_finished(self, where: str, params: tuple) -> int:
        self.flush()
        if self.unwritable is not None:
            return 0  # tried again once the state is written again
        try:
            with self.db:
                cursor = self.db.execute(f"DELETE FROM batches WHERE state='finished' AND {where}", params)
        except sqlite3.OperationalError as e:
            log.warning("cannot prune the state now: %s", e)
            return 0
        if cursor.rowcount:
            self.changed = True
        return cursor.rowcount

    def finished_sizes(self, batch_id: str | None = None) -> list[tuple[str, int, int]]:
        """(batch id, owner uid, bytes its submission and report take) of every finished batch (of
        the one, with ``batch_id``), the one that finished first first. Reads their contents: the
        daemon measures each batch once (see Daemon.state_sizes)."""
        where, params = ("AND id=?", (batch_id,)) if batch_id is not None else ("", ())
        return [(bid, uid, size or 0) for bid, uid, size in self.db.execute(
            "SELECT id, owner_uid, LENGTH(CAST(submission AS BLOB)) + IFNULL(LENGTH(CAST(report AS BLOB)), 0) "
            f"FROM batches WHERE state='finished' {where} ORDER BY finished, seq", params)]

    # --- reads ------------------------------------------------------------------------
    def active_batches(self) -> list[StoredBatch]:
        """Every active batch, in submission order.

        A record that cannot be used comes back with ``problem`` saying why and nothing else
        read from it, so one damaged batch never keeps the others from being restored.
        Trouble with the database itself (sqlite3.Error) is raised.
        """
        out = []
        rowids = self.db.execute("SELECT rowid FROM batches WHERE state='active' ORDER BY seq, rowid").fetchall()
        for (rowid,) in rowids:
            try:
                out.append(self._active_batch(rowid))
            except sqlite3.Error:
                raise
            except Exception as e:  # the record's values: wrong types, bad JSON, text that is not UTF-8
                reason = str(e) if isinstance(e, Unusable) else f"it cannot be read ({type(e).__name__}: {e})"
                out.append(StoredBatch(id=self._batch_id(rowid), seq=0, name=None, owner_uid=0, owner_gid=0,
                                       owner_groups=[], priority=0, submission={}, held=False, created=0.0,
                                       cancel_reason=None, tasks=[], open_attempts=[], problem=reason[:500],
                                       rowid=rowid))
        return out

    def _batch_id(self, rowid: int) -> str:
        """The id of a batch whose record may be damaged, as well as it can be shown."""
        (raw,) = self.db.execute("SELECT CAST(id AS BLOB) FROM batches WHERE rowid=?", (rowid,)).fetchone()
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else f"(row {rowid})"

    def _active_batch(self, rowid: int) -> StoredBatch:
        (bid, seq, name, uid, gid, groups, priority, submission, held, created, cancel_reason, task_count,
         rest) = self.db.execute(
            "SELECT id, seq, name, owner_uid, owner_gid, owner_groups, priority, submission, held, created, "
            "cancel_reason, task_count, IFNULL(rest, ?) FROM batches WHERE rowid=?", (QUEUED, rowid)).fetchone()
        _need(isinstance(bid, str) and 0 < len(bid) <= 200 and "\0" not in bid, "its id", bid)
        _need(_int(seq, 1, MAX_INT64), "its sequence number", seq)
        _need(_text(name), "its name", name)
        _need(_int(uid, 0, MAX_ID), "its owner's uid", uid)
        _need(_int(gid, 0, MAX_ID), "its owner's gid", gid)
        _need(isinstance(groups, str), "its owner's group list", groups)
        groups = json.loads(groups)
        _need(isinstance(groups, list) and len(groups) <= MAX_GROUPS and all(_int(g, 0, MAX_ID) for g in groups),
              "its owner's group list", groups)
        _need(BOUNDS["priority"].admits(priority), f"its priority ({BOUNDS['priority'].span()})", priority)
        _need(isinstance(submission, str), "its submission", submission)
        submission = json.loads(submission)
        _need(isinstance(submission, dict), "its submission", submission)
        _need(held in (0, 1) and not isinstance(held, float), "its held flag", held)
        _need(_real(created, 0, MAX_TIMESTAMP), "its creation time", created)
        _need(_text(cancel_reason), "its cancel reason", cancel_reason)
        # A queue batch's tasks all have rows; so have every batch's of schema 3 (no task_count).
        _need(task_count is None or _int(task_count, 1, BOUNDS["tasks"].high), "its number of tasks", task_count)
        _need(rest in (QUEUED, CANCELLED, RETURNED), "the status of its tasks not yet taken", rest)

        tasks: list[Task] = []
        by_index: dict[int, Task] = {}
        for idx, line, status, governor_ends, failures, message in self.db.execute(
                "SELECT idx, line, status, governor_ends, failures, message FROM tasks WHERE batch_id=? ORDER BY idx",
                (bid,)):
            after = tasks[-1].index + 1 if tasks else 0
            _need(_int(idx, after, MAX_INT64) and (task_count is not None or idx == after),
                  f"the index of its task after {after - 1}" if tasks else "the index of its first task", idx)
            _need(_text(line) or isinstance(line, bytes), f"the line of task {idx}", line)
            if isinstance(line, bytes):
                line = tasklines.text(line)
            # A NUL would end the string exec gets: the line could not be handed on as it is.
            # (A queue batch's message that held one ended failed unrun: it never goes to exec.)
            _need(line is None or "\0" not in line or status in FINISHED, f"the line of task {idx}", line)
            _need(status in TASK_STATES, f"the status of task {idx}", status)
            _need(_int(governor_ends, 0, MAX_INT64) and _int(failures, 0, MAX_INT64),
                  f"the termination and failure counts of task {idx}", (governor_ends, failures))
            if message is not None:
                _need(isinstance(message, str), f"the message of task {idx}", message)
                message = json.loads(message)
                _need(isinstance(message, dict) and set(message) <= MESSAGE_KEYS, f"the message of task {idx}",
                      message)
            tasks.append(Task(index=idx, line=line, status=status, governor_ends=governor_ends, failures=failures,
                              message=message))
            by_index[idx] = tasks[-1]
        if task_count is None:
            task_count = len(tasks)
        if tasks:
            last = tasks[-1].index
            _need(last < task_count, f"the index of task {last} (the batch has {task_count})", last)
        # A queue batch takes its tasks as messages come: none at first, and no cap over its life.
        if submission.get("amqp") is None:
            _need(0 < task_count <= BOUNDS["tasks"].high, f"its number of tasks ({BOUNDS['tasks'].span()})",
                  task_count)

        open_attempts = []
        for (idx, number, pid, start_ticks, start, end, exit_code, sig, cause, reason, peak_rss, cpu_seconds,
             pauses, stop_path) in self.db.execute(
                "SELECT idx, number, pid, start_ticks, start, end, exit_code, signal, cause, reason, peak_rss, "
                "cpu_seconds, pauses, stop_path FROM attempts WHERE batch_id=? ORDER BY idx, number", (bid,)):
            _need(idx in by_index, "the task of an attempt", idx)
            where = f"attempt {number!r} of task {idx}"
            _need(_int(number, 1, MAX_INT64), f"the number of an attempt of task {idx}", number)
            _need(pid is None or _int(pid, 1, MAX_PID), f"the pid of {where}", pid)
            _need(start_ticks is None or _int(start_ticks, 0, MAX_INT64), f"the start ticks of {where}", start_ticks)
            _need(_real(start, 0, MAX_TIMESTAMP), f"the start of {where}", start)
            _need(end is None or _real(end, 0, MAX_TIMESTAMP), f"the end of {where}", end)
            _need(exit_code is None or _int(exit_code, -(1 << 31), (1 << 31) - 1), f"the exit code of {where}",
                  exit_code)
            _need(sig is None or _int(sig, 0, 255), f"the signal of {where}", sig)
            _need(_text(cause) and _text(reason) and _text(stop_path), f"the texts of {where}", (cause, reason))
            _need(_int(peak_rss, 0, MAX_INT64), f"the peak memory of {where}", peak_rss)
            _need(_real(cpu_seconds, 0, float(MAX_INT64)), f"the CPU time of {where}", cpu_seconds)
            _need(_int(pauses, 0, MAX_INT64), f"the pause count of {where}", pauses)
            attempt = Attempt(number=number, pid=pid, start=start, end=end, exit_code=exit_code, signal=sig,
                              cause=cause, reason=reason, peak_rss=peak_rss, cpu_seconds=cpu_seconds,
                              pauses=pauses, stop_path=stop_path)
            by_index[idx].attempts.append(attempt)
            if end is None:
                open_attempts.append((by_index[idx], attempt, start_ticks))
        for task in tasks:
            # A running task has exactly one attempt without an end, its last; any other task none. Otherwise
            # a task could run twice at once, or stand "running" with no worker and keep its batch open forever.
            unended = [a for a in task.attempts if a.end is None]
            consistent = (len(unended) == 1 and unended[0] is task.attempts[-1]) if task.status == RUNNING \
                else not unended
            _need(consistent, f"task {task.index}, {task.status} with unfinished attempts", len(unended))
        return StoredBatch(id=bid, seq=seq, name=name, owner_uid=uid, owner_gid=gid, owner_groups=groups,
                           priority=priority, submission=submission, held=bool(held), created=float(created),
                           cancel_reason=cancel_reason, tasks=tasks, open_attempts=open_attempts, rowid=rowid,
                           task_count=task_count, rest=rest)

    def recorded_workers(self, rowid: int) -> list[tuple[int, int]]:
        """(pid, start ticks) of the unfinished attempts of a batch, whatever else its record holds."""
        rows = self.db.execute("SELECT pid, start_ticks FROM attempts WHERE end IS NULL AND batch_id IN "
                               "(SELECT id FROM batches WHERE rowid=?)", (rowid,)).fetchall()
        return [(pid, ticks) for pid, ticks in rows if _int(pid, 1, MAX_PID) and _int(ticks, 0, MAX_INT64)]

    def task_statuses(self, rowid: int) -> list[str]:
        """The statuses of a batch's tasks, whatever its record holds (shown as well as they can be)."""
        return self._statuses("rowid", rowid, lambda raw: raw.decode("utf-8", "replace") if isinstance(raw, bytes)
                              else repr(raw))

    def _statuses(self, key: str, value, shown) -> list[str]:
        """Every task's status by index (``key`` = ``value`` picks the batch): those with a row
        as written, the others its ``rest``, each through ``shown`` (it gets the stored bytes)."""
        row = self.db.execute(f"SELECT id, task_count, CAST(IFNULL(rest, ?) AS BLOB) FROM batches WHERE {key}=?",
                              (QUEUED, value)).fetchone()
        if row is None:
            return []
        bid, count, rest = row
        rows = self.db.execute("SELECT idx, CAST(status AS BLOB) FROM tasks WHERE batch_id=? ORDER BY idx",
                               (bid,)).fetchall()
        if not _int(count, 1, BOUNDS["tasks"].high):  # a row per task (schema 3, a queue batch), or damage
            return [shown(raw) for _, raw in rows]
        statuses = [shown(rest)] * count
        for idx, raw in rows:
            if _int(idx, 0, count - 1):  # an index outside the batch is damage: its row says nothing here
                statuses[idx] = shown(raw)
        return statuses

    def fail_batch(self, rowid: int, finished: float, report: dict) -> None:
        """Mark an active batch that cannot run again finished, with ``report``; its unfinished tasks failed."""
        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(f"UPDATE tasks SET status='failed' WHERE batch_id IN (SELECT id FROM batches WHERE "
                                f"rowid=?) AND status NOT IN ({', '.join('?' * len(FINISHED))})", (rowid, *FINISHED))
                self.db.execute(f"UPDATE batches SET rest='failed' WHERE rowid=? AND IFNULL(rest, ?) NOT IN "
                                f"({', '.join('?' * len(FINISHED))})", (rowid, QUEUED, *FINISHED))
                self.db.execute("UPDATE batches SET state='finished', finished=?, report=?, critical_reason=NULL "
                                "WHERE rowid=?", (finished, json.dumps(report), rowid))
        self._write(("fail", rowid), write)

    def finished_report(self, batch_id: str) -> dict | None:
        data = self.finished_report_text(batch_id)
        return json.loads(data) if data else None

    def finished_report_text(self, batch_id: str) -> bytes | None:
        """The stored report as the JSON it was written as (ASCII bytes, not decoded), or None."""
        row = self.db.execute("SELECT CAST(report AS BLOB) FROM batches WHERE id=? AND state='finished'",
                              (batch_id,)).fetchone()
        return row[0] if row and isinstance(row[0], bytes) and looks_like_report([row[0]]) else None

    def open_report(self, batch_id: str):
        """The stored report of a finished batch, to read a slice at a time (sqlite3's incremental
        BLOB I/O): a sqlite3.Blob; or, for a report stored as text (an older pmlmd), its bytes;
        None when there is none. The caller closes a Blob soon: it holds a read of the database."""
        row = self.db.execute("SELECT rowid, typeof(report) FROM batches WHERE id=? AND state='finished'",
                              (batch_id,)).fetchone()
        if row is None or row[1] not in ("blob", "text"):
            return None
        if row[1] == "text":
            return self.finished_report_text(batch_id)
        return self.db.blobopen("batches", "report", row[0], readonly=True)

    def batch_ids(self) -> set[str]:
        """Every batch the state holds, active or finished."""
        return {row[0] for row in self.db.execute("SELECT id FROM batches")}

    def task_count(self, batch_id: str) -> int:
        return self.db.execute("SELECT IFNULL((SELECT task_count FROM batches WHERE id=?), "
                               "(SELECT COUNT(*) FROM tasks WHERE batch_id=?))", (batch_id, batch_id)).fetchone()[0]

    def submission(self, batch_id: str) -> tuple[Any, tuple[int, int, list[int]], list[str]] | None:
        """What a batch was submitted with (for a retry): its submission as stored (checked by the
        caller), its owner (uid, gid, groups) and its tasks' statuses by index; None when there is
        no such batch. Raises Unusable when the record cannot be read."""
        row = self.db.execute("SELECT CAST(submission AS BLOB), owner_uid, owner_gid, CAST(owner_groups AS BLOB) "
                              "FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None:
            return None
        submission, uid, gid, groups = row
        _need(_int(uid, 0, MAX_ID), "its owner's uid", uid)
        _need(_int(gid, 0, MAX_ID), "its owner's gid", gid)
        try:
            groups = json.loads(groups, parse_constant=_no_constant)
            submission = json.loads(submission, parse_constant=_no_constant)
        except (TypeError, ValueError, RecursionError) as e:
            raise Unusable(f"its record cannot be read ({type(e).__name__})") from None
        _need(isinstance(groups, list) and len(groups) <= MAX_GROUPS and all(_int(g, 0, MAX_ID) for g in groups),
              "its owner's group list", groups)
        return submission, (uid, gid, groups), self._statuses("id", batch_id, lambda raw: _shown(raw) or "")

    def batch_owner(self, batch_id: str) -> int | None:
        row = self.db.execute("SELECT owner_uid FROM batches WHERE id=?", (batch_id,)).fetchone()
        return row[0] if row else None

    def finished_batches(self) -> list[BatchSummary]:
        """The summary of every finished batch, in submission order (see ``_finished``)."""
        rows = self.db.execute(f"SELECT {_FINISHED_COLUMNS} FROM batches WHERE state='finished' "
                               "ORDER BY seq").fetchall()
        return [self._finished(*row) for row in rows]

    def finished_summary(self, batch_id: str) -> BatchSummary | None:
        """The summary of a finished batch (see ``_finished``); None when no such batch has finished."""
        row = self.db.execute(f"SELECT {_FINISHED_COLUMNS} FROM batches WHERE id=? AND state='finished'",
                              (batch_id,)).fetchone()
        return None if row is None else self._finished(*row)

    def _finished(self, rowid, bid, name, uid, priority, created, finished, summary) -> BatchSummary:
        """A finished batch's summary: the one stored when it finished; else (stored by an older pmlmd,
        marked failed because its record was damaged, or not fit to be used) one made from what its
        record and its report hold, its values shown as well as they can be: text as UTF-8, numbers
        only when finite. The owner's user name is then None, for the daemon to fill in."""
        batch_id = _shown(bid)
        try:
            stored = BatchSummary.from_json(_json_object(summary)) if summary is not None else None
        except ValueError:
            stored = None
        if stored is not None and stored.batch == batch_id:
            return stored
        (report,) = self.db.execute("SELECT CAST(report AS BLOB) FROM batches WHERE rowid=?", (rowid,)).fetchone()
        uid = _plain(uid)
        return from_record(batch_id if batch_id is not None else f"(row {rowid})", name=_shown(name),
                           owner_uid=uid if _int(uid, 0, MAX_ID) else None, owner_user=None,
                           priority=priority if _int(priority, -MAX_INT64, MAX_INT64) else None,
                           created=_plain(created), finished=_plain(finished), report=_json_object(report))

    def next_seq(self) -> int:
        """A new batch number, never handed out before, even after pruning or a lost state: above the
        database's last one and, after a recovery, above last-batch-id's mark, which is moved a block on
        before an id beyond it is handed out. Raises Unwritable when the state cannot be written."""
        self.flush()
        self.check_writable()
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                row = self.db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
                seq = max(int(row[0]) if row else 0, self.floor) + 1
                if seq > self.high_water:
                    self._write_marker(seq + ID_BLOCK - 1)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq),))
        except (OSError, sqlite3.OperationalError) as e:
            self._fail_write(e)
            raise Unwritable(self.unwritable) from None
        self.changed = True
        return seq

    def _last_seq(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return int(row[0]) if row else 0


MESSAGE_KEYS = {"message_id", "redelivered", "settled"}


# A task's row, made the first time it is written (with its line) and brought up to date after.
TASK_ROW = ("INSERT INTO tasks (batch_id, idx, line, status, governor_ends, failures, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (batch_id, idx) DO UPDATE SET status=excluded.status, "
            "governor_ends=excluded.governor_ends, failures=excluded.failures, message=excluded.message")


def _task_values(batch_id: str, task: Task) -> tuple:
    return (batch_id, task.index, _line_value(task.line), task.status, task.governor_ends, task.failures,
            _message_json(task))


def _message_json(task: Task) -> str | None:
    return None if task.message is None else json.dumps(task.message)


def _space_trouble(e: Exception, state_dir: str) -> bool:
    """Whether a failed write is for want of space (SQLite's SQLITE_FULL, or its WAL index not growing)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    name = getattr(e, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL" or "full" in str(e):
        return True
    try:
        stat = os.statvfs(state_dir)
    except OSError:
        return False
    return stat.f_bavail == 0 or (stat.f_files and stat.f_favail == 0)


def _damage(path: str) -> str | None:
    """What is wrong with a database file, or None: opened read-only, checked with integrity_check."""
    try:
        if os.path.getsize(path) == 0:
            return "empty"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            if rows != [("ok",)]:
                return f"damaged (integrity_check: {'; '.join(str(r[0]) for r in rows[:3])})"
            db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return None  # in use, a full disk, no permission: not damage; the open that follows says more
    except sqlite3.DatabaseError as e:
        return f"damaged ({e})"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def _flock_holder(fd: int) -> int | None:
    """The pid holding a flock(2) on ``fd``'s file, from /proc/locks (proc(5): "FLOCK ... PID
    MAJOR:MINOR:INODE", device numbers in hex); None when it cannot be told."""
    info = os.fstat(fd)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        pass
    return None


def _last_seq_of(path: str) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return int(row[0]) if row else 0
    except (sqlite3.Error, ValueError):
        return 0
    finally:
        db.close()


# What Store._finished reads of a finished batch: not its report, which may be large, unless it needs it.
_FINISHED_COLUMNS = ("rowid, CAST(id AS BLOB), CAST(name AS BLOB), owner_uid, priority, created, finished, "
                     "CAST(summary AS BLOB)")


def _json_object(raw: bytes | None) -> dict:
    """A stored JSON object, or {} for anything else (strict JSON: a reply must be strict JSON too)."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant) if raw else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}

