"""A dedup record corrupted in its store (written by hand, by another program, or half
lost) is a :class:`DedupError` naming its order, never a driver's exception, and never
quoting what the record holds: in Redis, SQLite, PostgreSQL and DynamoDB (moto over real
HTTP). A recovery queue's corrupt row is an ``UnreadableJobs`` naming its order, the
column and the type, never the value, on SQLite and PostgreSQL (and procrastinate, which
reads rows the same way)."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll.dedup import (
    DeliveryState,
    DynamoDBDedupStore,
    PostgresDedupStore,
    RedisDedupStore,
    SQLiteDedupStore,
)
from foxpoll.errors import DedupError
from foxpoll.recovery import PostgresRecoveryQueue, SQLiteRecoveryQueue, UnreadableJobs

from .services import POSTGRES_URL, REDIS_URL, delete_keys, drop_table, require

SECRET = "CODE-1234-SECRET"  # stands for what a corrupt field may hold: never in a message

# -- Redis: five corruptions of one record -------------------------------------------------

#: How to corrupt the hash of a delivered record, given a client and its key.
REDIS_CORRUPTIONS: dict[str, Callable[[Any, str], None]] = {
    "a list at the key": lambda r, key: (r.delete(key), r.rpush(key, SECRET)),
    "missing fields": lambda r, key: r.hdel(key, "state", "order_id"),
    "non-numeric fields": lambda r, key: r.hset(key, mapping={"attempts": SECRET,
                                                              "lease_until": SECRET}),
    "a state it does not know": lambda r, key: r.hset(key, "state", SECRET),
    "a token that is not text": lambda r, key: r.hset(key, "token", b"\xff\xfe" + b"x" * 8),
}


@pytest.fixture
def redis_store() -> Iterator[tuple[RedisDedupStore, Any, str]]:
    import redis

    require("Redis", "127.0.0.1", 6379)
    prefix = f"foxpoll-test:{uuid.uuid4().hex[:8]}:"
    with RedisDedupStore(REDIS_URL, key_prefix=prefix) as store, \
            redis.Redis.from_url(REDIS_URL) as raw:
        yield store, raw, prefix
    delete_keys(prefix)


@pytest.mark.parametrize("corrupt", REDIS_CORRUPTIONS.values(), ids=REDIS_CORRUPTIONS.keys())
def test_a_corrupt_redis_record_is_a_dedup_error_naming_its_key(
    redis_store: tuple[RedisDedupStore, Any, str], corrupt: Callable[[Any, str], None]
) -> None:
    store, raw, prefix = redis_store
    store.claim("o1", "t1", lease=60)
    store.complete("o1", "t1", "h", None)
    key = f"{prefix}delivery:o1"
    corrupt(raw, key)
    for step in (lambda: store.get("o1"),
                 lambda: store.list(DeliveryState.DELIVERED, limit=10)):
        with pytest.raises(DedupError, match=f"order 'o1' \\(key '{key}'\\)|key '{key}'"
                           ) as raised:
            step()
        assert SECRET not in str(raised.value)
    # A claim may take a record with no state anew; it never raises a driver's error.
    failed = refusal(lambda: store.claim("o1", "t2", lease=60))
    assert failed is None or SECRET not in str(failed)


def refusal(step: Callable[[], object]) -> DedupError | None:
    """The :class:`DedupError` ``step`` raised, if it raised one."""
    try:
        step()
    except DedupError as exc:
        return exc
    return None


# -- every SQL store, and DynamoDB: a row of the wrong types ---------------------------------


def test_a_corrupt_dynamodb_item_is_a_dedup_error_naming_its_order(moto_url: str) -> None:
    import boto3

    client = boto3.client("dynamodb", endpoint_url=moto_url)
    store = DynamoDBDedupStore(f"foxpoll-corrupt-{uuid.uuid4().hex[:8]}", client=client)
    store.create_schema()
    store.claim("o1", "t1", lease=60)
    store.complete("o1", "t1", "h", None)
    client.update_item(TableName=store.table, Key={"order_id": {"S": "o1"}},
                       UpdateExpression="SET #s = :v", ExpressionAttributeNames={"#s": "state"},
                       ExpressionAttributeValues={":v": {"S": SECRET}})
    for step in (lambda: store.get("o1"), lambda: store.claim("o1", "t2", lease=60)):
        with pytest.raises(DedupError, match="o1") as raised:
            step()
        assert SECRET not in str(raised.value)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path
              ) -> Iterator[tuple[Any, str, Callable[[str], None]]]:
    """A store, its table, and a way to run SQL on it behind its back."""
    table = f"foxpoll_corrupt_{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        path = tmp_path / "dedup.db"
        with SQLiteDedupStore(path, table=table) as store:
            def execute(sql: str) -> None:
                with contextlib.closing(sqlite3.connect(path)) as db, db:
                    db.execute(sql)

            # SQLite keeps what it is given: text in a number's column.
            yield store, table, lambda sql: execute(sql.replace(
                "SET state = ", "SET attempts = "))
        return
    import psycopg

    require("PostgreSQL", "127.0.0.1", 5432)
    with PostgresDedupStore(POSTGRES_URL, table=table) as store:
        store.create_schema()

        def run(sql: str) -> None:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(sql)  # type: ignore[arg-type]

        try:
            yield store, table, run
        finally:
            drop_table(table)


def test_a_corrupt_sql_row_is_a_dedup_error_naming_its_order(
    sql_store: tuple[Any, str, Callable[[str], None]]
) -> None:
    store, table, execute = sql_store
    store.claim("o1", "t1", lease=60)
    store.complete("o1", "t1", "h", None)
    with contextlib.suppress(Exception):  # PostgreSQL checks the state: not any longer
        execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_state_check")
    execute(f"UPDATE {table} SET state = '{SECRET}' WHERE order_id = 'o1'")  # noqa: S608
    for step in (lambda: store.get("o1"), lambda: store.claim("o1", "t2", lease=60)):
        with pytest.raises(DedupError, match="o1") as raised:
            step()
        assert SECRET not in str(raised.value)


# -- a recovery queue's row ----------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def test_a_corrupt_queue_row_names_its_column_and_type_never_its_value(
        engine: str, tmp_path: Path) -> None:
    table = f"foxpoll_corrupt_q_{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if engine == "sqlite":
            path = tmp_path / "q.db"
            queue: Any = stack.enter_context(SQLiteRecoveryQueue(path, table=table))

            def execute(sql: str) -> None:
                with contextlib.closing(sqlite3.connect(path)) as db, db:
                    db.execute(sql)
        else:
            import psycopg

            require("PostgreSQL", "127.0.0.1", 5432)
            stack.callback(drop_table, table)
            queue = stack.enter_context(PostgresRecoveryQueue(POSTGRES_URL, table=table))
            queue.create_schema()

            def execute(sql: str) -> None:
                with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                    conn.execute(sql)  # type: ignore[arg-type]

            with contextlib.suppress(Exception):  # a CHECK on the state, where there is one
                execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_state_check")
        queue.enqueue("o1")
        execute(f"UPDATE {table} SET state = '{SECRET}' WHERE order_id = 'o1'")  # noqa: S608
        with pytest.raises(UnreadableJobs) as raised:
            queue.get("o1")
        assert raised.value.unreadable == {"o1": "state is no job state"}
        assert str(raised.value) == "order o1: unreadable row (state is no job state)"
