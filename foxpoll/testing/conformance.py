"""``DedupStoreConformance``: the pytest suite every dedup store must pass.

Subclass it in your tests and provide a ``make_store`` fixture returning your store (a
:class:`~foxpoll.dedup.DedupStore` or an :class:`~foxpoll.dedup.AsyncDedupStore`, created
but not yet used: async stores are driven on an event loop this suite owns)::

    from foxpoll.testing import DedupStoreConformance

    class TestMyStore(DedupStoreConformance):
        @pytest.fixture
        def make_store(self):
            return MyStore(dsn)

Order ids are unique per test, so a persistent backend needs no clean-up between tests.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from foxpoll.dedup.base import AsyncDedupStore, DedupStore, DeliveryRecord, DeliveryState
from foxpoll.delivery import DeliveryResult, adeliver_once, deliver_once
from foxpoll.errors import DeliveryInProgress, LeaseLost
from foxpoll.models import Order, OrderItem, OrderStatus

__all__ = ["DedupStoreConformance"]

T = TypeVar("T")
AnyStore = DedupStore | AsyncDedupStore

#: How far the store's clock may be from this machine's in the clock test.
CLOCK_TOLERANCE = 5.0
CONTENDERS = 16


class DedupStoreConformance:
    """The contract of a dedup store, as tests. Subclass and provide ``make_store``."""

    @pytest.fixture
    def make_store(self) -> AnyStore:
        raise NotImplementedError("provide a make_store fixture returning your store")

    @pytest.fixture
    def store(self, make_store: AnyStore) -> Iterator[AnyStore]:
        self._loop = asyncio.new_event_loop()
        try:
            yield make_store
        finally:
            try:
                if isinstance(make_store, AsyncDedupStore):
                    self._loop.run_until_complete(make_store.aclose())
                else:
                    make_store.close()
            finally:
                self._loop.close()

    # -- helpers ---------------------------------------------------------------------

    def run(self, result: Awaitable[T] | T) -> T:
        """The value of a primitive's result, awaiting it on this test's loop if async."""
        if inspect.isawaitable(result):
            return self._loop.run_until_complete(_resolve(result))
        return result

    @staticmethod
    def order_id() -> str:
        return f"conformance-{uuid.uuid4()}"

    @staticmethod
    def token() -> str:
        return uuid.uuid4().hex

    @staticmethod
    def completed_order(order_id: str) -> Order:
        item = OrderItem(item_id="product_1", quantity=1, external_data=("CODE-1", "CODE-2"))
        return Order(id=order_id, status=OrderStatus.COMPLETED, items=(item,))

    # -- claiming --------------------------------------------------------------------

    def test_first_claim_acquires(self, store: AnyStore) -> None:
        order_id, token = self.order_id(), self.token()
        result = self.run(store.claim(order_id, token, 60))
        assert result.acquired
        assert result.record.order_id == order_id
        assert result.record.state is DeliveryState.CLAIMED
        assert result.record.token == token
        assert result.record.attempts == 1

    def test_a_live_claim_blocks_other_workers(self, store: AnyStore) -> None:
        order_id, first = self.order_id(), self.token()
        self.run(store.claim(order_id, first, 60))
        second = self.run(store.claim(order_id, self.token(), 60))
        assert not second.acquired
        assert second.record.token == first
        assert second.record.lease_until is not None
        assert second.record.lease_until > second.now

    def test_an_expired_claim_is_taken_over_and_the_old_token_fenced(
        self, store: AnyStore
    ) -> None:
        order_id, old, new = self.order_id(), self.token(), self.token()
        self.run(store.claim(order_id, old, 0))  # expires at once
        takeover = self.run(store.claim(order_id, new, 60))
        assert takeover.acquired
        assert takeover.record.token == new
        assert takeover.record.attempts == 2
        writes: list[Callable[[], Any]] = [
            lambda: store.complete(order_id, old, "hash", None),
            lambda: store.release(order_id, old),
            lambda: store.renew(order_id, old, 60),
        ]
        for write in writes:
            with pytest.raises(LeaseLost):
                self.run(write())
        record = self.run(store.get(order_id))
        assert record is not None
        assert (record.state, record.token) == (DeliveryState.CLAIMED, new)

    def test_release_makes_the_order_claimable_again(self, store: AnyStore) -> None:
        order_id, token = self.order_id(), self.token()
        self.run(store.claim(order_id, token, 60))
        released = self.run(store.release(order_id, token))
        assert released.state is DeliveryState.RELEASED
        again = self.run(store.claim(order_id, self.token(), 60))
        assert again.acquired
        assert again.record.attempts == 2
        with pytest.raises(LeaseLost):
            self.run(store.release(order_id, token))  # released once, not twice

    def test_complete_is_terminal_and_idempotent(self, store: AnyStore) -> None:
        order_id, token = self.order_id(), self.token()
        self.run(store.claim(order_id, token, 60))
        done = self.run(store.complete(order_id, token, "hash-1", "receipt-1"))
        assert done.state is DeliveryState.DELIVERED
        assert (done.payload_hash, done.receipt) == ("hash-1", "receipt-1")
        assert done.delivered_at is not None
        again = self.run(store.complete(order_id, token, "hash-1", "receipt-1"))
        assert again.state is DeliveryState.DELIVERED
        assert again.delivered_at == done.delivered_at
        later = self.run(store.claim(order_id, self.token(), 60))
        assert not later.acquired
        assert later.record.state is DeliveryState.DELIVERED
        with pytest.raises(LeaseLost):
            self.run(store.complete(order_id, self.token(), "hash-2", None))

    def test_claim_and_complete_return_what_the_store_holds(self, store: AnyStore) -> None:
        # A store may build these records from a short reply: they must still be exact.
        order_id, token = self.order_id(), self.token()
        claimed = self.run(store.claim(order_id, token, 60)).record
        assert self.run(store.get(order_id)) == claimed
        done = self.run(store.complete(order_id, token, "hash-1", None))
        assert self.run(store.get(order_id)) == done
        again_id, first = self.order_id(), self.token()
        self.run(store.claim(again_id, first, 60))
        self.run(store.release(again_id, first))
        retaken = self.run(store.claim(again_id, self.token(), 60)).record
        assert self.run(store.get(again_id)) == retaken
        assert retaken.attempts == 2

    def test_a_delivered_record_survives_an_expired_lease(self, store: AnyStore) -> None:
        order_id, token = self.order_id(), self.token()
        self.run(store.claim(order_id, token, 0))
        self.run(store.complete(order_id, token, "hash", None))  # nobody took over: fine
        assert not self.run(store.claim(order_id, self.token(), 60)).acquired

    def test_renew_extends_a_live_claim(self, store: AnyStore) -> None:
        order_id, token = self.order_id(), self.token()
        first = self.run(store.claim(order_id, token, 10))
        renewed = self.run(store.renew(order_id, token, 600))
        assert renewed.lease_until is not None
        assert first.record.lease_until is not None
        assert renewed.lease_until >= first.record.lease_until + 500

    def test_writes_without_a_claim_raise_lease_lost(self, store: AnyStore) -> None:
        order_id = self.order_id()
        with pytest.raises(LeaseLost):
            self.run(store.complete(order_id, self.token(), "hash", None))
        with pytest.raises(LeaseLost):
            self.run(store.release(order_id, self.token()))
        with pytest.raises(LeaseLost):
            self.run(store.renew(order_id, self.token(), 5))
        assert self.run(store.get(order_id)) is None

    def test_get_and_list(self, store: AnyStore) -> None:
        claimed, released, delivered = self.order_id(), self.order_id(), self.order_id()
        tokens = {o: self.token() for o in (claimed, released, delivered)}
        for order_id, token in tokens.items():
            self.run(store.claim(order_id, token, 60))
        self.run(store.release(released, tokens[released]))
        self.run(store.complete(delivered, tokens[delivered], "hash", None))
        for order_id, state in ((claimed, DeliveryState.CLAIMED),
                                (released, DeliveryState.RELEASED),
                                (delivered, DeliveryState.DELIVERED)):
            record = self.run(store.get(order_id))
            assert record is not None
            assert record.state is state
            listed = self._listed(store, state)
            assert order_id in listed
            others = {claimed, released, delivered} - {order_id}
            assert not others & set(listed)

    def _listed(self, store: AnyStore, state: DeliveryState) -> list[str]:
        records: list[DeliveryRecord] = self.run(store.list(state, limit=10_000))
        assert all(r.state is state for r in records)
        times = [r.updated_at or 0 for r in records]
        assert times == sorted(times)  # least recently changed first
        return [r.order_id for r in records]

    def test_list_respects_the_limit(self, store: AnyStore) -> None:
        for _ in range(3):
            self.run(store.claim(self.order_id(), self.token(), 60))
        assert len(self.run(store.list(DeliveryState.CLAIMED, limit=2))) == 2

    def test_the_store_clock_is_sane_and_leases_add_up(self, store: AnyStore) -> None:
        lease = 42.5
        result = self.run(store.claim(self.order_id(), self.token(), lease))
        assert abs(result.now - time.time()) < CLOCK_TOLERANCE
        assert result.record.lease_until is not None
        assert result.record.lease_until == pytest.approx(result.now + lease, abs=0.01)
        assert result.record.created_at == pytest.approx(result.now, abs=0.01)

    def test_bad_arguments_are_rejected(self, store: AnyStore) -> None:
        for order_id, token, lease in (("", "t", 1), ("o", "", 1), ("o", "t", -1),
                                       ("x" * 300, "t", 1), ("a\nb", "t", 1)):
            with pytest.raises(ValueError, match=r"must|too long"):
                self.run(store.claim(order_id, token, lease))

    # -- concurrency -------------------------------------------------------------------

    def test_one_claim_wins_under_contention(self, store: AnyStore) -> None:
        for _ in range(5):
            order_id = self.order_id()
            winners = self._contend(store, self._claimer(order_id))
            assert sum(1 for r in winners if r.acquired) == 1

    def _claimer(self, order_id: str) -> Callable[[AnyStore], Any]:
        return lambda s: s.claim(order_id, self.token(), 60)

    def test_deliver_once_delivers_once_under_contention(self, store: AnyStore) -> None:
        order = self.completed_order(self.order_id())
        calls: list[str] = []
        lock = threading.Lock()

        def deliver(o: Order) -> str:
            with lock:
                calls.append(o.id)
            return "sent"

        results = self._contend(store, lambda s: _deliver(s, order, deliver))
        delivered = [r for r in results if isinstance(r, DeliveryResult) and r.delivered]
        assert calls == [order.id]
        assert len(delivered) == 1
        assert all(isinstance(r, (DeliveryResult, DeliveryInProgress)) for r in results)
        record = self.run(store.get(order.id))
        assert record is not None
        assert record.state is DeliveryState.DELIVERED
        assert record.receipt == "sent"

    def test_a_failed_delivery_releases_and_a_retry_delivers(self, store: AnyStore) -> None:
        order = self.completed_order(self.order_id())

        def broken(o: Order) -> None:
            raise ConnectionError("mail server down")

        with pytest.raises(ConnectionError):
            self.run(_deliver(store, order, broken))
        record = self.run(store.get(order.id))
        assert record is not None
        assert record.state is DeliveryState.RELEASED
        result = self.run(_deliver(store, order, lambda o: "ok"))
        assert result.delivered
        assert result.record.attempts == 2
        assert not self.run(_deliver(store, order, lambda o: "again")).delivered

    def _contend(self, store: AnyStore, attempt: Callable[[AnyStore], Any]) -> list[Any]:
        """Run ``attempt`` from CONTENDERS threads (sync store) or tasks (async store) at
        once; each result is a value or the exception raised."""
        if isinstance(store, AsyncDedupStore):
            async def all_at_once() -> list[Any]:
                return list(await asyncio.gather(
                    *(_resolve(attempt(store)) for _ in range(CONTENDERS)),
                    return_exceptions=True,
                ))

            return self._loop.run_until_complete(all_at_once())
        barrier = threading.Barrier(CONTENDERS)

        def one() -> Any:
            barrier.wait()
            try:
                return attempt(store)
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(CONTENDERS) as pool:
            return list(pool.map(lambda _: one(), range(CONTENDERS)))


async def _resolve(result: Awaitable[T] | T) -> T:
    if inspect.isawaitable(result):
        return await result
    return result


def _deliver(store: AnyStore, order: Order, deliver: Callable[[Order], Any]) -> Any:
    if isinstance(store, AsyncDedupStore):
        return adeliver_once(order, deliver, store)
    return deliver_once(order, deliver, store)
