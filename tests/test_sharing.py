"""What docs/sharing.md promises: which objects many threads or tasks may share."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from foxpoll import AsyncFoxReload, FoxReload
from foxpoll.dedup import AsyncSQLiteDedupStore, SQLiteDedupStore
from foxpoll.delivery import adeliver_once, deliver_once
from foxpoll.errors import DeliveryInProgress
from foxpoll.models import Order
from foxpoll.ratelimit import RateLimit
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript

THREADS = 8
ITEMS = [{"itemId": "product_steam_10"}]


def buy(client: FoxReload, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        order = client.orders.create(items=ITEMS)
        client.orders.pay(order.id)
        ids.append(order.id)
    return ids


def test_one_client_shared_by_threads_waits_for_every_order() -> None:
    sim = FakeFoxReload(default_script=OrderScript.complete(after=30))
    budget = RateLimit(600, clock=sim.clock)
    with sim.client(rate_limit=budget) as client:
        ids = buy(client, THREADS)
        barrier = threading.Barrier(THREADS)

        def wait(order_id: str) -> Order:
            barrier.wait()  # every thread polls through the client at once
            return client.wait_for_completion(order_id, timeout=600)

        with ThreadPoolExecutor(THREADS) as pool:
            orders = list(pool.map(wait, ids))
    assert [o.id for o in orders] == ids
    assert all(o.status == "completed" and o.codes for o in orders)


def test_one_sqlite_store_shared_by_threads_delivers_each_order_once(tmp_path: Path) -> None:
    sim = FakeFoxReload(default_script=OrderScript.complete(after=0))
    store = SQLiteDedupStore(tmp_path / "dedup.db", clock=sim.clock)
    with sim.client() as client:
        orders = [client.wait_for_completion(i, timeout=60) for i in buy(client, 4)]
    sent: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def send(order: Order) -> None:
        with lock:
            sent[order.id] += 1

    def deliver(order: Order) -> bool:
        try:
            return deliver_once(order, send, store, clock=sim.clock).delivered
        except DeliveryInProgress:  # another thread holds the claim right now
            return False

    def deliver_all(_: int) -> int:
        barrier.wait()  # every thread races for every order
        return sum(deliver(o) for o in orders)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            delivered = sum(pool.map(deliver_all, range(THREADS)))
    finally:
        store.close()
    assert delivered == len(orders)
    assert sent == Counter({o.id: 1 for o in orders})


async def test_one_async_client_shared_by_tasks_waits_for_every_order() -> None:
    sim = FakeFoxReload(default_script=OrderScript.complete(after=30))
    async with sim.async_client(rate_limit=RateLimit(600, clock=sim.clock)) as client:
        ids = []
        for _ in range(20):
            order = await client.orders.create(items=ITEMS)
            await client.orders.pay(order.id)
            ids.append(order.id)
        orders = await asyncio.gather(*(client.wait_for_completion(i, timeout=600) for i in ids))
    assert [o.id for o in orders] == ids
    assert all(o.status == "completed" and o.codes for o in orders)


async def test_one_async_sqlite_store_shared_by_tasks_delivers_each_order_once(
        tmp_path: Path) -> None:
    sim = FakeFoxReload(default_script=OrderScript.complete(after=0))
    store = AsyncSQLiteDedupStore(tmp_path / "dedup.db", clock=sim.clock)
    async with sim.async_client() as client:
        order = await client.orders.create(items=ITEMS)
        await client.orders.pay(order.id)
        order = await client.wait_for_completion(order.id, timeout=60)
    sent: list[str] = []

    async def deliver() -> bool:
        try:
            result = await adeliver_once(order, lambda o: sent.append(o.id), store,
                                         clock=sim.clock)
        except DeliveryInProgress:  # another task holds the claim right now
            return False
        return result.delivered

    try:
        delivered = await asyncio.gather(*(deliver() for _ in range(THREADS)))
    finally:
        await store.aclose()
    assert sum(delivered) == 1
    assert sent == [order.id]


def test_an_async_client_is_built_inside_each_event_loop() -> None:
    """The rule for many loops: one AsyncFoxReload per loop, each closed in its loop."""
    sim = FakeFoxReload(default_script=OrderScript.complete(after=5))

    async def one_loop() -> str:
        client: AsyncFoxReload
        async with sim.async_client() as client:
            order = await client.orders.create(items=ITEMS)
            await client.orders.pay(order.id)
            return (await client.wait_for_completion(order.id, timeout=60)).status

    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda _: asyncio.run(one_loop()), range(4)))
    assert statuses == ["completed"] * 4


def test_fake_clock_shared_by_threads_loses_no_sleep() -> None:
    clock = FakeClock()

    def sleep_many(_: int) -> None:
        for _ in range(1000):
            clock.sleep(0.5)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(sleep_many, range(THREADS)))
    assert clock.monotonic() == THREADS * 1000 * 0.5
    assert len(clock.sleeps) == THREADS * 1000
