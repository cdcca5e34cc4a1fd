"""``PostgresDedupStore``: psycopg 3, one statement per transition, the server's clock.

The claim is ``INSERT ... ON CONFLICT ... DO UPDATE ... WHERE (released or expired)
RETURNING``: PostgreSQL's row lock on the conflicting row makes concurrent claims take
turns, and only one of them sees its row returned. Works with a connection string (the
store then opens its own small ``psycopg_pool`` pool on first use, closed by ``close()``
/ ``aclose()`` or ``with``) or a ``psycopg_pool`` pool of yours.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("PostgresDedupStore needs psycopg: pip install 'foxpoll[postgres]'") from exc

from foxpoll._effects import arun_flow, run_flow
from foxpoll._postgres import Checkout, PostgresConnections

from ._flows import Flow, FlowStore, Query, SQLFlows
from ._sql import POSTGRES
from .base import AsyncDedupStore, DedupStore

__all__ = ["AsyncPostgresDedupStore", "PostgresDedupStore"]

DEFAULT_TABLE = "foxpoll_deliveries"


class _PostgresStore(FlowStore):
    """What both PostgreSQL stores share: the statements and where connections come from."""

    _asynchronous = False

    def __init__(
        self, conninfo_or_pool: Any, *, table: str = DEFAULT_TABLE, connect_timeout: float = 10,
        max_connections: int = 10, statement_timeout: float = 5.0,
        reuse_connection_for: float = 1.0,
    ) -> None:
        self._sql = POSTGRES.statements(table)
        self._flows = SQLFlows(self._sql)
        self._pg = PostgresConnections(conninfo_or_pool, table=table, what="delivery",
                                       timeout=connect_timeout, size=max_connections,
                                       statement_timeout=statement_timeout,
                                       asynchronous=self._asynchronous,
                                       reuse_for=reuse_connection_for)


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
        statement_timeout: Seconds one store call may take once it has its connection;
            past that, its connection is cut and the call raises
            :class:`StoreUnavailable` (a network that froze mid-statement).
        reuse_connection_for: Seconds a connection taken from the pool serves the next
            calls before it goes back (it goes back at once after a failed call, and
            when the store is idle or closed); 0 returns it after every call. Taking it
            anew costs each call tens of microseconds; keeping it holds one connection
            of a shared pool per busy thread that much longer.

    Call :meth:`create_schema` once (it is idempotent) before use.
    """

    def _connection(self) -> Checkout:
        return self._pg.connection()

    def create_schema(self) -> None:
        """Create the table and its index, if missing."""
        with self._connection() as conn, conn.transaction():
            conn.execute(self._sql.schema)
            conn.execute(self._sql.index)

    def _run(self, flow: Flow[Any]) -> Any:
        # Autocommit: every statement of a flow is atomic on its own (see SQLFlows), so an
        # explicit transaction would only add BEGIN and COMMIT round trips.
        checkout = self._pg.connection()
        with checkout:
            return run_flow(flow, checkout.rows)  # every statement returns rows

    def close(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        self._pg.close()


class AsyncPostgresDedupStore(_PostgresStore, AsyncDedupStore):
    """:class:`PostgresDedupStore` on psycopg's asyncio connections
    (a connection string, or a ``psycopg_pool.AsyncConnectionPool``). Each call takes its
    connection from the pool and gives it back: ``reuse_connection_for`` is for
    blocking stores."""

    _asynchronous = True

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        return self._pg.aconnection()

    async def create_schema(self) -> None:
        """See :meth:`PostgresDedupStore.create_schema`."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._sql.schema)
            await conn.execute(self._sql.index)

    async def _run(self, flow: Flow[Any]) -> Any:
        async with self._connection() as conn:

            async def perform(query: Query) -> list[tuple[Any, ...]]:
                cursor = await conn.execute(query.sql, query.params)
                return await cursor.fetchall()

            return await arun_flow(flow, perform)

    async def aclose(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        await self._pg.aclose()
