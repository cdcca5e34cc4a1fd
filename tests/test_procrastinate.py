"""ProcrastinateRecoveryQueue on the machine's PostgreSQL, with real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, Order, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.events import InMemoryPublisher
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

from .services import POSTGRES_URL, require

pytestmark = pytest.mark.service
WORKER = Path(__file__).with_name("procrastinate_worker.py")
STEAM = [{"itemId": "product_steam_10"}]


@pytest.fixture
def database() -> Iterator[str]:
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"foxpoll_proc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


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


def fast_forward(url: str) -> None:
    """Make every scheduled job due now: the database's schedule, without sleeping."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE procrastinate_jobs SET scheduled_at = now() "
                     "WHERE status = 'todo' AND scheduled_at > now()")


def test_enqueue_is_idempotent_per_order(database: str) -> None:
    queue = make_queue(database)
    try:
        assert queue.enqueue("o1")
        assert not queue.enqueue("o1")  # the same order, still waiting: one job
        assert queue.enqueue("o2")
    finally:
        queue.close_connections()


def test_pending_orders_retry_capped_then_dead_letter_and_requeue(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    policy = RecoveryPolicy(max_attempts=3, backoff=Fixed(7200))  # asks for 2 h...
    queue = make_queue(database, policy=policy)
    try:
        order_id = paid(sim, client, OrderScript.stall(paid_for=0))
        assert queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                policy=policy)
        import psycopg

        for attempt in range(3):
            queue.run_worker(worker, wait=False, install_signal_handlers=False)
            if attempt < 2:
                with psycopg.connect(database) as conn:
                    row = conn.execute(
                        "SELECT attempts, EXTRACT(EPOCH FROM scheduled_at - now()) "
                        "FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'",
                        (order_id,)).fetchone()
                assert row is not None
                assert row[0] == attempt + 1
                assert 3000 < row[1] <= 3600  # ...capped at the backoff's cap (1 h)
            fast_forward(database)
        dead = queue.list_dead()
        assert [(j.order_id, j.attempts, j.last_status) for j in dead] == [
            (order_id, 3, "processing")]
        assert not queue.enqueue(order_id)  # dead letters stay dead until requeued
        sim.script(order_id, OrderScript.complete(after=0))
        requeued = queue.requeue(order_id)
        assert requeued.state is JobState.QUEUED
        delivered: list[Order] = []
        events = InMemoryPublisher()
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append,
                                publisher=events, policy=policy)
        queue.run_worker(worker, wait=False, install_signal_handlers=False)
        assert [o.id for o in delivered] == [order_id]
        assert [e.status for e in events.events] == ["completed"]
        assert queue.list_dead() == []
        with pytest.raises(KeyError):
            queue.requeue("never-seen")
    finally:
        queue.close_connections()


def test_close_settles_a_dead_letter(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    sim, client, _ = served
    policy = RecoveryPolicy(max_attempts=1)
    queue = make_queue(database, policy=policy)
    try:
        order_id = paid(sim, client, OrderScript.stall(paid_for=0))
        queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                policy=policy)
        queue.run_worker(worker, wait=False, install_signal_handlers=False)
        closed = queue.close(order_id, "refunded by support")
        assert (closed.state, closed.note) == (JobState.CLOSED, "refunded by support")
        assert queue.list_dead() == []
        with pytest.raises(ValueError, match="closed"):
            queue.close(order_id, "again")
    finally:
        queue.close_connections()


def worker_process(database: str, sim_url: str, api_key: str, mode: str) -> Any:
    return subprocess.Popen(  # noqa: S603 - our own test worker
        [sys.executable, str(WORKER), database, sim_url, api_key, mode],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_two_worker_processes_share_the_orders_each_handled_once(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    import psycopg

    from foxpoll.dedup import PostgresDedupStore

    sim, client, sim_url = served
    queue = make_queue(database)
    PostgresDedupStore(database).create_schema()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE handled (order_id TEXT, pid INTEGER)")
    ids = [paid(sim, client, OrderScript.complete(after=0)) for _ in range(20)]
    for order_id in ids:
        queue.enqueue(order_id)
    queue.close_connections()
    workers = [worker_process(database, sim_url, sim.api_key, "share") for _ in range(2)]
    try:
        for process in workers:
            assert process.wait(timeout=120) == 0
    finally:
        for process in workers:
            process.kill()
            process.stdout.close()
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT order_id, pid FROM handled").fetchall()
    assert sorted(order_id for order_id, _ in rows) == sorted(ids)  # each exactly once
    assert len({pid for _, pid in rows}) == 2  # and both workers took part


def test_a_killed_worker_s_job_is_picked_up_again(
    database: str, served: tuple[FakeFoxReload, FoxReload, str]
) -> None:
    from foxpoll.dedup import PostgresDedupStore

    sim, client, sim_url = served
    queue = make_queue(database)
    store = PostgresDedupStore(database)
    store.create_schema()
    order_id = paid(sim, client, OrderScript.complete(after=0))
    queue.enqueue(order_id)
    hung = worker_process(database, sim_url, sim.api_key, "hang")
    try:
        assert hung.stdout.readline().strip() == "delivering"
        os.kill(hung.pid, signal.SIGKILL)
        assert hung.wait(timeout=10) == -signal.SIGKILL
    finally:
        hung.kill()
        hung.stdout.close()
    deadline = time.monotonic() + 30
    while asyncio.run(queue.retry_stalled_jobs(seconds_since_heartbeat=1.0)) == 0:
        assert time.monotonic() < deadline  # the dead worker's heartbeat goes stale
        time.sleep(0.3)
    delivered: list[Order] = []
    worker = RecoveryWorker(client, queue, store, on_completed=delivered.append, lease=2.0)
    while not delivered:  # its delivery claim (2 s lease) runs out, then we deliver
        assert time.monotonic() < deadline
        queue.run_worker(worker, wait=False, install_signal_handlers=False)
        fast_forward(database)
        time.sleep(0.2)
    assert [o.id for o in delivered] == [order_id]
    record = store.get(order_id)
    assert record is not None
    assert record.attempts == 2  # the dead worker's claim, then ours
    queue.close_connections()
