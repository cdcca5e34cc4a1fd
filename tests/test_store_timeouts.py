"""A network that freezes mid-statement fails the store call within its statement
timeout instead of blocking it (and the delivery's lease) for good: PostgreSQL and Redis,
sync and async, a store's own connections and a caller's, through foxpoll.testing's
FreezingProxy in front of the real servers."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import psycopg_pool
import pytest
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from foxpoll import StoreUnavailable
from foxpoll.dedup import (
    AsyncPostgresDedupStore,
    AsyncRedisDedupStore,
    PostgresDedupStore,
    RedisDedupStore,
)
from foxpoll.testing import FreezingProxy

from .services import POSTGRES_URL, REDIS_URL, delete_keys, drop_table, require

TABLE = f"foxpoll_timeouts_{uuid.uuid4().hex[:8]}"
PREFIX = f"foxpoll-timeouts-{uuid.uuid4().hex[:8]}:"
LIMIT = 0.5


def _target(url: str) -> tuple[str, int]:
    parts = urlparse(url)
    return parts.hostname or "127.0.0.1", parts.port or 0


@pytest.fixture
def pg_proxy() -> Iterator[FreezingProxy]:
    require("PostgreSQL", *_target(POSTGRES_URL))
    with PostgresDedupStore(POSTGRES_URL, table=TABLE) as store:
        store.create_schema()
    try:
        with FreezingProxy(_target(POSTGRES_URL)) as proxy:
            yield proxy
    finally:
        drop_table(TABLE)


@pytest.fixture
def redis_proxy() -> Iterator[FreezingProxy]:
    require("Redis", *_target(REDIS_URL))
    try:
        with FreezingProxy(_target(REDIS_URL)) as proxy:
            yield proxy
    finally:
        delete_keys(PREFIX)


def _via(url: str, proxy: FreezingProxy) -> str:
    parts = urlparse(url)
    return parts._replace(netloc=f"{parts.username + '@' if parts.username else ''}"
                                 f"127.0.0.1:{proxy.port}").geturl()


def pg_own(proxy: FreezingProxy) -> tuple[Any, None]:
    return PostgresDedupStore(_via(POSTGRES_URL, proxy), table=TABLE,
                              statement_timeout=LIMIT), None


def pg_callers_pool(proxy: FreezingProxy) -> tuple[Any, Any]:
    pool = psycopg_pool.ConnectionPool(_via(POSTGRES_URL, proxy), min_size=1, max_size=2,
                                       kwargs={"autocommit": True}, open=True)
    return PostgresDedupStore(pool, table=TABLE, statement_timeout=LIMIT), pool


def pg_async(proxy: FreezingProxy) -> tuple[Any, None]:
    return AsyncPostgresDedupStore(_via(POSTGRES_URL, proxy), table=TABLE,
                                   statement_timeout=LIMIT), None


def redis_own(proxy: FreezingProxy) -> tuple[Any, None]:
    return RedisDedupStore(_via(REDIS_URL, proxy), key_prefix=PREFIX,
                           statement_timeout=LIMIT), None


def redis_async_own(proxy: FreezingProxy) -> tuple[Any, None]:
    return AsyncRedisDedupStore(_via(REDIS_URL, proxy), key_prefix=PREFIX,
                                statement_timeout=LIMIT), None


def redis_async_callers_client(proxy: FreezingProxy) -> tuple[Any, Any]:
    # No socket timeout at all: only the store's own deadline can end a frozen call.
    client = aredis.Redis.from_url(_via(REDIS_URL, proxy), socket_timeout=None)
    return AsyncRedisDedupStore(client, key_prefix=PREFIX, statement_timeout=LIMIT), client


async def _call(result: Any) -> Any:
    return await result if isinstance(result, Awaitable) else result


async def frozen_then_thawed(store: Any, proxy: FreezingProxy) -> None:
    order = f"o-{uuid.uuid4()}"
    await _call(store.get(order))  # a connection is open and in the pool
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer within statement_timeout"):
        await _call(store.claim(order, "token-1", 30.0))
    assert time.monotonic() - started < LIMIT + 2.0  # unbounded before: blocked for good
    proxy.thaw()
    # The cut connection was dropped; the next call gets a working one.
    claim = await _call(store.claim(f"o-{uuid.uuid4()}", "token-2", 30.0))
    assert claim.acquired


@pytest.mark.slow
@pytest.mark.parametrize("make", [pg_own, pg_callers_pool, pg_async])
async def test_postgres_call_ends_within_the_statement_timeout(
        make: Callable[[FreezingProxy], tuple[Any, Any]], pg_proxy: FreezingProxy) -> None:
    store, callers_pool = make(pg_proxy)
    try:
        await frozen_then_thawed(store, pg_proxy)
    finally:
        await _call(store.aclose() if hasattr(store, "aclose") else store.close())
        if callers_pool is not None:  # the store leaves a caller's pool open
            assert not callers_pool.closed
            callers_pool.close()


@pytest.mark.slow
@pytest.mark.parametrize("make", [redis_own, redis_async_own, redis_async_callers_client])
async def test_redis_call_ends_within_the_statement_timeout(
        make: Callable[[FreezingProxy], tuple[Any, Any]], redis_proxy: FreezingProxy) -> None:
    store, callers_client = make(redis_proxy)
    try:
        await frozen_then_thawed(store, redis_proxy)
    finally:
        await _call(store.aclose() if hasattr(store, "aclose") else store.close())
        if callers_client is not None:  # the store leaves a caller's client open
            await callers_client.aclose()


@pytest.mark.slow
def test_a_callers_blocking_redis_client_is_bounded_by_its_own_socket_timeout(
        redis_proxy: FreezingProxy) -> None:
    # A client of the caller's is used as it is: its socket timeout, not the store's
    # statement_timeout (5 s here), ends a frozen call.
    client = redis.Redis.from_url(_via(REDIS_URL, redis_proxy), socket_timeout=LIMIT,
                                  retry=Retry(NoBackoff(), 0))
    store = RedisDedupStore(client, key_prefix=PREFIX)
    try:
        assert store.get(f"o-{uuid.uuid4()}") is None
        redis_proxy.freeze()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="within the client's socket timeout"):
            store.claim(f"o-{uuid.uuid4()}", "token-1", 30.0)
        assert time.monotonic() - started < LIMIT + 2.0
        redis_proxy.thaw()
        assert store.claim(f"o-{uuid.uuid4()}", "token-2", 30.0).acquired
    finally:
        store.close()
        client.close()


def _ping(conn: socket.socket) -> bytes:
    """Redis's answer to an inline ``PING`` on ``conn`` (``b""`` once it is closed)."""
    conn.sendall(b"PING\r\n")
    return conn.recv(64)


def _closed(conn: socket.socket) -> bool:
    """Whether the other end of ``conn`` closed it (within 2 s)."""
    conn.settimeout(2.0)
    try:
        return conn.recv(64) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_proxy_that_goes_down_drops_its_connections_until_it_is_up(
        redis_proxy: FreezingProxy) -> None:
    address = ("127.0.0.1", redis_proxy.port)
    with socket.create_connection(address, timeout=2.0) as before:
        assert _ping(before) == b"+PONG\r\n"
        redis_proxy.down()
        assert _closed(before)  # an open connection is dropped
        with socket.create_connection(address, timeout=2.0) as during:
            assert _closed(during)  # accepted, then closed at once, never forwarded
        redis_proxy.up()
        with socket.create_connection(address, timeout=2.0) as after:
            assert _ping(after) == b"+PONG\r\n"
