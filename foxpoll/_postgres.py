"""Where foxpoll's PostgreSQL stores get connections, and what their failures become.

Every call holds its connection for ``statement_timeout`` seconds at most: past that,
the watchdog shuts the connection's socket, so a network that froze mid-statement fails
the call instead of blocking it (and the delivery's lease) for good.

Given a connection string, a store owns a small ``psycopg_pool`` pool, opened on first use
(``pool.open`` is idempotent and locked, so racing first calls are safe) and closed by the
store; given a pool, it uses it as is and never closes it. A missing table and an
unreachable server become :class:`~foxpoll.errors.StoreUnavailable`.

A blocking call keeps its connection *warm* for the next call, for up to ``reuse_for``
seconds (one by default) after it came out of the pool: see :mod:`foxpoll._warm`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import psycopg_pool
from psycopg import pq

from ._deadlines import WATCHDOG, Alarm, Guard, shut_down_fd
from ._warm import WarmConnections
from .errors import StoreUnavailable

__all__ = ["PostgresConnections"]


class PostgresConnections:
    """The connections of one store (its table named ``table``, holding ``what``).

    Blocking calls reuse a connection that is still warm (see the module); the async
    ones always go through the pool.

    Args:
        conninfo_or_pool: A libpq connection string, or a sync or async pool.
        asynchronous: Make the store's own pool an ``AsyncConnectionPool``.
        timeout: Seconds to wait for a connection.
        size: The most connections the store's own pool opens.
        statement_timeout: Seconds one call may hold its connection.
        reuse_for: Seconds a connection may serve blocking calls after it left the pool
            (0: back after every call).
    """

    def __init__(self, conninfo_or_pool: Any, *, table: str, what: str, timeout: float,
                 size: int, statement_timeout: float = 5.0, asynchronous: bool = False,
                 reuse_for: float = 1.0) -> None:
        self._warm: WarmConnections[Checkout] = WarmConnections(reuse_for)
        self.table, self.what, self.timeout = table, what, timeout
        self.statement_timeout = statement_timeout
        self.owned = isinstance(conninfo_or_pool, str)
        if isinstance(conninfo_or_pool, str):
            kind = psycopg_pool.AsyncConnectionPool if asynchronous else psycopg_pool.ConnectionPool
            self.pool: Any = kind(conninfo_or_pool, min_size=1, max_size=size, open=False,
                                  timeout=timeout, kwargs={"autocommit": True},
                                  name=f"foxpoll-{table}")
        else:
            self.pool = conninfo_or_pool
        found = self.pool.conninfo
        self.conninfo: str | None = found if isinstance(found, str) else None

    def _keep_warm(self, checkout: Checkout) -> bool:
        """Keep ``checkout``'s connection for the next call, unless the pool is closing or
        it is past ``reuse_for``; whether it was kept."""
        return not self.pool.closed and self._warm.keep(checkout)

    def _failure(self, exc: psycopg.Error, deadline: Alarm | Guard | None
                 ) -> StoreUnavailable:
        if deadline is not None and deadline.fired:
            return StoreUnavailable(f"PostgreSQL did not answer within statement_timeout "
                                    f"({self.statement_timeout:g} s)")
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return StoreUnavailable(f"the {self.what} table {self.table!r} does not exist: "
                                    "call create_schema() once")
        return StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}")

    def connection(self) -> Checkout:
        """A connection for one blocking call (``with``): a warm one, or from the pool."""
        held = None if self.pool.closed else self._warm.take()
        return held or Checkout(self)

    def aconnection(self) -> Checkout:
        """A connection from the async pool, for one call (``async with``)."""
        return Checkout(self)

    def close(self) -> None:
        """Return the warm connections, and close the store's own sync pool (a pool it was
        given stays open)."""
        self._warm.flush(everything=True)
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        if self.owned and not self.pool.closed:
            await self.pool.close()


_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
_IDLE = pq.TransactionStatus.IDLE
_FAILURES = (psycopg.errors.UndefinedTable, psycopg.OperationalError)  # PoolTimeout is one


class Checkout:
    """One call's connection: taken from the pool, cut by the watchdog past
    ``statement_timeout``, given back; psycopg's failures become ``StoreUnavailable``.

    A class, not a generator context manager, and ``getconn``/``putconn`` rather than
    ``pool.connection()``: every delivery goes through here twice. A blocking checkout
    stays warm after a call that went well (see the module), with its connection and its
    cursor. A connection a caller's pool left outside autocommit is committed (or rolled
    back) before it goes back.
    """

    __slots__ = ("_alarm", "_conn", "_cursor", "_guard", "_pg", "since")
    _alarm: Alarm  # an async call's deadline

    def __init__(self, pg: PostgresConnections) -> None:
        self._pg = pg
        self._conn: Any = None
        self._cursor: Any = None
        self._guard: Guard | None = None  # the blocking calls' deadlines, while out
        self.since = 0.0  # when the connection left the pool

    def rows(self, query: tuple[str, Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Run ``(sql, params)``, a statement that returns rows; its rows. The cursor is
        made once per time the connection is out of the pool."""
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self._conn.cursor()
        cursor.execute(*query)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows

    def _fresh(self, conn: Any) -> Any:
        """Hold ``conn``, just out of the pool: its cursor is made on first use."""
        self._conn, self._cursor, self.since = conn, None, time.monotonic()
        return conn

    def _cut(self) -> Callable[[], None]:
        """What the watchdog runs on a call past its deadline."""
        return functools.partial(shut_down_fd, self._conn.pgconn.socket)

    def _raise(self, exc: BaseException | None, deadline: Alarm | Guard | None) -> None:
        if isinstance(exc, _FAILURES):
            raise self._pg._failure(exc, deadline) from exc

    def put_back(self) -> None:
        """Return the connection to the pool."""
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        conn, self._conn, self._cursor = self._conn, None, None
        self._pg.pool.putconn(conn)

    def __enter__(self) -> psycopg.Connection[Any]:
        guard = self._guard
        if guard is None:  # not warm: take a connection from the pool
            pool = self._pg.pool
            try:
                if self._pg.owned and pool.closed:
                    pool.open(wait=True, timeout=self._pg.timeout)
                self._fresh(pool.getconn(timeout=self._pg.timeout))
            except _FAILURES as exc:
                raise self._pg._failure(exc, None) from exc
            guard = self._guard = WATCHDOG.guard(self._pg.statement_timeout, self._cut())
        guard.start()
        conn: psycopg.Connection[Any] = self._conn
        return conn

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        status = None
        try:
            status = self._conn.pgconn.transaction_status
            if status in _OPEN:
                if exc is None:
                    self._conn.commit()
                    status = _IDLE
                else:
                    self._conn.rollback()
        except _FAILURES as failure:
            exc = exc or failure
        finally:
            guard = self._guard
            assert guard is not None  # set by __enter__
            fired = guard.stop()
            if exc is not None or fired or status != _IDLE or not self._pg._keep_warm(self):
                self.put_back()
        if exc is not None:
            self._raise(exc, guard)

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        pool = self._pg.pool
        try:
            if self._pg.owned and pool.closed:
                await pool.open(wait=True, timeout=self._pg.timeout)
            conn: psycopg.AsyncConnection[Any] = self._fresh(
                await pool.getconn(timeout=self._pg.timeout))
        except _FAILURES as exc:
            raise self._pg._failure(exc, None) from exc
        self._alarm = WATCHDOG.arm(self._pg.statement_timeout, self._cut())
        return conn

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if self._conn.pgconn.transaction_status in _OPEN:
                if exc is None:
                    await self._conn.commit()
                else:
                    await self._conn.rollback()
        except _FAILURES as failure:
            exc = exc or failure
        finally:
            WATCHDOG.disarm(self._alarm)
            await self._pg.pool.putconn(self._conn)
            self._conn = None
        self._raise(exc, self._alarm)
