"""``PostgresRecoveryQueue``: the recovery queue in a PostgreSQL table, for many workers on
many machines.

Workers pull due jobs with ``FOR UPDATE SKIP LOCKED``, so they pass each other instead of
queueing on one row; a job is leased while it is handled, and a worker that dies leaves
the lease to run out. Times are the server's. :class:`ProcrastinateRecoveryQueue` is the
same table with procrastinate running the workers.

::

    queue = PostgresRecoveryQueue("postgresql://...")
    queue.create_schema()                       # once, idempotent
    RecoveryWorker(client, queue, store, on_completed=send_codes).run()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

try:
    import psycopg_pool
    from psycopg.rows import dict_row
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "PostgresRecoveryQueue needs psycopg: pip install 'foxpoll[postgres]'"
    ) from exc

from foxpoll._clock import Clock, SystemClock
from foxpoll._postgres import PostgresConnections
from foxpoll.dedup._sql import POSTGRES

from ._sql import Execute, JobStatements, SQLJobQueue
from .base import RecoveryPolicy

__all__ = ["PostgresRecoveryQueue"]

DEFAULT_TABLE = "foxpoll_recovery"


class PostgresRecoveryQueue(SQLJobQueue):
    """A recovery queue in a PostgreSQL table.

    Args:
        where: A libpq connection string, for which the queue opens its own
            small pool on first use (closed by :meth:`close` or ``with``); or
            your ``psycopg_pool.ConnectionPool``, which it uses and never closes.
        policy: The re-check policy, for this queue and its workers.
        table: The table name, or ``schema.name`` for a schema other than the connection's
            ``search_path``; each part a plain identifier (folded to lower case, as
            PostgreSQL does) or a double-quoted one (``'billing."Recovery"'``). Names are
            quoted in every statement, and the index's name is derived from the table's.
        connect_timeout: Seconds to wait for a connection before :class:`StoreUnavailable`.
        statement_timeout: Seconds one queue call may take once it has its connection,
            as for :class:`~foxpoll.dedup.PostgresDedupStore`; past it the call raises
            :class:`StoreUnavailable`.
        max_connections: The size of the queue's own pool.
        clock: Read with ``clock.time()``: the clock of the ``due_at`` times callers give (a
            ``FakeClock`` when the client runs on virtual time). Stored times are
            the server's; a ``due_at`` is turned into a delay against this clock.

    Call :meth:`create_schema` once (it is idempotent) before use.
    """

    def __init__(self, where: str | psycopg_pool.ConnectionPool[Any], *,
                 policy: RecoveryPolicy | None = None, table: str = DEFAULT_TABLE,
                 connect_timeout: float = 5.0, max_connections: int = 4,
                 statement_timeout: float = 5.0,
                 clock: Clock | None = None) -> None:
        self.policy = policy or RecoveryPolicy()
        self.table = table
        self._clock = (clock or SystemClock()).time
        self._sql = JobStatements.render(POSTGRES, table)
        self._pg = PostgresConnections(where, table=table, what="recovery",
                                       timeout=connect_timeout, size=max_connections,
                                       statement_timeout=statement_timeout)
        self.conninfo = self._pg.conninfo

    def create_schema(self) -> None:
        """Create the table and its indexes, if missing: the due jobs' and the done
        rows' (retention's; a table made before it gets it here)."""
        with self._transaction() as execute:
            execute(self._sql.schema, {})
            execute(self._sql.index, {})
            execute(self._sql.done_index, {})

    @contextmanager
    def _transaction(self) -> Iterator[Execute]:
        # Autocommit: every statement is atomic on its own and the two-statement enqueue
        # tolerates a race between them, so no BEGIN / COMMIT round trips.
        with self._pg.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:

            def execute(sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
                cursor.execute(sql, params or None)  # no params: no % parsing
                return cursor.fetchall() if cursor.description is not None else []

            yield execute

    def close(self) -> None:
        """Close the queue's own pool (a pool you passed in stays open)."""
        self._pg.close()
