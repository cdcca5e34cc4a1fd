"""Where foxpoll's PostgreSQL stores get connections, and what their failures become.

Given a connection string, a store owns a small ``psycopg_pool`` pool, opened on first use
(``pool.open`` is idempotent and locked, so racing first calls are safe) and closed by the
store; given a pool, it uses it as is and never closes it. A missing table and an
unreachable server become :class:`~foxpoll.errors.StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import psycopg_pool

from .errors import StoreUnavailable

__all__ = ["PostgresConnections"]


class PostgresConnections:
    """The connections of one store (its table named ``table``, holding ``what``).

    Args:
        conninfo_or_pool: A libpq connection string, or a sync or async pool.
        asynchronous: Make the store's own pool an ``AsyncConnectionPool``.
        timeout: Seconds to wait for a connection.
        size: The most connections the store's own pool opens.
    """

    def __init__(self, conninfo_or_pool: Any, *, table: str, what: str, timeout: float,
                 size: int, asynchronous: bool = False) -> None:
        self.table, self.what, self.timeout = table, what, timeout
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

    def _failure(self, exc: psycopg.Error) -> StoreUnavailable:
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return StoreUnavailable(f"the {self.what} table {self.table!r} does not exist: "
                                    "call create_schema() once")
        return StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection from the sync pool."""
        try:
            if self.owned and self.pool.closed:
                self.pool.open(wait=True, timeout=self.timeout)
            with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
        # A pool's PoolTimeout is an OperationalError too.
        except (psycopg.errors.UndefinedTable, psycopg.OperationalError) as exc:
            raise self._failure(exc) from exc

    @asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection from the async pool."""
        try:
            if self.owned and self.pool.closed:
                await self.pool.open(wait=True, timeout=self.timeout)
            async with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
        except (psycopg.errors.UndefinedTable, psycopg.OperationalError) as exc:
            raise self._failure(exc) from exc

    def close(self) -> None:
        """Close the store's own sync pool (a pool it was given stays open)."""
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        if self.owned and not self.pool.closed:
            await self.pool.close()
