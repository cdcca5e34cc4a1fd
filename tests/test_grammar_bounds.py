"""The constructor grammar's promises, through public behaviour: ``statement_timeout`` ends
a budget's or a stream's call on a frozen network, ``busy_timeout`` ends a wait for
another process's SQLite lock, a client you pass in outlives ``with``, and one the object
opens itself is bounded by its timeouts and closed with it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from foxpoll import StoreUnavailable
from foxpoll.events import (
    AsyncRedisStreamPublisher,
    OrderEvent,
    RedisStreamConsumer,
    RedisStreamPublisher,
)
from foxpoll.models import Order, OrderItem, OrderStatus
from foxpoll.ratelimit import RedisRateLimit, SQLiteRateLimit
from foxpoll.recovery import SQLiteRecoveryQueue
from foxpoll.testing import FreezingProxy

from .services import REDIS_URL, delete_keys, require

PREFIX = f"foxpoll-grammar-{uuid.uuid4().hex[:8]}:"
LIMIT = 0.5


def event() -> OrderEvent:
    order = Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                  items=(OrderItem("p", 1, external_data=("AAA-111",)),))
    return OrderEvent.from_order(order)


@pytest.fixture
def frozen_url() -> Iterator[tuple[str, FreezingProxy]]:
    require("Redis", "127.0.0.1", 6379)
    parts = urlparse(REDIS_URL)
    try:
        with FreezingProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
            yield parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl(), proxy
    finally:
        delete_keys(PREFIX)


def budget(url: str) -> Callable[[], Any]:
    limit = RedisRateLimit(url, 6000, key_prefix=PREFIX, statement_timeout=LIMIT)
    return limit.acquire


def publisher(url: str) -> Callable[[], Any]:
    made = RedisStreamPublisher(url, key_prefix=PREFIX, statement_timeout=LIMIT)
    return lambda: made.publish(event())


def consumer(url: str) -> Callable[[], Any]:
    made = RedisStreamConsumer(url, group="g", consumer="c", handler=lambda e: None,
                               key_prefix=PREFIX, block=None, statement_timeout=LIMIT)
    return made.consume


@pytest.mark.slow
@pytest.mark.parametrize("make", [budget, publisher, consumer])
def test_a_frozen_redis_ends_the_call_within_statement_timeout(
        make: Callable[[str], Callable[[], Any]],
        frozen_url: tuple[str, FreezingProxy]) -> None:
    url, proxy = frozen_url
    call = make(url)
    call()  # connected, and answered
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call()
    assert time.monotonic() - started < LIMIT + 2.0  # no bound before: waited for good


@pytest.mark.slow
async def test_a_frozen_redis_ends_an_async_publish_within_statement_timeout(
        frozen_url: tuple[str, FreezingProxy]) -> None:
    url, proxy = frozen_url
    async with AsyncRedisStreamPublisher(url, key_prefix=PREFIX,
                                         statement_timeout=LIMIT) as made:
        await made.publish(event())
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await made.publish(event())
        assert time.monotonic() - started < LIMIT + 2.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["budget", "queue"])
def test_busy_timeout_ends_the_wait_for_another_writers_lock(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    made: Any = (SQLiteRateLimit(path, 600, busy_timeout=LIMIT) if kind == "budget"
                 else SQLiteRecoveryQueue(path, busy_timeout=LIMIT))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process is writing, and stays
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            made.acquire() if kind == "budget" else made.enqueue("order-1")
        assert LIMIT * 0.8 < time.monotonic() - started < LIMIT + 2.0
    finally:
        other.close()
        made.close()


def test_a_client_you_pass_in_outlives_with() -> None:
    require("Redis", "127.0.0.1", 6379)
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        with RedisRateLimit(client, 6000, key_prefix=PREFIX) as limit:
            assert limit.acquire() == 0.0
        with RedisStreamPublisher(client, key_prefix=PREFIX) as made:
            made.publish(event())
        assert client.xlen(f"{PREFIX}orders") == 1  # still open, and the key was derived
        assert client.exists(f"{PREFIX}rate-limit") == 1
    finally:
        delete_keys(PREFIX)
        client.close()


def test_sqlite_budgets_in_tables_of_their_own_are_apart(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with SQLiteRateLimit(path, 60, burst=1, table='main."Budget ""A"""') as first, \
            SQLiteRateLimit(path, 60, burst=1) as second:
        assert first.acquire() == 0.0
        assert first.acquire() > 0  # the one permit is gone...
        assert second.acquire() == 0.0  # ...from its own table only
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                            "ORDER BY name").fetchall()
    assert tables == [('Budget "A"',), ("foxpoll_rate_limit",)]


async def aws_object(kind: str, moto_url: str, client: Any) -> tuple[Any, Callable[[], Any]]:
    """An async AWS object on ``client`` (None: its own), and one call of it."""
    import boto3

    if kind == "sqs":
        from foxpoll.events import AsyncSQSPublisher

        queue = boto3.client("sqs", endpoint_url=moto_url).create_queue(
            QueueName=f"foxpoll-grammar-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        publisher = AsyncSQSPublisher(queue, client=client, connect_timeout=2.0,
                                      statement_timeout=3.0)
        return publisher, lambda: publisher.publish(event())
    from foxpoll.dedup import AsyncDynamoDBDedupStore, DynamoDBDedupStore

    table = f"foxpoll-grammar-{uuid.uuid4().hex[:8]}"
    DynamoDBDedupStore(table, client=boto3.client("dynamodb", endpoint_url=moto_url)
                       ).create_schema()
    store = AsyncDynamoDBDedupStore(table, client=client, connect_timeout=2.0,
                                    statement_timeout=3.0)
    return store, lambda: store.get("order-1")


@pytest.mark.parametrize("kind", ["sqs", "dynamodb"])
async def test_an_async_aws_object_closes_the_client_it_opened_and_never_yours(
        kind: str, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import aioboto3

    configs: list[Any] = []  # of every aioboto3 client opened, in order
    closed: list[int] = []  # which of them were closed, in order
    opening = aioboto3.Session.client

    def spied(session: Any, service_name: str, **kwargs: Any) -> Any:
        context = opening(session, service_name, **kwargs)

        class Spy:
            async def __aenter__(self) -> Any:
                self.number = len(configs)
                configs.append(kwargs.get("config"))
                return await context.__aenter__()

            async def __aexit__(self, *exc: Any) -> Any:
                closed.append(self.number)
                return await context.__aexit__(*exc)

        return Spy()

    monkeypatch.setattr(aioboto3.Session, "client", spied)
    async with aioboto3.Session().client(kind, endpoint_url=moto_url) as yours:
        made, call = await aws_object(kind, moto_url, yours)
        async with made:
            await call()
        assert (len(configs), closed) == (1, [])  # yours, used and left open
    assert closed == [0]

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # for the client the object opens
    made, call = await aws_object(kind, moto_url, None)
    async with made:
        await asyncio.gather(call(), call())  # concurrent first calls: one client
        assert len(configs) == 2
        assert closed == [0]
    assert closed == [0, 1]
    assert (configs[1].connect_timeout, configs[1].read_timeout) == (2.0, 3.0)
