"""One error for every store: a budget, an event stream or a queue whose server cannot be
reached raises ``StoreUnavailable`` (a ``StoreError``), never its driver's own exception,
and the message carries no connection details. One used after ``close()``, or given a
place no file can be, raises a plain ``StoreError``: waiting would not cure it."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from foxpoll import StoreError, StoreUnavailable
from foxpoll.events import OrderEvent, event_id_for

from .services import AWS_ENV, POSTGRES_URL, REDIS_URL, delete_keys, free_port, require

EVENT = OrderEvent(event_id_for("o1", "completed"), "o1", "completed", ("CODE-1",), 0.0)


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _dead_redis() -> str:
    return f"redis://user:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there


def _says_nothing_of(url: str, error: BaseException) -> None:
    message = str(error)
    assert "hunter2" not in message
    assert url.rsplit(":", 1)[1].split("/")[0] not in message  # the port


@pytest.mark.parametrize("call", ["acquire", "aacquire", "throttled", "athrottled"])
async def test_a_redis_budget_that_cannot_reach_redis_is_store_unavailable(call: str) -> None:
    import redis

    from foxpoll.ratelimit import RedisRateLimit

    url = _dead_redis()
    budget = RedisRateLimit(url, per_minute=100)
    try:
        args: tuple[Any, ...] = (None,) if "throttled" in call else ()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await _settle(getattr(budget, call)(*args))
        assert time.monotonic() - started < 5.0 + 2.0  # the budget's connect timeout
    finally:
        await budget.aclose()
    _says_nothing_of(url, info.value)
    assert isinstance(info.value.__cause__, redis.ConnectionError)  # chained, for debugging


def _sqlite_kinds() -> dict[str, Callable[[Any], Any]]:
    from foxpoll.dedup import AsyncSQLiteDedupStore, SQLiteDedupStore
    from foxpoll.ratelimit import SQLiteRateLimit
    from foxpoll.recovery import SQLiteRecoveryQueue

    return {"SQLiteDedupStore": SQLiteDedupStore, "AsyncSQLiteDedupStore":
            AsyncSQLiteDedupStore, "SQLiteRecoveryQueue": SQLiteRecoveryQueue,
            "SQLiteRateLimit": lambda where: SQLiteRateLimit(where, per_minute=100)}


@pytest.mark.parametrize("kind", list(_sqlite_kinds()))
@pytest.mark.parametrize("where", ["missing directory", "directory"])
def test_a_sqlite_file_that_cannot_exist_there_is_a_store_error_not_an_outage(
    tmp_path: Path, kind: str, where: str,
) -> None:
    """Waiting would not make the directory appear, or the directory a file."""
    path = tmp_path / "no-such-dir" / "x.db" if where == "missing directory" else tmp_path
    said = "no directory" if where == "missing directory" else "is a directory"
    for form in (path, str(path), f"sqlite:///{path}"):
        with pytest.raises(StoreError, match=said) as info:
            _sqlite_kinds()[kind](form)
        assert not isinstance(info.value, StoreUnavailable)
    assert not (tmp_path / "no-such-dir").exists()


def test_a_locked_sqlite_file_is_still_an_outage(tmp_path: Path) -> None:
    import sqlite3

    from foxpoll.dedup import SQLiteDedupStore

    path = tmp_path / "x.db"
    SQLiteDedupStore(path).close()  # the table exists
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process, in a long write
    try:
        with SQLiteDedupStore(path, busy_timeout=0.05) as store, \
                pytest.raises(StoreUnavailable, match="SQLite is unavailable"):
            store.get("o1")
    finally:
        holder.close()


async def test_a_sqlite_budget_used_after_close_says_so_even_failing_open(
    tmp_path: Path,
) -> None:
    from foxpoll.ratelimit import SQLiteRateLimit

    for fail_open in (False, True):  # fail_open is for outages: this is none
        budget = SQLiteRateLimit(tmp_path / "budget.db", per_minute=100, fail_open=fail_open)
        assert budget.acquire() == 0.0
        budget.close()
        for call in (budget.acquire, functools.partial(budget.throttled, 1.0)):
            with pytest.raises(StoreError, match="SQLiteRateLimit is closed") as info:
                call()
            assert not isinstance(info.value, StoreUnavailable)
        with pytest.raises(StoreError, match="SQLiteRateLimit is closed"):
            await budget.athrottled(1.0)


async def test_a_sqlite_dedup_store_used_after_close_says_so(tmp_path: Path) -> None:
    from foxpoll.dedup import AsyncSQLiteDedupStore, SQLiteDedupStore

    store = SQLiteDedupStore(tmp_path / "d.db")
    store.close()
    for call in (lambda: store.get("o1"), lambda: store.claim("o1", "t", 30.0),
                 store.create_schema):
        with pytest.raises(StoreError, match="SQLiteDedupStore is closed") as info:
            call()
        assert not isinstance(info.value, StoreUnavailable)
    astore = AsyncSQLiteDedupStore(tmp_path / "d.db")
    await astore.aclose()
    with pytest.raises(StoreError, match="is closed") as info:
        await astore.get("o1")
    assert not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_redis_stream_publisher_that_cannot_reach_redis_is_store_unavailable(
    kind: str,
) -> None:
    from foxpoll.events import AsyncRedisStreamPublisher, RedisStreamPublisher

    url = _dead_redis()
    publisher: Any = (RedisStreamPublisher if kind == "blocking"
                      else AsyncRedisStreamPublisher)(url)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await _settle(publisher.publish(EVENT))
    finally:
        await _settle(publisher.close() if kind == "blocking" else publisher.aclose())
    _says_nothing_of(url, info.value)
    assert "CODE-1" not in str(info.value)


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_redis_stream_consumer_that_cannot_reach_redis_is_store_unavailable(
    kind: str,
) -> None:
    from foxpoll.events import AsyncRedisStreamConsumer, RedisStreamConsumer

    handled: list[OrderEvent] = []
    url = _dead_redis()
    consumer: Any = (RedisStreamConsumer if kind == "blocking" else AsyncRedisStreamConsumer)(
        url, group="g", consumer="c", handler=handled.append, block=None)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await _settle(consumer.consume())
    finally:
        await _settle(consumer.close() if kind == "blocking" else consumer.aclose())
    _says_nothing_of(url, info.value)
    assert handled == []


@pytest.mark.service
async def test_a_failing_handler_is_not_mistaken_for_an_unreachable_redis() -> None:
    """The handler's own ConnectionError (it may use Redis too) leaves its entry pending;
    it is not turned into StoreUnavailable."""
    require("Redis", "127.0.0.1", 6379)
    import redis

    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    prefix = f"test-store-errors:{time.monotonic_ns()}:"

    def handler(event: OrderEvent) -> None:
        raise redis.ConnectionError("the handler's own Redis is down")

    publisher = RedisStreamPublisher(REDIS_URL, key_prefix=prefix)
    consumer = RedisStreamConsumer(REDIS_URL, group="g", consumer="c", handler=handler,
                                   key_prefix=prefix, block=None)
    try:
        consumer.ensure_group()
        publisher.publish(EVENT)
        assert consumer.consume() == 0  # not acknowledged, and no exception
    finally:
        publisher.close()
        consumer.close()
        delete_keys(f"{prefix}orders")


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_an_sqs_publisher_that_cannot_reach_sqs_is_store_unavailable(
    kind: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from botocore.config import Config

    from foxpoll.events import AsyncSQSPublisher, SQSPublisher

    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{free_port()}"
    queue = f"{endpoint}/123456789012/events"
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2)
    if kind == "blocking":
        import boto3

        with pytest.raises(StoreUnavailable, match="SQS is unavailable"):
            SQSPublisher(queue, client=boto3.client("sqs", endpoint_url=endpoint, config=config)
                         ).publish(EVENT)
        return
    import aioboto3

    async with aioboto3.Session().client("sqs", endpoint_url=endpoint, config=config) as sqs:
        with pytest.raises(StoreUnavailable, match="SQS is unavailable"):
            await AsyncSQSPublisher(queue, client=sqs).publish(EVENT)


def test_every_store_error_is_one_kind() -> None:
    from foxpoll import DedupError, EventError, LeaseLost

    for error in (StoreUnavailable("x"), DedupError("x"), LeaseLost("x"), EventError("x")):
        assert isinstance(error, StoreError)


def test_a_postgres_table_never_created_is_a_store_error_not_an_outage() -> None:
    """Waiting for the server would not make the table appear: a worker that retries
    through outages must not retry this one forever."""
    from foxpoll.dedup import PostgresDedupStore

    require("PostgreSQL", "127.0.0.1", 5432)
    with (PostgresDedupStore(POSTGRES_URL, table="foxpoll_never_created_here") as store,
          pytest.raises(StoreError, match="does not exist") as info):
        store.get("o1")
    assert not isinstance(info.value, StoreUnavailable)
