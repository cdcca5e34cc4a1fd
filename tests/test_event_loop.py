"""Nothing an async client does blocks its event loop, not even a frozen recovery queue.

A task ticks every 10 ms while the client pays and waits with a queue that cannot answer:
a SQLite file another connection holds locked, or PostgreSQL behind a network that froze.
No tick may come more than 100 ms late. The queue's guarantee holds all the same: a
payment waits for its watch, and a watch that cannot be written fails the payment before
anything is paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from foxpoll import StoreUnavailable
from foxpoll.recovery import JobState, PostgresRecoveryQueue, SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, FreezingProxy, OrderScript

from .services import POSTGRES_URL, drop_table, require

pytestmark = pytest.mark.slow

STEAM = [{"itemId": "product_steam_10"}]
PAY = ("POST", "/api/orders/*/pay")
TICK = 0.010
LATE = 0.100


class Ticks:
    """Ticks every 10 ms on the event loop, and keeps how late the latest tick came."""

    def __init__(self) -> None:
        self.count = 0
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK)
            self.worst = max(self.worst, time.monotonic() - before - TICK)
            self.count += 1


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Ticks]:
    ticks = Ticks()
    task = asyncio.create_task(ticks.run())
    try:
        yield ticks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def new_order(sim: FakeFoxReload, script: OrderScript) -> str:
    sim.script_next(script)
    with sim.client() as plain:
        return plain.orders.create(items=STEAM).id


async def test_a_locked_sqlite_queue_holds_the_payment_not_the_event_loop(
    tmp_path: Path, sim: FakeFoxReload
) -> None:
    path = tmp_path / "queue.db"
    order_id = new_order(sim, OrderScript.complete(after=5))
    with SQLiteRecoveryQueue(path, clock=sim.clock) as queue:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process's write transaction
        paid_while_locked: list[int] = []
        loop = asyncio.get_running_loop()
        loop.call_later(0.4, lambda: paid_while_locked.append(sim.count(*PAY)))
        loop.call_later(0.5, locker.execute, "COMMIT")
        try:
            async with sim.async_client(recovery_queue=queue) as client, ticking() as ticks:
                started = time.monotonic()
                await client.orders.pay(order_id)
                blocked = time.monotonic() - started
                order = await client.wait_for_completion(order_id)
        finally:
            locker.close()
        job = queue.get(order_id)
    assert blocked >= 0.5  # the payment waited for its watch...
    assert paid_while_locked == [0]  # ...and was not sent before it was written
    assert sim.count(*PAY) == 1
    assert order.codes
    assert job is not None
    assert job.state is JobState.QUEUED
    assert job.reason == "delivery"
    assert ticks.count >= 0.5 / TICK / 2
    assert ticks.worst <= LATE, f"a tick came {ticks.worst * 1000:.0f} ms late"


def _via(url: str, proxy: FreezingProxy) -> str:
    parts = urlparse(url)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()


@pytest.mark.service
async def test_a_frozen_postgres_queue_fails_the_payment_not_the_event_loop(
    sim: FakeFoxReload,
) -> None:
    target = urlparse(POSTGRES_URL)
    host, port = target.hostname or "127.0.0.1", target.port or 5432
    require("PostgreSQL", host, port)
    table = f"foxpoll_loop_{uuid.uuid4().hex[:8]}"
    unpaid = new_order(sim, OrderScript.complete(after=5))
    paid = new_order(sim, OrderScript.complete(after=5))
    with sim.client() as plain:
        plain.orders.pay(paid)  # paid elsewhere; this client only waits for it
    try:
        with FreezingProxy((host, port)) as proxy, PostgresRecoveryQueue(
                _via(POSTGRES_URL, proxy), table=table, statement_timeout=0.5,
                connect_timeout=1.0) as queue:
            queue.create_schema()
            proxy.freeze()
            async with sim.async_client(recovery_queue=queue) as client, ticking() as ticks:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await client.orders.pay(unpaid)
                failed_within = time.monotonic() - started
                # The watch at the wait's start and the settle at its end fail and are
                # logged; the wait itself goes on and returns the order.
                order = await client.wait_for_completion(paid)
            proxy.thaw()
    finally:
        drop_table(table)
    assert sim.count(*PAY) == 1  # only the other caller's: nothing was paid without a watch
    assert failed_within <= 0.5 + 2.0
    assert order.codes
    assert ticks.count >= failed_within / TICK / 2
    assert ticks.worst <= LATE, f"a tick came {ticks.worst * 1000:.0f} ms late"
