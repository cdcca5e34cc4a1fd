"""Where a PostgreSQL store's connections come from and go back to, and how long a call
waits: against the real server, on a pool of the test's or the store's own."""

from __future__ import annotations

import os
import select
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import psycopg
import pytest

from foxpoll.errors import StoreError, StoreUnavailable

from .services import POSTGRES_URL, closing_stores, drop_table, require

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
def table() -> Iterator[str]:
    require("PostgreSQL", "127.0.0.1", 5432)
    name = f"foxpoll_conns_{uuid.uuid4().hex[:8]}"
    yield name
    drop_table(name)


@pytest.fixture
def make_store(pool: Any, table: str) -> Iterator[Any]:
    """Stores on the test's pool, over one table (the stores closed after)."""
    from foxpoll.dedup import PostgresDedupStore

    def build(**options: Any) -> Any:
        store = PostgresDedupStore(options.pop("pool", pool), table=table, **options)
        store.create_schema()
        return store

    with closing_stores(build) as make:
        yield make


def read_within(fd: int, seconds: float) -> bytes:
    """One byte from ``fd``, or b"" if none comes within ``seconds``."""
    ready, _, _ = select.select([fd], [], [], seconds)
    return os.read(fd, 1) if ready else b""


def all_back(pool: Any) -> bool:
    stats = pool.get_stats()
    return bool(stats["pool_available"] == stats["pool_size"])


def requests(pool: Any) -> int:
    return int(pool.get_stats().get("requests_num", 0))


def test_every_call_takes_a_connection_and_gives_it_back(make_store: Any, pool: Any
                                                         ) -> None:
    store = make_store()
    before = requests(pool)
    for n in range(20):
        store.get(f"o-{n}")
        assert all_back(pool)  # nothing is held between calls
    assert requests(pool) - before == 20


def test_close_leaves_a_callers_pool_open(make_store: Any, pool: Any) -> None:
    store = make_store()
    store.get("o-1")
    store.close()
    assert not pool.closed
    with pool.connection() as conn:  # it still serves
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_failed_call_gives_its_connection_back(pool: Any) -> None:
    from foxpoll.dedup import PostgresDedupStore

    missing = PostgresDedupStore(pool, table="never_created_here")
    for _ in range(2):
        with pytest.raises(StoreError, match=r"create_schema\(\)"):
            missing.get("o-1")
        assert all_back(pool)


def test_a_closed_callers_pool_is_not_worked_around(make_store: Any, pool: Any) -> None:
    store = make_store()
    store.get("o-1")
    pool.close()
    with pytest.raises(StoreError, match="is closed") as closed:
        store.get("o-2")
    assert not isinstance(closed.value, StoreUnavailable)  # waiting would not reopen it


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_store_used_after_close_says_so_and_is_no_outage(table: str, kind: str
                                                                 ) -> None:
    from foxpoll.dedup import AsyncPostgresDedupStore, PostgresDedupStore
    from foxpoll.recovery import PostgresRecoveryQueue

    store: Any = (PostgresDedupStore if kind == "blocking" else AsyncPostgresDedupStore)(
        POSTGRES_URL, table=table)
    queue = PostgresRecoveryQueue(POSTGRES_URL, table=f"{table}_q")
    try:
        if kind == "blocking":
            store.create_schema()
            assert store.get("o-1") is None
            store.close()
            with pytest.raises(StoreError, match=f"table '{table}' is closed") as info:
                store.get("o-1")
        else:
            await store.create_schema()
            assert await store.get("o-1") is None
            await store.aclose()
            with pytest.raises(StoreError, match=f"table '{table}' is closed") as info:
                await store.get("o-1")
        assert not isinstance(info.value, StoreUnavailable)
        queue.create_schema()
        queue.close()
        with pytest.raises(StoreError, match="is closed") as info:
            queue.enqueue("o-1")
        assert not isinstance(info.value, StoreUnavailable)
    finally:
        drop_table(f"{table}_q")


@pytest.mark.parametrize("seconds", [0, -1, float("nan")])
def test_the_statement_timeout_is_checked(seconds: float) -> None:
    from foxpoll.dedup import AsyncPostgresDedupStore, PostgresDedupStore
    from foxpoll.recovery import PostgresRecoveryQueue

    for kind in (PostgresDedupStore, AsyncPostgresDedupStore, PostgresRecoveryQueue):
        with pytest.raises(ValueError, match="statement_timeout"):
            kind(POSTGRES_URL, statement_timeout=seconds)


@pytest.mark.slow
def test_an_exhausted_pool_is_store_unavailable_after_connect_timeout(table: str) -> None:
    from psycopg_pool import ConnectionPool

    from foxpoll.dedup import PostgresDedupStore

    with ConnectionPool(POSTGRES_URL, min_size=1, max_size=1,
                        kwargs={"autocommit": True}) as pool:
        store = PostgresDedupStore(pool, table=table, connect_timeout=0.5)
        store.create_schema()
        with pool.connection():  # someone else holds the pool's one connection
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="PoolTimeout"):
                store.get("o-1")
            assert 0.4 < time.monotonic() - started < 0.5 + 2.0
        assert store.get("o-1") is None  # given back: the store gets it


@pytest.mark.slow
def test_a_call_waiting_on_a_lock_ends_within_the_statement_timeout(table: str) -> None:
    # A healthy network, a row lock held elsewhere: the call is cut like a frozen one,
    # and the store serves the next call on a fresh connection.
    from foxpoll.dedup import PostgresDedupStore

    with PostgresDedupStore(POSTGRES_URL, table=table, statement_timeout=0.5) as store:
        store.create_schema()
        assert store.claim("o-1", "token-1", 0.01).acquired
        time.sleep(0.02)  # its lease runs out: the next claim would take it over...
        with psycopg.connect(POSTGRES_URL) as locker:
            locker.execute(f"SELECT 1 FROM {table} WHERE order_id = 'o-1' "  # noqa: S608
                           "FOR UPDATE")  # ...once it has the row, which this holds
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="within statement_timeout"):
                store.claim("o-1", "token-2", 60)
            assert 0.5 <= time.monotonic() - started < 0.5 + 2.0
            assert store.claim("o-2", "token-3", 60).acquired  # while the lock is held
            locker.rollback()


@pytest.mark.slow
def test_a_forked_worker_s_frozen_call_still_ends_in_time(make_store: Any, table: str
                                                         ) -> None:
    # The parent's store calls started the deadlines' watchdog; a forked child (a
    # pre-forking server's worker) has no such thread, and its calls must be cut too.
    from foxpoll.dedup import PostgresDedupStore
    from foxpoll.testing import FreezingProxy

    make_store().get("o-1")
    parts = urlparse(POSTGRES_URL)
    with FreezingProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
        via = parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
        to_parent, from_child = os.pipe()
        to_child, from_parent = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            outcome = b"?"
            try:
                store = PostgresDedupStore(via, table=table, statement_timeout=0.5)
                store.get("o-2")  # connected, before the network freezes
                os.write(from_child, b"r")
                os.read(to_child, 1)  # frozen now
                started = time.monotonic()
                try:
                    store.get("o-3")
                except StoreUnavailable:
                    outcome = b"1" if time.monotonic() - started < 0.5 + 2.0 else b"0"
            finally:
                os.write(from_child, outcome)
                os._exit(0)  # no clean-up: the pool and its connections are the child's
        try:
            assert read_within(to_parent, 10) == b"r"
            proxy.freeze()
            os.write(from_parent, b"f")
            assert read_within(to_parent, 10) == b"1"
        finally:
            proxy.thaw()
            os.kill(child, signal.SIGKILL)  # done, or blocked for good
            os.waitpid(child, 0)
            for fd in (to_parent, from_child, to_child, from_parent):
                os.close(fd)
