"""``PostgresDedupStore``: psycopg 3, one statement per transition, the server's clock.

The claim is ``INSERT ... ON CONFLICT ... DO UPDATE ... WHERE (released or expired)
RETURNING``: PostgreSQL's row lock on the conflicting row makes concurrent claims take
turns, and only one of them sees its row returned. Works with a connection string (the
store then opens its own small ``psycopg_pool`` pool on first use, closed by ``close()``
/ ``aclose()`` or ``with``) or a ``psycopg_pool`` pool of yours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

try:
    import psycopg
    import psycopg_pool
    from psycopg.rows import dict_row
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("PostgresDedupStore needs psycopg: pip install 'foxpoll[postgres]'") from exc

from foxpoll._effects import arun_flow, run_flow
from foxpoll.errors import StoreUnavailable

from ._flows import Flow, FlowStore, Query, SQLFlows
from ._sql import POSTGRES
from .base import AsyncDedupStore, DedupStore, unavailable

__all__ = ["AsyncPostgresDedupStore", "PostgresDedupStore"]

DEFAULT_TABLE = "foxpoll_deliveries"


class _PostgresStore(FlowStore):
    """What both PostgreSQL stores share: the statements and where connections come from."""

    def __init__(
        self, conninfo_or_pool: Any, *, table: str = DEFAULT_TABLE, connect_timeout: float = 10,
        max_connections: int = 10,
    ) -> None:
        self._sql = POSTGRES.statements(table)
        self._flows = SQLFlows(self._sql)
        self._table = table
        self._connect_timeout = connect_timeout
        self._owns_pool = isinstance(conninfo_or_pool, str)
        self._pool: Any = (self._own_pool(conninfo_or_pool, max_connections)
                           if isinstance(conninfo_or_pool, str) else conninfo_or_pool)

    def _own_pool(self, conninfo: str, size: int) -> Any:
        raise NotImplementedError

    def _missing(self, exc: psycopg.errors.UndefinedTable) -> StoreUnavailable:
        return StoreUnavailable(f"the delivery table {self._table!r} does not exist: "
                                "call create_schema() once")


class PostgresDedupStore(_PostgresStore, DedupStore):
    """A dedup store in a PostgreSQL table.

    Args:
        conninfo_or_pool: A libpq connection string, for which the store opens its own
            pool on first use (``close()`` or ``with`` closes it); or your
            ``psycopg_pool.ConnectionPool`` (never closed by the store) whose connections
            are in autocommit mode (``kwargs={"autocommit": True}``). Each primitive is one
            atomic statement.
        table: The table name (a plain identifier).
        connect_timeout: Seconds to wait for a connection before :class:`StoreUnavailable`.
        max_connections: The size of the store's own pool.

    Call :meth:`create_schema` once (it is idempotent) before use.
    """

    def _own_pool(self, conninfo: str, size: int) -> psycopg_pool.ConnectionPool[Any]:
        return psycopg_pool.ConnectionPool(
            conninfo, min_size=1, max_size=size, open=False, timeout=self._connect_timeout,
            kwargs={"autocommit": True}, name=f"foxpoll-{self._table}")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            if self._owns_pool and self._pool.closed:
                self._pool.open(wait=True, timeout=self._connect_timeout)
            with self._pool.connection(timeout=self._connect_timeout) as conn:
                yield conn
        except psycopg.errors.UndefinedTable as exc:
            raise self._missing(exc) from exc
        except psycopg.OperationalError as exc:  # a pool's PoolTimeout is one too
            raise unavailable("PostgreSQL", exc) from exc

    def create_schema(self) -> None:
        """Create the table and its index, if missing."""
        with self._connection() as conn, conn.transaction():
            conn.execute(self._sql.schema)
            conn.execute(self._sql.index)

    def _run(self, flow: Flow[Any]) -> Any:
        # Autocommit: every statement of a flow is atomic on its own (see SQLFlows), so an
        # explicit transaction would only add BEGIN and COMMIT round trips.
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:

            def perform(query: Query) -> list[dict[str, Any]]:
                cur.execute(query.sql, query.params)
                return cur.fetchall()  # every statement returns rows

            return run_flow(flow, perform)

    def close(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        if self._owns_pool and not self._pool.closed:
            self._pool.close()


class AsyncPostgresDedupStore(_PostgresStore, AsyncDedupStore):
    """:class:`PostgresDedupStore` on psycopg's asyncio connections
    (a connection string, or a ``psycopg_pool.AsyncConnectionPool``)."""

    def _own_pool(self, conninfo: str, size: int) -> psycopg_pool.AsyncConnectionPool[Any]:
        return psycopg_pool.AsyncConnectionPool(
            conninfo, min_size=1, max_size=size, open=False, timeout=self._connect_timeout,
            kwargs={"autocommit": True}, name=f"foxpoll-{self._table}")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            if self._owns_pool and self._pool.closed:
                await self._pool.open(wait=True, timeout=self._connect_timeout)
            async with self._pool.connection(timeout=self._connect_timeout) as conn:
                yield conn
        except psycopg.errors.UndefinedTable as exc:
            raise self._missing(exc) from exc
        except psycopg.OperationalError as exc:
            raise unavailable("PostgreSQL", exc) from exc

    async def create_schema(self) -> None:
        """See :meth:`PostgresDedupStore.create_schema`."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._sql.schema)
            await conn.execute(self._sql.index)

    async def _run(self, flow: Flow[Any]) -> Any:
        async with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:

            async def perform(query: Query) -> list[dict[str, Any]]:
                await cur.execute(query.sql, query.params)
                return await cur.fetchall()

            return await arun_flow(flow, perform)

    async def aclose(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        if self._owns_pool and not self._pool.closed:
            await self._pool.close()
