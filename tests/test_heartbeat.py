"""Heartbeats: a live process renews its watches in one write per period, so a dead one's
orders are re-checked within a lease, whatever their wait's horizon.

On virtual time against the simulator first, with a SQLite queue that counts its
renewals; then ``queue.renew`` on every engine; then a fleet of real processes, one of
them SIGKILLed mid-wait (``heartbeat_worker.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, Order, OrderStalled, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.errors import StoreUnavailable
from foxpoll.polling import PollAttempt, WaitPolicy
from foxpoll.recovery import (
    JobState,
    RecoveryJob,
    RecoveryPolicy,
    RecoveryWorker,
    SQLiteRecoveryQueue,
)
from foxpoll.recovery._sql import RENEW_CHUNK
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript, SimulatorServer

from .services import POSTGRES_URL, drop_table, require
from .test_recovery_queues import Engine, due_in, engine  # noqa: F401 - the fixture

STEAM = [{"itemId": "product_steam_10"}]
POLICY = RecoveryPolicy()  # the defaults: a 60 s lease, renewed every 20 s
PERIOD = POLICY.watch_lease / 3


class Hooks:
    """A listener made of functions, by event name."""

    def __init__(self, **hooks: Any) -> None:
        self.__dict__.update(hooks)


class CountingQueue(SQLiteRecoveryQueue):
    """A SQLite queue that records each renewal: when, and how many orders it named."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renewals: list[tuple[float, int]] = []
        self.watches = 0
        self.fail_renewals = 0

    def watch(self, order_id: str, *, due_at: float, replace: bool = True) -> bool:
        self.watches += 1
        return super().watch(order_id, due_at=due_at, replace=replace)

    def renew(self, order_ids: Iterable[str], *, due_at: float) -> int:
        ids = list(order_ids)
        self.renewals.append((self._clock(), len(ids)))
        if self.fail_renewals:
            self.fail_renewals -= 1
            raise StoreUnavailable("SQLite is unavailable: injected")
        return super().renew(ids, due_at=due_at)


@pytest.fixture
def queue(tmp_path: Path, clock: FakeClock) -> Iterator[CountingQueue]:
    with CountingQueue(tmp_path / "q.db", policy=POLICY, clock=clock) as opened:
        yield opened


def new_orders(sim: FakeFoxReload, script: OrderScript, count: int = 1) -> list[str]:
    sim.script_next(*[script] * count)
    with sim.client() as plain:
        return [plain.orders.create(items=STEAM).id for _ in range(count)]


def job(queue: SQLiteRecoveryQueue, order_id: str) -> RecoveryJob:
    found = queue.get(order_id)
    assert found is not None
    return found


# -- one write per period, for every wait of the process ----------------------------------


def test_many_waits_renew_their_watches_in_one_write_per_period(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    ids = new_orders(sim, OrderScript.complete(after=600), count=30)
    due_in: dict[str, list[float]] = {order_id: [] for order_id in ids}
    finished_at: list[float] = []

    def polled(attempt: PollAttempt) -> None:
        due_in[attempt.order_id].append(job(queue, attempt.order_id).due_at - clock.time())

    with sim.client(recovery_queue=queue) as client:
        for order_id in ids:
            client.orders.pay(order_id)
        began, before = clock.time(), len(queue.renewals)
        results = list(client.wait_many(ids, policy=WaitPolicy.after_payment(),
                                        listener=Hooks(on_poll=polled, on_finish=lambda r:
                                                       finished_at.append(clock.time()))))
        elapsed = clock.time() - began
    assert all(result.ok for result in results)
    assert elapsed > 600
    assert queue.watches == 30  # the payments' own: the waits wrote none
    # One renewal a period for the 30 orders, not one per order, until they complete.
    renewals = queue.renewals[before:]
    times = [at for at, _ in renewals]
    assert elapsed / PERIOD - 2 <= len(times) <= elapsed / PERIOD + 1
    assert all(later - earlier >= PERIOD - 1e-3
               for earlier, later in itertools.pairwise(times))
    early = [named for at, named in renewals if at < min(finished_at)]
    assert len(early) >= 25
    assert set(early) == {30}
    # Every poll found its order's watch a lease ahead, less at most one period.
    seen = [left for lefts in due_in.values() for left in lefts]
    assert POLICY.watch_lease - PERIOD - 1e-6 <= min(seen) <= max(seen) <= POLICY.watch_lease
    assert {job(queue, order_id).reason for order_id in ids} == {"delivery"}  # settled


def test_a_long_sleep_wakes_every_period_without_a_request(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    [order_id] = new_orders(sim, OrderScript.complete(after=100))
    policy = WaitPolicy(backoff=Fixed(90.0, jitter=0.0), max_attempts=5)
    with sim.client(recovery_queue=queue) as client:
        client.orders.pay(order_id)
        gets = sim.count("GET")
        clock.sleeps.clear()
        client.wait_for_completion(order_id, policy=policy)
    assert sim.count("GET") - gets == 3  # at once, at 90 s, at 180 s: no extra poll
    assert max(clock.sleeps) == pytest.approx(PERIOD)
    assert sum(clock.sleeps) == pytest.approx(180.0)
    assert len(queue.renewals) == 9  # every 20 s from the payment on, the last at 180 s
    [other] = new_orders(sim, OrderScript.complete(after=100))
    with sim.client() as plain:  # no queue, no heartbeat: the schedule's own sleeps
        plain.orders.pay(other)
        clock.sleeps.clear()
        plain.wait_for_completion(other, policy=policy)
    assert clock.sleeps == [90.0, 90.0]


def sampling_due_in(clock: FakeClock, queue: SQLiteRecoveryQueue, order_ids: list[str]
                    ) -> list[float]:
    """Have every sleep of ``clock`` first note how long each order's watch (once written)
    has left."""
    samples: list[float] = []
    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        watched = [queue.get(order_id) for order_id in order_ids]
        samples.extend(found.due_at - clock.time() for found in watched if found is not None)
        real_sleep(seconds)

    clock.sleep = sleep  # type: ignore[method-assign]
    return samples


@pytest.mark.parametrize("held_by", ["429s", "a slow budget", "429s on the payment"])
@pytest.mark.parametrize("waits", ["one", "many"])
def test_a_wait_held_inside_one_request_still_renews_its_watch(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue, held_by: str, waits: str
) -> None:
    # Before, a request's own sleeps (a 429's Retry-After, a permit of the budget) did not
    # beat: three Retry-After: 60 in a row let the live wait's watch fall due.
    from foxpoll.ratelimit import RateLimit
    from foxpoll.testing import Fault, FaultKind

    ids = new_orders(sim, OrderScript.complete(after=400), count=2 if waits == "many" else 1)
    budget = RateLimit(1, burst=1, clock=clock) if held_by == "a slow budget" else None
    with sim.client(recovery_queue=queue, rate_limit=budget) as client:
        if held_by == "429s on the payment":
            sim.inject(Fault(FaultKind.RATE_LIMIT, method="POST", times=3, retry_after=60))
        clock.sleeps.clear()
        samples = sampling_due_in(clock, queue, ids)
        for order_id in ids:
            client.orders.pay(order_id)
        if held_by == "429s":
            sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", times=3, retry_after=60))
        policy = WaitPolicy.after_payment()
        if waits == "one":
            [order_id] = ids
            assert client.wait_for_completion(order_id, policy=policy).status.value == \
                "completed"
        else:
            assert all(result.ok for result in client.wait_many(ids, policy=policy))
    assert sum(clock.sleeps) >= 180  # held a minute at a time, three times or more
    assert max(clock.sleeps) <= PERIOD + 1e-6  # every sleep woke to beat...
    # ...so the watches stayed a lease ahead, less at most a period: never due
    assert min(samples) >= POLICY.watch_lease - PERIOD - 1e-6


async def test_the_async_client_renews_in_a_worker_thread(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    import threading

    ids = new_orders(sim, OrderScript.complete(after=120), count=5)
    threads: set[str] = set()
    original = queue.renew

    def renew(order_ids: Iterable[str], *, due_at: float) -> int:
        threads.add(threading.current_thread().name)
        return original(order_ids, due_at=due_at)

    queue.renew = renew  # type: ignore[method-assign]
    async with sim.async_client(recovery_queue=queue) as client:
        for order_id in ids:
            await client.orders.pay(order_id)
        results = [result async for result in client.wait_many(ids)]
    assert all(result.ok for result in results)
    assert max(named for _, named in queue.renewals) == 5  # one write for the five
    assert threading.main_thread().name not in threads  # never on the event loop


# -- what stops renewing ------------------------------------------------------------------


def test_a_wait_that_ends_however_it_ends_is_renewed_no_more(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    [fast] = new_orders(sim, OrderScript.complete(after=1))
    abandoned, raised, keeper = new_orders(sim, OrderScript.stall(), count=3)

    def refuse(attempt: PollAttempt) -> None:
        raise RuntimeError("a listener's bug")

    with sim.client(recovery_queue=queue) as client:
        for order_id in (fast, abandoned, raised, keeper):
            client.orders.pay(order_id)
        for _ in client.wait_many([fast, abandoned]):  # the consumer leaves after one
            break
        with pytest.raises(RuntimeError, match="bug"):
            client.wait_for_completion(raised, listener=Hooks(on_poll=refuse))
        due = {order_id: job(queue, order_id).due_at for order_id in (abandoned, raised)}
        before = len(queue.renewals)
        # The process lives on and waits on another order for three leases.
        with pytest.raises(OrderStalled):
            client.wait_for_completion(keeper, timeout=3 * POLICY.watch_lease)
    assert len(queue.renewals) - before >= 8
    assert {named for _, named in queue.renewals[before:]} == {1}  # the keeper's only
    for order_id in (abandoned, raised):
        left = job(queue, order_id)
        assert (left.state, left.reason, left.due_at) == (JobState.QUEUED, "watch",
                                                          due[order_id])
        assert left.due_at < clock.time()  # fallen due: a worker re-checks it


def test_a_payment_not_waited_on_is_renewed_until_a_wait_would_have_given_up(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue
) -> None:
    """A process that only pays renews as it pays, for the client policy's horizon."""
    first, *later = new_orders(sim, OrderScript.stall(), count=12)
    horizon = 30.0
    with sim.client(recovery_queue=queue, wait_policy=WaitPolicy(timeout=horizon)) as client:
        client.orders.pay(first)
        paid_at = clock.time()
        for order_id in later:
            clock.advance(PERIOD)
            client.orders.pay(order_id)
    until = paid_at + horizon + POLICY.watch_margin
    # Renewed at each payment a period apart while it was live, then left to fire.
    assert job(queue, first).due_at == pytest.approx(
        paid_at + PERIOD * math.floor((until - paid_at) / PERIOD) + POLICY.watch_lease,
        abs=1e-3)
    assert job(queue, later[-1]).due_at - clock.time() == pytest.approx(POLICY.watch_lease)


def test_a_renewal_that_fails_is_logged_and_tried_again(
    sim: FakeFoxReload, clock: FakeClock, queue: CountingQueue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [order_id] = new_orders(sim, OrderScript.complete(after=150))
    queue.fail_renewals = 1  # the next renewal still comes a period before it is due
    due_in: list[float] = []
    with sim.client(recovery_queue=queue) as client, caplog.at_level(logging.ERROR):
        client.orders.pay(order_id)
        order = client.wait_for_completion(order_id, policy=WaitPolicy.after_payment(),
                                           listener=Hooks(on_poll=lambda a: due_in.append(
                                               job(queue, order_id).due_at - clock.time())))
    assert order.status == "completed"
    assert caplog.text.count("could not renew the watches of 1 orders") == 1
    assert len(queue.renewals) > 3
    assert min(due_in) >= PERIOD - 1e-3  # it never came near to falling due


def test_a_watch_lease_must_be_a_positive_time() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="watch_lease"):
            RecoveryPolicy(watch_lease=bad)
    assert RecoveryPolicy(watch_lease=5.0).watch_lease == 5.0


# -- queue.renew on every engine ----------------------------------------------------------


def test_renew_moves_only_queued_watches_many_at_a_time(engine: Engine) -> None:  # noqa: F811
    q = engine.queue
    watched = [f"w{n}" for n in range(RENEW_CHUNK + 1)]  # two statements, one of one id
    for order_id in watched:
        assert q.watch(order_id, due_at=engine.now() + 10)
    q.watch("stalled", due_at=engine.now() + 10)
    q.enqueue("stalled", due_at=engine.now() + 10)  # under recovery: the worker's
    q.watch("failed", due_at=engine.now() + 10)
    q.settle("failed", status="failed")
    renewed = q.renew([*watched, "stalled", "failed", "never-seen", watched[0]],
                      due_at=engine.now() + 500)
    assert renewed == len(watched)
    assert 495 < due_in(engine, watched[0]) <= 500
    assert 495 < due_in(engine, watched[-1]) <= 500
    assert due_in(engine, "stalled") <= 10
    assert q.get("failed").state is JobState.DONE  # type: ignore[union-attr]
    assert q.renew([], due_at=engine.now()) == 0
    with pytest.raises(ValueError, match="order id"):
        q.renew([""], due_at=engine.now())


# -- real processes: one SIGKILLed mid-wait ------------------------------------------------

WORKER = Path(__file__).with_name("heartbeat_worker.py")
BUYERS = 3
ORDERS_EACH = 4
SLACK = 30.0  # the bound: delivered within watch_lease + SLACK of the kill


@pytest.mark.slow
@pytest.mark.parametrize("engine_kind", [
    "sqlite", pytest.param("postgres", marks=pytest.mark.service),
    pytest.param("procrastinate", marks=pytest.mark.service)])
def test_a_killed_process_s_orders_are_delivered_within_a_lease_of_its_death(
    engine_kind: str, tmp_path: Path
) -> None:
    """Three buyers on the default schedule (20 minutes) and the default 60 s lease; one
    is SIGKILLed while its orders are pending, once it has renewed their watches; the
    others wait on orders that never finish. A recovery worker (on procrastinate: its
    worker and dispatcher) delivers the dead buyer's orders within lease + 30 s of the
    kill, and never touches the live buyers' watches. About 85 s per engine."""
    config: dict[str, Any] = {"engine": engine_kind}
    database = None
    if engine_kind == "sqlite":
        config["sqlite_path"] = str(tmp_path / "queue.db")
    else:
        require("PostgreSQL", "127.0.0.1", 5432)
        config.update(db=POSTGRES_URL, table=f"heartbeat_{uuid.uuid4().hex[:10]}")
        if engine_kind == "procrastinate":  # procrastinate's tables: a database of its own
            database = config["table"]
            postgres(f"CREATE DATABASE {database}")
            config["db"] = POSTGRES_URL.rsplit("/", 1)[0] + f"/{database}"
    try:
        with queue_for(config) as made:  # the schema, before the buyers start
            if engine_kind != "sqlite":
                made.create_schema()
        run_fleet(config, tmp_path)
    finally:
        if engine_kind == "postgres":
            drop_table(config["table"])
        if database is not None:
            postgres(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def postgres(statement: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(statement)


def queue_for(config: dict[str, Any]) -> Any:
    if config["engine"] == "sqlite":
        return SQLiteRecoveryQueue(config["sqlite_path"])
    if config["engine"] == "procrastinate":
        from foxpoll.recovery import ProcrastinateRecoveryQueue

        return ProcrastinateRecoveryQueue(config["db"], table=config["table"],
                                          dispatch_every=1.0)
    from foxpoll.recovery import PostgresRecoveryQueue

    return PostgresRecoveryQueue(config["db"], table=config["table"])


def run_fleet(config: dict[str, Any], tmp: Path) -> None:
    sim = FakeFoxReload(clock=SystemClock(), record_requests=False)
    victim = 1
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as plain:
        orders: list[list[str]] = []
        for buyer in range(BUYERS):
            # The victim's orders complete once it is dead (killed after its first
            # renewal, a period in); the others' never do, so their buyers wait (and
            # renew) to the end of the test.
            script = OrderScript.complete(after=PERIOD + 10) if buyer == victim else \
                OrderScript.stall()
            sim.script_next(*[script] * ORDERS_EACH)
            orders.append([plain.orders.create(items=STEAM).id for _ in range(ORDERS_EACH)])
        buyers: list[subprocess.Popen[bytes]] = []
        log = (tmp / "buyers.log").open("ab")
        try:
            for buyer in range(BUYERS):
                path = tmp / f"buyer-{buyer}.json"
                path.write_text(json.dumps({**config, "sim_url": server.url,
                                            "api_key": sim.api_key, "orders": orders[buyer],
                                            "marker": str(tmp / f"buyer-{buyer}.waiting")}))
                buyers.append(subprocess.Popen(  # noqa: S603 - our own test worker
                    [sys.executable, str(WORKER), str(path)], stdout=log, stderr=log,
                    env={**os.environ, "PYTHONPATH": os.getcwd()}))
            deadline = time.monotonic() + 30
            while not all((tmp / f"buyer-{n}.waiting").exists() for n in range(BUYERS)):
                assert time.monotonic() < deadline, "the buyers never started waiting"
                assert all(b.poll() is None for b in buyers), "a buyer exited early"
                time.sleep(0.1)
            waiting_at = time.time()
            renewed_once(config, orders[victim], waiting_at)  # mid-wait, and renewed
            buyers[victim].send_signal(signal.SIGKILL)
            assert buyers[victim].wait(timeout=10) == -signal.SIGKILL
            killed_at = time.time()
            delivered = recover(server.url, sim.api_key, config, orders[victim], killed_at)
            with queue_for(config) as queue:
                live = [job(queue, order_id) for buyer in range(BUYERS) if buyer != victim
                        for order_id in orders[buyer]]
            alive = [buyer for n, buyer in enumerate(buyers) if n != victim]
            assert all(b.poll() is None for b in alive), "a live buyer died"
        finally:
            for buyer_process in buyers:
                if buyer_process.poll() is None:
                    buyer_process.kill()
                    buyer_process.wait(timeout=10)
            log.close()
    lease = POLICY.watch_lease
    assert sorted(delivered) == sorted(orders[victim])
    late = {order_id: at - killed_at for order_id, at in delivered.items()
            if at - killed_at > lease + SLACK}
    assert not late, f"delivered later than lease + {SLACK:.0f}s after the kill: {late}"
    # The live buyers paid before the kill, so their watches were renewed, past their
    # first lease, and never fired.
    for left in live:
        assert (left.state, left.reason, left.attempts) == (JobState.QUEUED, "watch", 0)
        assert left.due_at > killed_at + lease
    print(f"{config['engine']}: delivered {len(delivered)} orders "
          f"{min(delivered.values()) - killed_at:.1f}-"
          f"{max(delivered.values()) - killed_at:.1f}s after the kill")


def renewed_once(config: dict[str, Any], order_ids: list[str], paid_by: float) -> None:
    """Return once every one of ``order_ids`` has had its watch renewed: due more than a
    lease after the payments (``paid_by``)."""
    deadline = time.monotonic() + PERIOD + 15
    with queue_for(config) as queue:
        while True:
            dues = [job(queue, order_id).due_at for order_id in order_ids]
            if min(dues) > paid_by + POLICY.watch_lease + PERIOD / 2:
                return
            assert time.monotonic() < deadline, f"never renewed: due {dues}, paid {paid_by}"
            time.sleep(0.2)


def recover(sim_url: str, api_key: str, config: dict[str, Any], expected: list[str],
            killed_at: float) -> dict[str, float]:
    """Run a recovery worker until it has delivered ``expected``, or the bound has passed
    by 10 s; when each order was delivered (epoch seconds)."""
    delivered: dict[str, float] = {}

    def deliver(order: Order) -> None:
        delivered[order.id] = time.time()

    stop_at = killed_at + POLICY.watch_lease + SLACK + 10
    with queue_for(config) as queue, FoxReload(api_key, base_url=sim_url) as client:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=deliver)
        if config["engine"] == "procrastinate":
            asyncio.run(run_procrastinate(queue, worker, lambda: set(expected) <= delivered.keys()
                                          or time.time() >= stop_at))
            return delivered
        while not set(expected) <= delivered.keys() and time.time() < stop_at:
            worker.run_pending()
            time.sleep(0.5)
    return delivered


async def run_procrastinate(queue: Any, worker: RecoveryWorker, done: Callable[[], bool]
                            ) -> None:
    """procrastinate's worker and foxpoll's dispatcher, as ``queue.run_worker`` runs
    them, until ``done()``."""
    running = asyncio.ensure_future(queue.run_worker_async(
        worker, install_signal_handlers=False, fetch_job_polling_interval=0.5))
    try:
        while not done():
            assert not running.done(), running.exception()
            await asyncio.sleep(0.5)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
