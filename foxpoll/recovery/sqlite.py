"""``SQLiteRecoveryQueue``: the embedded recovery queue, for the workers of one host."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foxpoll._clock import Clock, SystemClock
from foxpoll.dedup._sql import SQLITE, TableName
from foxpoll.dedup._sqlite import closed, connect, sqlite_path
from foxpoll.errors import unavailable_on

from ._sql import Execute, JobStatements, SQLJobQueue
from .base import RecoveryPolicy

__all__ = ["SQLiteRecoveryQueue"]


class SQLiteRecoveryQueue(SQLJobQueue):
    """A recovery queue in a SQLite file. Each call is one ``BEGIN IMMEDIATE`` transaction,
    so the processes of a host take turns.

    Args:
        where: The database file (it may be the dedup store's file): a path, or
            ``sqlite:///PATH`` (``sqlite:////PATH`` for an absolute one).
        policy: The re-check policy, for this queue and its workers.
        table: The table name; each part a plain identifier or a double-quoted one.
            ``main.name`` names the file's own schema.
        busy_timeout: Seconds to wait for another process's lock before
            :class:`StoreUnavailable`.
        clock: The queue's time, read with ``clock.time()`` (a ``FakeClock`` for virtual
            time).
        setup: Make the file ready on opening: the WAL journal mode, the table (and a
            column added since foxpoll 0.1), its indexes. False uses the file as it is,
            changing nothing of its schema or journal mode (the table must exist): how
            ``foxpoll dlq requeue`` opens a queue it only acts on.
        read_only: Open the file read-only (and set nothing up): every call that would
            write raises :class:`StoreUnavailable`. How ``foxpoll recovery list`` and
            ``foxpoll dlq list`` open a queue.

    Raises:
        StoreError: The path is a directory, or its directory does not exist.
        StoreUnavailable: The file could not be opened otherwise (locked, unreadable).
    """

    def __init__(self, where: str | os.PathLike[str], *, policy: RecoveryPolicy | None = None,
                 table: str = "foxpoll_recovery", busy_timeout: float = 30.0,
                 clock: Clock | None = None, setup: bool = True,
                 read_only: bool = False) -> None:
        self.policy = policy or RecoveryPolicy()
        name = TableName.parse(table)
        self._sql = JobStatements.render(SQLITE, name)
        self._clock = (clock or SystemClock()).time
        self._lock = threading.Lock()
        self._closed = False
        with unavailable_on("SQLite", sqlite3.Error):
            self._db = (_connect_read_only(where, busy_timeout) if read_only
                        else connect(where, busy_timeout=busy_timeout))
            self._db.row_factory = sqlite3.Row
        if read_only or not setup:
            return
        try:
            with unavailable_on("SQLite", sqlite3.Error):
                self._db.execute("PRAGMA journal_mode=WAL")
            with self._transaction() as execute:
                execute(self._sql.schema, {})
                info = "SELECT name FROM pragma_table_info(:table, :schema)"
                columns = {row["name"] for row in execute(
                    info, {"table": name.table, "schema": name.schema or "main"})}
                if "token" not in columns:  # a table made by foxpoll 0.1
                    execute(f"ALTER TABLE {name.qualified} ADD COLUMN token TEXT", {})
                execute(self._sql.index, {})
                execute(self._sql.done_index, {})
        except BaseException:
            self._db.close()  # a queue that failed to open holds nothing open
            raise

    @contextmanager
    def _transaction(self) -> Iterator[Execute]:
        with self._lock, unavailable_on("SQLite", sqlite3.Error):
            if self._closed:
                raise closed("this SQLiteRecoveryQueue")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _execute(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [dict(row) for row in self._db.execute(sql, {**params, "now": self._clock()})]

    def close(self) -> None:
        """Close the database connection; a later call raises :class:`StoreError`."""
        with self._lock:
            self._closed = True
            self._db.close()


def _connect_read_only(where: str | os.PathLike[str], busy_timeout: float
                       ) -> sqlite3.Connection:
    """A read-only connection to the existing file ``where`` names (``mode=ro``: SQLite
    refuses every write, and a missing file, rather than creating one)."""
    uri = Path(sqlite_path(where)).resolve().as_uri()
    return sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy_timeout,
                           isolation_level=None, check_same_thread=False)
