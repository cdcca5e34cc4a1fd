"""Watches: a paid order is recorded durably before it is paid, and settled by its wait.

On virtual time against the simulator, with a SQLite recovery queue. The same paths with
real processes and SIGKILL are in ``test_chaos.py``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foxpoll import AmbiguousOrderError, APIStatusError, ConflictError, OrderStalled
from foxpoll.backoff import ExponentialJitter, Fixed, FullJitter
from foxpoll.dedup import MemoryDedupStore
from foxpoll.delivery import deliver_once
from foxpoll.errors import StoreUnavailable
from foxpoll.polling import PollAttempt, WaitPolicy, WaitResult
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

STEAM = [{"itemId": "product_steam_10"}]
PAY = ("POST", "/api/orders/*/pay")


class Hooks:
    """A listener made of functions, by event name."""

    def __init__(self, **hooks: Any) -> None:
        self.__dict__.update(hooks)


class CountingQueue(SQLiteRecoveryQueue):
    """A SQLite queue that counts its writes and what the API had seen at each watch."""

    def __init__(self, *args: Any, sim: FakeFoxReload, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sim = sim
        self.writes: Counter[str] = Counter()
        self.pays_seen_at_watch: list[int] = []
        self.fail: set[str] = set()

    def _maybe_fail(self, name: str) -> None:
        self.writes[name] += 1
        if name in self.fail:
            raise StoreUnavailable("SQLite is unavailable: injected")

    def watch(self, order_id: str, *, due_at: float, replace: bool = True) -> bool:
        self._maybe_fail("watch")
        self.pays_seen_at_watch.append(self.sim.count(*PAY))
        return super().watch(order_id, due_at=due_at, replace=replace)

    def settle(self, order_id: str, *, status: str) -> bool:
        self._maybe_fail("settle")
        return super().settle(order_id, status=status)

    def enqueue(self, order_id: str, **kwargs: Any) -> bool:
        self._maybe_fail("enqueue")
        return super().enqueue(order_id, **kwargs)

    def unwatch(self, order_id: str) -> bool:
        self._maybe_fail("unwatch")
        return super().unwatch(order_id)


@pytest.fixture
def queue(tmp_path: Path, clock: FakeClock, sim: FakeFoxReload) -> Iterator[CountingQueue]:
    policy = RecoveryPolicy(max_attempts=4, watch_margin=60.0, delivery_grace=300.0)
    with CountingQueue(tmp_path / "q.db", policy=policy, clock=clock, sim=sim) as opened:
        yield opened


def new_order(sim: FakeFoxReload, script: OrderScript) -> str:
    sim.script_next(script)
    with sim.client() as plain:
        return plain.orders.create(items=STEAM).id


def job(queue: SQLiteRecoveryQueue, order_id: str) -> Any:
    found = queue.get(order_id)
    assert found is not None
    return found


# -- pay ----------------------------------------------------------------------------------


def test_pay_records_the_watch_before_the_payment_is_sent(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=10))
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
    assert queue.pays_seen_at_watch == [0]
    watched = job(queue, order_id)
    assert (watched.state, watched.reason, watched.attempts) == (JobState.QUEUED, "watch", 0)
    # Due one lease from now, not at the wait's horizon (compared as a delay: an epoch
    # time's relative tolerance would be half an hour).
    assert watched.due_at - clock.time() == pytest.approx(queue.policy.watch_lease)


def test_a_payment_never_postpones_the_watch_of_a_wait_already_running(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=10))
    queue.watch(order_id, due_at=clock.time() + 30)  # another owner's wait, elsewhere
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        assert job(queue, order_id).due_at == pytest.approx(clock.time() + 30)
        # This process's own wait then sets its due time (its watch was not the pay's).
        client.wait_for_completion(order_id)
    assert queue.writes["watch"] == 3


def test_no_watch_no_payment(sim: FakeFoxReload, queue: CountingQueue) -> None:
    order_id = new_order(sim, OrderScript.complete(after=10))
    queue.fail.add("watch")
    with sim.client(recovery_queue=queue) as client, pytest.raises(StoreUnavailable):
        client.orders.pay(order_id)
    assert sim.count(*PAY) == 0
    assert sim.status_of(order_id) == "active"


def test_a_refused_payment_drops_its_watch_and_a_conflict_keeps_it(
    sim: FakeFoxReload, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=10))
    sim.balance = 0
    with sim.client(recovery_queue=queue) as client:
        with pytest.raises(APIStatusError, match="402"):
            client.orders.pay(order_id)
        assert queue.get(order_id) is None  # nothing was paid: nothing to watch
        sim.balance = 10_000
        client.orders.pay(order_id)
        with pytest.raises(ConflictError):
            client.orders.pay(order_id)  # paid already: the first payment's watch stays
    assert job(queue, order_id).reason == "watch"


def test_an_ambiguous_payment_keeps_its_watch(sim: FakeFoxReload, queue: CountingQueue) -> None:
    order_id = new_order(sim, OrderScript.complete(after=10))
    sim.inject(Fault(FaultKind.DISCONNECT, method="POST", path="/api/orders/*/pay"))
    with sim.client(recovery_queue=queue) as client, pytest.raises(AmbiguousOrderError):
        client.orders.pay(order_id)
    assert job(queue, order_id).reason == "watch"


# -- waits --------------------------------------------------------------------------------


def test_pay_then_wait_costs_one_write_at_pay_and_one_at_finish(
    sim: FakeFoxReload, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=20))
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        order = client.wait_for_completion(order_id, policy=WaitPolicy.after_payment())
    assert order.status == "completed"
    assert queue.writes == Counter(watch=1, settle=1)
    settled = job(queue, order_id)
    assert (settled.reason, settled.last_status) == ("delivery", "completed")


@pytest.mark.parametrize("attempts", [200, 5])
def test_a_wait_reuses_the_pay_watch_and_keeps_it_from_falling_due(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue, attempts: int
) -> None:
    order_id = new_order(sim, OrderScript.stall())
    due_in: list[float] = []

    def polled(attempt: PollAttempt) -> None:
        due_in.append(job(queue, order_id).due_at - clock.time())

    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id, policy=WaitPolicy(max_attempts=attempts),
                                       listener=Hooks(on_poll=polled))
    assert queue.writes["watch"] == 1  # the payment's: the wait, short or long, wrote none
    lease = queue.policy.watch_lease
    # Renewed while the wait ran, whatever its horizon: never due before it gave up.
    assert len(due_in) == attempts
    assert lease * 2 / 3 - 1e-6 <= min(due_in) <= max(due_in) <= lease


@pytest.mark.parametrize(("script", "state", "reason"), [
    (OrderScript.complete(after=5), JobState.QUEUED, "delivery"),
    (OrderScript.fail(after=5), JobState.DONE, "watch"),
    (OrderScript.cancel(after=5), JobState.DONE, "watch"),
    (OrderScript.stall(), JobState.QUEUED, "stalled"),
])
def test_each_way_a_wait_ends_settles_its_watch(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue, script: OrderScript,
    state: JobState, reason: str
) -> None:
    order_id = new_order(sim, script)
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        try:
            client.wait_for_completion(order_id, policy=WaitPolicy(max_attempts=8),
                                       raise_on_failure=False)
        except OrderStalled:
            assert reason == "stalled"
    ended = job(queue, order_id)
    assert (ended.state, ended.reason) == (state, reason)
    if reason == "stalled":
        assert ended.due_at <= clock.time()  # recovery starts at once


def test_wait_many_watches_every_order_it_was_not_told_about(
    sim: FakeFoxReload, queue: CountingQueue
) -> None:
    with sim.client() as plain:  # paid elsewhere, by a process without a queue
        ids = []
        for _ in range(3):
            sim.script_next(OrderScript.complete(after=5))
            order = plain.orders.create(items=STEAM)
            plain.orders.pay(order.id)
            ids.append(order.id)
    with sim.client(recovery_queue=queue) as client:
        results = list(client.wait_many(ids))
    assert all(r.ok for r in results)
    assert queue.writes == Counter(watch=3, settle=3)
    assert {job(queue, i).reason for i in ids} == {"delivery"}


async def test_the_async_client_records_and_settles_watches(
    sim: FakeFoxReload, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=5))
    async with sim.async_client(recovery_queue=queue) as client:
        await client.orders.pay(order_id)
        await client.wait_for_completion(order_id)
    assert queue.writes == Counter(watch=1, settle=1)
    assert job(queue, order_id).reason == "delivery"


def test_a_failed_settle_never_hides_the_codes(
    sim: FakeFoxReload, queue: CountingQueue, caplog: pytest.LogCaptureFixture
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=5))
    queue.fail.add("settle")
    with sim.client(recovery_queue=queue) as client, caplog.at_level(logging.ERROR):
        client.orders.pay(order_id)
        assert client.wait_for_completion(order_id).codes
    assert "could not settle" in caplog.text
    assert job(queue, order_id).reason == "watch"  # it will fire, which is safe


def test_a_failed_enqueue_of_a_stalled_order_is_not_hidden(
    sim: FakeFoxReload, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.stall())
    queue.fail.add("enqueue")
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        with pytest.raises(StoreUnavailable):
            client.wait_for_completion(order_id, policy=WaitPolicy(max_attempts=3))


# -- the worker finishes what a dead process left ----------------------------------------


def drain(worker: RecoveryWorker, queue: SQLiteRecoveryQueue, clock: FakeClock) -> None:
    for _ in range(50):
        due = queue.next_due()
        if due is None:
            return
        clock.advance(max(0.0, due - clock.time()))
        worker.run_pending()
    raise AssertionError("the queue never drained")


def test_a_process_that_dies_after_paying_loses_no_order(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.complete(after=30))
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        # ...and the process dies here: no wait, no pending-orders table, no sweep.
        delivered: list[str] = []
        worker = RecoveryWorker(client, queue, MemoryDedupStore(clock=clock),
                                on_completed=lambda o: delivered.append(o.id))
        assert worker.run_pending() == 0  # not before its lease runs out
        drain(worker, queue, clock)
    assert delivered == [order_id]
    assert job(queue, order_id).state is JobState.DONE


def test_a_delivered_order_is_confirmed_from_the_store_without_a_request(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    store = MemoryDedupStore(clock=clock)
    order_id = new_order(sim, OrderScript.complete(after=5))
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        order = client.wait_for_completion(order_id)
        assert deliver_once(order, lambda o: None, store).delivered
        worker = RecoveryWorker(client, queue, store, on_completed=print)
        gets = sim.count("GET")
        drain(worker, queue, clock)
    assert sim.count("GET") == gets
    assert (job(queue, order_id).state, job(queue, order_id).note) == (JobState.DONE,
                                                                        "completed")


def test_codes_not_delivered_before_a_crash_are_delivered_once_by_the_worker(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    store = MemoryDedupStore(clock=clock)
    order_id = new_order(sim, OrderScript.complete(after=5))
    delivered: list[str] = []
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        client.wait_for_completion(order_id)
        # ...the process dies before deliver_once.
        worker = RecoveryWorker(client, queue, store,
                                on_completed=lambda o: delivered.append(o.id))
        drain(worker, queue, clock)
        assert not deliver_once(client.orders.get(order_id), print, store).delivered
    assert delivered == [order_id]


def test_a_watch_that_fires_during_its_wait_yields_to_the_wait_s_settle(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    order_id = new_order(sim, OrderScript.fail(after=30))
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        queue.watch(order_id, due_at=clock.time())  # due already: the guess was short
        taken = queue.take(lease=60)
        assert taken is not None
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        # The wait, still running, sees the order fail and settles the watch...
        with pytest.raises(Exception, match="failed"):
            client.wait_for_completion(order_id)
        assert job(queue, order_id).state is JobState.DONE
        # ...and the worker's re-check of the pending order it saw earlier changes nothing.
        sim.script(order_id, OrderScript.stall())
        assert worker.process(taken).state is JobState.DONE


# -- the horizon --------------------------------------------------------------------------


policies = st.one_of(
    st.builds(ExponentialJitter, base=st.floats(0.1, 10), factor=st.floats(1.0, 2.0),
              cap=st.floats(1, 60), jitter=st.floats(0, 1), poll_at_start=st.booleans()),
    st.builds(Fixed, seconds=st.floats(0.1, 30), jitter=st.floats(0, 1)),
    st.builds(FullJitter, base=st.floats(0.1, 10), cap=st.floats(1, 60)),
)


@settings(max_examples=40, deadline=None)
@given(backoff=policies, attempts=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       timeout=st.none() | st.floats(1, 600))
def test_a_wait_never_outlives_its_horizon(backoff: Any, attempts: int, seed: int,
                                           timeout: float | None) -> None:
    clock = FakeClock()
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.stall())
    results: list[WaitResult] = []
    with sim.client(rng=random.Random(seed)) as client:
        order_id = client.orders.create(items=STEAM).id
        client.orders.pay(order_id)
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id,
                                       policy=WaitPolicy(backoff=backoff, max_attempts=attempts),
                                       timeout=timeout, listener=Hooks(on_finish=results.append))
    options = WaitPolicy(backoff=backoff, max_attempts=attempts, timeout=timeout)
    assert results[0].elapsed <= options.horizon() + 1e-6
