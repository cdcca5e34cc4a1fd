"""ProcrastinateRecoveryQueue on the machine's PostgreSQL, with real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, Order, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.events import MemoryPublisher
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

from .services import own_database

pytestmark = pytest.mark.service
WORKER = Path(__file__).with_name("procrastinate_worker.py")
STEAM = [{"itemId": "product_steam_10"}]
QUIET = {"install_signal_handlers": False, "fetch_job_polling_interval": 0.2}


@pytest.fixture
def database() -> Iterator[str]:
    with own_database("foxpoll_proc") as url:
        yield url


@pytest.fixture
def served() -> Iterator[tuple[FakeFoxReload, FoxReload, str]]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as client:
        yield sim, client, server.url


def make_queue(url: str, **kwargs: Any) -> Any:
    from foxpoll.recovery import ProcrastinateRecoveryQueue

    queue = ProcrastinateRecoveryQueue(url, **kwargs)
    queue.create_schema()
    queue.create_schema()  # idempotent
    return queue


def paid(sim: FakeFoxReload, client: FoxReload, script: OrderScript) -> str:
    sim.script_next(script)
    order = client.orders.create(items=STEAM)
    client.orders.pay(order.id)
    return order.id


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def fast_forward(url: str, seconds: float = 1e6) -> None:
    """Move every due time and lease back: the database's schedule, without sleeping."""
    sql(url, "UPDATE foxpoll_recovery SET due_at = due_at - %s, "
        "locked_until = locked_until - %s", seconds, seconds)


def test_enqueue_while_the_job_runs_and_retries_never_conflicts(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    policy = RecoveryPolicy(max_attempts=5, backoff=Fixed(600))
    with make_queue(database, policy=policy) as queue:
        order_id = paid(sim, client, OrderScript.stall(paid_for=0))
        assert queue.enqueue(order_id)
        token, reserved = queue.reserve_due(lease=60)
        assert reserved == [order_id]
        running = queue.take_dispatched(order_id, token, lease=60)
        assert running is not None
        # Two owners' waits stall while the job runs, and the sweep finds it too: the
        # case that made procrastinate's queueing_lock lose orders.
        assert not queue.enqueue(order_id)
        assert not queue.enqueue(order_id, reason="sweep")
        assert queue.take_dispatched(order_id, token, lease=60) is None  # a duplicate wake-up
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        assert worker.process(running).attempts == 1  # its retry
        assert not queue.enqueue(order_id)  # due now again: the earlier time wins
        queue.run_worker(worker, wait=False, **QUIET)  # dispatches and re-checks it
        job = queue.get(order_id)
        assert job is not None
        assert (job.state, job.attempts, job.last_status) == (JobState.QUEUED, 2, "processing")
        assert 500 < job.due_at - time.time() <= 600
        # Every wake-up ran and was deleted; none failed, none is stuck.
        assert sql(database, "SELECT status, count(*) FROM procrastinate_jobs GROUP BY 1") == []


def test_pending_orders_retry_then_dead_letter_requeue_and_deliver(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    policy = RecoveryPolicy(max_attempts=3, backoff=Fixed(7200))
    with make_queue(database, policy=policy) as queue:
        order_id = paid(sim, client, OrderScript.stall(paid_for=0))
        assert queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        for attempt in range(3):
            queue.run_worker(worker, wait=False, **QUIET)
            job = queue.get(order_id)
            assert job is not None
            if attempt < 2:
                assert (job.state, job.attempts) == (JobState.QUEUED, attempt + 1)
                assert 7100 < job.due_at - time.time() <= 7200  # the policy's wait
            fast_forward(database)
        assert [(j.order_id, j.attempts, j.last_status) for j in queue.list_dead()] == [
            (order_id, 3, "processing")]
        assert not queue.enqueue(order_id)  # dead letters stay dead until requeued
        queue.run_worker(worker, wait=False, **QUIET)
        assert queue.get(order_id).state is JobState.DEAD  # type: ignore[union-attr]
        sim.script(order_id, OrderScript.complete(after=0))
        assert queue.requeue(order_id).state is JobState.QUEUED
        delivered: list[Order] = []
        events = MemoryPublisher()
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append,
                                publisher=events)
        queue.run_worker(worker, wait=False, **QUIET)
        assert [o.id for o in delivered] == [order_id]
        assert [e.status for e in events.events] == ["completed"]
        assert queue.get(order_id).state is JobState.DONE  # type: ignore[union-attr]
        assert queue.list_dead() == []


def test_a_job_whose_delivery_always_raises_is_dead_lettered_after_max_attempts(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    policy = RecoveryPolicy(max_attempts=3, backoff=Fixed(7200))
    with make_queue(database, policy=policy) as queue:
        order_id = paid(sim, client, OrderScript.complete(after=0))
        assert queue.enqueue(order_id)
        calls: list[str] = []

        def refused(order: Order) -> None:
            calls.append(order.id)
            raise ConnectionRefusedError("the customer's mailbox refused the message")

        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=refused)
        for _ in range(5):
            queue.run_worker(worker, wait=False, **QUIET)
            fast_forward(database)
        assert calls == [order_id] * 3
        assert [(j.order_id, j.attempts, j.last_status, j.last_error)
                for j in queue.list_dead()] == [
            (order_id, 3, "completed",
             "ConnectionRefusedError: the customer's mailbox refused the message")]
        # Every wake-up ran to its end, the failing ones too: recorded, not raised.
        assert sql(database, "SELECT status, count(*) FROM procrastinate_jobs GROUP BY 1") == []


def test_a_wake_up_taken_and_abandoned_until_its_attempts_are_used_up_is_buried(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    with make_queue(database, policy=RecoveryPolicy(max_attempts=2)) as queue:
        order_id = paid(sim, client, OrderScript.complete(after=0))
        queue.enqueue(order_id)
        for attempt in (1, 2):  # each worker dies holding it
            token, reserved = queue.reserve_due(lease=60)
            assert reserved == [order_id]
            assert queue.take_dispatched(order_id, token, lease=60).attempts == attempt
            fast_forward(database)
        delivered: list[Order] = []
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append)
        queue.run_worker(worker, wait=False, **QUIET)
        job = queue.get(order_id)
        assert job is not None
        assert (job.state, job.attempts, delivered) == (JobState.DEAD, 3, [])
        assert job.last_error is not None
        assert job.last_error.startswith("re-check 2 of 2 never ended")


def test_close_settles_a_dead_letter(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    with make_queue(database, policy=RecoveryPolicy(max_attempts=1)) as queue:
        order_id = paid(sim, client, OrderScript.stall(paid_for=0))
        queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        queue.run_worker(worker, wait=False, **QUIET)
        resolved = queue.resolve(order_id, "refunded by support")
        assert (resolved.state, resolved.note) == (JobState.RESOLVED, "refunded by support")
        assert queue.list_dead() == []
        with pytest.raises(ValueError, match="resolved"):
            queue.resolve(order_id, "again")


def test_the_worker_takes_its_policy_from_its_queue(database: str,
                                                    served: tuple[Any, FoxReload, str]) -> None:
    _, client, _ = served
    with make_queue(database, policy=RecoveryPolicy(max_attempts=2)) as queue:
        with pytest.raises(TypeError, match="policy"):  # one policy, given to the queue
            RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                           policy=RecoveryPolicy(max_attempts=9))  # type: ignore[call-arg]
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        assert worker.policy.max_attempts == 2  # read from the queue


async def test_async_callers_run_the_worker_and_its_dispatcher(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    with make_queue(database) as queue:
        order_id = paid(sim, client, OrderScript.complete(after=0))
        queue.enqueue(order_id)
        delivered: list[Order] = []
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append)
        await queue.run_worker_async(worker, wait=False, **QUIET)
        assert [o.id for o in delivered] == [order_id]
        assert queue.get(order_id).state is JobState.DONE  # type: ignore[union-attr]


def worker_process(database: str, sim_url: str, api_key: str, mode: str) -> Any:
    return subprocess.Popen(  # noqa: S603 - our own test worker
        [sys.executable, str(WORKER), database, sim_url, api_key, mode],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


@pytest.mark.slow
def test_two_worker_processes_share_the_orders_each_handled_once(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    from foxpoll.dedup import PostgresDedupStore

    sim, client, sim_url = served
    queue = make_queue(database)
    PostgresDedupStore(database).create_schema()
    sql(database, "CREATE TABLE handled (order_id TEXT, pid INTEGER)")
    ids = [paid(sim, client, OrderScript.complete(after=0)) for _ in range(20)]
    for order_id in ids:
        queue.enqueue(order_id)
    queue.close()
    workers = [worker_process(database, sim_url, sim.api_key, "share") for _ in range(2)]
    try:
        for process in workers:
            assert process.wait(timeout=120) == 0
    finally:
        for process in workers:
            process.kill()
            process.stdout.close()
    rows = sql(database, "SELECT order_id, pid FROM handled")
    assert sorted(order_id for order_id, _ in rows) == sorted(ids)  # each exactly once
    assert len({pid for _, pid in rows}) == 2  # and both workers took part


@pytest.mark.slow
def test_a_killed_worker_s_order_is_rechecked_with_no_operator_step(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    from foxpoll.dedup import PostgresDedupStore

    sim, client, sim_url = served
    queue = make_queue(database)
    store = PostgresDedupStore(database)
    store.create_schema()
    sql(database, "CREATE TABLE handled (order_id TEXT, pid INTEGER)")
    order_id = paid(sim, client, OrderScript.complete(after=0))
    queue.enqueue(order_id)
    queue.close()
    hung = worker_process(database, sim_url, sim.api_key, "hang")
    try:
        assert hung.stdout.readline().strip() == "delivering"
        os.kill(hung.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert hung.wait(timeout=10) == -signal.SIGKILL
    finally:
        hung.kill()
        hung.stdout.close()
    # A fresh worker, left alone: its dispatcher rescues the dead worker's wake-up and,
    # once the dead worker's leases (2 s) run out, wakes the order again.
    serving = worker_process(database, sim_url, sim.api_key, "serve")
    try:
        while not sql(database, "SELECT 1 FROM handled"):
            assert time.monotonic() - killed_at < 20, "the order was never re-checked"
            time.sleep(0.2)
        took = time.monotonic() - killed_at
        while sql(database, "SELECT 1 FROM procrastinate_jobs WHERE status = 'doing'"):
            assert time.monotonic() - killed_at < 20, "the dead worker's job stayed doing"
            time.sleep(0.2)
    finally:
        serving.terminate()
        serving.wait(timeout=10)
        serving.stdout.close()
    assert sql(database, "SELECT order_id FROM handled") == [(order_id,)]
    record = store.get(order_id)
    assert record is not None
    assert record.attempts == 2  # the dead worker's claim, then the new one's
    # lease (2 s) + delivery claim expiry (2 s) + dispatch period + start-up, with room
    assert took < 15
