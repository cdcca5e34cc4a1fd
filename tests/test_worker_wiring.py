"""What ends a recovery worker: its wiring refused before any job is taken, a callback
that still cannot take an order (on procrastinate too), and ``stop`` in a backlog."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, Order, SystemClock
from foxpoll.dedup import MemoryDedupStore
from foxpoll.recovery import JobState, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript, SimulatorServer

from .services import own_database

STEAM = [{"itemId": "product_steam_10"}]


def paid(sim: FakeFoxReload, client: FoxReload) -> str:
    sim.script_next(OrderScript.complete(after=0))
    order = client.orders.create(items=STEAM)
    client.orders.pay(order.id)
    return order.id


async def send_later(order: Order) -> None:
    raise AssertionError("never awaited")


class SendsLater:
    """A callback whose ``__call__`` is async: made for an async worker."""

    async def __call__(self, order: Order) -> None:
        raise AssertionError("never awaited")


class ReturnsACoroutine:
    """Blocking on its face, but what it returns is a coroutine: no signature tells."""

    def __call__(self, order: Order) -> Any:
        return send_later(order)


@pytest.mark.parametrize(("callback", "message"), [
    (lambda: None, "on_completed cannot be called with an order: too many positional"),
    (lambda order, inbox: None, "on_completed cannot be called with an order: missing"),
    (send_later, "on_completed is async"),
    (functools.partial(send_later), "on_completed is async"),
    (SendsLater(), "on_completed is async"),
    ("send_codes", "on_completed must be callable, not str"),
])
def test_a_callback_that_cannot_take_an_order_is_refused_before_any_job_is_taken(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock, callback: Any, message: str,
) -> None:
    with sim.client() as client, SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        order_id = paid(sim, client)
        queue.enqueue(order_id)
        with pytest.raises(TypeError, match=message):
            RecoveryWorker(client, queue, MemoryDedupStore(clock=clock), on_completed=callback)
        with pytest.raises(TypeError, match=message.replace("on_completed", "on_terminal")):
            RecoveryWorker(client, queue, MemoryDedupStore(clock=clock), on_completed=print,
                           on_terminal=callback)
        job = queue.get(order_id)
        assert job is not None
        assert (job.state, job.attempts) == (JobState.QUEUED, 0)  # never taken


def test_callbacks_that_can_take_an_order_are_accepted(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock,
) -> None:
    def with_defaults(order: Order, inbox: str = "codes@example.com") -> None: ...

    inbox: list[Order] = []
    with sim.client() as client, SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        for callback in (print, inbox.append, with_defaults, lambda *args: None,
                         ReturnsACoroutine()):  # the last one is caught when called
            RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=callback,
                           on_terminal=callback)


def test_run_ends_within_one_job_of_stop_in_a_backlog(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock,
) -> None:
    stop = threading.Event()
    delivered: list[str] = []

    def deliver(order: Order) -> None:
        delivered.append(order.id)
        if len(delivered) == 3:
            stop.set()  # as a signal handler would, mid-backlog

    with sim.client() as client, SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        for _ in range(20):
            queue.enqueue(paid(sim, client))
        worker = RecoveryWorker(client, queue, MemoryDedupStore(clock=clock),
                                on_completed=deliver)
        worker.run(stop=stop)
        assert len(delivered) == 3
        assert len(queue.jobs(JobState.QUEUED)) == 17
        assert worker.run_pending(stop=stop) == 0  # set already: nothing is taken


# -- procrastinate ---------------------------------------------------------------------


@pytest.fixture
def database() -> Iterator[str]:
    with own_database("f22_wiring") as url:
        yield url


@pytest.mark.service
async def test_a_callback_that_cannot_take_an_order_ends_the_procrastinate_worker(
    database: str,
) -> None:
    from foxpoll.recovery import ProcrastinateRecoveryQueue

    real = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(real) as server, FoxReload(real.api_key, base_url=server.url) as client, \
            ProcrastinateRecoveryQueue(database, dispatch_every=0.3) as queue:
        queue.create_schema()
        order_id = paid(real, client)
        queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(),
                                on_completed=ReturnsACoroutine())
        # procrastinate catches a task's exceptions: before, the worker ran on, and every
        # wake-up failed the same way, each costing its job an attempt.
        with pytest.raises(TypeError, match="on_completed is async"):
            await asyncio.wait_for(queue.run_worker_async(
                worker, install_signal_handlers=False, fetch_job_polling_interval=0.2), 30)
        job = queue.get(order_id)
        assert job is not None
        assert job.state is JobState.QUEUED
        assert job.last_error is None  # nothing on the order's record: it is not at fault
