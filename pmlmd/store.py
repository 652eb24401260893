"""Persistence: the daemon's batches, tasks and attempts in one SQLite file (WAL).

A submitted batch is committed before the daemon replies, and every attempt's start
and end is committed as it happens, so a restarted daemon knows every task's state
and which workers it may find still running. Finished batches keep their report
until they are pruned.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass

from .batch import Attempt, Task

SCHEMA_VERSION = 1

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
    report TEXT                      -- JSON execution report, once finished
);
CREATE TABLE IF NOT EXISTS tasks (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    line TEXT,
    status TEXT NOT NULL,
    governor_ends INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
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


class StoreError(Exception):
    """The state database cannot be used; the message names the file and the fix."""


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
    tasks: list[Task]
    open_attempts: list[tuple[Task, Attempt, int | None]]  # attempts with no end: (task, attempt, start ticks)


class Store:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, "state.db")
        try:
            os.makedirs(state_dir, mode=0o750, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of pmlmd; WAL keeps it consistent
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot use the state database {self.path}: {e}; check that --state-dir (state_dir "
                             f"in pmlmd.toml) names a directory pmlmd can write") from e
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, this pmlmd knows {SCHEMA_VERSION}: "
                             "use a pmlmd that matches it, or move the file away to start afresh")

    def close(self) -> None:
        self.db.close()

    # --- writes ---------------------------------------------------------------------
    def add_batch(self, batch_id: str, seq: int, name: str | None, owner: tuple[int, int, list[int]], priority: int,
                  submission: dict, created: float, tasks: list[Task]) -> None:
        uid, gid, groups = owner
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO batches (id, seq, name, owner_uid, owner_gid, owner_groups, priority, "
                            "submission, state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active', ?)",
                            (batch_id, seq, name, uid, gid, json.dumps(groups), priority, json.dumps(submission),
                             created))
            self.db.executemany("INSERT INTO tasks (batch_id, idx, line, status) VALUES (?, ?, ?, ?)",
                                ((batch_id, t.index, t.line, t.status) for t in tasks))

    def attempt_started(self, batch_id: str, task: Task, attempt: Attempt, start_ticks: int | None) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO attempts (batch_id, idx, number, pid, start_ticks, start) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (batch_id, task.index, attempt.number, attempt.pid, start_ticks, attempt.start))
            self._task_row(batch_id, task)

    def attempt_ended(self, batch_id: str, task: Task, attempt: Attempt) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO attempts (batch_id, idx, number, pid, start, end, exit_code, signal, cause, reason, "
                "peak_rss, cpu_seconds, pauses, stop_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (batch_id, idx, number) DO UPDATE SET end=excluded.end, exit_code=excluded.exit_code, "
                "signal=excluded.signal, cause=excluded.cause, reason=excluded.reason, peak_rss=excluded.peak_rss, "
                "cpu_seconds=excluded.cpu_seconds, pauses=excluded.pauses, stop_path=excluded.stop_path",
                (batch_id, task.index, attempt.number, attempt.pid, attempt.start, attempt.end, attempt.exit_code,
                 attempt.signal, attempt.cause, attempt.reason, attempt.peak_rss, attempt.cpu_seconds,
                 attempt.pauses, attempt.stop_path))
            self._task_row(batch_id, task)

    def _task_row(self, batch_id: str, task: Task) -> None:
        self.db.execute("UPDATE tasks SET status=?, governor_ends=?, failures=? WHERE batch_id=? AND idx=?",
                        (task.status, task.governor_ends, task.failures, batch_id, task.index))

    def tasks_changed(self, batch_id: str, tasks: list[Task]) -> None:
        """Record the status of many tasks at once (a cancel marks the queue cancelled)."""
        with self.db:
            self.db.execute("BEGIN")
            for task in tasks:
                self._task_row(batch_id, task)

    def set_held(self, batch_id: str, held: bool) -> None:
        with self.db:
            self.db.execute("UPDATE batches SET held=? WHERE id=?", (int(held), batch_id))

    def set_cancelled(self, batch_id: str, reason: str) -> None:
        with self.db:
            self.db.execute("UPDATE batches SET cancel_reason=? WHERE id=?", (reason, batch_id))

    def finish(self, batch_id: str, finished: float, report: dict) -> None:
        with self.db:
            self.db.execute("UPDATE batches SET state='finished', finished=?, report=?, critical_reason=? "
                            "WHERE id=?", (finished, json.dumps(report), report.get("error_message")
                                           if report.get("critical_error") else None, batch_id))

    def prune(self, finished_before: float) -> int:
        with self.db:
            cursor = self.db.execute("DELETE FROM batches WHERE state='finished' AND finished < ?",
                                     (finished_before,))
        return cursor.rowcount

    # --- reads ------------------------------------------------------------------------
    def active_batches(self) -> list[StoredBatch]:
        out = []
        rows = self.db.execute("SELECT id, seq, name, owner_uid, owner_gid, owner_groups, priority, submission, "
                               "held, created, cancel_reason FROM batches WHERE state='active' ORDER BY seq")
        for (bid, seq, name, uid, gid, groups, priority, submission, held, created, cancel_reason) in rows.fetchall():
            tasks = {}
            for idx, line, status, governor_ends, failures in self.db.execute(
                    "SELECT idx, line, status, governor_ends, failures FROM tasks WHERE batch_id=? ORDER BY idx",
                    (bid,)):
                tasks[idx] = Task(index=idx, line=line, status=status, governor_ends=governor_ends,
                                  failures=failures)
            open_attempts = []
            for (idx, number, pid, start_ticks, start, end, exit_code, sig, cause, reason, peak_rss, cpu_seconds,
                 pauses, stop_path) in self.db.execute(
                    "SELECT idx, number, pid, start_ticks, start, end, exit_code, signal, cause, reason, peak_rss, "
                    "cpu_seconds, pauses, stop_path FROM attempts WHERE batch_id=? ORDER BY idx, number", (bid,)):
                attempt = Attempt(number=number, pid=pid, start=start, end=end, exit_code=exit_code, signal=sig,
                                  cause=cause, reason=reason, peak_rss=peak_rss, cpu_seconds=cpu_seconds,
                                  pauses=pauses, stop_path=stop_path)
                tasks[idx].attempts.append(attempt)
                if end is None:
                    open_attempts.append((tasks[idx], attempt, start_ticks))
            out.append(StoredBatch(id=bid, seq=seq, name=name, owner_uid=uid, owner_gid=gid,
                                   owner_groups=json.loads(groups), priority=priority,
                                   submission=json.loads(submission), held=bool(held), created=created,
                                   cancel_reason=cancel_reason, tasks=[tasks[i] for i in sorted(tasks)],
                                   open_attempts=open_attempts))
        return out

    def finished_report(self, batch_id: str) -> dict | None:
        row = self.db.execute("SELECT report FROM batches WHERE id=? AND state='finished'", (batch_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def batch_owner(self, batch_id: str) -> int | None:
        row = self.db.execute("SELECT owner_uid FROM batches WHERE id=?", (batch_id,)).fetchone()
        return row[0] if row else None

    def finished_batches(self) -> list[dict]:
        rows = self.db.execute("SELECT id, name, owner_uid, priority, created, finished, report FROM batches "
                               "WHERE state='finished' ORDER BY seq").fetchall()
        out = []
        for bid, name, uid, priority, created, finished, report in rows:
            rep = json.loads(report) if report else {}
            out.append({"batch": bid, "name": name, "owner_uid": uid, "priority": priority, "state": "finished",
                        "created": created, "finished": finished, "counts": rep.get("counts"),
                        "exit_status": rep.get("exit_status")})
        return out

    def next_seq(self) -> int:
        """A new batch number, never handed out before, even after pruning."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
            seq = (int(row[0]) if row else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq),))
        return seq
