"""The recovery queue and worker, on virtual time against the simulator."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from foxpoll import Order, OrderStalled, OrderStatus, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import DeliveryState, MemoryDedupStore
from foxpoll.errors import InternalServerError, StoreUnavailable
from foxpoll.events import MemoryPublisher
from foxpoll.metrics import PrometheusMetrics
from foxpoll.polling import WaitPolicy
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

STEAM = [{"itemId": "product_steam_10"}]


@pytest.fixture
def queue(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteRecoveryQueue]:
    with SQLiteRecoveryQueue(tmp_path / "recovery.db", clock=clock) as opened:
        yield opened


def paid(sim: FakeFoxReload, script: OrderScript) -> str:
    sim.script_next(script)
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
    return order.id


def drain(worker: RecoveryWorker, queue: SQLiteRecoveryQueue, clock: FakeClock,
          limit: int = 100) -> int:
    """Run the worker on virtual time until nothing is queued; return the passes made."""
    for passes in range(limit):
        due = queue.next_due()
        if due is None:
            return passes
        clock.advance(max(0.0, due - clock.time()))
        worker.run_pending()
    raise AssertionError("the queue never drained")


# -- the queue ---------------------------------------------------------------------------


def test_enqueue_is_idempotent_and_the_earlier_due_time_wins(
    queue: SQLiteRecoveryQueue, clock: FakeClock
) -> None:
    now = clock.time()
    assert queue.enqueue("o1", due_at=now + 100)
    assert not queue.enqueue("o1", due_at=now + 500)
    assert queue.get("o1").due_at == now + 100  # type: ignore[union-attr]
    assert not queue.enqueue("o1", due_at=now + 10)
    assert queue.get("o1").due_at == now + 10  # type: ignore[union-attr]
    assert len(queue.jobs(JobState.QUEUED)) == 1


def test_take_leases_a_due_job(queue: SQLiteRecoveryQueue, clock: FakeClock) -> None:
    queue.enqueue("later", due_at=clock.time() + 60)
    queue.enqueue("now")
    job = queue.take(lease=30)
    assert job is not None
    assert job.order_id == "now"
    assert queue.take(lease=30) is None  # "now" is leased, "later" not due
    clock.advance(31)
    again = queue.take(lease=30)
    assert again is not None
    assert again.order_id == "now"  # the lease ran out: a dead worker's job comes back


def test_dead_letters_requeue_and_close(queue: SQLiteRecoveryQueue) -> None:
    queue.enqueue("o1")
    queue.bury("o1", last_status="processing", last_error=None)
    dead = queue.list_dead()
    assert [(j.order_id, j.last_status, j.state) for j in dead] == [
        ("o1", "processing", JobState.DEAD)]
    assert queue.take() is None
    requeued = queue.requeue("o1")
    assert (requeued.state, requeued.attempts, requeued.reason) == (JobState.QUEUED, 0,
                                                                    "requeued")
    queue.bury("o1", last_status="processing", last_error="timeout")
    reason = "refunded by support, ticket 4411"
    resolved = queue.resolve("o1", reason)
    assert (resolved.state, resolved.note) == (JobState.RESOLVED, reason)
    assert queue.list_dead() == []
    with pytest.raises(ValueError, match="resolved"):
        queue.resolve("o1", "again")
    with pytest.raises(KeyError):
        queue.requeue("unknown")
    with pytest.raises(ValueError, match="reason"):
        queue.resolve("o1", "")


def test_bad_order_ids_are_rejected(queue: SQLiteRecoveryQueue) -> None:
    for bad in ("", "  ", "x" * 300):
        with pytest.raises(ValueError, match="order id"):
            queue.enqueue(bad)


def test_sweep_enqueues_only_old_non_terminal_orders(
    queue: SQLiteRecoveryQueue, clock: FakeClock
) -> None:
    now = clock.time()
    pending = [("fresh", now - 60), ("old", now - 700), ("older", now - 5000)]
    assert queue.sweep(pending, now=now) == 2
    assert queue.sweep(pending, now=now) == 0  # idempotent
    assert sorted(j.order_id for j in queue.jobs(JobState.QUEUED)) == ["old", "older"]


# -- the worker --------------------------------------------------------------------------


def test_a_stalled_wait_is_recovered_delivered_once_and_published(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.stall())
    with sim.client(recovery_queue=queue) as client:
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id, policy=WaitPolicy(max_attempts=5))
        job = queue.get(order_id)
        assert job is not None
        assert (job.state, job.reason) == (JobState.QUEUED, "stalled")  # enqueued by itself
        sim.script(order_id, OrderScript.complete(after=clock.monotonic() + 200))
        delivered: list[Order] = []
        publisher = MemoryPublisher()
        store = MemoryDedupStore(clock=clock)
        registry = CollectorRegistry()
        worker = RecoveryWorker(client, queue, store, on_completed=delivered.append,
                                publisher=publisher, metrics=PrometheusMetrics(registry))
        drain(worker, queue, clock)
    assert [o.id for o in delivered] == [order_id]
    assert len(delivered[0].codes) == 1
    assert [(e.order_id, e.status) for e in publisher.events] == [(order_id, "completed")]
    assert publisher.events[0].codes == delivered[0].codes
    done = queue.get(order_id)
    assert done is not None
    assert (done.state, done.note) == (JobState.DONE, "completed")
    assert done.attempts >= 2  # it was still processing at the first re-checks
    assert store.get(order_id).state is DeliveryState.DELIVERED  # type: ignore[union-attr]
    assert registry.get_sample_value("foxpoll_orders_completed_total") == 1


def test_failed_and_cancelled_orders_go_to_the_terminal_handler(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    failed = paid(sim, OrderScript.fail(after=100))
    cancelled = paid(sim, OrderScript.cancel(after=40, reason="payment_failure"))
    for order_id in (failed, cancelled):
        queue.enqueue(order_id)
    handed: list[Order] = []
    delivered: list[Order] = []
    publisher = MemoryPublisher()
    with sim.client() as client:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append,
                                on_terminal=handed.append, publisher=publisher)
        drain(worker, queue, clock)
    assert delivered == []
    assert sorted((o.id, o.status) for o in handed) == sorted(
        [(failed, OrderStatus.FAILED), (cancelled, OrderStatus.CANCELLED)])
    assert sorted(e.status for e in publisher.events) == ["cancelled", "failed"]
    assert all(e.codes == () for e in publisher.events)
    assert {queue.get(i).note for i in (failed, cancelled)} == {  # type: ignore[union-attr]
        "failed", "cancelled"}


def test_exhausted_orders_are_dead_lettered_on_the_doubling_schedule(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.stall())
    queue.enqueue(order_id)
    checks: list[float] = []
    with sim.client() as client:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        original = worker.recheck

        def spy(order_id: str, attempt: int, **kwargs: Any) -> Any:
            checks.append(clock.time())
            return original(order_id, attempt, **kwargs)

        worker.recheck = spy  # type: ignore[method-assign]
        drain(worker, queue, clock)
    dead = queue.list_dead()
    assert [(j.order_id, j.attempts, j.last_status) for j in dead] == [
        (order_id, 8, "processing")]
    waits = [b - a for a, b in itertools.pairwise(checks)]
    assert len(checks) == 8
    for n, wait in enumerate(waits):  # 30, 60, 120, ... each plus up to 30 %
        plain = min(30 * 2**n, 3600)
        assert plain <= wait <= plain * 1.3 + 1e-6
    queue.requeue(order_id)
    sim.script(order_id, OrderScript.complete(after=0))
    delivered: list[Order] = []
    with sim.client() as client:
        RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append
                       ).run_pending()
    assert [o.id for o in delivered] == [order_id]  # requeued, re-checked, delivered


def test_an_api_outage_uses_up_no_attempt_and_ends_the_round(
    sim: FakeFoxReload, clock: FakeClock, tmp_path: Path
) -> None:
    """A 5xx says the API is out, not that the order is wrong: the job keeps its
    attempts however long the outage lasts (each round ends on it, for run() to wait it
    out), and is delivered once the API is back."""
    order_id = paid(sim, OrderScript.complete(after=0))
    queue = SQLiteRecoveryQueue(tmp_path / "q.db", policy=RecoveryPolicy(max_attempts=3),
                                clock=clock)
    queue.enqueue(order_id)
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", times=100))
    delivered: list[Order] = []
    with sim.client(max_retries=0) as client, queue:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append)
        for _ in range(3 * queue.policy.max_attempts):
            with pytest.raises(InternalServerError):
                worker.run_pending()
            job = queue.get(order_id)
            assert job is not None
            assert (job.state, job.attempts, job.last_status) == (JobState.QUEUED, 0, None)
            assert (job.last_error or "").startswith("InternalServerError: ")
            clock.advance(job.due_at - clock.time())
        assert queue.list_dead() == []
        sim.clear_faults()
        assert worker.run_pending() == 1
        done = queue.get(order_id)
    assert [o.id for o in delivered] == [order_id]
    assert done is not None
    assert (done.state, done.attempts) == (JobState.DONE, 1)


def test_a_delivery_in_progress_elsewhere_is_retried_after_its_lease(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    store = MemoryDedupStore(clock=clock)
    store.claim(order_id, "another-worker", 120)  # someone else is delivering it
    queue.enqueue(order_id)
    delivered: list[Order] = []
    with sim.client() as client:
        worker = RecoveryWorker(client, queue, store, on_completed=delivered.append)
        assert worker.run_pending() == 1
        job = queue.get(order_id)
        assert job is not None
        assert job.state is JobState.QUEUED
        assert job.due_at >= clock.time() + 119
        drain(worker, queue, clock)  # their lease expires (they died): we deliver
    assert [o.id for o in delivered] == [order_id]


class CountedRenewals(MemoryDedupStore):
    """A memory store on ``clock`` that lets a test wait for the next renewal."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.renewed = threading.Semaphore(0)

    def renew(self, order_id: str, token: str, lease: float) -> Any:
        try:
            return super().renew(order_id, token, lease)
        finally:
            self.renewed.release()


def test_the_workers_slow_delivery_keeps_its_claim_on_the_clients_clock(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    queue.enqueue(order_id)
    store = CountedRenewals(clock)
    rivals: list[bool] = []

    def slow(order: Order) -> None:
        for _ in range(3):  # 45 s in steps of 15: past the 30 s lease
            clock.sleep(15)
            assert store.renewed.acquire(timeout=5), "no renewal on the client's clock"
            claim = store.claim(order.id, "rival", 30)
            rivals.append(claim.acquired)

    with sim.client() as client:
        worker = RecoveryWorker(client, queue, store, on_completed=slow, lease=30)
        assert worker.run_pending() == 1
    assert rivals == [False] * 3  # the claim was renewed every third of the lease
    assert store.get(order_id).state is DeliveryState.DELIVERED  # type: ignore[union-attr]
    assert queue.get(order_id).state is JobState.DONE  # type: ignore[union-attr]


def test_run_waits_for_due_jobs_on_the_clients_clock(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    queue.enqueue(order_id, due_at=clock.time() + 600)
    stop = threading.Event()
    delivered: list[str] = []

    def deliver(order: Order) -> None:
        delivered.append(order.id)
        stop.set()

    with sim.client() as client:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(clock=clock),
                                on_completed=deliver)
        start = clock.monotonic()
        worker.run(stop=stop, idle=5)  # ten virtual minutes, no real ones
    assert delivered == [order_id]
    assert 600 <= clock.monotonic() - start <= 605


@pytest.mark.slow
def test_run_ends_soon_after_stop_on_the_real_clock(tmp_path: Path) -> None:
    sim = FakeFoxReload(clock=SystemClock())
    stop = threading.Event()
    with sim.client() as client, SQLiteRecoveryQueue(tmp_path / "q.db") as queue:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        runner = threading.Thread(target=worker.run, kwargs={"stop": stop, "idle": 60})
        runner.start()
        time.sleep(0.2)  # let it start its minute of idling
        stopped = time.monotonic()
        stop.set()
        runner.join(5)
        assert not runner.is_alive()
    assert time.monotonic() - stopped < 1.0  # not the rest of the idle minute


@pytest.mark.slow
def test_a_killed_worker_s_job_is_taken_again(tmp_path: Path) -> None:
    path = tmp_path / "recovery.db"
    with SQLiteRecoveryQueue(path) as setup:
        setup.enqueue("o-crash")
    script = (
        "import os, signal, sys\n"
        "from foxpoll.recovery import SQLiteRecoveryQueue\n"
        "job = SQLiteRecoveryQueue(sys.argv[1]).take(lease=1.0)\n"
        "print(job.order_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)],  # noqa: S603
                            capture_output=True, text=True, timeout=30, check=False,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.strip() == "o-crash"
    with SQLiteRecoveryQueue(path) as queue:
        assert queue.take() is None  # still leased to the dead worker
        deadline = time.monotonic() + 10
        while (job := queue.take()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert job.order_id == "o-crash"


def test_the_worker_sweeps_the_partners_pending_orders(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    old = paid(sim, OrderScript.complete(after=0))
    recent = paid(sim, OrderScript.complete(after=0))
    records = [(old, clock.time() - 3600), (recent, clock.time() - 30)]  # the partner's rows
    delivered: list[Order] = []
    with sim.client() as client:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=delivered.append)
        assert worker.sweep(lambda: records) == 1
        assert worker.sweep(lambda: records) == 0  # already queued
        job = queue.get(old)
        assert job is not None
        assert job.reason == "sweep"
        assert queue.get(recent) is None  # not yet ten minutes old
        stop = threading.Event()
        calls = []

        def pending() -> list[tuple[str, float]]:
            calls.append(1)
            return records

        def deliver(order: Order) -> None:
            delivered.append(order)
            stop.set()  # one pass of the loop is enough here

        RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=deliver).run(
            stop=stop, idle=0, pending_orders=pending)
    assert calls == [1]
    assert [o.id for o in delivered] == [old]


# -- a re-check's failure is recorded on its job ------------------------------------------


def test_a_failure_inside_on_completed_is_recorded_and_retried_then_delivered(
    sim: FakeFoxReload, clock: FakeClock, tmp_path: Path
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    calls: list[str] = []

    def flaky(order: Order) -> None:
        calls.append(order.id)
        if len(calls) == 1:
            _ = order.codes[99]  # a bug in the partner's code: IndexError
        if len(calls) == 2:
            raise RuntimeError("smtp: " + "x" * 1000)

    policy = RecoveryPolicy(max_attempts=3, backoff=Fixed(60.0))
    with SQLiteRecoveryQueue(tmp_path / "q.db", policy=policy, clock=clock) as queue, \
            sim.client() as client:
        queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(clock=clock),
                                on_completed=flaky)
        worker.run_pending()
        first = queue.get(order_id)
        assert first is not None
        assert (first.state, first.attempts, first.last_status) == (
            JobState.QUEUED, 1, "completed")
        assert first.last_error == "IndexError: tuple index out of range"
        assert 59 < first.due_at - clock.time() <= 60  # the policy's wait
        clock.advance(60)
        worker.run_pending()
        second = queue.get(order_id)
        assert second is not None
        assert second.last_error is not None
        assert second.last_error.startswith("RuntimeError: smtp: xxx")
        assert len(second.last_error) <= len("RuntimeError: ") + 200  # a foreign message, cut
        clock.advance(60)
        worker.run_pending()
        done = queue.get(order_id)
    assert calls == [order_id] * 3
    assert done is not None
    assert (done.state, done.attempts, done.note) == (JobState.DONE, 3, "completed")


def test_a_failing_on_terminal_is_dead_lettered_with_its_error(
    sim: FakeFoxReload, clock: FakeClock, tmp_path: Path
) -> None:
    order_id = paid(sim, OrderScript.fail(after=0))
    refunds: list[str] = []

    def refund(order: Order) -> None:
        refunds.append(order.id)
        raise LookupError("no payment on record")

    policy = RecoveryPolicy(max_attempts=2, backoff=Fixed(60.0))
    with SQLiteRecoveryQueue(tmp_path / "q.db", policy=policy, clock=clock) as queue, \
            sim.client() as client:
        queue.enqueue(order_id)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                on_terminal=refund)
        assert drain(worker, queue, clock) == 2
        dead = queue.list_dead()
    assert refunds == [order_id] * 2
    assert [(j.attempts, j.last_status, j.last_error) for j in dead] == [
        (2, "failed", "LookupError: no payment on record")]


def test_a_callback_that_cannot_take_an_order_ends_the_worker_not_the_job(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    queue.enqueue(order_id)

    def no_arguments() -> None:
        raise AssertionError("never called")

    async def asynchronous(order: Order) -> None:
        raise AssertionError("never awaited")

    store = MemoryDedupStore(clock=clock)
    with sim.client() as client:
        miswired: list[tuple[Any, str]] = [(no_arguments, "cannot be called with an order"),
                                           (asynchronous, "is async")]
        for callback, message in miswired:
            with pytest.raises(TypeError, match=message):  # refused before any job is taken
                RecoveryWorker(client, queue, store, on_completed=callback)
            worker = RecoveryWorker(client, queue, store, on_completed=print)
            worker.on_completed = callback  # rewired after that check: each call checks
            with pytest.raises(TypeError, match=message):
                worker.run_pending()
            job = queue.get(order_id)
            assert job is not None
            assert job.last_error is None  # nothing recorded on the order: it is not at fault
            assert store.get(order_id).state is not DeliveryState.DELIVERED  # type: ignore[union-attr]
            clock.advance(queue.next_due() - clock.time())  # type: ignore[operator]
        delivered: list[str] = []
        RecoveryWorker(client, queue, store,
                       on_completed=lambda o: delivered.append(o.id)).run_pending()
    assert delivered == [order_id]  # the wiring fixed, the order goes out


def test_a_dedup_store_that_fails_is_recorded_on_the_job(
    sim: FakeFoxReload, clock: FakeClock, queue: SQLiteRecoveryQueue
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))

    class Down(MemoryDedupStore):
        def get(self, order_id: str) -> Any:
            raise StoreUnavailable("dedup store: Redis unavailable (ConnectionError)")

        def claim(self, order_id: str, token: str, lease: float) -> Any:
            raise StoreUnavailable("dedup store: Redis unavailable (ConnectionError)")

    queue.watch(order_id, due_at=clock.time())
    assert queue.settle(order_id, status="completed")  # reason "delivery": the store first
    clock.advance(queue.policy.delivery_grace or 0)
    delivered: list[Order] = []
    with sim.client() as client:
        worker = RecoveryWorker(client, queue, Down(), on_completed=delivered.append)
        with pytest.raises(StoreUnavailable):  # an outage: the round ends on it
            worker.run_pending()
    job = queue.get(order_id)
    assert job is not None
    # recorded, with the attempt given back: a store outage dead-letters nothing
    assert (job.state, job.attempts, job.last_status) == (JobState.QUEUED, 0, "completed")
    assert job.last_error == "StoreUnavailable: dedup store: Redis unavailable (ConnectionError)"
    assert delivered == []


def test_a_delivery_in_progress_on_the_last_attempt_is_dead_lettered(
    sim: FakeFoxReload, clock: FakeClock, tmp_path: Path
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0))
    store = MemoryDedupStore(clock=clock)
    store.claim(order_id, "another-worker", 3600)
    with SQLiteRecoveryQueue(tmp_path / "q.db", policy=RecoveryPolicy(max_attempts=1),
                             clock=clock) as queue, sim.client() as client:
        queue.enqueue(order_id)
        RecoveryWorker(client, queue, store, on_completed=print).run_pending()
        dead = queue.list_dead()
    assert [(j.attempts, j.last_status) for j in dead] == [(1, "completed")]
    assert dead[0].last_error == (f"DeliveryInProgress: order {order_id} is being delivered "
                                  "by another worker")
