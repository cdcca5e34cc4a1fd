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
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import psycopg_pool

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

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection from the sync pool, for one call."""
        alarm = None
        try:
            if self.owned and self.pool.closed:
                self.pool.open(wait=True, timeout=self.timeout)
            with self.pool.connection(timeout=self.timeout) as conn:
                alarm = self._arm(conn)
                try:
                    yield conn
                finally:
                    WATCHDOG.disarm(alarm)
        # A pool's PoolTimeout is an OperationalError too.
        except (psycopg.errors.UndefinedTable, psycopg.OperationalError) as exc:
            raise self._failure(exc, alarm) from exc

    @asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection from the async pool, for one call."""
        alarm = None
        try:
            if self.owned and self.pool.closed:
                await self.pool.open(wait=True, timeout=self.timeout)
            async with self.pool.connection(timeout=self.timeout) as conn:
                alarm = self._arm(conn)
                try:
                    yield conn
                finally:
                    WATCHDOG.disarm(alarm)
        except (psycopg.errors.UndefinedTable, psycopg.OperationalError) as exc:
            raise self._failure(exc, alarm) from exc

    def close(self) -> None:
        """Close the store's own sync pool (a pool it was given stays open)."""
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        if self.owned and not self.pool.closed:
            await self.pool.close()
