"""examples/mysql_store.py, a partner-written adapter, passes the conformance suite on MariaDB."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll.testing import DedupStoreConformance

from .services import MARIADB, require

EXAMPLE = Path(__file__).parent.parent / "examples" / "mysql_store.py"


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
        return load_example().MySQLDedupStore(table=mysql_table, **MARIADB)

    def test_it_is_only_a_subclass_with_the_primitives(self) -> None:
        from foxpoll.dedup import DedupStore

        cls = load_example().MySQLDedupStore
        assert issubclass(cls, DedupStore)
        primitives = {"_claim", "_complete", "_release", "_renew", "_get", "_list"}
        assert primitives <= set(vars(cls))
        assert not {"claim", "complete", "release", "renew", "get", "list"} & set(vars(cls))
