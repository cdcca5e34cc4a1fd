"""Where foxpoll's PostgreSQL stores get connections, and what their failures become.

Each call takes a connection from a ``psycopg_pool`` pool (``pool.connection()``) and gives
it back. Given a connection string, a store owns a small pool, opened on first use
(``pool.open`` is idempotent and locked, so racing first calls are safe) and closed by the
store; given a pool, it uses it as is and never closes it.

A call's bounds come from the driver first: the pool's wait (``connect_timeout``), and on
the store's own pool libpq's ``connect_timeout`` and the server's ``statement_timeout``,
which cancels a statement that runs too long (a lock held elsewhere) and leaves the
connection in working order. What no driver setting covers is a network that freezes
while TCP still acknowledges: see :mod:`foxpoll._deadlines`. A call still running a tenth
past ``statement_timeout`` has its connection shut down, and fails.

Failures become :class:`~foxpoll.errors.StoreUnavailable`: a missing table, an
unreachable server, an exhausted pool, a statement past its time.
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
from .errors import StoreUnavailable

__all__ = ["PostgresConnections"]


class PostgresConnections:
    """The connections of one store (its table named ``table``, holding ``what``).

    Args:
        conninfo_or_pool: A libpq connection string, or a sync or async pool.
        asynchronous: Make the store's own pool an ``AsyncConnectionPool``.
        timeout: Seconds to wait for a connection.
        size: The most connections the store's own pool opens.
        statement_timeout: Seconds one statement may run on the server (the store's own
            pool), and, a tenth more, one call may hold its connection (any pool).
    """

    def __init__(self, conninfo_or_pool: Any, *, table: str, what: str, timeout: float,
                 size: int, statement_timeout: float = 5.0, asynchronous: bool = False
                 ) -> None:
        if not statement_timeout > 0:
            raise ValueError("statement_timeout must be positive")
        self.table, self.what, self.timeout = table, what, timeout
        self.statement_timeout = statement_timeout
        self.owned = isinstance(conninfo_or_pool, str)
        if isinstance(conninfo_or_pool, str):
            kind = psycopg_pool.AsyncConnectionPool if asynchronous else psycopg_pool.ConnectionPool
            # min_size=0: the first call opens the first connection (the pool's own first
            # one would race it, and one call would leave two connections).
            self.pool: Any = kind(conninfo_or_pool, min_size=0, max_size=size, open=False,
                                  timeout=timeout, name=f"foxpoll-{table}",
                                  kwargs=_settings(conninfo_or_pool, statement_timeout,
                                                   timeout))
        else:
            self.pool = conninfo_or_pool
        found = self.pool.conninfo
        self.conninfo: str | None = found if isinstance(found, str) else None

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one blocking call (``with``), back in the pool after it."""
        with self._failures():
            if self.owned and self.pool.closed:
                self.pool.open()
            with self.pool.connection(self.timeout) as conn, self._deadline(conn), \
                    _unit(conn):
                yield conn

    @contextlib.asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection from the async pool for one call (``async with``)."""
        with self._failures():
            if self.owned and self.pool.closed:
                await self.pool.open()
            async with self.pool.connection(self.timeout) as conn:
                with self._deadline(conn):
                    async with _unit(conn):
                        yield conn

    @contextlib.contextmanager
    def _deadline(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]
                  ) -> Iterator[None]:
        """Cut ``conn`` if the call is still running a tenth past ``statement_timeout``
        (disarmed before the connection goes back to the pool)."""
        alarm = WATCHDOG.arm(1.1 * self.statement_timeout,
                             functools.partial(shut_down_fd, conn.fileno()))
        try:
            yield
        except psycopg.Error as exc:
            if WATCHDOG.disarm(alarm):
                raise self._late() from exc
            raise
        finally:
            WATCHDOG.disarm(alarm)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.UndefinedTable as exc:
            raise StoreUnavailable(f"the {self.what} table {self.table!r} does not exist: "
                                   "call create_schema() once") from exc
        except psycopg.errors.QueryCanceled as exc:  # the server's statement_timeout
            raise self._late() from exc
        except psycopg.OperationalError as exc:  # PoolTimeout and PoolClosed are ones
            raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc

    def _late(self) -> StoreUnavailable:
        return StoreUnavailable(f"PostgreSQL did not answer within statement_timeout "
                                f"({self.statement_timeout:g} s)")

    def close(self) -> None:
        """Close the store's own sync pool (a pool it was given stays open)."""
        if self.owned and not self.pool.closed:
            self.pool.close()

    async def aclose(self) -> None:
        """Close the store's own async pool."""
        if self.owned and not self.pool.closed:
            await self.pool.close()


def _unit(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Any:
    """The call's unit of work, a context manager (sync or async): nothing on an
    autocommit connection, whose statements each stand alone; on a caller's pool left
    outside autocommit, a transaction, so that it ends (committed, or rolled back on an
    error) while the call's deadline still runs."""
    return contextlib.nullcontext() if conn.autocommit else conn.transaction()


def _settings(conninfo: str, statement_timeout: float, connect_timeout: float
              ) -> dict[str, Any]:
    """The connection settings of a store's own pool: autocommit, libpq's
    ``connect_timeout`` and the server's ``statement_timeout``, unless ``conninfo`` sets
    them itself."""
    given = conninfo_to_dict(conninfo)
    settings: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in given:  # libpq counts whole seconds, at least 2
        settings["connect_timeout"] = max(2, math.ceil(connect_timeout))
    options = str(given.get("options") or "")
    if "statement_timeout" not in options:
        milliseconds = max(1, round(statement_timeout * 1000))
        settings["options"] = f"{options} -c statement_timeout={milliseconds}".strip()
    return settings
