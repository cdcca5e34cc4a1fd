"""``SQLiteRecoveryQueue``: the embedded recovery queue, for the workers of one host."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .base import JobQueue, JobState, RecoveryJob, require_text

__all__ = ["SQLiteRecoveryQueue"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS foxpoll_recovery (
    order_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    due_at       REAL NOT NULL,
    locked_until REAL,
    reason       TEXT NOT NULL DEFAULT '',
    last_status  TEXT,
    last_error   TEXT,
    note         TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS foxpoll_recovery_due ON foxpoll_recovery (state, due_at)"
_COLUMNS = ("order_id", "state", "attempts", "due_at", "reason", "last_status", "last_error",
            "note", "created_at", "updated_at")


class SQLiteRecoveryQueue(JobQueue):
    """A recovery queue in a SQLite file.

    Args:
        path: The database file (it may be the dedup store's file).
        clock: Seconds since the epoch; a fake clock's ``time`` for virtual time.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.fspath(path), timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.execute(_INDEX)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, order_id: str) -> RecoveryJob | None:
        row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM foxpoll_recovery "  # noqa: S608
                         "WHERE order_id = ?", (order_id,)).fetchone()
        return _job(row) if row else None

    def enqueue(self, order_id: str, *, reason: str = "stalled", due_at: float | None = None
                ) -> bool:
        require_text(order_id, "order id")
        now = self._clock()
        due = now if due_at is None else due_at
        with self._write() as db:
            inserted = db.execute(
                "INSERT INTO foxpoll_recovery (order_id, state, due_at, reason, created_at,"
                " updated_at) VALUES (?, 'queued', ?, ?, ?, ?) ON CONFLICT (order_id) DO NOTHING",
                (order_id, due, reason, now, now),
            ).rowcount == 1
            if not inserted:  # already queued: keep the earlier of the two due times
                db.execute("UPDATE foxpoll_recovery SET due_at = ?, updated_at = ? "
                           "WHERE order_id = ? AND state = 'queued' AND due_at > ?",
                           (due, now, order_id, due))
        return inserted

    def take(self, *, lease: float = 300.0) -> RecoveryJob | None:
        now = self._clock()
        with self._write() as db:
            row = db.execute(
                "SELECT order_id FROM foxpoll_recovery WHERE state = 'queued' AND due_at <= ?"
                " AND (locked_until IS NULL OR locked_until <= ?) ORDER BY due_at LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE foxpoll_recovery SET locked_until = ? WHERE order_id = ?",
                       (now + lease, row["order_id"]))
            return self._row(db, row["order_id"])

    def next_due(self) -> float | None:
        """When the earliest queued job is due, or None when none is queued."""
        with self._lock:
            row = self._db.execute("SELECT MIN(MAX(due_at, COALESCE(locked_until, 0))) AS t "
                                   "FROM foxpoll_recovery WHERE state = 'queued'").fetchone()
        return None if row["t"] is None else float(row["t"])

    def _update(self, order_id: str, assignments: str, values: tuple[Any, ...],
                where: str = "1 = 1") -> RecoveryJob:
        with self._write() as db:
            changed = db.execute(
                f"UPDATE foxpoll_recovery SET {assignments}, updated_at = ? "  # noqa: S608
                f"WHERE order_id = ? AND {where}", (*values, self._clock(), order_id),
            ).rowcount
            job = self._row(db, order_id)
        if job is None:
            raise KeyError(order_id)
        if not changed:
            raise ValueError(f"order {order_id} is {job.state.value}: not changed")
        return job

    def retry(self, order_id: str, *, due_at: float, last_status: str | None,
              last_error: str | None) -> RecoveryJob:
        return self._update(order_id, "attempts = attempts + 1, due_at = ?, last_status = ?, "
                            "last_error = ?, locked_until = NULL",
                            (due_at, last_status, last_error), "state = 'queued'")

    def finish(self, order_id: str, *, final_status: str) -> RecoveryJob:
        return self._update(order_id, "state = 'done', note = ?, last_status = ?, "
                            "locked_until = NULL", (final_status, final_status))

    def bury(self, order_id: str, *, last_status: str | None, last_error: str | None
             ) -> RecoveryJob:
        return self._update(order_id, "state = 'dead', attempts = attempts + 1, "
                            "last_status = ?, last_error = ?, locked_until = NULL",
                            (last_status, last_error), "state = 'queued'")

    def requeue(self, order_id: str) -> RecoveryJob:
        return self._update(order_id, "state = 'queued', attempts = 0, due_at = ?, "
                            "reason = 'requeued', note = NULL, locked_until = NULL",
                            (self._clock(),), "state IN ('dead', 'closed')")

    def close(self, order_id: str, reason: str) -> RecoveryJob:
        require_text(reason, "reason")
        return self._update(order_id, "state = 'closed', note = ?", (reason,), "state = 'dead'")

    def get(self, order_id: str) -> RecoveryJob | None:
        with self._lock:
            return self._row(self._db, order_id)

    def jobs(self, state: JobState, *, limit: int = 100) -> list[RecoveryJob]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM foxpoll_recovery WHERE state = ? "  # noqa: S608
                "ORDER BY updated_at, order_id LIMIT ?", (JobState(state).value, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def close_connections(self) -> None:
        with self._lock:
            self._db.close()


def _job(row: sqlite3.Row) -> RecoveryJob:
    data = dict(row)
    data["state"] = JobState(data["state"])
    return RecoveryJob(**data)
