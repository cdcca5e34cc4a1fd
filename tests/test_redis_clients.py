"""A Redis client of yours, given to any Redis class, is checked when the object is built:
of the kind the class drives (``redis.Redis``, or ``redis.asyncio.Redis`` for the
``Async`` classes), and bounded by a ``socket_timeout`` wherever foxpoll has no deadline
of its own, above a consumer's ``block``. No server is needed: nothing connects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from foxpoll.dedup import AsyncRedisDedupStore, RedisDedupStore
from foxpoll.events import (
    AsyncRedisStreamConsumer,
    AsyncRedisStreamPublisher,
    RedisStreamConsumer,
    RedisStreamPublisher,
)
from foxpoll.ratelimit import RedisRateLimit

URL = "redis://127.0.0.1:1/0"  # never reached


def _consumer(kind: type[Any], block: float | None = None) -> Callable[[Any], Any]:
    return lambda client: kind(client, group="g", consumer="c", handler=print, block=block)


SYNC: dict[str, Callable[[Any], Any]] = {
    "RedisDedupStore": RedisDedupStore,
    "RedisStreamPublisher": RedisStreamPublisher,
    "RedisStreamConsumer": _consumer(RedisStreamConsumer),
    "RedisRateLimit": lambda client: RedisRateLimit(client, per_minute=100),
}
ASYNC: dict[str, Callable[[Any], Any]] = {
    "AsyncRedisDedupStore": AsyncRedisDedupStore,
    "AsyncRedisStreamPublisher": AsyncRedisStreamPublisher,
    "AsyncRedisStreamConsumer": _consumer(AsyncRedisStreamConsumer),
}


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Any]]:
    """Clients made by the test, closed after it."""
    made: list[Any] = []

    def make(asynchronous: bool = False, **options: Any) -> Any:
        kind = redis.asyncio.Redis if asynchronous else redis.Redis
        made.append(kind.from_url(URL, **options))
        return made[-1]

    yield make
    for client in made:
        if isinstance(client, redis.asyncio.Redis):
            await client.aclose()
        else:
            client.close()


@pytest.mark.parametrize("kind", list(SYNC))
async def test_a_blocking_client_without_a_socket_timeout_is_refused(
    kind: str, clients: Callable[..., Any]
) -> None:
    with pytest.raises(ValueError, match=r"needs a socket_timeout \(Redis\(\.\.\., "):
        SYNC[kind](clients(socket_timeout=None))
    SYNC[kind](clients(socket_timeout=2))  # bounded: taken


@pytest.mark.parametrize("kind", ["AsyncRedisStreamPublisher", "AsyncRedisStreamConsumer"])
async def test_an_asyncio_stream_client_without_a_socket_timeout_is_refused_too(
    kind: str, clients: Callable[..., Any]
) -> None:
    # The streams put no deadline of their own on a call: the socket timeout is the bound.
    with pytest.raises(ValueError, match="needs a socket_timeout"):
        ASYNC[kind](clients(asynchronous=True, socket_timeout=None))
    ASYNC[kind](clients(asynchronous=True, socket_timeout=2))


async def test_an_asyncio_client_bounded_by_the_objects_own_deadline_needs_none(
    clients: Callable[..., Any]
) -> None:
    AsyncRedisDedupStore(clients(asynchronous=True, socket_timeout=None))  # statement_timeout
    RedisRateLimit(clients(asynchronous=True, socket_timeout=None), per_minute=100)


@pytest.mark.parametrize("kind", [RedisStreamConsumer, AsyncRedisStreamConsumer])
async def test_a_consumers_client_must_outwait_its_blocking_read(
    kind: type[Any], clients: Callable[..., Any]
) -> None:
    asynchronous = kind is AsyncRedisStreamConsumer
    for timeout in (1.0, 0.5):
        with pytest.raises(ValueError, match=rf"socket_timeout \({timeout:g} s\) must be "
                           r"above block \(1 s\)"):
            _consumer(kind, block=1.0)(clients(asynchronous, socket_timeout=timeout))
    _consumer(kind, block=1.0)(clients(asynchronous, socket_timeout=1.5))
    _consumer(kind, block=None)(clients(asynchronous, socket_timeout=0.1))  # never blocks


@pytest.mark.parametrize(("kind", "twin"), [(name, f"Async{name}") for name in SYNC
                                            if name != "RedisRateLimit"])
async def test_a_client_of_the_other_kind_is_a_type_error_naming_the_twin(
    kind: str, twin: str, clients: Callable[..., Any]
) -> None:
    with pytest.raises(TypeError, match=f"{kind} needs a redis.Redis client, and was given "
                       f"a redis.asyncio one: use {twin} for that"):
        SYNC[kind](clients(asynchronous=True, socket_timeout=2))
    with pytest.raises(TypeError, match=f"{twin} needs a redis.asyncio client, and was "
                       f"given a redis.Redis one: use {kind} for that"):
        ASYNC[twin](clients(socket_timeout=2))


@pytest.mark.parametrize("kind", [*SYNC.values(), *ASYNC.values()])
def test_something_that_is_no_redis_client_is_a_type_error(kind: Callable[[Any], Any]
                                                           ) -> None:
    with pytest.raises(TypeError, match="takes a redis:// URL or a Redis client, not dict"):
        kind({"host": "127.0.0.1"})
