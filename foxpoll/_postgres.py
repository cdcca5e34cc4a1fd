"""Where foxpoll's PostgreSQL stores get connections, and what their failures become.

Every call holds its connection for ``statement_timeout`` seconds at most: past that,
the watchdog shuts the connection's socket, so a network that froze mid-statement fails
the call instead of blocking it (and the delivery's lease) for good.

Given a connection string, a store owns a small ``psycopg_pool`` pool, opened on first use
(``pool.open`` is idempotent and locked, so racing first calls are safe) and closed by the
store; given a pool, it uses it as is and never closes it. A missing table and an
unreachable server become :class:`~foxpoll.errors.StoreUnavailable`.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg import pq

from ._deadlines import WATCHDOG, Alarm, shut_down_fd
from .errors import StoreUnavailable

__all__ = ["PostgresConnections"]


class PostgresConnections:
    """The connections of one store (its table named ``table``, holding ``what``).

    Args:
        conninfo_or_pool: A libpq connection string, or a sync or async pool.
        asynchronous: Make the store's own pool an ``AsyncConnectionPool``.
        timeout: Seconds to wait for a connection.
        size: The most connections the store's own pool opens.
        statement_timeout: Seconds one call may hold its connection.
    """

    def __init__(self, conninfo_or_pool: Any, *, table: str, what: str, timeout: float,
                 size: int, statement_timeout: float = 5.0, asynchronous: bool = False
                 ) -> None:
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

    def _failure(self, exc: psycopg.Error, alarm: Alarm | None) -> StoreUnavailable:
        if alarm is not None and alarm.fired:
            return StoreUnavailable(f"PostgreSQL did not answer within statement_timeout "
                                    f"({self.statement_timeout:g} s)")
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return StoreUnavailable(f"the {self.what} table {self.table!r} does not exist: "
                                    "call create_schema() once")
        return StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}")

    def _arm(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Alarm:
        return WATCHDOG.arm(self.statement_timeout,
                            functools.partial(shut_down_fd, conn.pgconn.socket))

    def connection(self) -> Checkout:
        """A connection from the sync pool, for one call (``with``)."""
        return Checkout(self)

    def aconnection(self) -> Checkout:
        """A connection from the async pool, for one call (``async with``)."""
        return Checkout(self)

    def close(self) -> None:
        """Close the store's own sync pool (a pool it was given stays open)."""
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        if self.owned and not self.pool.closed:
            await self.pool.close()


_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
_FAILURES = (psycopg.errors.UndefinedTable, psycopg.OperationalError)  # PoolTimeout is one


class Checkout:
    """One call's connection: taken from the pool, cut by the watchdog past
    ``statement_timeout``, given back; psycopg's failures become ``StoreUnavailable``.

    A class, not a generator context manager, and ``getconn``/``putconn`` rather than
    ``pool.connection()``: every delivery goes through here twice. A connection a caller's
    pool left outside autocommit is committed (or rolled back) before it goes back.
    """

    __slots__ = ("_alarm", "_conn", "_pg")
    _conn: Any
    _alarm: Alarm

    def __init__(self, pg: PostgresConnections) -> None:
        self._pg = pg

    def _taken(self, conn: Any) -> Any:
        self._conn, self._alarm = conn, self._pg._arm(conn)
        return conn

    def _settled(self, exc: BaseException | None) -> None:
        if isinstance(exc, _FAILURES):
            raise self._pg._failure(exc, self._alarm) from exc

    def __enter__(self) -> psycopg.Connection[Any]:
        pool = self._pg.pool
        try:
            if self._pg.owned and pool.closed:
                pool.open(wait=True, timeout=self._pg.timeout)
            return cast("psycopg.Connection[Any]",
                        self._taken(pool.getconn(timeout=self._pg.timeout)))
        except _FAILURES as exc:
            raise self._pg._failure(exc, None) from exc

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if self._conn.pgconn.transaction_status in _OPEN:
                if exc is None:
                    self._conn.commit()
                else:
                    self._conn.rollback()
        except _FAILURES as failure:
            exc = exc or failure
        finally:
            WATCHDOG.disarm(self._alarm)
            self._pg.pool.putconn(self._conn)
        self._settled(exc)

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        pool = self._pg.pool
        try:
            if self._pg.owned and pool.closed:
                await pool.open(wait=True, timeout=self._pg.timeout)
            return cast("psycopg.AsyncConnection[Any]",
                        self._taken(await pool.getconn(timeout=self._pg.timeout)))
        except _FAILURES as exc:
            raise self._pg._failure(exc, None) from exc

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
        self._settled(exc)
