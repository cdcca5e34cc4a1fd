"""A Redis store runs every call through its client's pool, one command at a time: it holds
no connection between calls, a connection the server closed is replaced before it serves,
a script the server forgot is loaded again, an error reply leaves the store serving, a
forked child's calls work, nothing needs hiredis, and an unreachable server is
``StoreUnavailable``: against the real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest

from foxpoll.errors import DedupError, StoreUnavailable

from .services import REDIS_URL, delete_keys, free_port, own_redis_server, require

pytestmark = pytest.mark.service

redis = pytest.importorskip("redis")


@pytest.fixture
def prefix() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    prefix = f"foxpoll-conn-{uuid.uuid4().hex[:8]}:"
    yield prefix
    delete_keys(prefix)


def kill_clients(name: str) -> int:
    """Have the server close every connection named ``name``; how many it closed."""
    with redis.Redis.from_url(REDIS_URL) as admin:
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
        for client_id in ids:
            admin.client_kill_filter(_id=client_id)
    return len(ids)


@pytest.mark.slow
def test_a_connection_the_server_closed_is_replaced_before_it_serves(prefix: str) -> None:
    from foxpoll.dedup import RedisDedupStore

    name = f"foxpoll-conn-{uuid.uuid4().hex[:8]}"
    with RedisDedupStore(f"{REDIS_URL}?client_name={name}", key_prefix=prefix) as store:
        assert store.claim("o-1", "t-1", 30).acquired
        assert kill_clients(name) == 1  # a restart, a CLIENT KILL, an idle timeout
        time.sleep(0.05)  # the server's close reaches the socket
        # The store's client does not retry: only a check before the call saves it.
        assert store.complete("o-1", "t-1", "h", None).state.value == "delivered"


def test_a_pool_of_one_serves_the_store_and_its_caller_in_turn() -> None:
    # The store holds no connection between calls, and loads a script the server forgot
    # again through a pool whose one connection it gives back after every command.
    # (SCRIPT FLUSH empties every client's scripts: on a server of the test's own.)
    from foxpoll.dedup import RedisDedupStore

    with own_redis_server() as url:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=1, timeout=1,
                                                     socket_timeout=5)
        client = redis.Redis(connection_pool=pool)
        try:
            with RedisDedupStore(client) as store:
                assert store.claim("o-1", "t-1", 30).acquired
                assert client.ping()  # would wait for the pool's connection, then fail
                with redis.Redis.from_url(url) as admin:
                    admin.script_flush()
                assert store.complete("o-1", "t-1", "h", None).state.value == "delivered"
                assert store.claim("o-2", "t-2", 30).acquired  # and the next script too
            assert client.ping()  # closing the store left the caller's client open
        finally:
            pool.disconnect()


def test_a_callers_blocking_client_without_a_socket_timeout_is_refused() -> None:
    # Nothing else could end its calls on a frozen network.
    from foxpoll.dedup import AsyncRedisDedupStore, RedisDedupStore

    unbounded = redis.Redis.from_url(REDIS_URL, socket_timeout=None)
    with pytest.raises(ValueError, match="needs a socket_timeout"):
        RedisDedupStore(unbounded)
    bounded = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    assert RedisDedupStore(bounded).statement_timeout == 5.0
    # The async store bounds every call by its statement_timeout, whatever the client.
    AsyncRedisDedupStore(redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=None))
    unbounded.close()
    bounded.close()


def test_an_error_reply_or_a_corrupt_record_leaves_the_store_serving(prefix: str) -> None:
    from foxpoll.dedup import RedisDedupStore

    with RedisDedupStore(REDIS_URL, key_prefix=prefix) as store, \
            redis.Redis.from_url(REDIS_URL) as admin:
        admin.set(f"{prefix}delivery:o-bad", "not a hash")
        with pytest.raises(DedupError, match="WRONGTYPE"):  # the script's HMGET on a string
            store.claim("o-bad", "t-1", 30)
        admin.hset(f"{prefix}delivery:o-odd", mapping={"order_id": "o-odd",
                                                      "state": "vanished"})
        with pytest.raises(DedupError, match="corrupt"):
            store.get("o-odd")
        assert store.claim("o-good", "t-1", 30).acquired
        assert store.get("o-good").token == "t-1"


def test_a_forked_child_calls_the_store_and_leaves_the_parents_alone(prefix: str) -> None:
    from foxpoll.dedup import RedisDedupStore

    with RedisDedupStore(REDIS_URL, key_prefix=prefix) as store:
        assert store.claim("o-1", "t-1", 30).acquired  # the parent has a connection
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                ok = store.claim("o-2", "t-2", 30).acquired and store.get("o-1") is not None
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        try:
            assert os.read(read, 1) == b"1"
        finally:
            os.close(read)
            os.waitpid(child, 0)
        assert store.complete("o-1", "t-1", "h", None).state.value == "delivered"
        assert store.get("o-2").token == "t-2"


def test_the_store_works_without_hiredis(prefix: str) -> None:
    # hiredis is optional (the redis extra installs it): redis-py parses without it.
    program = f"""
import sys
sys.modules["hiredis"] = None  # as if it were not installed
from foxpoll.dedup import RedisDedupStore
with RedisDedupStore({REDIS_URL!r}, key_prefix={prefix!r}) as store:
    claim = store.claim("o-1", "t-1", 30.5)
    assert claim.acquired
    assert abs(claim.record.lease_until - claim.now - 30.5) < 0.01
    record = store.complete("o-1", "t-1", "h", "receipt")
    assert (record.state.value, record.receipt) == ("delivered", "receipt")
    stored = store.get("o-1")
    assert (stored.state, stored.token, stored.payload_hash) == (record.state, "t-1", "h")
"""
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)  # noqa: S603


async def _call(result: Any) -> Any:
    return await result if isinstance(result, Awaitable) else result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_an_unreachable_server_is_store_unavailable(kind: str) -> None:
    from foxpoll.dedup import AsyncRedisDedupStore, RedisDedupStore

    port = free_port()  # nothing listens there
    make = RedisDedupStore if kind == "blocking" else AsyncRedisDedupStore
    store: Any = make(f"redis://127.0.0.1:{port}/0", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await _call(store.claim("o-1", "t-1", 30))
    assert time.monotonic() - started < 1 + 2.0
    assert str(port) not in str(info.value)  # no connection details in the message
