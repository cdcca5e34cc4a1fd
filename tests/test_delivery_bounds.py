"""A delivery that happened is recorded if the store comes back within the lease, which
closes the window in which codes go out twice. (A slow delivery keeping its claim is
tested in test_delivery.py.)"""

from __future__ import annotations

import threading
import uuid
from typing import Any
from urllib.parse import urlparse

import pytest

from foxpoll import (
    Order,
    OrderStatus,
    StoreUnavailable,
    deliver_once,
)
from foxpoll.dedup import (
    DeliveryState,
    MemoryDedupStore,
    PostgresDedupStore,
)
from foxpoll.models import OrderItem
from foxpoll.testing import FakeClock, FreezingProxy

from .services import POSTGRES_URL, drop_table, require


def completed() -> Order:
    return Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", 1, external_data=("CODE-1",)),))


class FlakyComplete(MemoryDedupStore):
    """A store whose complete() fails ``failures`` times first, as a store whose network
    hiccups right after the codes went out."""

    def __init__(self, failures: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures, self.attempts = failures, 0

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreUnavailable("Redis is unavailable: ConnectionError")
        return super().complete(*args, **kwargs)


def test_a_failed_complete_is_retried_with_backoff_within_the_lease() -> None:
    clock = FakeClock()
    store = FlakyComplete(3, clock=clock)
    sent: list[str] = []
    result = deliver_once(completed(), lambda o: sent.append(o.id), store, lease=60,
                          clock=clock)
    assert result.delivered
    assert result.record.state is DeliveryState.DELIVERED
    assert store.attempts == 4
    assert len(sent) == 1
    assert clock.monotonic() == pytest.approx(0.1 + 0.2 + 0.4)  # virtual: no real sleep


def test_a_store_down_for_the_whole_lease_gives_up_before_it_ends() -> None:
    clock = FakeClock()
    store = FlakyComplete(10_000, clock=clock)
    with pytest.raises(StoreUnavailable):
        deliver_once(completed(), lambda o: None, store, lease=10, clock=clock)
    assert clock.monotonic() < 10  # it stopped retrying before the claim could expire
    assert store.attempts > 5


@pytest.mark.slow
def test_a_network_stall_while_recording_is_outlasted_on_real_postgres() -> None:
    host, port = urlparse(POSTGRES_URL).hostname or "", urlparse(POSTGRES_URL).port or 5432
    require("PostgreSQL", host, port)
    table = f"foxpoll_stall_{uuid.uuid4().hex[:8]}"
    with PostgresDedupStore(POSTGRES_URL, table=table) as direct:
        direct.create_schema()
    try:
        _deliver_through_a_stall(host, port, table)
    finally:
        drop_table(table)


def _deliver_through_a_stall(host: str, port: int, table: str) -> None:
    with FreezingProxy((host, port)) as proxy:
        dsn = urlparse(POSTGRES_URL)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
        with PostgresDedupStore(dsn, table=table, statement_timeout=0.5) as store:
            order = completed()

            def deliver(o: Order) -> None:
                proxy.freeze()  # the network stalls just as the codes went out...
                threading.Timer(1.5, proxy.thaw).start()  # ...for a second and a half

            result = deliver_once(order, deliver, store, lease=30)
            assert result.delivered
            record = store.get(order.id)
            assert record is not None
            assert record.state is DeliveryState.DELIVERED


@pytest.mark.slow
def test_a_network_stall_while_recording_is_outlasted_on_real_redis() -> None:
    # The store's client does not retry a command: deliver_once retries the completion.
    from foxpoll.dedup import RedisDedupStore

    from .services import REDIS_URL, delete_keys

    target = urlparse(REDIS_URL)
    require("Redis", target.hostname or "", target.port or 6379)
    prefix = f"foxpoll-stall-{uuid.uuid4().hex[:8]}:"
    try:
        with FreezingProxy((target.hostname or "", target.port or 6379)) as proxy, \
                RedisDedupStore(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=prefix,
                                statement_timeout=0.5) as store:
            thawed: list[threading.Timer] = []

            def deliver(o: Order) -> None:
                proxy.freeze()  # the network stalls as the codes go out, for 1.5 s
                thawed.append(threading.Timer(1.5, proxy.thaw))
                thawed[0].start()

            order = completed()
            assert deliver_once(order, deliver, store, lease=30).delivered
            thawed[0].join()
            record = store.get(order.id)
            assert record is not None
            assert record.state is DeliveryState.DELIVERED
    finally:
        delete_keys(prefix)

