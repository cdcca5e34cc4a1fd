"""Where foxpoll's PostgreSQL stores get connections, and what their failures become.

Each call takes a connection from a ``psycopg_pool`` pool (``pool.connection()``) and gives
it back. Given a connection string, a store owns a small pool, opened on first use
(``pool.open`` is idempotent and locked, so racing first calls are safe) and closed by the
store; given a pool, it uses it as is and never closes it.

A call's bounds come from the driver where it has them: the pool's wait
(``connect_timeout``), and libpq's ``connect_timeout`` for the store's own connections.
Once a call has its connection, no driver setting bounds it (see :mod:`foxpoll._deadlines`):
a call still running at ``statement_timeout`` has its connection shut down, and fails.

The server's own ``statement_timeout`` is left alone: it would cancel a statement waiting
on a lock and keep its connection, but it is a startup option that PgBouncer and other
poolers refuse (or a session ``SET`` that leaks to other clients through a transaction
pooler). A connection string or pool of the caller's may set it.

An unreachable server, an exhausted pool or a call past its time becomes
:class:`foxpoll.StoreUnavailable`, worth retrying. A missing table, or a pool closed (the
store used after ``close()``), becomes :class:`foxpoll.StoreError`, which waiting would
not fix (``create_schema()`` does the first; a new store, the second).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from ._deadlines import WATCHDOG, shut_down_fd
from .errors import StoreError, StoreUnavailable

__all__ = ["PostgresConnections"]


class PostgresConnections:
    """The connections of one store (its table named ``table``, holding ``what``).

    Args:
        where: A libpq connection string, or a sync or async pool.
        asynchronous: Make the store's own pool an ``AsyncConnectionPool``.
        timeout: Seconds to wait for a connection.
        size: The most connections the store's own pool opens.
        statement_timeout: Seconds one call may hold its connection.
    """

    def __init__(self, where: Any, *, table: str, what: str, timeout: float,
                 size: int, statement_timeout: float = 5.0, asynchronous: bool = False
                 ) -> None:
        if not statement_timeout > 0:
            raise ValueError("statement_timeout must be positive")
        self.table, self.what, self.timeout = table, what, timeout
        self.statement_timeout = statement_timeout
        self.owned = isinstance(where, str)
        if isinstance(where, str):
            kind = psycopg_pool.AsyncConnectionPool if asynchronous else psycopg_pool.ConnectionPool
            settings: dict[str, Any] = {"autocommit": True}
            if "connect_timeout" not in conninfo_to_dict(where):
                settings["connect_timeout"] = max(2, math.ceil(timeout))  # libpq: whole s, >= 2
            # min_size=0: the first call opens the first connection (the pool's own first
            # one would race it, and one call would leave two connections).
            self.pool: Any = kind(where, min_size=0, max_size=size, open=False,
                                  timeout=timeout, name=f"foxpoll-{table}", kwargs=settings)
        else:
            self.pool = where
        found = self.pool.conninfo
        self.conninfo: str | None = found if isinstance(found, str) else None
        self._closed = False  # by close(): the store's own pool is never opened again

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one blocking call (``with``), back in the pool after it."""
        with self._failures():
            if self.owned and self.pool.closed:
                self._refuse_if_closed()
                self.pool.open()
            with self.pool.connection(self.timeout) as conn, self._deadline(conn), \
                    _unit(conn):
                yield conn

    @contextlib.asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection from the async pool for one call (``async with``)."""
        with self._failures():
            if self.owned and self.pool.closed:
                self._refuse_if_closed()
                await self.pool.open()
            async with self.pool.connection(self.timeout) as conn:
                with self._deadline(conn):
                    async with _unit(conn):
                        yield conn

    @contextlib.contextmanager
    def _deadline(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]
                  ) -> Iterator[None]:
        """Cut ``conn`` if the call is still running at ``statement_timeout`` (disarmed
        before the connection goes back to the pool)."""
        alarm = WATCHDOG.arm(self.statement_timeout,
                             functools.partial(shut_down_fd, conn.fileno()))
        try:
            yield
        except psycopg.Error as exc:
            if WATCHDOG.disarm(alarm):
                raise self._late() from exc
            raise
        finally:
            if WATCHDOG.disarm(alarm):
                # Cut, if only as the call ended: closed, the pool replaces it rather
                # than lend a dead connection to the next call.
                conn.pgconn.finish()

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.UndefinedTable as exc:
            # Not an outage: waiting for the server would not make the table appear.
            raise StoreError(f"the {self.what} table {self.table!r} does not exist: "
                             "call create_schema() once") from exc
        except psycopg_pool.PoolClosed as exc:
            # Not an outage either: a closed pool never opens again.
            raise StoreError(f"the pool of the {self.what} table {self.table!r} is closed "
                             "(the store's close(), or the pool's own): make a new "
                             "store") from exc
        except psycopg.OperationalError as exc:  # PoolTimeout is one
            raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc

    def _refuse_if_closed(self) -> None:
        if self._closed:  # not an outage: a closed store never opens again
            raise StoreError(f"the pool of the {self.what} table {self.table!r} is closed "
                             "(the store's close()): make a new store")

    def _late(self) -> StoreUnavailable:
        return StoreUnavailable(f"PostgreSQL did not answer within statement_timeout "
                                f"({self.statement_timeout:g} s)")

    def close(self) -> None:
        """Close the store's own sync pool (a pool it was given stays open)."""
        self._closed = self.owned
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        self._closed = self.owned
        if self.owned and not self.pool.closed:
            await self.pool.close()


def _unit(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Any:
    """The call's unit of work, a context manager (sync or async): nothing on an
    autocommit connection, whose statements each stand alone; on a caller's pool left
    outside autocommit, a transaction, so that it ends (committed, or rolled back on an
    error) while the call's deadline still runs."""
    return contextlib.nullcontext() if conn.autocommit else conn.transaction()
