"""In-flight slots per client: requests queue in foxpoll, by priority, not in httpx's pool."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from foxpoll import AsyncFoxReload, FoxReload
from foxpoll._gate import AsyncGate, Gate
from foxpoll.ratelimit import Priority
from foxpoll.testing import FakeFoxReload

ORDER = {"id": "o1", "status": "completed", "items": []}


async def test_waiters_go_by_priority_then_in_order() -> None:
    gate = AsyncGate(1)
    await gate.acquire(Priority.POLL)
    went: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await gate.acquire(priority)
        went.append(name)
        gate.release()

    tasks = [asyncio.ensure_future(wait(n, p)) for n, p in
             [("poll-1", Priority.POLL), ("fresh", Priority.FRESH), ("poll-2", Priority.POLL),
              ("buy", Priority.BUY)]]
    await asyncio.sleep(0)
    gate.release()
    await asyncio.gather(*tasks)
    assert went == ["buy", "fresh", "poll-1", "poll-2"]
    assert gate.busy == 0


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    gate = AsyncGate(1)
    await gate.acquire(0)
    waiter = asyncio.ensure_future(gate.acquire(0))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0)
    gate.release()
    assert gate.busy == 0
    await asyncio.wait_for(gate.acquire(0), 1)  # the slot is free again
    assert gate.busy == 1


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_the_size_is_a_whole_positive_number(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        AsyncGate(bad)
    with pytest.raises(ValueError, match="max_in_flight"):
        Gate(bad)


def test_threads_go_by_priority() -> None:
    gate = Gate(1)
    gate.acquire(Priority.POLL)
    went: list[str] = []

    def wait(name: str, priority: int) -> None:
        gate.acquire(priority)
        went.append(name)
        gate.release()

    threads = [threading.Thread(target=wait, args=(n, p)) for n, p in
               [("poll", Priority.POLL), ("buy", Priority.BUY), ("fresh", Priority.FRESH)]]
    for thread in threads:
        thread.start()
    while gate.waiting < 3:
        time.sleep(0.001)
    gate.release()
    for thread in threads:
        thread.join()
    assert went == ["buy", "fresh", "poll"]


class HeldTransport(httpx.AsyncBaseTransport):
    """Answers only when the test lets it; counts requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.seen: list[str] = []
        self.go = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.seen.append(request.method)
        await self.go.wait()
        self.in_flight -= 1
        if request.method == "GET":  # about the order asked for, as the id check wants
            asked = request.url.path.rsplit("/", 1)[-1]
            return httpx.Response(200, json={**ORDER, "id": asked})
        return httpx.Response(200, json={**ORDER, "status": "active"})


@pytest.mark.slow
async def test_a_thousand_tasks_wait_in_foxpoll_not_in_the_pool_and_buys_go_first() -> None:
    held = HeldTransport()
    async with AsyncFoxReload("key", base_url="https://api.test", transport=held,
                              max_in_flight=10) as client:
        reads = [asyncio.ensure_future(client.orders.get(f"o{i}")) for i in range(1000)]
        await asyncio.sleep(0.01)
        buy = asyncio.ensure_future(client.orders.create(items=[{"itemId": "p"}]))
        await asyncio.sleep(0.01)
        assert held.in_flight == 10  # ten sent; 990 reads and the buy wait in foxpoll
        held.go.set()
        await asyncio.gather(buy, *reads)
    assert held.most == 10
    assert held.seen.index("POST") == 10  # the first request sent once a slot was free


@pytest.mark.slow
def test_the_sync_client_bounds_its_threads_too() -> None:
    sim = FakeFoxReload()
    most = 0
    in_flight = 0
    lock = threading.Lock()
    release = threading.Event()

    class Held(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal most, in_flight
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            release.wait(5)
            with lock:
                in_flight -= 1
            return sim.handle(request)

    with FoxReload(sim.api_key, base_url=sim.base_url, transport=Held(),
                   max_in_flight=3) as client:
        threads = [threading.Thread(target=client.categories.list) for _ in range(12)]
        for thread in threads:
            thread.start()
        while in_flight < 3:
            time.sleep(0.001)
        time.sleep(0.05)
        assert in_flight == 3
        release.set()
        for thread in threads:
            thread.join()
    assert most == 3
