"""``PostgresDedupStore``: psycopg 3, one statement per transition, the server's clock.

The claim is ``INSERT ... ON CONFLICT ... DO UPDATE ... WHERE (released or expired)
RETURNING``: PostgreSQL's row lock on the conflicting row makes concurrent claims take
turns, and only one of them sees its row returned. Works with a connection string (the
store then opens its own small ``psycopg_pool`` pool on first use, closed by ``close()``
/ ``aclose()`` or ``with``) or a ``psycopg_pool`` pool of yours.
"""

from __future__ import annotations

from typing import Any, TypeVar

from foxpoll import _io
from foxpoll._core import check_timeout

try:
    from foxpoll._postgres import PostgresConnections
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("PostgresDedupStore needs psycopg: pip install 'foxpoll[postgres]'") from exc

from ._flows import Flow, FlowStore, Rows, SQLFlows, query
from ._sql import POSTGRES
from .base import AsyncDedupStore, DedupStore

__all__ = ["AsyncPostgresDedupStore", "PostgresDedupStore"]

DEFAULT_TABLE = "foxpoll_deliveries"

T = TypeVar("T")


class _PostgresStore(FlowStore):
    """What both PostgreSQL stores share: the statements and where connections come from."""

    _asynchronous = False

    def __init__(
        self, where: Any, *, table: str = DEFAULT_TABLE, connect_timeout: float = 5.0,
        max_connections: int = 10, statement_timeout: float = 5.0,
    ) -> None:
        check_timeout(connect_timeout, "connect_timeout")
        check_timeout(statement_timeout, "statement_timeout")
        self._sql = POSTGRES.statements(table)
        self._flows = SQLFlows(self._sql)
        self._pg = PostgresConnections(where, table=table, what="delivery",
                                       timeout=connect_timeout, size=max_connections,
                                       statement_timeout=statement_timeout,
                                       asynchronous=self._asynchronous)


class PostgresDedupStore(_PostgresStore, DedupStore):
    """A dedup store in a PostgreSQL table.

    Args:
        where: A libpq connection string, for which the store opens its own
            pool on first use (``close()`` or ``with`` closes it); or your
            ``psycopg_pool.ConnectionPool`` (never closed by the store), best with its
            connections in autocommit mode (``kwargs={"autocommit": True}``): each
            primitive is one atomic statement (outside autocommit, each call runs in a
            transaction of its own).
        table: The table name, or ``schema.name`` for a schema other than the connection's
            ``search_path``; each part a plain identifier (folded to lower case, as
            PostgreSQL does) or a double-quoted one. Names are quoted in every statement.
        connect_timeout: Seconds to wait for a connection before :class:`StoreUnavailable`.
        max_connections: The size of the store's own pool.
        statement_timeout: Seconds one call may take once it has its connection; past
            that (a network that froze mid-statement, a lock held elsewhere), its
            connection is cut and the call raises :class:`StoreUnavailable`. The server's
            own ``statement_timeout`` is yours to set, in the connection string
            (``options=-c statement_timeout=...``) or your pool's settings.

    Call :meth:`create_schema` once (it is idempotent) before use.
    """

    def create_schema(self) -> None:
        """Create the table and its index, if missing."""
        with self._pg.connection() as conn, conn.transaction():
            conn.execute(self._sql.schema)
            conn.execute(self._sql.index)

    def _run(self, flow: Flow[T]) -> T:
        with self._pg.connection() as conn:

            def perform(op: _io.Op[Any]) -> Rows:
                sql = query(op)
                return conn.execute(sql.sql, sql.params).fetchall()  # each returns rows

            return _io.run(flow, perform)

    def close(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        self._pg.close()


class AsyncPostgresDedupStore(_PostgresStore, AsyncDedupStore):
    """:class:`PostgresDedupStore` on psycopg's asyncio connections
    (a connection string, or a ``psycopg_pool.AsyncConnectionPool``). Its pool belongs to
    one event loop: build one store per loop, shared by that loop's tasks."""

    _asynchronous = True

    async def create_schema(self) -> None:
        """See :meth:`PostgresDedupStore.create_schema`."""
        async with self._pg.aconnection() as conn, conn.transaction():
            await conn.execute(self._sql.schema)
            await conn.execute(self._sql.index)

    async def _run(self, flow: Flow[T]) -> T:
        async with self._pg.aconnection() as conn:

            async def perform(op: _io.Op[Any]) -> Rows:
                sql = query(op)
                cursor = await conn.execute(sql.sql, sql.params)
                return await cursor.fetchall()

            return await _io.arun(flow, perform)

    async def aclose(self) -> None:
        """Close the store's own pool (a pool you passed in stays open)."""
        await self._pg.aclose()
