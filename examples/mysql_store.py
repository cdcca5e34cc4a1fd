"""A dedup store for MariaDB / MySQL, written the way a partner team adds a backend.

Subclass ``foxpoll.dedup.DedupStore`` and implement its six primitives; foxpoll's
``deliver_once`` does the rest. Each primitive is one short transaction: ``SELECT ... FOR
UPDATE`` locks the row (or the gap where it would be), the decision is made, the row is
written. The database's clock (``UNIX_TIMESTAMP(NOW(6))``) is the store clock.

Check it with foxpoll's conformance suite (see ``tests/test_mysql_example.py``)::

    class TestMySQLStore(DedupStoreConformance):
        @pytest.fixture
        def make_store(self):
            return MySQLDedupStore(host="127.0.0.1", user="root", database="test")

Run the demo against a local MariaDB: ``python examples/mysql_store.py``
(``MYSQL_HOST``, ``MYSQL_USER``, ``MYSQL_PASSWORD``, ``MYSQL_DATABASE`` override the defaults).
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pymysql
import pymysql.cursors

from foxpoll import Order, OrderItem, OrderStatus, StoreUnavailable, deliver_once
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
ATTEMPTS = 10
T = TypeVar("T")
LOCK = "SELECT * FROM {table} WHERE order_id = %s FOR UPDATE"


class MySQLDedupStore(DedupStore):
    """Deliveries in a MariaDB / MySQL (InnoDB) table, via PyMySQL."""

    def __init__(self, *, table: str = "foxpoll_deliveries", **connect: Any) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", table):
            raise ValueError("table must be a plain identifier")  # it is formatted into SQL
        self.table = table
        self.connect_args = {"connect_timeout": 10, **connect}
        with self._transaction() as cur:
            cur.execute(SCHEMA.format(table=table))

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        try:
            conn = pymysql.connect(cursorclass=pymysql.cursors.DictCursor, autocommit=False,
                                   **self.connect_args)
        except pymysql.err.OperationalError as exc:
            raise StoreUnavailable(f"MySQL is unavailable: {type(exc).__name__}") from exc
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _retrying(self, work: Callable[[Any], T]) -> T:
        """Run ``work`` in a transaction, again if InnoDB chose it as a deadlock victim,
        after a short random pause so that the contenders do not collide again."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._transaction() as cur:
                    return work(cur)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] not in RETRYABLE or attempt == ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.01 * attempt))
        raise AssertionError("unreachable")

    def _locked(self, cur: Any, order_id: str) -> tuple[dict[str, Any] | None, float]:
        cur.execute(NOW)
        now = float(cur.fetchone()["now"])
        cur.execute(LOCK.format(table=self.table), (order_id,))
        return cur.fetchone(), now

    def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        return self._retrying(lambda cur: self._claim_in(cur, order_id, token, lease))

    def _claim_in(self, cur: Any, order_id: str, token: str, lease: float) -> ClaimResult:
        row, now = self._locked(cur, order_id)
        if row is not None:
            expired = row["state"] == "claimed" and row["lease_until"] <= now
            if row["state"] != "released" and not expired:
                return ClaimResult(False, record_from_fields(row), now)
            cur.execute(
                f"UPDATE {self.table} SET state = 'claimed', token = %s, lease_until = %s, "
                "attempts = attempts + 1, updated_at = %s WHERE order_id = %s",
                (token, now + lease, now, order_id),
            )
        else:
            cur.execute(
                f"INSERT INTO {self.table} (order_id, state, token, lease_until, attempts,"
                " created_at, updated_at) VALUES (%s, 'claimed', %s, %s, 1, %s, %s)",
                (order_id, token, now + lease, now, now),
            )
        cur.execute(f"SELECT * FROM {self.table} WHERE order_id = %s", (order_id,))
        return ClaimResult(True, record_from_fields(cur.fetchone()), now)

    def _update_owned(self, order_id: str, token: str, assignments: str,
                      values: tuple[Any, ...]) -> DeliveryRecord:
        return self._retrying(
            lambda cur: self._update_owned_in(cur, order_id, token, assignments, values)
        )

    def _update_owned_in(self, cur: Any, order_id: str, token: str, assignments: str,
                         values: tuple[Any, ...]) -> DeliveryRecord:
        row, now = self._locked(cur, order_id)
        if row is None or row["state"] != "claimed" or row["token"] != token:
            raise lease_lost(order_id, record_from_fields(row) if row else None)
        cur.execute(f"UPDATE {self.table} SET {assignments}, updated_at = %s "
                    "WHERE order_id = %s", (*values, now, order_id))
        cur.execute(f"SELECT * FROM {self.table} WHERE order_id = %s", (order_id,))
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
        with self._transaction() as cur:
            cur.execute(f"SELECT * FROM {self.table} WHERE order_id = %s", (order_id,))
            row = cur.fetchone()
        return record_from_fields(row) if row else None

    def _list(self, state: DeliveryState, limit: int) -> list[DeliveryRecord]:
        with self._transaction() as cur:
            cur.execute(f"SELECT * FROM {self.table} WHERE state = %s "
                        "ORDER BY updated_at, order_id LIMIT %s", (state.value, limit))
            return [record_from_fields(row) for row in cur.fetchall()]


def main() -> None:
    store = MySQLDedupStore(
        host=os.environ.get("MYSQL_HOST", "127.0.0.1"),
        user=os.environ.get("MYSQL_USER", "root"),
        password=os.environ.get("MYSQL_PASSWORD", ""),
        database=os.environ.get("MYSQL_DATABASE", "test"),
    )
    order = Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                  items=(OrderItem("product_steam_10", 1, external_data=("CODE",)),))
    first = deliver_once(order, lambda o: "sent", store)
    second = deliver_once(order, lambda o: "sent again", store)
    print(f"order {order.id}: delivered={first.delivered}, then delivered={second.delivered}")


if __name__ == "__main__":
    main()
