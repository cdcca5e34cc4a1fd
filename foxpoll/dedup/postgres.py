"""``PostgresDedupStore``: psycopg 3, one statement per transition, the server's clock.

The claim is ``INSERT ... ON CONFLICT ... DO UPDATE ... WHERE (released or expired)
RETURNING``: PostgreSQL's row lock on the conflicting row makes concurrent claims take
turns, and only one of them sees its row returned. Works with a connection string (one
connection per call) or a ``psycopg_pool`` pool (recommended).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

try:
    import psycopg
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
        self, conninfo_or_pool: Any, *, table: str = DEFAULT_TABLE, connect_timeout: float = 10
    ) -> None:
        self._sql = POSTGRES.statements(table)
        self._flows = SQLFlows(self._sql)
        self._table = table
        self._target = conninfo_or_pool
        self._connect_timeout = connect_timeout

    def _missing(self, exc: psycopg.errors.UndefinedTable) -> StoreUnavailable:
        return StoreUnavailable(f"the delivery table {self._table!r} does not exist: "
                                "call create_schema() once")


class PostgresDedupStore(_PostgresStore, DedupStore):
    """A dedup store in a PostgreSQL table.

    Args:
        conninfo_or_pool: A libpq connection string, or a ``psycopg_pool.ConnectionPool``
            (not closed by the store) whose connections are in autocommit mode
            (``kwargs={"autocommit": True}``). Each primitive is one atomic statement.
        table: The table name (a plain identifier).
        connect_timeout: Seconds to wait for a connection before :class:`StoreUnavailable`.

    Call :meth:`create_schema` once (it is idempotent) before use.
    """

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            if isinstance(self._target, str):
                with psycopg.connect(self._target, connect_timeout=int(self._connect_timeout),
                                     autocommit=True) as conn:
                    yield conn
            else:
                with self._target.connection(timeout=self._connect_timeout) as conn:
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


class AsyncPostgresDedupStore(_PostgresStore, AsyncDedupStore):
    """:class:`PostgresDedupStore` on psycopg's asyncio connections
    (a connection string, or a ``psycopg_pool.AsyncConnectionPool``)."""

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            if isinstance(self._target, str):
                async with await psycopg.AsyncConnection.connect(
                    self._target, connect_timeout=int(self._connect_timeout), autocommit=True
                ) as conn:
                    yield conn
            else:
                async with self._target.connection(timeout=self._connect_timeout) as conn:
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
