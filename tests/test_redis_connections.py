"""A blocking Redis store keeps a connection warm between calls, replaces one the server
closed meanwhile, and gives it back to the client's pool when its time is up, when a call
on it failed, when the store falls idle or is closed, and never to a forked child: against
the real server, on a client of the test's."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from foxpoll.errors import DedupError

from .services import REDIS_URL, closing_stores, delete_keys, eventually, require

pytestmark = pytest.mark.service

redis = pytest.importorskip("redis")


class CountingPool(redis.ConnectionPool):  # type: ignore[misc]
    """A pool that counts the connections taken from it."""

    taken = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.taken += 1
        return super().get_connection(*args, **kwargs)

    def in_use(self) -> int:
        return len(self._in_use_connections)


@pytest.fixture
def pool() -> Iterator[CountingPool]:
    require("Redis", "127.0.0.1", 6379)
    name = f"foxpoll-warm-{uuid.uuid4().hex[:8]}"
    pool = CountingPool.from_url(REDIS_URL, client_name=name)
    yield pool
    pool.disconnect()


@pytest.fixture
def make_store(pool: CountingPool) -> Iterator[Any]:
    """Stores on the test's client, under one key prefix, deleted (and the stores closed)
    after."""
    from foxpoll.dedup import RedisDedupStore

    prefix = f"foxpoll-warm-{uuid.uuid4().hex[:8]}:"

    def build(**options: Any) -> Any:
        return RedisDedupStore(redis.Redis(connection_pool=pool), key_prefix=prefix, **options)

    with closing_stores(build) as make:
        yield make
    delete_keys(prefix)


@pytest.fixture
def store(make_store: Any) -> Any:
    return make_store()


def kill_clients(name: str) -> int:
    """Have the server close every connection named ``name``; how many it closed."""
    with redis.Redis.from_url(REDIS_URL) as admin:
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
        for client_id in ids:
            admin.client_kill_filter(_id=client_id)
    return len(ids)


@pytest.mark.parametrize(("reuse", "taken"), [(60, 1), (0, 20)])
def test_reuse_sets_how_often_calls_take_a_connection_from_the_pool(
        make_store: Any, pool: CountingPool, reuse: float, taken: int) -> None:
    store = make_store(reuse_connection_for=reuse)
    for n in range(10):
        assert store.claim(f"o-{n}", f"t-{n}", 30).acquired
        store.complete(f"o-{n}", f"t-{n}", "h", None)
    assert pool.taken == taken
    if not reuse:
        assert pool.in_use() == 0


def test_the_reuse_time_is_checked(pool: CountingPool) -> None:
    from foxpoll.dedup import RedisDedupStore

    with pytest.raises(ValueError, match="reuse_connection_for"):
        RedisDedupStore(redis.Redis(connection_pool=pool), reuse_connection_for=61)


def test_a_connection_goes_back_once_its_time_is_up(make_store: Any, pool: CountingPool
                                                    ) -> None:
    store = make_store(reuse_connection_for=0.05)
    store.get("o-1")
    time.sleep(0.06)
    store.get("o-2")  # past its time: this call gives it back, the next takes one anew
    store.get("o-3")
    assert pool.taken == 2


def test_an_idle_store_gives_its_connection_back(make_store: Any, pool: CountingPool
                                                 ) -> None:
    store = make_store(reuse_connection_for=0.3)
    store.claim("o-1", "t-1", 30)
    assert pool.in_use() == 1  # warm
    assert eventually(lambda: pool.in_use() == 0)  # no further call: the flush returned it


def test_close_gives_the_warm_connection_back_to_a_callers_client(
        store: Any, pool: CountingPool) -> None:
    store.get("o-1")
    store.close()
    assert pool.in_use() == 0
    client = redis.Redis(connection_pool=pool)
    assert client.ping()  # the caller's client and pool still work


def test_a_connection_the_server_closed_is_replaced_before_it_serves(
        store: Any, pool: CountingPool) -> None:
    assert store.claim("o-1", "t-1", 30).acquired
    assert kill_clients(pool.connection_kwargs["client_name"]) == 1
    time.sleep(0.05)  # the server's close reaches the socket
    # The warm connection is dead: the call takes a fresh one, and does not fail.
    assert store.complete("o-1", "t-1", "h", None).state.value == "delivered"
    assert pool.taken == 2


def test_an_error_reply_keeps_the_connection_a_cut_one_does_not(
        store: Any, pool: CountingPool) -> None:
    with redis.Redis.from_url(REDIS_URL) as admin:
        admin.set(store._flows.record_key("o-bad"), "not a hash")
    with pytest.raises(redis.ResponseError):  # the script's HMGET on a string
        store.claim("o-bad", "t-1", 30)
    assert len(store._warm) == 1  # the reply was read in full: the connection is sound
    store._warm.take().guard.action()  # as the watchdog does to a frozen call
    assert store.claim("o-good", "t-1", 30).acquired  # on a fresh connection
    assert pool.taken == 2


def test_a_corrupt_record_keeps_the_connection(store: Any, pool: CountingPool) -> None:
    with redis.Redis.from_url(REDIS_URL) as admin:
        admin.hset(store._flows.record_key("o-odd"), mapping={"order_id": "o-odd",
                                                              "state": "vanished"})
    with pytest.raises(DedupError, match="corrupt"):
        store.get("o-odd")
    assert len(store._warm) == 1
    store.get("o-other")
    assert pool.taken == 1


def test_a_forked_child_leaves_the_parents_warm_connection_alone(
        store: Any, pool: CountingPool) -> None:
    store.get("o-1")
    parents = list(store._warm._held)
    assert parents
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = len(store._warm) == 0 and store.get("o-2") is None
            ok = ok and store._warm._held[0] not in parents
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert store.get("o-3") is None  # the parent's own connection still serves it
    assert store._warm._held == parents


def test_without_hiredis_commands_are_packed_by_redis_py(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import foxpoll.dedup.redis as module

    monkeypatch.setattr(module, "_PACK", None)
    claim = store.claim("o-1", "t-1", 30.5)
    assert claim.acquired
    assert claim.record.lease_until == pytest.approx(claim.now + 30.5, abs=0.01)
    record = store.complete("o-1", "t-1", "h", "receipt")
    assert (record.state.value, record.receipt) == ("delivered", "receipt")
    stored = store.get("o-1")
    assert (stored.state, stored.token, stored.payload_hash) == (record.state, "t-1", "h")


def test_a_forgotten_script_is_loaded_again_on_the_connection_in_hand() -> None:
    # A caller's pool of one connection: the store holds it, so loading the script again
    # through the client (another connection) could never succeed.
    from foxpoll.dedup import RedisDedupStore

    require("Redis", "127.0.0.1", 6379)
    prefix = f"foxpoll-warm-{uuid.uuid4().hex[:8]}:"
    pool = redis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=1, timeout=1)
    try:
        with RedisDedupStore(redis.Redis(connection_pool=pool), key_prefix=prefix) as store:
            assert store.claim("o-1", "t-1", 30).acquired
            with redis.Redis.from_url(REDIS_URL) as admin:
                admin.script_flush()
            assert store.complete("o-1", "t-1", "h", None).state.value == "delivered"
            assert store.claim("o-2", "t-2", 30).acquired  # and the next script too
    finally:
        pool.disconnect()
        delete_keys(prefix)
