"""Every bundled dedup store passes the conformance suite, against its real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll.dedup import (
    AsyncMemoryDedupStore,
    AsyncSQLiteDedupStore,
    MemoryDedupStore,
    SQLiteDedupStore,
)
from foxpoll.testing import DedupStoreConformance

from .services import POSTGRES_URL, REDIS_URL, drop_table, require


class TestMemoryStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self) -> Any:
        return MemoryDedupStore()


class TestAsyncMemoryStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self) -> Any:
        return AsyncMemoryDedupStore()


class TestSQLiteStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Any:
        return SQLiteDedupStore(tmp_path / "deliveries.db")


class TestAsyncSQLiteStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Any:
        return AsyncSQLiteDedupStore(tmp_path / "deliveries.db")


@pytest.fixture(scope="module")
def pg_table() -> Iterator[str]:
    require("PostgreSQL", "127.0.0.1", 5432)
    from foxpoll.dedup import PostgresDedupStore

    table = f"foxpoll_test_{uuid.uuid4().hex[:8]}"
    PostgresDedupStore(POSTGRES_URL, table=table).create_schema()
    PostgresDedupStore(POSTGRES_URL, table=table).create_schema()  # idempotent
    yield table
    drop_table(table)


@pytest.mark.service
class TestPostgresStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, pg_table: str) -> Any:
        from foxpoll.dedup import PostgresDedupStore

        return PostgresDedupStore(POSTGRES_URL, table=pg_table)


@pytest.mark.service
class TestPostgresStoreOnAPool(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, pg_table: str) -> Iterator[Any]:
        from psycopg_pool import ConnectionPool

        from foxpoll.dedup import PostgresDedupStore

        with ConnectionPool(POSTGRES_URL, min_size=2, max_size=20,
                            kwargs={"autocommit": True}) as pool:
            yield PostgresDedupStore(pool, table=pg_table)


@pytest.mark.service
class TestPostgresStoreOnATransactionalPool(DedupStoreConformance):
    """A caller's pool left outside autocommit: each call's work is committed before its
    connection goes back, or the next call, on another connection, would not see it."""

    @pytest.fixture
    def make_store(self, pg_table: str) -> Iterator[Any]:
        from psycopg_pool import ConnectionPool

        from foxpoll.dedup import PostgresDedupStore

        with ConnectionPool(POSTGRES_URL, min_size=2, max_size=20) as pool:
            yield PostgresDedupStore(pool, table=pg_table)


@pytest.mark.service
async def test_async_store_commits_on_a_transactional_pool(pg_table: str) -> None:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from foxpoll import adeliver_once
    from foxpoll.dedup import AsyncPostgresDedupStore, DeliveryState

    order = DedupStoreConformance.completed_order(f"txpool-{uuid.uuid4()}")
    async with AsyncConnectionPool(POSTGRES_URL, min_size=1, max_size=2) as pool:
        result = await adeliver_once(order, lambda o: "sent",
                                     AsyncPostgresDedupStore(pool, table=pg_table))
    assert result.delivered
    with psycopg.connect(POSTGRES_URL) as conn:  # another session sees what was committed
        row = conn.execute(f"SELECT state FROM {pg_table} WHERE order_id = %s",  # noqa: S608
                           (order.id,)).fetchone()
    assert row == (DeliveryState.DELIVERED.value,)


@pytest.mark.service
class TestAsyncPostgresStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, pg_table: str) -> Any:
        from foxpoll.dedup import AsyncPostgresDedupStore

        return AsyncPostgresDedupStore(POSTGRES_URL, table=pg_table)


class TestSQLiteStoreWithAQuotedName(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Any:
        return SQLiteDedupStore(tmp_path / "deliveries.db", table='main."Partner\'s ""Codes"""')


@pytest.fixture(scope="module")
def pg_schema_table() -> Iterator[str]:
    """A table in a schema of its own, under a name that only works quoted."""
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg
    from psycopg import sql

    from foxpoll.dedup import PostgresDedupStore

    schema = f"billing_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    table = f'{schema}."Deliveries; DROP TABLE x"'
    try:
        PostgresDedupStore(POSTGRES_URL, table=table).create_schema()
        PostgresDedupStore(POSTGRES_URL, table=table).create_schema()  # idempotent
        yield table
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.service
class TestPostgresStoresInASchema(DedupStoreConformance):
    @pytest.fixture(params=["PostgresDedupStore", "AsyncPostgresDedupStore"])
    def make_store(self, request: pytest.FixtureRequest, pg_schema_table: str) -> Any:
        import foxpoll.dedup

        return getattr(foxpoll.dedup, request.param)(POSTGRES_URL, table=pg_schema_table)


@pytest.mark.service
def test_a_schema_qualified_table_is_where_the_server_says(pg_schema_table: str) -> None:
    import psycopg
    from psycopg import sql

    from foxpoll import deliver_once
    from foxpoll.dedup import PostgresDedupStore

    schema = pg_schema_table.partition(".")[0]
    order = DedupStoreConformance.completed_order(f"schema-{uuid.uuid4()}")
    with PostgresDedupStore(POSTGRES_URL, table=pg_schema_table) as store:
        assert deliver_once(order, lambda o: "sent", store).delivered
    where = sql.Identifier(schema, "Deliveries; DROP TABLE x")  # psycopg's own quoting
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT state FROM {} WHERE order_id = %s").format(where),
                           (order.id,)).fetchone()
        indexes = conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s",
                               (schema,)).fetchall()
    assert row == ("delivered",)
    assert ("Deliveries; DROP TABLE x_state_updated",) in indexes  # beside its table


@pytest.mark.service
def test_plain_names_fold_to_lower_case_and_long_names_keep_their_own_index() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    from foxpoll.dedup import PostgresDedupStore

    stem = f"foxpoll_test_{uuid.uuid4().hex[:8]}_"
    long_names = [stem + letter * (63 - len(stem)) for letter in "ab"]  # 63 bytes each
    mixed = f"Foxpoll_Test_{uuid.uuid4().hex[:8]}"
    try:
        for table in [*long_names, mixed]:
            PostgresDedupStore(POSTGRES_URL, table=table).create_schema()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            tables = {row[0]: row[1] for row in conn.execute(
                "SELECT tablename, indexname FROM pg_indexes WHERE tablename = ANY(%s) "
                "AND indexname NOT LIKE '%%pkey'", ([*long_names, mixed.lower()],))}
        # An unquoted name means what it means to PostgreSQL: the table of foxpoll < 1.0.
        assert set(tables) == {*long_names, mixed.lower()}
        assert len(set(tables.values())) == 3  # no index name cut short onto another's
        assert all(len(index) <= 63 for index in tables.values())
    finally:
        for table in [*long_names, mixed.lower()]:
            drop_table(table)


@pytest.mark.parametrize("table", ["a.b.c", "deliveries; DROP TABLE x", '"50%"', "",
                                   '"unterminated', "x" * 64, "1table", 'a."b"c'])
def test_table_names_that_are_not_one_or_two_identifiers_are_refused(
    tmp_path: Path, table: str
) -> None:
    with pytest.raises(ValueError, match="table name"):
        SQLiteDedupStore(tmp_path / "deliveries.db", table=table)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    import redis

    prefix = f"foxpoll-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.service
class TestRedisStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, redis_prefix: str) -> Any:
        from foxpoll.dedup import RedisDedupStore

        return RedisDedupStore(REDIS_URL, key_prefix=redis_prefix)


@pytest.mark.service
class TestAsyncRedisStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, redis_prefix: str) -> Any:
        from foxpoll.dedup import AsyncRedisDedupStore

        return AsyncRedisDedupStore(REDIS_URL, key_prefix=redis_prefix)


@pytest.fixture
def dynamodb_table(moto_url: str) -> str:
    import boto3

    from foxpoll.dedup import DynamoDBDedupStore

    table = f"foxpoll-test-{uuid.uuid4().hex[:8]}"
    client = boto3.client("dynamodb", endpoint_url=moto_url)
    DynamoDBDedupStore(table, client=client).create_schema()
    DynamoDBDedupStore(table, client=client).create_schema()  # idempotent
    return table


class TestDynamoDBStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, dynamodb_table: str, moto_url: str) -> Any:
        import boto3

        from foxpoll.dedup import DynamoDBDedupStore

        client = boto3.client("dynamodb", endpoint_url=moto_url)
        return DynamoDBDedupStore(dynamodb_table, client=client)


class TestAsyncDynamoDBStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, dynamodb_table: str, moto_url: str,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
        from foxpoll.dedup import AsyncDynamoDBDedupStore

        monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # for the client the store opens
        return AsyncDynamoDBDedupStore(dynamodb_table)


@pytest.mark.service
async def test_a_missing_postgres_table_says_to_call_create_schema() -> None:
    from foxpoll.dedup import AsyncPostgresDedupStore, PostgresDedupStore
    from foxpoll.errors import StoreError, StoreUnavailable

    from .services import POSTGRES_URL, require

    require("PostgreSQL", "127.0.0.1", 5432)
    with PostgresDedupStore(POSTGRES_URL, table="never_created_here") as store, \
            pytest.raises(StoreError, match=r"create_schema\(\)") as missing:
        store.get("o1")
    assert not isinstance(missing.value, StoreUnavailable)  # not an outage to wait out
    async with AsyncPostgresDedupStore(POSTGRES_URL, table="never_created_here") as astore:
        with pytest.raises(StoreError, match=r"create_schema\(\)") as missing:
            await astore.get("o1")
    assert not isinstance(missing.value, StoreUnavailable)


@pytest.mark.service
async def test_a_connection_string_gives_the_store_one_lazy_pool_of_its_own() -> None:
    import uuid

    from foxpoll import Order, OrderStatus, adeliver_once, deliver_once
    from foxpoll.dedup import AsyncPostgresDedupStore, PostgresDedupStore
    from foxpoll.models import OrderItem

    from .services import POSTGRES_URL, eventually, postgres_connections, require

    require("PostgreSQL", "127.0.0.1", 5432)
    table = f"deliveries_{uuid.uuid4().hex[:8]}"
    name = f"foxpoll-test-{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES_URL}?application_name={name}"

    def order() -> Order:
        return Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                     items=(OrderItem("p", 1, external_data=("CODE",)),))

    def connections() -> int:
        return postgres_connections(name)

    try:
        with PostgresDedupStore(url, table=table) as store:
            assert connections() == 0  # nothing is opened before the first call
            store.create_schema()
            for _ in range(30):
                assert deliver_once(order(), lambda o: None, store).delivered
            assert connections() == 1  # reused, not one per call
        assert eventually(lambda: connections() == 0)  # closed with the store
        async with AsyncPostgresDedupStore(url, table=table) as astore:
            assert connections() == 0
            for _ in range(30):
                assert (await adeliver_once(order(), lambda o: None, astore)).delivered
            assert connections() == 1
        assert eventually(lambda: connections() == 0)
    finally:
        drop_table(table)


@pytest.mark.service
def test_redis_indexes_never_outgrow_their_records() -> None:
    import uuid

    import redis

    from foxpoll import Order, OrderStatus, deliver_once
    from foxpoll.dedup import DeliveryState, RedisDedupStore
    from foxpoll.models import OrderItem

    from .services import REDIS_URL, delete_keys, require

    require("Redis", "127.0.0.1", 6379)
    prefix = f"foxpoll-test-{uuid.uuid4().hex[:8]}:"
    raw = redis.Redis.from_url(REDIS_URL)

    def order(order_id: str) -> Order:
        return Order(id=order_id, status=OrderStatus.COMPLETED,
                     items=(OrderItem("p", 1, external_data=("CODE",)),))

    with RedisDedupStore(REDIS_URL, key_prefix=prefix, retention=3600) as store:
        ids = [f"o{i:02d}" for i in range(10)]
        for order_id in ids:
            deliver_once(order(order_id), lambda o: None, store)
        delivered = f"{prefix}deliveries:delivered"
        # The six oldest records expire (their TTL ran out); their index entries stay...
        for order_id in ids[:6]:
            raw.delete(f"{prefix}delivery:{order_id}")
        listed = store.list(DeliveryState.DELIVERED, limit=3)
        assert [r.order_id for r in listed] == ids[6:9]  # ...and listing pages past them
        # Entries older than the retention go at the next transition: make them old.
        raw.zadd(delivered, dict.fromkeys(ids[6:], 0))
        deliver_once(order("fresh"), lambda o: None, store)
        assert raw.zrange(delivered, 0, -1) == [b"fresh"]
        # Released records and claims nobody finished expire too.
        with pytest.raises(RuntimeError):
            deliver_once(order("released"), _boom, store)
        ttl = raw.ttl(f"{prefix}delivery:released")
        assert 3500 < ttl <= 3600
        store.claim("crashed", "token-1", lease=60)
        assert 3600 < raw.ttl(f"{prefix}delivery:crashed") <= 3660
    delete_keys(prefix)
    raw.close()


def _boom(order: object) -> None:
    raise RuntimeError("the customer's mailbox is down")


@pytest.mark.service
async def test_redis_stores_run_on_after_the_server_forgets_their_scripts() -> None:
    # The stores call EVALSHA themselves; a restarted or flushed server answers NOSCRIPT,
    # and the script is loaded again rather than the call failing.
    import redis

    from foxpoll.dedup import AsyncRedisDedupStore, RedisDedupStore

    from .services import own_redis_server

    # SCRIPT FLUSH empties every client's scripts: on a server of the test's own.
    with own_redis_server() as url, redis.Redis.from_url(url) as raw:
        with RedisDedupStore(url) as store:
            assert store.claim("o1", "token-1", 60).acquired
            raw.script_flush()
            assert store.complete("o1", "token-1", "h", None).token == "token-1"
        async with AsyncRedisDedupStore(url) as astore:
            assert (await astore.claim("o2", "token-2", 60)).acquired
            raw.script_flush()
            assert (await astore.complete("o2", "token-2", "h", None)).token == "token-2"
