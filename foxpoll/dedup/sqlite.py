"""``SQLiteDedupStore``: the embedded default, one file shared by the processes of a host.

Each primitive runs in ``BEGIN IMMEDIATE``, so concurrent writers (threads or processes)
take turns; the claim is an UPSERT with ``RETURNING``. The process clock is the store
clock: every writer is on the same machine.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from typing import Any, TypeVar

from foxpoll import _io
from foxpoll._clock import Clock, SystemClock
from foxpoll._core import check_timeout

from ._flows import Flow, FlowStore, Rows, SQLFlows, query
from ._sql import SQLITE
from ._sqlite import closed, connect
from .base import AsyncDedupStore, DedupStore, unavailable

__all__ = ["AsyncSQLiteDedupStore", "SQLiteDedupStore"]

DEFAULT_TABLE = "foxpoll_deliveries"

T = TypeVar("T")


class SQLiteDedupStore(FlowStore, DedupStore):
    """A dedup store in a SQLite file.

    Args:
        where: The database file (created if missing): a path, or ``sqlite:///PATH``
            (``sqlite:////PATH`` for an absolute one).
        table: The table name; each part a plain identifier or a double-quoted one.
            ``main.name`` names the file's own schema.
        busy_timeout: Seconds to wait for another writer's lock before giving up
            (:class:`StoreUnavailable`).
        clock: The store's time, read with ``clock.time()``.

    Raises:
        StoreError: The path is a directory, or its directory does not exist.
        StoreUnavailable: The file could not be opened otherwise (locked, unreadable).
    """

    def __init__(
        self,
        where: str | os.PathLike[str],
        *,
        table: str = DEFAULT_TABLE,
        busy_timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        check_timeout(busy_timeout, "busy_timeout")
        self._sql = SQLITE.statements(table)
        self._flows = SQLFlows(self._sql)
        self._clock = (clock or SystemClock()).time
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._db = connect(where, busy_timeout=busy_timeout)
        except sqlite3.Error as exc:
            raise unavailable("SQLite", exc) from exc
        try:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as exc:
                raise unavailable("SQLite", exc) from exc
            self.create_schema()
        except BaseException:
            self._db.close()  # a store that failed to open holds nothing open
            raise

    def create_schema(self) -> None:
        """Create the table and its index, if missing."""
        with self._lock:
            if self._closed:
                raise closed("this SQLiteDedupStore")
            try:
                self._db.execute(self._sql.schema)
                self._db.execute(self._sql.index)
            except sqlite3.Error as exc:
                raise unavailable("SQLite", exc) from exc

    def _perform(self, op: _io.Op[Any]) -> Rows:
        sql = query(op)
        return self._db.execute(sql.sql, {**sql.params, "now": self._clock()}).fetchall()

    def _run(self, flow: Flow[T]) -> T:
        with self._lock:
            if self._closed:
                flow.close()
                raise closed("this SQLiteDedupStore")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                flow.close()
                raise unavailable("SQLite", exc) from exc
            try:
                result = _io.run(flow, self._perform)
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise unavailable("SQLite", exc) from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def close(self) -> None:
        """Close the database connection; a later call raises :class:`StoreError`."""
        with self._lock:
            self._closed = True
            self._db.close()


class AsyncSQLiteDedupStore(FlowStore, AsyncDedupStore):
    """:class:`SQLiteDedupStore` for asyncio: each primitive runs in a worker thread."""

    def __init__(self, where: str | os.PathLike[str], *, table: str = DEFAULT_TABLE,
                 busy_timeout: float = 30.0, clock: Clock | None = None) -> None:
        self.sync = SQLiteDedupStore(where, table=table, busy_timeout=busy_timeout,
                                     clock=clock)
        self._flows = self.sync._flows

    async def _run(self, flow: Flow[T]) -> T:
        return await asyncio.to_thread(self.sync._run, flow)

    async def aclose(self) -> None:
        self.sync.close()
