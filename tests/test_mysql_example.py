"""examples/mysql_store.py, a partner-written adapter, passes the conformance suite on MariaDB
and follows the stores' constructor grammar (docs/stores.md)."""

from __future__ import annotations

import importlib.util
import inspect
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import Order, OrderItem, OrderStatus, StoreError, StoreUnavailable, deliver_once
from foxpoll.testing import DedupStoreConformance

from .services import MARIADB, require

EXAMPLE = Path(__file__).parent.parent / "examples" / "mysql_store.py"
URL = "mysql://{user}@{host}:{port}/{database}".format(**MARIADB)


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("mysql_store", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mysql_store"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mysql_table() -> Iterator[str]:
    require("MariaDB", MARIADB["host"], MARIADB["port"])
    import pymysql

    table = f"foxpoll_example_{uuid.uuid4().hex[:8]}"
    yield table
    conn = pymysql.connect(**MARIADB)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


@pytest.mark.service
class TestMySQLExampleStore(DedupStoreConformance):
    @pytest.fixture
    def make_store(self, mysql_table: str) -> Any:
        # Schema-qualified, as docs/stores.md allows: the database, then the table.
        store = load_example().MySQLDedupStore(URL, table=f"{MARIADB['database']}.{mysql_table}")
        store.create_schema()
        return store

    def test_it_is_only_a_subclass_with_the_primitives(self) -> None:
        from foxpoll.dedup import DedupStore

        cls = load_example().MySQLDedupStore
        assert issubclass(cls, DedupStore)
        primitives = {"_claim", "_complete", "_release", "_renew", "_get", "_list"}
        assert primitives <= set(vars(cls))
        assert not {"claim", "complete", "release", "renew", "get", "list"} & set(vars(cls))


def test_it_takes_the_arguments_of_the_stores_grammar() -> None:
    parameters = inspect.signature(load_example().MySQLDedupStore).parameters.values()
    assert [(p.name, p.kind, p.default) for p in parameters] == [
        ("where", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("table", inspect.Parameter.KEYWORD_ONLY, "foxpoll_deliveries"),
        ("connect_timeout", inspect.Parameter.KEYWORD_ONLY, 5.0),
        ("statement_timeout", inspect.Parameter.KEYWORD_ONLY, 5.0),
    ]


def test_table_names_are_checked_and_quoted() -> None:
    quoted = load_example().quoted_table
    assert quoted("order") == "`order`"
    assert quoted("billing.foxpoll_deliveries") == "`billing`.`foxpoll_deliveries`"
    for bad in ("a.b.c", "x; DROP TABLE y", "`x`", "9lives", "", "a" * 65, "a."):
        with pytest.raises(ValueError, match="table must be"):
            quoted(bad)


def test_a_bad_location_is_refused_without_quoting_it() -> None:
    cls = load_example().MySQLDedupStore
    for where in ("postgresql://app:s3cret@db/shop", "mysql://app:s3cret@db/shop?ssl=1"):
        with pytest.raises(ValueError, match="mysql://") as caught:
            cls(where)
        assert "s3cret" not in str(caught.value)
    with pytest.raises(TypeError):
        cls(42)
    for timeout in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="statement_timeout"):
            cls(URL, statement_timeout=timeout)


@pytest.mark.service
def test_a_connection_of_yours_serves_and_is_never_closed(mysql_table: str) -> None:
    import pymysql

    conn = pymysql.connect(**MARIADB)
    try:
        with load_example().MySQLDedupStore(conn, table=mysql_table) as store:
            store.create_schema()
            order = Order(id=f"yours-{uuid.uuid4()}", status=OrderStatus.COMPLETED,
                          items=(OrderItem("product_steam_10", 1, external_data=("C",)),))
            assert deliver_once(order, lambda o: "sent", store).delivered
            assert not deliver_once(order, lambda o: "again", store).delivered
        assert conn.open
        conn.ping()  # still the caller's, and still working
    finally:
        conn.close()


@pytest.mark.service
def test_a_missing_table_is_a_store_error_that_says_what_to_do() -> None:
    require("MariaDB", MARIADB["host"], MARIADB["port"])
    with load_example().MySQLDedupStore(URL, table="foxpoll_example_missing") as store, \
            pytest.raises(StoreError, match=r"create_schema\(\)") as caught:
        store.get("o1")
    assert not isinstance(caught.value, StoreUnavailable)


@pytest.mark.slow
def test_a_server_that_never_answers_is_unavailable_within_the_timeouts() -> None:
    # A listener that accepts connections and never speaks: the handshake's first read
    # waits, bounded by statement_timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        url = f"mysql://root:s3cret@127.0.0.1:{port}/test"
        with load_example().MySQLDedupStore(url, connect_timeout=0.5,
                                            statement_timeout=0.5) as store:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                store.get("o1")
            assert time.monotonic() - started < 3.0
    assert "s3cret" not in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)
