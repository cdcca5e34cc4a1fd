"""A dedup store for MariaDB / MySQL, written the way a partner team adds a backend.

Subclass ``foxpoll.dedup.DedupStore`` and implement its six primitives; foxpoll's
``deliver_once`` does the rest. Each primitive is one short transaction: ``SELECT ... FOR
UPDATE`` locks the row (or the gap where it would be), the decision is made, the row is
written. The database's clock (``UNIX_TIMESTAMP(NOW(6))``) is the store clock.

The constructor follows the grammar of foxpoll's own stores (``docs/stores.md``): where
the data lives first (a ``mysql://`` URL, or a connection of yours), then ``table=``,
``connect_timeout=`` and ``statement_timeout=``; ``close()`` or ``with`` closes what the
store opened, and only that.

Check it with foxpoll's conformance suite (see ``tests/test_mysql_example.py``)::

    class TestMySQLStore(DedupStoreConformance):
        @pytest.fixture
        def make_store(self):
            store = MySQLDedupStore("mysql://root@127.0.0.1/test")
            store.create_schema()
            return store

Run the demo against a local MariaDB: ``python examples/mysql_store.py`` (``MYSQL_URL``
overrides ``mysql://root@127.0.0.1:3306/test``).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pymysql
import pymysql.cursors

from foxpoll import Order, OrderItem, OrderStatus, StoreError, StoreUnavailable, deliver_once
from foxpoll.dedup import (
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    lease_lost,
    record_from_fields,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    order_id      VARCHAR(255) PRIMARY KEY,
    state         VARCHAR(16) NOT NULL,
    token         VARCHAR(64),
    lease_until   DOUBLE,
    attempts      INT NOT NULL DEFAULT 0,
    payload_hash  VARCHAR(64),
    receipt       TEXT,
    created_at    DOUBLE NOT NULL,
    updated_at    DOUBLE NOT NULL,
    delivered_at  DOUBLE,
    KEY state_updated (state, updated_at)
) ENGINE=InnoDB"""

NOW = "SELECT UNIX_TIMESTAMP(NOW(6)) AS now"
RETRYABLE = (1213, 1205)  # deadlock, lock wait timeout: InnoDB asks the client to retry
NO_SUCH_TABLE = 1146
ATTEMPTS = 10
T = TypeVar("T")
LOCK = "SELECT * FROM {table} WHERE order_id = %s FOR UPDATE"
# A part of a table name: a plain identifier, at most 64 characters as MySQL allows.
PART = r"[A-Za-z_][A-Za-z0-9_$]{0,63}"


def quoted_table(table: str) -> str:
    """``table`` or ``database.table``, each part in backticks: the check keeps backticks
    out, and the quotes keep a reserved word such as ``order`` a name."""
    if not isinstance(table, str) or not re.fullmatch(rf"{PART}(\.{PART})?", table):
        raise ValueError("table must be table or database.table, each part letters, digits, "
                         "_ or $, not starting with a digit")
    return ".".join(f"`{part}`" for part in table.split("."))


def connect_arguments(url: str) -> dict[str, Any]:
    """PyMySQL's arguments for ``mysql://user:password@host:port/database``. Errors never
    quote the URL: it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname or parts.query:
        raise ValueError("where must be mysql://user:password@host:port/database (no "
                         "query: pass a connection of yours for other options)")
    return {"host": parts.hostname, "port": parts.port or 3306,
            "user": unquote(parts.username or ""), "password": unquote(parts.password or ""),
            "database": unquote(parts.path.lstrip("/")) or None}


def positive_seconds(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds")
    return float(value)


class MySQLDedupStore(DedupStore):
    """Deliveries in a MariaDB / MySQL (InnoDB) table, via PyMySQL.

    Args:
        where: A ``mysql://user:password@host:port/database`` URL, for which the store
            opens connections as its calls need them and keeps the idle ones (``close()``
            or ``with`` closes them); or a ``pymysql`` connection of yours, which serves
            one call at a time and is never closed by the store.
        table: The table, or ``database.table``; names are quoted in every statement.
        connect_timeout: Seconds to connect, on the store's own connections.
        statement_timeout: Seconds each reply of the server may take, on the store's own
            connections (PyMySQL's ``read_timeout`` and ``write_timeout``); past that the
            connection is dropped and the call raises ``StoreUnavailable``. A connection of
            yours keeps its own timeouts.
    """

    def __init__(self, where: str | pymysql.connections.Connection, *,
                 table: str = "foxpoll_deliveries", connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        self._table = quoted_table(table)
        connect_timeout = positive_seconds(connect_timeout, "connect_timeout")
        statement_timeout = positive_seconds(statement_timeout, "statement_timeout")
        self._yours: pymysql.connections.Connection | None = None
        self._connect: dict[str, Any] = {}
        if isinstance(where, pymysql.connections.Connection):
            self._yours = where
        elif isinstance(where, str):
            self._connect = {**connect_arguments(where), "connect_timeout": connect_timeout,
                             "read_timeout": statement_timeout,
                             "write_timeout": statement_timeout}
        else:
            raise TypeError("where must be a mysql:// URL or a pymysql connection")
        self._serial = threading.Lock()  # a connection of yours: one call at a time
        self._lock = threading.Lock()  # the idle connections of the store's own
        self._idle: list[pymysql.connections.Connection] = []

    def create_schema(self) -> None:
        """Create the table if it does not exist (once, before the first delivery)."""
        self._run(lambda cur: cur.execute(SCHEMA.format(table=self._table)))

    def close(self) -> None:
        """Close the connections the store opened (a connection of yours stays open)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(pymysql.err.Error):
                conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One transaction, on your connection or on one of the store's own. One of the
        store's is kept for the next call only if the transaction ended, committed or
        rolled back: after any other failure, its state is unknown."""
        with self._serial if self._yours is not None else contextlib.nullcontext():
            conn = self._yours if self._yours is not None else self._take()
            ended = False
            try:
                conn.begin()
                try:
                    with conn.cursor(pymysql.cursors.DictCursor) as cur:
                        yield cur
                except BaseException:
                    conn.rollback()
                    ended = True
                    raise
                conn.commit()
                ended = True
            finally:
                if conn is not self._yours:
                    self._give_back(conn, ended)

    def _take(self) -> pymysql.connections.Connection:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            # The server drops a connection idle past its wait_timeout: check, at the cost
            # of a round trip, rather than fail the call.
            try:
                conn.ping()
                return conn
            except pymysql.err.Error:
                self._give_back(conn, reusable=False)
        return pymysql.connect(**self._connect)

    def _give_back(self, conn: pymysql.connections.Connection, reusable: bool) -> None:
        if reusable and conn.open:
            with self._lock:
                self._idle.append(conn)
            return
        with contextlib.suppress(pymysql.err.Error):
            conn.close()

    def _run(self, work: Callable[[Any], T]) -> T:
        """Run ``work`` in a transaction, again if InnoDB chose it as a deadlock victim,
        after a short random pause so that the contenders do not collide again. The
        driver's errors become foxpoll's, naming no host or user."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._transaction() as cur:
                    return work(cur)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] in RETRYABLE and attempt < ATTEMPTS:
                    time.sleep(random.uniform(0, 0.01 * attempt))
                    continue
                raise StoreUnavailable(f"MySQL is unavailable: error {exc.args[0]}") from exc
            except pymysql.err.InterfaceError as exc:
                raise StoreUnavailable("MySQL is unavailable: the connection is closed") \
                    from exc
            except pymysql.err.ProgrammingError as exc:
                if exc.args[0] == NO_SUCH_TABLE:  # waiting would not create it
                    raise StoreError(f"the delivery table {self._table} does not exist: call "
                                     "create_schema() once") from exc
                raise
        raise AssertionError("unreachable")

    def _locked(self, cur: Any, order_id: str) -> tuple[dict[str, Any] | None, float]:
        cur.execute(NOW)
        now = float(cur.fetchone()["now"])
        cur.execute(LOCK.format(table=self._table), (order_id,))
        return cur.fetchone(), now

    def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        return self._run(lambda cur: self._claim_in(cur, order_id, token, lease))

    def _claim_in(self, cur: Any, order_id: str, token: str, lease: float) -> ClaimResult:
        row, now = self._locked(cur, order_id)
        if row is not None:
            expired = row["state"] == "claimed" and row["lease_until"] <= now
            if row["state"] != "released" and not expired:
                return ClaimResult(False, record_from_fields(row), now)
            cur.execute(
                f"UPDATE {self._table} SET state = 'claimed', token = %s, lease_until = %s, "
                "attempts = attempts + 1, updated_at = %s WHERE order_id = %s",
                (token, now + lease, now, order_id),
            )
        else:
            cur.execute(
                f"INSERT INTO {self._table} (order_id, state, token, lease_until, attempts,"
                " created_at, updated_at) VALUES (%s, 'claimed', %s, %s, 1, %s, %s)",
                (order_id, token, now + lease, now, now),
            )
        cur.execute(f"SELECT * FROM {self._table} WHERE order_id = %s", (order_id,))
        return ClaimResult(True, record_from_fields(cur.fetchone()), now)

    def _update_owned(self, order_id: str, token: str, assignments: str,
                      values: tuple[Any, ...]) -> DeliveryRecord:
        return self._run(
            lambda cur: self._update_owned_in(cur, order_id, token, assignments, values)
        )

    def _update_owned_in(self, cur: Any, order_id: str, token: str, assignments: str,
                         values: tuple[Any, ...]) -> DeliveryRecord:
        row, now = self._locked(cur, order_id)
        if row is None or row["state"] != "claimed" or row["token"] != token:
            raise lease_lost(order_id, record_from_fields(row) if row else None)
        cur.execute(f"UPDATE {self._table} SET {assignments}, updated_at = %s "
                    "WHERE order_id = %s", (*values, now, order_id))
        cur.execute(f"SELECT * FROM {self._table} WHERE order_id = %s", (order_id,))
        return record_from_fields(cur.fetchone())

    def _complete(self, order_id: str, token: str, payload_hash: str,
                 receipt: str | None) -> DeliveryRecord:
        current = self._get(order_id)
        if current is not None and current.state is DeliveryState.DELIVERED and (
            current.token == token
        ):
            return current
        return self._update_owned(
            order_id, token,
            "state = 'delivered', payload_hash = %s, receipt = %s, lease_until = NULL, "
            "delivered_at = UNIX_TIMESTAMP(NOW(6))",
            (payload_hash, receipt),
        )

    def _release(self, order_id: str, token: str) -> DeliveryRecord:
        return self._update_owned(order_id, token, "state = 'released', lease_until = NULL", ())

    def _renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        return self._update_owned(order_id, token,
                                  "lease_until = UNIX_TIMESTAMP(NOW(6)) + %s", (lease,))

    def _get(self, order_id: str) -> DeliveryRecord | None:
        return self._run(lambda cur: self._get_in(cur, order_id))

    def _get_in(self, cur: Any, order_id: str) -> DeliveryRecord | None:
        cur.execute(f"SELECT * FROM {self._table} WHERE order_id = %s", (order_id,))
        row = cur.fetchone()
        return record_from_fields(row) if row else None

    def _list(self, state: DeliveryState, limit: int) -> list[DeliveryRecord]:
        return self._run(lambda cur: self._list_in(cur, state, limit))

    def _list_in(self, cur: Any, state: DeliveryState, limit: int) -> list[DeliveryRecord]:
        cur.execute(f"SELECT * FROM {self._table} WHERE state = %s "
                    "ORDER BY updated_at, order_id LIMIT %s", (state.value, limit))
        return [record_from_fields(row) for row in cur.fetchall()]


def main() -> None:
    url = os.environ.get("MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    with MySQLDedupStore(url) as store:
        store.create_schema()
        order = Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                      items=(OrderItem("product_steam_10", 1, external_data=("CODE",)),))
        first = deliver_once(order, lambda o: "sent", store)
        second = deliver_once(order, lambda o: "sent again", store)
    print(f"order {order.id}: delivered={first.delivered}, then delivered={second.delivered}")


if __name__ == "__main__":
    main()
