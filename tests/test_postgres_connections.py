"""A PostgreSQL store keeps a connection warm between blocking calls, and gives it back to
the pool when its time is up, when a call on it failed, when the store falls idle or is
closed, and never to a forked child: against the real server, on a pool of the test's."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from foxpoll.errors import StoreUnavailable

from .services import POSTGRES_URL, closing_stores, drop_table, eventually, require

pytestmark = pytest.mark.service


@pytest.fixture
def pool() -> Iterator[Any]:
    require("PostgreSQL", "127.0.0.1", 5432)
    from psycopg_pool import ConnectionPool

    with ConnectionPool(POSTGRES_URL, min_size=1, max_size=4,
                        kwargs={"autocommit": True}) as pool:
        pool.wait()
        yield pool


@pytest.fixture
def make_store(pool: Any) -> Iterator[Any]:
    """Stores on the test's pool, over one table, dropped (and the stores closed) after."""
    from foxpoll.dedup import PostgresDedupStore

    table = f"foxpoll_warm_{uuid.uuid4().hex[:8]}"

    def build(**options: Any) -> Any:
        store = PostgresDedupStore(pool, table=table, **options)
        store.create_schema()
        return store

    with closing_stores(build) as make:
        yield make
    drop_table(table)


@pytest.fixture
def store(make_store: Any) -> Any:
    return make_store()


def requests(pool: Any) -> int:
    return int(pool.get_stats().get("requests_num", 0))


def all_back(pool: Any) -> bool:
    """Every connection the pool opened is idle in it, soon (after the store's flush)."""
    return eventually(lambda: pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"])


@pytest.mark.parametrize(("reuse", "taken"), [(60, 0), (0, 20)])
def test_reuse_sets_how_often_calls_take_a_connection_from_the_pool(
        make_store: Any, pool: Any, reuse: float, taken: int) -> None:
    store = make_store(reuse_connection_for=reuse)
    store.get("o-0")  # takes one, or keeps create_schema's
    before = requests(pool)
    for n in range(20):
        store.get(f"o-{n}")
    assert requests(pool) - before == taken
    if not reuse:
        assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]


def test_the_reuse_time_is_checked(pool: Any) -> None:
    from foxpoll.dedup import PostgresDedupStore

    with pytest.raises(ValueError, match="reuse_connection_for"):
        PostgresDedupStore(pool, reuse_connection_for=-1)


def test_a_connection_goes_back_once_its_time_is_up(make_store: Any, pool: Any) -> None:
    store = make_store(reuse_connection_for=0.05)
    store.get("o-1")
    time.sleep(0.06)
    before = requests(pool)
    store.get("o-2")  # past its time: this call gives it back, the next takes one anew
    store.get("o-3")
    assert requests(pool) - before == 1


def test_an_idle_store_gives_its_connection_back(make_store: Any, pool: Any) -> None:
    store = make_store(reuse_connection_for=0.05)
    store.get("o-1")
    assert pool.get_stats()["pool_available"] < pool.get_stats()["pool_size"]  # warm
    assert all_back(pool)  # with no further call: the flush returned it


def test_close_gives_the_warm_connection_back_to_a_callers_pool(store: Any, pool: Any
                                                                ) -> None:
    store.get("o-1")
    store.close()
    assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]
    assert not pool.closed  # the caller's pool stays open


def test_a_failed_call_gives_its_connection_back(store: Any, pool: Any) -> None:
    from foxpoll.dedup import PostgresDedupStore

    missing = PostgresDedupStore(pool, table="never_created_here")
    with pytest.raises(StoreUnavailable, match=r"create_schema\(\)"):
        missing.get("o-1")
    assert len(missing._pg._warm) == 0
    before = requests(pool)
    with pytest.raises(StoreUnavailable):
        missing.get("o-1")
    assert requests(pool) - before == 1  # taken anew, not the failed one kept


def test_a_closed_callers_pool_is_not_worked_around(store: Any, pool: Any) -> None:
    store.get("o-1")
    pool.close()
    with pytest.raises(StoreUnavailable):
        store.get("o-2")


def test_a_forked_child_leaves_the_parents_warm_connection_alone(store: Any, pool: Any
                                                                 ) -> None:
    store.get("o-1")
    parents = list(store._pg._warm._held)
    assert parents
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = len(store._pg._warm) == 0 and store._pg.connection() not in parents
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(child, 0)
    store.get("o-2")  # the parent's own connection still serves it
