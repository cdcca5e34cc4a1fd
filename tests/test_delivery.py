"""deliver_once / adeliver_once: the orchestration, its bad input and its failure modes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
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
    StoreError,
    StoreUnavailable,
    adeliver_once,
    current_lease,
    deliver_once,
)
from foxpoll.dedup import (
    AsyncMemoryDedupStore,
    AsyncSQLiteDedupStore,
    DeliveryState,
    MemoryDedupStore,
    SQLiteDedupStore,
)
from foxpoll.models import OrderItem
from foxpoll.testing import FakeClock

from .services import free_port


class Clock:
    """A store's wall clock, moved by hand (``.now``)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
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
    store.close()  # a closed store: every statement fails, and waiting will not help
    calls: list[Order] = []
    with pytest.raises(StoreError, match="closed") as refused:
        deliver_once(completed(), calls.append, store)
    assert not isinstance(refused.value, StoreUnavailable)
    assert calls == []


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.slow),
                                     "redis"])  # the pool waits out its connect_timeout
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
    # Another program writes the store's file: a connection of the test's own.
    with contextlib.closing(sqlite3.connect(tmp_path / "d.db", isolation_level=None)) as db:
        db.execute("UPDATE foxpoll_deliveries SET attempts = 'many' WHERE order_id = ?",
                   (order.id,))
        with pytest.raises(DedupError, match="corrupt"):
            store.get(order.id)
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.execute("UPDATE foxpoll_deliveries SET state = 'lost' WHERE order_id = ?",
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
    import hashlib
    import json

    result = deliver_once(completed(codes=tuple(codes)), lambda o: None, MemoryDedupStore())
    canonical = json.dumps(codes, sort_keys=True, separators=(",", ":"), default=str)
    assert result.record.payload_hash == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(("codes", "digest"), [
    (("AAA", "BBB"), "518d1d0ec11d9c4a85cbc86de03771a3cc2b7c35eb40e6b70c08b0c736552490"),
    (({"code": "X", "pin": "1"}, "é", 'Ünï"\\'),
     "c049519b8d597a0f0dc8c2da5fce8637427e88583f32e58c6094f58201511c20"),
    (({"b": 1, "a": [1.5, None]},),
     "78b813b45cafddddaf027fd5d368b04a20445a9be0e4a37a13e21349fe76a8e9"),
    ((), "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"),
])
def test_the_codes_hash_is_what_earlier_releases_stored(codes: tuple[Any, ...],
                                                        digest: str) -> None:
    # Stores already hold these hashes: the same codes must keep hashing the same.
    result = deliver_once(completed(codes=codes), lambda o: None, MemoryDedupStore())
    assert result.record.payload_hash == digest


class TokenRecorder(MemoryDedupStore):
    """Keeps the fencing token of every claim."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []

    def claim(self, order_id: str, token: str, lease: float) -> Any:
        self.tokens.append(token)
        return super().claim(order_id, token, lease)


def test_fencing_tokens_differ_across_calls_threads_and_a_forked_child() -> None:
    import os
    import threading

    store = TokenRecorder()

    def deliver_many(count: int) -> None:
        for _ in range(count):
            deliver_once(completed(), lambda o: None, store)

    threads = [threading.Thread(target=deliver_many, args=(100,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            deliver_many(50)
            os.write(write, "\n".join(store.tokens[-50:]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    deliver_many(50)  # the parent goes on after the fork
    parents = set(store.tokens)
    assert len(parents) == 450
    assert len(childs) == 50
    assert not childs & parents
    assert all(len(token) >= 32 for token in parents)  # 128 random bits: unguessable


# Renewal. A slow delivery keeps its claim: while deliver runs, the claim is renewed every
# third of its lease, on the clock deliver_once is given. On a FakeClock, time moves only
# when deliver sleeps, so these tests run in virtual time.


class Renewals(MemoryDedupStore):
    """Counts renewals, and lets a test wait for the next one; ``failures`` renewals fail
    first, as a store whose network hiccups."""

    def __init__(self, clock: FakeClock, failures: int = 0) -> None:
        super().__init__(clock=clock)
        self.count, self.failures = 0, failures
        self.tried = threading.Semaphore(0)

    def renew(self, order_id: str, token: str, lease: float) -> Any:
        try:
            self.count += 1
            if self.count <= self.failures:
                raise StoreUnavailable("SQLite is unavailable: OperationalError")
            return super().renew(order_id, token, lease)
        finally:
            self.tried.release()

    def wait_for_renewal(self) -> None:
        assert self.tried.acquire(timeout=5), "no renewal came"


def test_a_slow_delivery_keeps_its_claim() -> None:
    clock = FakeClock()
    store = Renewals(clock)
    order = completed()
    rivals: list[BaseException] = []

    def slow(o: Order) -> str:
        for _ in range(6):  # 90 s in steps of 15: three times the lease
            clock.sleep(15)
            store.wait_for_renewal()
            with pytest.raises(DeliveryInProgress) as rival:
                deliver_once(o, lambda _: None, store, lease=30, renew=False)
            rivals.append(rival.value)
        return "sent"

    result = deliver_once(order, slow, store, lease=30, clock=clock)
    assert result.delivered
    assert result.record.state is DeliveryState.DELIVERED
    assert len(rivals) == 6
    assert store.count == 6  # once a step: each crossed one third of the lease
    assert clock.monotonic() == 90  # the renewals followed the clock and never moved it


def test_without_renewal_a_slow_delivery_loses_its_claim() -> None:
    clock = FakeClock()
    store = Renewals(clock)
    order = completed()
    rival: list[bool] = []

    def slow(o: Order) -> None:
        clock.sleep(31)
        rival.append(deliver_once(o, lambda _: None, store, lease=30).delivered)

    with pytest.raises(LeaseLost):
        deliver_once(order, slow, store, lease=30, renew=False, clock=clock)
    assert rival == [True]  # the second delivery that renewal prevents
    assert store.count == 0


def test_quick_deliveries_neither_renew_nor_move_the_clock() -> None:
    clock = FakeClock()
    store = Renewals(clock)
    for _ in range(50):
        assert deliver_once(completed(), lambda o: None, store, lease=0.5, clock=clock).delivered
    assert store.count == 0
    assert (clock.monotonic(), clock.sleeps) == (0, [])


def test_a_failed_renewal_is_tried_again_a_third_of_the_lease_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = Renewals(clock, failures=1)
    order = completed()

    def slow(o: Order) -> None:
        clock.sleep(11)
        store.wait_for_renewal()  # fails: the claim lasts until 30 s all the same
        clock.sleep(11)
        store.wait_for_renewal()  # succeeds, at 22 s: now until 52 s
        clock.sleep(9)  # past the first lease, before the next renewal is due
        with pytest.raises(DeliveryInProgress):
            deliver_once(o, lambda _: None, store, lease=30)

    with caplog.at_level(logging.WARNING, logger="foxpoll.delivery"):
        assert deliver_once(order, slow, store, lease=30, clock=clock).delivered
    assert "renewing the claim failed (StoreUnavailable)" in caplog.text
    assert store.count == 2


@pytest.mark.slow
def test_a_renewal_that_finds_the_claim_taken_over_stops_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store_time = Clock()  # the store's clock, moved apart from the delivery's
    store = MemoryDedupStore(clock=store_time)
    order = completed()
    renewed = threading.Semaphore(0)
    renew = store.renew

    def counted_renew(*args: Any) -> Any:
        try:
            return renew(*args)
        finally:
            renewed.release()

    store.renew = counted_renew  # type: ignore[method-assign]

    def stalls(o: Order) -> None:
        store_time.now += 31  # the store sees the claim expire...
        store.claim(o.id, "rival", 60)  # ...and a rival take over
        clock.sleep(11)
        assert renewed.acquire(timeout=5)
        clock.sleep(11)  # no second renewal after the first found the claim lost
        assert not renewed.acquire(timeout=0.2)

    with caplog.at_level(logging.ERROR, logger="foxpoll.delivery"), pytest.raises(LeaseLost):
        deliver_once(order, stalls, store, lease=30, clock=clock)
    assert "taken over while deliver ran" in caplog.text
    assert store.get(order.id).token == "rival"  # type: ignore[union-attr]


def slow_in_steps(clock: FakeClock, store: Renewals, steps: int) -> Any:
    """A deliver that sleeps ``steps`` times 15 s on ``clock``, waiting for a renewal
    after each, then checks that a rival still finds the claim live."""
    def deliver(o: Order) -> str:
        for _ in range(steps):
            clock.sleep(15)
            store.wait_for_renewal()
        with pytest.raises(DeliveryInProgress):
            deliver_once(o, lambda _: None, store, lease=30, renew=False)
        return "sent"
    return deliver


def test_slow_deliveries_at_once_each_keep_their_claim() -> None:
    # Each blocking delivery has a renewer of its own, whether it began before, after or
    # inside another one.
    results: dict[int, bool] = {}

    def worker(number: int) -> None:
        clock = FakeClock()
        store = Renewals(clock)
        results[number] = deliver_once(completed(), slow_in_steps(clock, store, 3 + number),
                                       store, lease=30, clock=clock).delivered

    outer_clock = FakeClock()
    outer_store = Renewals(outer_clock)

    def outer(o: Order) -> None:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        slow_in_steps(outer_clock, outer_store, 3)(o)  # still renewed after the others

    assert deliver_once(completed(), outer, outer_store, lease=30, clock=outer_clock).delivered
    assert results == dict.fromkeys(range(4), True)


def test_a_forked_child_renews_its_own_slow_delivery() -> None:
    import os

    clock = FakeClock()
    store = Renewals(clock)
    # The parent's renewer goes back to wait for the next delivery, as the child forks:
    # the child must not hand its delivery to that renewer, which does not run there.
    deliver_once(completed(), slow_in_steps(clock, store, 1), store, lease=30, clock=clock)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            ours = Renewals(clock)
            result = deliver_once(completed(), slow_in_steps(clock, ours, 2), ours, lease=30,
                                  clock=clock)
            os.write(write, f"{result.delivered} {ours.count}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    os.waitpid(child, 0)
    assert reported == "True 2"


class AsyncRenewals(AsyncMemoryDedupStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.count = 0

    async def renew(self, order_id: str, token: str, lease: float) -> Any:
        self.count += 1
        return await super().renew(order_id, token, lease)


async def test_a_slow_async_delivery_keeps_its_claim() -> None:
    clock = FakeClock()
    store = AsyncRenewals(clock)
    order = completed()
    rivals: list[BaseException] = []

    async def slow(o: Order) -> str:
        for _ in range(9):  # at least 90 s: three times the lease
            await clock.asleep(10)
            with pytest.raises(DeliveryInProgress) as rival:
                await adeliver_once(o, lambda _: None, store, lease=30, renew=False)
            rivals.append(rival.value)
        return "sent"

    result = await adeliver_once(order, slow, store, lease=30, clock=clock)
    assert result.delivered
    assert len(rivals) == 9
    assert clock.monotonic() >= 90
    assert store.count >= 3


async def test_an_async_renewal_that_breaks_is_logged_not_left_unretrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()

    class Broken(MemoryDedupStore):
        def renew(self, order_id: str, token: str, lease: float) -> Any:
            raise RuntimeError("a bug in a store of one's own")

    async def slow(o: Order) -> str:
        for _ in range(4):  # 40 s of a 30 s lease: the renewal at 10 s breaks
            await clock.asleep(10)
        return "sent"

    result = await adeliver_once(completed(), slow, Broken(clock=clock), lease=30,
                                 clock=clock)
    assert result.receipt == "sent"
    await asyncio.sleep(0)  # the renewing task's done-callback runs on the loop
    assert "renewing a claim stopped: RuntimeError" in caplog.text


async def test_quick_async_deliveries_neither_renew_nor_move_the_clock() -> None:
    clock = FakeClock()
    store = AsyncRenewals(clock)

    async def deliver(o: Order) -> None:
        pass

    for _ in range(20):
        assert (await adeliver_once(completed(), deliver, store, lease=0.5, clock=clock)
                ).delivered
    assert store.count == 0
    assert clock.sleeps == []


@pytest.mark.slow
def test_a_delivery_slower_than_its_lease_keeps_its_claim_on_sqlite(tmp_path: Any) -> None:
    # Real time, a real store: the renewer's thread, its waits and the store's own clock.
    import time

    store = SQLiteDedupStore(tmp_path / "d.db")
    order = completed()
    rival: list[BaseException] = []

    def slow(o: Order) -> None:
        time.sleep(1.0)  # past the 0.4 s lease: only the renewals keep the claim
        with pytest.raises(DeliveryInProgress) as taken:
            deliver_once(o, lambda _: None, store, lease=0.4)
        rival.append(taken.value)

    assert deliver_once(order, slow, store, lease=0.4).delivered
    assert len(rival) == 1
    assert store.get(order.id).state is DeliveryState.DELIVERED  # type: ignore[union-attr]
    store.close()


@pytest.mark.slow
async def test_an_async_delivery_slower_than_its_lease_keeps_its_claim_on_sqlite(
    tmp_path: Any,
) -> None:
    store = AsyncSQLiteDedupStore(tmp_path / "d.db")
    order = completed()
    rival: list[BaseException] = []

    async def slow(o: Order) -> None:
        await asyncio.sleep(1.0)
        with pytest.raises(DeliveryInProgress) as taken:
            await adeliver_once(o, lambda _: None, store, lease=0.4)
        rival.append(taken.value)

    assert (await adeliver_once(order, slow, store, lease=0.4)).delivered
    assert len(rival) == 1
    await store.aclose()
