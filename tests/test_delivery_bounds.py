"""A delivery that happened is recorded if the store comes back within the lease, and a
slow delivery keeps its claim: both close the window in which codes go out twice."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import pytest

from foxpoll import (
    DeliveryInProgress,
    LeaseLost,
    Order,
    OrderStatus,
    StoreUnavailable,
    adeliver_once,
    deliver_once,
)
from foxpoll.dedup import (
    AsyncSQLiteDedupStore,
    DeliveryState,
    MemoryDedupStore,
    PostgresDedupStore,
    SQLiteDedupStore,
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
    store = FlakyComplete(3, clock=clock.time)
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
    store = FlakyComplete(10_000, clock=clock.time)
    with pytest.raises(StoreUnavailable):
        deliver_once(completed(), lambda o: None, store, lease=10, clock=clock)
    assert clock.monotonic() < 10  # it stopped retrying before the claim could expire
    assert store.attempts > 5


def test_the_claim_is_renewed_while_a_slow_delivery_runs(tmp_path: Any) -> None:
    store = SQLiteDedupStore(tmp_path / "d.db")
    order = completed()
    rival: list[BaseException | None] = []

    def slow(o: Order) -> None:
        time.sleep(1.0)  # past the 0.4 s lease: only the renewals keep the claim
        try:
            deliver_once(o, lambda _: None, store, lease=0.4)
            rival.append(None)
        except DeliveryInProgress as exc:
            rival.append(exc)

    assert deliver_once(order, slow, store, lease=0.4).delivered
    assert isinstance(rival[0], DeliveryInProgress)
    assert store.get(order.id).state is DeliveryState.DELIVERED  # type: ignore[union-attr]


def test_without_renewal_a_slow_delivery_loses_its_claim(tmp_path: Any) -> None:
    store = SQLiteDedupStore(tmp_path / "d.db")
    order = completed()
    rival: list[bool] = []

    def slow(o: Order) -> None:
        time.sleep(1.0)
        rival.append(deliver_once(o, lambda _: None, store, lease=0.4).delivered)

    with pytest.raises(LeaseLost):
        deliver_once(order, slow, store, lease=0.4, renew=False)
    assert rival == [True]  # the second delivery that renewal prevents


async def test_the_claim_is_renewed_while_an_async_delivery_runs(tmp_path: Any) -> None:
    import asyncio

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


def test_a_later_slow_delivery_is_renewed_after_an_earlier_one(tmp_path: Any) -> None:
    # Deliveries share one alarm, armed at the earliest first renewal among them: the second
    # delivery's renewal is due after the first's, so only the re-arming after the first
    # one's starts it.
    store = SQLiteDedupStore(tmp_path / "d.db")
    first, second = completed(), completed()
    rivals: dict[str, BaseException | None] = {}

    def slow(sleep: float) -> Any:
        def deliver(o: Order) -> None:
            time.sleep(sleep)  # past its lease: only renewals keep the claim
            try:
                deliver_once(o, lambda _: None, store, lease=10)
                rivals[o.id] = None
            except DeliveryInProgress as exc:
                rivals[o.id] = exc
        return deliver

    thread = threading.Thread(target=deliver_once, args=(first, slow(0.8), store),
                              kwargs={"lease": 0.3})
    thread.start()
    time.sleep(0.05)
    assert deliver_once(second, slow(1.3), store, lease=0.9).delivered
    thread.join()
    assert isinstance(rivals[first.id], DeliveryInProgress)
    assert isinstance(rivals[second.id], DeliveryInProgress)


def test_quick_deliveries_arm_no_alarm_each(tmp_path: Any) -> None:
    # One alarm serves every delivery's first renewal; one per delivery would put a heap
    # entry and two lock round trips on each.
    from foxpoll._deadlines import WATCHDOG

    store = MemoryDedupStore()
    deliver_once(completed(), lambda _: None, store)
    before = WATCHDOG.pending()
    for _ in range(200):
        deliver_once(completed(), lambda _: None, store)
    assert WATCHDOG.pending() - before <= 1


def test_an_overtaken_renewal_alarm_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A delivery whose first renewal is due before the armed alarm arms an earlier one,
    # which re-arms for the rest when it fires. The alarm it overtook must then do
    # nothing: re-arming too, it would start one more alarm chain each time.
    from foxpoll import delivery

    fired: list[Any] = []

    class Watchdog:
        def arm(self, seconds: float, action: Any) -> None:
            fired.append(action)

    monkeypatch.setattr(delivery, "WATCHDOG", Watchdog())
    renewals = delivery._Renewals()
    started: list[Any] = []

    class Renewer:
        def __init__(self, due: float) -> None:
            self.due = due

        def start(self) -> None:
            started.append(self)

    now = time.monotonic()
    slow, quick = Renewer(now + 600), Renewer(now - 1)  # quick is due already
    renewals.add(slow)  # type: ignore[arg-type]
    renewals.add(quick)  # type: ignore[arg-type]
    assert len(fired) == 2
    fired[1]()  # the earlier alarm: starts quick's renewals, re-arms for slow
    assert started == [quick]
    assert len(fired) == 3
    fired[0]()  # the overtaken one
    assert started == [quick]
    assert len(fired) == 3
    fired[2]()  # the re-armed one, early: nothing due yet, so it arms again
    assert started == [quick]
    assert len(fired) == 4
