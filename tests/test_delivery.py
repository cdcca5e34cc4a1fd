"""deliver_once / adeliver_once: the orchestration, its bad input and its failure modes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foxpoll import (
    DedupError,
    DeliveryInProgress,
    LeaseLost,
    Order,
    OrderStatus,
    StoreUnavailable,
    adeliver_once,
    current_lease,
    deliver_once,
)
from foxpoll.dedup import (
    AsyncMemoryDedupStore,
    DeliveryState,
    MemoryDedupStore,
    SQLiteDedupStore,
)
from foxpoll.models import OrderItem

from .services import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def completed(order_id: str | None = None, codes: tuple[Any, ...] = ("AAA", "BBB")) -> Order:
    return Order(id=order_id or str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", len(codes), external_data=codes),))


def test_delivers_and_records_a_receipt_and_hash() -> None:
    store = MemoryDedupStore()
    sent: list[tuple[Any, ...]] = []
    order = completed()
    result = deliver_once(order, lambda o: sent.append(o.codes) or "msg-1", store)
    assert result.delivered
    assert result.receipt == "msg-1"
    assert sent == [("AAA", "BBB")]
    assert result.record.state is DeliveryState.DELIVERED
    assert result.record.receipt == "msg-1"
    assert result.record.payload_hash is not None
    assert "AAA" not in result.record.payload_hash
    assert "AAA" not in repr(result)


def test_a_second_delivery_is_skipped() -> None:
    store = MemoryDedupStore()
    order = completed()
    deliver_once(order, lambda o: None, store)
    calls = []
    again = deliver_once(order, calls.append, store)
    assert not again.delivered
    assert calls == []


def test_the_same_codes_hash_the_same_and_different_codes_differ() -> None:
    store = MemoryDedupStore()
    a = deliver_once(completed("a", ("X",)), lambda o: None, store).record.payload_hash
    b = deliver_once(completed("b", ("X",)), lambda o: None, store).record.payload_hash
    c = deliver_once(completed("c", ({"code": "X", "pin": "1"},)), lambda o: None,
                     store).record.payload_hash
    assert a == b != c


@pytest.mark.parametrize("status", ["active", "paid", "processing", "failed", "cancelled", "odd"])
def test_only_completed_orders_are_delivered(status: str) -> None:
    store = MemoryDedupStore()
    order = Order(id="o", status=OrderStatus(status))
    calls: list[Order] = []
    with pytest.raises(ValueError, match="not completed"):
        deliver_once(order, calls.append, store)
    assert calls == []
    assert store.get("o") is None


def test_an_empty_order_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        deliver_once(Order(id=" ", status=OrderStatus.COMPLETED), lambda o: None,
                     MemoryDedupStore())


def test_not_an_order_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        deliver_once({"id": "x"}, lambda o: None, MemoryDedupStore())  # type: ignore[arg-type]


def test_a_failing_delivery_releases_and_reraises() -> None:
    store = MemoryDedupStore()
    order = completed()

    def boom(o: Order) -> None:
        raise TimeoutError("smtp")

    with pytest.raises(TimeoutError):
        deliver_once(order, boom, store)
    record = store.get(order.id)
    assert record is not None
    assert record.state is DeliveryState.RELEASED
    assert deliver_once(order, lambda o: "ok", store).delivered


def test_keyboard_interrupt_in_deliver_still_releases() -> None:
    store = MemoryDedupStore()
    order = completed()

    def interrupted(o: Order) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deliver_once(order, interrupted, store)
    assert store.get(order.id).state is DeliveryState.RELEASED  # type: ignore[union-attr]


def test_a_live_claim_elsewhere_is_delivery_in_progress() -> None:
    clock = Clock()
    store = MemoryDedupStore(clock=clock)
    order = completed()
    store.claim(order.id, "other-worker", 60)
    calls: list[Order] = []
    with pytest.raises(DeliveryInProgress) as info:
        deliver_once(order, calls.append, store)
    assert info.value.lease_until == clock.now + 60
    assert calls == []
    clock.now += 61  # the other worker died: its lease runs out
    assert deliver_once(order, lambda o: None, store).delivered


def test_long_deliveries_renew_their_lease() -> None:
    clock = Clock()
    store = MemoryDedupStore(clock=clock)
    order = completed()

    def slow(o: Order) -> None:
        lease = current_lease()
        assert lease.order_id == o.id
        clock.now += 50
        lease.renew()  # another 60 s from now
        clock.now += 50  # 100 s in: past the first lease, within the renewed one
        with pytest.raises(DeliveryInProgress):
            deliver_once(o, lambda _: None, store)  # a rival still sees a live claim

    assert deliver_once(order, slow, store, lease=60).delivered


def test_current_lease_outside_deliver_raises() -> None:
    with pytest.raises(RuntimeError, match="inside deliver"):
        current_lease()


def test_a_takeover_during_deliver_is_lease_lost_on_complete() -> None:
    clock = Clock()
    store = MemoryDedupStore(clock=clock)
    order = completed()

    def stalls(o: Order) -> None:
        clock.now += 120  # past the lease...
        store.claim(o.id, "rival", 60)  # ...and a rival takes over

    with pytest.raises(LeaseLost):
        deliver_once(order, stalls, store, lease=60)
    assert store.get(order.id).token == "rival"  # type: ignore[union-attr]


def test_a_dead_store_delivers_nothing() -> None:
    store = SQLiteDedupStore(":memory:")
    store.close()  # a closed database: every statement fails
    calls: list[Order] = []
    with pytest.raises(StoreUnavailable):
        deliver_once(completed(), calls.append, store)
    assert calls == []


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_unreachable_servers_are_store_unavailable(backend: str) -> None:
    port = free_port()  # nothing listens there
    if backend == "postgres":
        from foxpoll.dedup import PostgresDedupStore

        store: Any = PostgresDedupStore(f"postgresql://postgres@127.0.0.1:{port}/test",
                                        connect_timeout=2)
    else:
        from foxpoll.dedup import RedisDedupStore

        store = RedisDedupStore(f"redis://127.0.0.1:{port}/0")
    calls: list[Order] = []
    with pytest.raises(StoreUnavailable) as info:
        deliver_once(completed(), calls.append, store)
    assert calls == []
    assert str(port) not in str(info.value)  # no connection details in the message


def test_a_corrupted_record_is_a_dedup_error(tmp_path: Any) -> None:
    store = SQLiteDedupStore(tmp_path / "d.db")
    order = completed()
    store.claim(order.id, "t", 60)
    store._db.execute("UPDATE foxpoll_deliveries SET attempts = 'many' WHERE order_id = ?",
                      (order.id,))
    with pytest.raises(DedupError, match="corrupt"):
        store.get(order.id)
    store._db.execute("PRAGMA ignore_check_constraints = ON")
    store._db.execute("UPDATE foxpoll_deliveries SET state = 'lost' WHERE order_id = ?",
                      (order.id,))
    with pytest.raises(DedupError, match="corrupt"):
        deliver_once(order, lambda o: None, store)
    store.close()


def test_a_sync_store_rejects_an_async_deliver() -> None:
    async def deliver(o: Order) -> None:
        pass

    store = MemoryDedupStore()
    order = completed()
    with pytest.raises(TypeError, match="adeliver_once"):
        deliver_once(order, deliver, store)
    assert store.get(order.id).state is DeliveryState.RELEASED  # type: ignore[union-attr]


async def test_adeliver_once_with_an_async_deliver_and_renewal() -> None:
    store = AsyncMemoryDedupStore()
    order = completed()
    sent: list[str] = []

    async def deliver(o: Order) -> str:
        await asyncio.sleep(0)
        record = await current_lease().renew(120)
        assert record.lease_until is not None
        sent.append(o.id)
        return "queued"

    first = await adeliver_once(order, deliver, store)
    second = await adeliver_once(order, deliver, store)
    assert (first.delivered, second.delivered) == (True, False)
    assert first.receipt == "queued"
    assert sent == [order.id]


async def test_cancelling_adeliver_once_releases_the_claim() -> None:
    store = AsyncMemoryDedupStore()
    order = completed()
    started = asyncio.Event()

    async def deliver(o: Order) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(adeliver_once(order, deliver, store))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await store.get(order.id)
    assert record is not None
    assert record.state is DeliveryState.RELEASED


@pytest.mark.service
def test_redis_delivered_records_expire_after_the_retention() -> None:
    from .services import REDIS_URL, delete_keys, require

    require("Redis", "127.0.0.1", 6379)
    import redis

    from foxpoll.dedup import RedisDedupStore

    prefix = f"foxpoll-ttl-{uuid.uuid4().hex[:8]}:"
    store = RedisDedupStore(REDIS_URL, key_prefix=prefix, retention=3600)
    forever = RedisDedupStore(REDIS_URL, key_prefix=prefix, retention=0)
    order, other = completed(), completed()
    deliver_once(order, lambda o: None, store)
    deliver_once(other, lambda o: None, forever)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert 3500 < client.ttl(f"{prefix}delivery:{order.id}") <= 3600
        assert client.ttl(f"{prefix}delivery:{other.id}") == -1  # no expiry
        store.claim(str(uuid.uuid4()), "t", 60)
        assert client.ttl(f"{prefix}delivery:{order.id}") > 0
        client.delete(f"{prefix}delivery:{order.id}")  # as if it expired
        listed = [r.order_id for r in store.list(DeliveryState.DELIVERED)]
        assert order.id not in listed  # expired records drop out of listings...
        assert client.zscore(f"{prefix}deliveries:delivered", order.id) is None  # ...and the index
    finally:
        delete_keys(prefix)
        client.close()


@given(st.lists(st.one_of(st.text(), st.dictionaries(st.text(), st.text(), max_size=3)),
                max_size=5))
def test_the_codes_hash_is_sha256_of_their_canonical_json(codes: list[Any]) -> None:
    # The fast path for text codes must hash exactly what the JSON encoder would: stored
    # hashes stay comparable across releases.
    import hashlib
    import json

    from foxpoll.delivery import _codes_hash

    canonical = json.dumps(codes, sort_keys=True, separators=(",", ":"), default=str)
    assert _codes_hash(tuple(codes)) == hashlib.sha256(canonical.encode()).hexdigest()


def test_fencing_tokens_differ_across_calls_threads_and_a_forked_child() -> None:
    import os
    import threading

    from foxpoll.delivery import _TOKENS

    made: list[str] = []
    threads = [threading.Thread(target=lambda: made.extend(_TOKENS.next() for _ in range(500)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 2000
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, "\n".join(_TOKENS.next() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    parents = {_TOKENS.next() for _ in range(100)}  # counting on from where the child began
    assert len(childs) == 100
    assert not childs & parents
    assert not childs & set(made)
