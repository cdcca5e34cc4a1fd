"""Recovery workers outlive outages of their queue, stores and the API, and say so once."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from foxpoll import FoxReload, Order, SystemClock
from foxpoll._io import run
from foxpoll._outages import OUTAGE_BACKOFF, STOP_LOOKS_EVERY, Outages
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.errors import StoreUnavailable
from foxpoll.metrics import PrometheusMetrics
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import (
    FakeClock,
    FakeFoxReload,
    Fault,
    FaultKind,
    FreezingProxy,
    OrderScript,
    SimulatorServer,
)

from .services import POSTGRES_URL, own_database, require

STEAM = [{"itemId": "product_steam_10"}]
OUTAGE_LOG = "recovery worker: round failed"


class FlakyQueue(SQLiteRecoveryQueue):
    """A real SQLite queue whose ``take`` fails as ``fail()`` says: an outage on cue."""

    def __init__(self, path: Path, *, fail: Callable[[], BaseException | None],
                 **options: Any) -> None:
        super().__init__(path, **options)
        self.fail = fail
        self.failed = 0

    def take(self, *, lease: float = 300.0) -> Any:
        error = self.fail()
        if error is not None:
            self.failed += 1
            raise error
        return super().take(lease=lease)


RECOVERY_LOG = logging.getLogger("foxpoll.recovery")


def paid(sim: FakeFoxReload, client: FoxReload, script: OrderScript) -> str:
    sim.script_next(script)
    order = client.orders.create(items=STEAM)
    client.orders.pay(order.id)
    return order.id


def errors(registry: CollectorRegistry, component: str = "recovery") -> float:
    return registry.get_sample_value("foxpoll_worker_errors_total",
                                     {"component": component}) or 0.0


def messages(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.getMessage().startswith(start)]


# -- the bookkeeping ---------------------------------------------------------------------


def test_outages_back_off_capped_with_full_jitter_and_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    outages = Outages("recovery", "recovery worker", log=RECOVERY_LOG,
                      backoff=OUTAGE_BACKOFF,
                      rng=random.Random(7), metrics=PrometheusMetrics(registry),
                      clock=clock.monotonic)
    caplog.set_level(logging.DEBUG, logger="foxpoll.recovery")
    down = StoreUnavailable("PostgreSQL is unavailable: X")
    for _ in range(2):  # two outages: each starts its backoff afresh
        waits = [outages.failed(down) for _ in range(12)]
        for _ in waits:
            run(outages.count(down))
        assert all(0 <= w <= min(60.0, 2.0 ** n) for n, w in enumerate(waits))
        assert max(waits) > 8  # it grows...
        assert len(set(waits)) == len(waits)  # ...jittered, not in step with the fleet
        clock.advance(sum(waits))
        outages.succeeded()
        outages.succeeded()  # nothing more to say while all is well
    assert messages(caplog, logging.WARNING, OUTAGE_LOG) == [
        "recovery worker: round failed (StoreUnavailable: PostgreSQL is unavailable: X); "
        "retrying until it succeeds"] * 2
    recovered = messages(caplog, logging.INFO, "recovery worker: recovered")
    assert len(recovered) == 2
    assert recovered[0].startswith("recovery worker: recovered after 12 failed round(s) in ")
    assert errors(registry) == 24


def test_a_foreign_error_is_logged_by_its_type_only(caplog: pytest.LogCaptureFixture) -> None:
    outages = Outages("recovery", "recovery worker", log=RECOVERY_LOG,
                      backoff=Fixed(1), rng=random.Random(),
                      metrics=None, clock=time.monotonic)
    outages.failed(sqlite3.OperationalError("unable to open /secret/path?password=hunter2"))
    assert messages(caplog, logging.WARNING, OUTAGE_LOG) == [
        "recovery worker: round failed (OperationalError); retrying until it succeeds"]
    assert "hunter2" not in caplog.text


# -- the worker, on virtual time ---------------------------------------------------------


@pytest.fixture
def served(sim: FakeFoxReload) -> Iterator[FoxReload]:
    sim.default_script = OrderScript.complete(after=0)
    with sim.client() as client:
        yield client


def test_the_worker_outlives_a_queue_outage_logs_it_once_counts_it_and_delivers(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock, served: FoxReload,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="foxpoll.recovery")
    back_at = clock.monotonic() + 600  # ten minutes without the queue

    def down() -> BaseException | None:
        if clock.monotonic() < back_at:
            return StoreUnavailable("PostgreSQL is unavailable: OperationalError")
        return None

    stop = threading.Event()
    delivered: list[Order] = []

    def deliver(order: Order) -> None:
        delivered.append(order)
        stop.set()

    registry = CollectorRegistry()
    with FlakyQueue(tmp_path / "q.db", fail=down, clock=clock) as queue:
        order_id = paid(sim, served, OrderScript.complete(after=0))
        queue.enqueue(order_id)
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=deliver, metrics=PrometheusMetrics(registry),
                                rng=random.Random(3))
        worker.run(stop=stop)
        assert [o.id for o in delivered] == [order_id]
        assert queue.get(order_id).state is JobState.DONE  # type: ignore[union-attr]
    assert len(messages(caplog, logging.WARNING, OUTAGE_LOG)) == 1
    assert len(messages(caplog, logging.INFO, "recovery worker: recovered")) == 1
    assert errors(registry) == queue.failed > 10  # every failed round, counted
    # Backed off: a round every ~30 s at most once the backoff reached its cap, and back
    # within a minute of the queue.
    assert queue.failed < 600 / 10
    assert back_at <= clock.monotonic() < back_at + 60


def test_stop_ends_the_worker_promptly_in_the_middle_of_an_outage(
    tmp_path: Path, clock: FakeClock, served: FoxReload,
) -> None:
    stop = threading.Event()
    stopped_at: list[float] = []

    def down() -> BaseException | None:
        if queue.failed == 5:
            stop.set()  # while the worker is about to wait up to 32 s
            stopped_at.append(clock.monotonic())
        return StoreUnavailable("SQLite is unavailable: OperationalError")

    with FlakyQueue(tmp_path / "q.db", fail=down, clock=clock) as queue:
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=print, outage_backoff=Fixed(3600))
        worker.run(stop=stop)
    assert clock.monotonic() - stopped_at[0] <= STOP_LOOKS_EVERY


def test_a_failing_sweep_is_an_outage_that_does_not_hold_the_due_jobs_back(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock, served: FoxReload,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def records() -> list[tuple[str, float]]:
        raise StoreUnavailable("your orders table is unavailable")

    stop = threading.Event()
    delivered: list[Order] = []
    registry = CollectorRegistry()
    with SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        order_id = paid(sim, served, OrderScript.complete(after=0))
        queue.enqueue(order_id)
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=lambda o: (delivered.append(o), stop.set()),
                                metrics=PrometheusMetrics(registry))
        worker.run(stop=stop, pending_orders=records)
    assert [o.id for o in delivered] == [order_id]
    assert errors(registry) == 1
    assert messages(caplog, logging.WARNING, OUTAGE_LOG) == [
        "recovery worker: round failed (StoreUnavailable: your orders table is "
        "unavailable); retrying until it succeeds"]


def test_an_api_outage_does_not_stop_the_worker(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock, served: FoxReload,
) -> None:
    order_id = paid(sim, served, OrderScript.complete(after=0))
    sim.inject(Fault(FaultKind.SERVER_ERROR, times=10_000),
               Fault(FaultKind.CONNECT_ERROR, times=10_000))
    stop = threading.Event()
    delivered: list[Order] = []
    policy = RecoveryPolicy(max_attempts=2, backoff=Fixed(1))  # fewer than the outage's rounds

    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if clock.monotonic() >= 5:  # the API is back after 5 s
            sim.clear_faults()

    clock.sleep = sleep  # type: ignore[method-assign]
    with SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock, policy=policy) as queue:
        queue.enqueue(order_id)
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=lambda o: (delivered.append(o), stop.set()))
        worker.run(stop=stop, idle=0.5)
        assert [o.id for o in delivered] == [order_id]
        job = queue.get(order_id)
        assert job is not None
        assert job.state is JobState.DONE
        assert job.attempts == 1  # the outage's re-checks gave their attempts back


# -- what ends run() ---------------------------------------------------------------------


def test_programming_errors_in_the_wiring_end_run_at_once(
    tmp_path: Path, clock: FakeClock, served: FoxReload, caplog: pytest.LogCaptureFixture,
) -> None:
    with SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=print)
        with pytest.raises(TypeError):
            worker.run(pending_orders=lambda since: [])  # type: ignore[arg-type,misc]
    with FlakyQueue(tmp_path / "f.db", fail=lambda: AttributeError("no such thing"),
                    clock=clock) as flaky:
        worker = RecoveryWorker(served, flaky, MemoryDedupStore(clock=clock),
                                on_completed=print)
        with pytest.raises(AttributeError):
            worker.run()
    assert flaky.failed == 1  # not retried
    assert messages(caplog, logging.WARNING, OUTAGE_LOG) == []


def test_metrics_without_the_error_hook_still_serve_and_keep_done_is_checked(
    tmp_path: Path, clock: FakeClock, served: FoxReload, caplog: pytest.LogCaptureFixture,
) -> None:
    finished: list[Any] = []

    class OnlyFinish:  # a Listener of the partner's own, from before on_worker_error
        def on_finish(self, result: Any) -> None:
            finished.append(result)

    with FlakyQueue(tmp_path / "q.db", clock=clock, fail=lambda: (
            StoreUnavailable("down") if clock.monotonic() < 100 else None)) as queue:
        stop = threading.Event()
        worker = RecoveryWorker(served, queue, MemoryDedupStore(), on_completed=print,
                                metrics=OnlyFinish())  # type: ignore[arg-type]
        real_sleep = clock.sleep

        def sleep(seconds: float) -> None:
            real_sleep(seconds)
            if clock.monotonic() > 200:
                stop.set()

        clock.sleep = sleep  # type: ignore[method-assign]
        worker.run(stop=stop)  # the outage is logged, not counted, and the worker lives
    assert queue.failed > 1
    assert len(messages(caplog, logging.WARNING, OUTAGE_LOG)) == 1
    with SQLiteRecoveryQueue(tmp_path / "k.db", clock=clock) as other, \
            pytest.raises(ValueError, match="keep_done"):
        RecoveryWorker(served, other, MemoryDedupStore(), on_completed=print, keep_done=-1)


def test_a_callback_that_cannot_take_an_order_ends_run_one_that_raises_stays_with_its_job(
    tmp_path: Path, sim: FakeFoxReload, clock: FakeClock, served: FoxReload,
) -> None:
    with SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        order_id = paid(sim, served, OrderScript.complete(after=0))
        queue.enqueue(order_id)
        miswired = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                  on_completed=print)
        # rewired past the constructor's check: the first call tells
        miswired.on_completed = lambda: None  # type: ignore[assignment,misc]
        with pytest.raises(TypeError, match="on_completed"):
            miswired.run()  # the wiring: no job can succeed, so no waiting

        stop = threading.Event()
        real_sleep = clock.sleep

        def sleep(seconds: float) -> None:
            real_sleep(seconds)
            if clock.monotonic() > 3600:
                stop.set()

        def refuse(order: Order) -> None:
            raise ConnectionRefusedError("the customer's mailbox")

        clock.sleep = sleep  # type: ignore[method-assign]
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=refuse)
        worker.run(stop=stop, idle=30)  # returns at the stop, never raises
        job = queue.get(order_id)
        assert job is not None
        assert job.state is not JobState.DONE  # not delivered, not lost
        assert job.last_error is not None
        assert "ConnectionRefusedError" in job.last_error  # on record, on the job


# -- real outages, on real time ----------------------------------------------------------


@pytest.fixture
def real_api() -> Iterator[tuple[FakeFoxReload, FoxReload]]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(sim) as server, \
            FoxReload(sim.api_key, base_url=server.url, timeout=1.0, max_retries=0) as client:
        yield sim, client


@pytest.fixture
def pg_table() -> Iterator[str]:
    require("PostgreSQL", "127.0.0.1", 5432)
    from .services import drop_table

    table = f"h6b_outage_{uuid.uuid4().hex[:8]}"
    try:
        yield table
    finally:
        drop_table(table)


def run_in_thread(worker: RecoveryWorker, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop, "idle": 0.1},
                              daemon=True)
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.service
def test_a_postgres_worker_outlives_a_5_s_freeze_and_a_5_s_api_outage_then_delivers(
    pg_table: str, real_api: tuple[FakeFoxReload, FoxReload],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from foxpoll.recovery import PostgresRecoveryQueue

    caplog.set_level(logging.INFO, logger="foxpoll.recovery")
    sim, client = real_api
    direct = PostgresRecoveryQueue(POSTGRES_URL, table=pg_table,
                                   policy=RecoveryPolicy(backoff=Fixed(0.5), max_attempts=50))
    direct.create_schema()
    registry = CollectorRegistry()
    delivered: list[str] = []
    stop = threading.Event()
    with FreezingProxy(("127.0.0.1", 5432)) as proxy, direct:
        host, port, rest = "127.0.0.1", proxy.port, POSTGRES_URL.rsplit("/", 1)[1]
        via_proxy = PostgresRecoveryQueue(
            f"host={host} port={port} user=postgres dbname={rest}", table=pg_table,
            policy=direct.policy, statement_timeout=1.0, connect_timeout=1.0)
        worker = RecoveryWorker(client, via_proxy, MemoryDedupStore(),
                                on_completed=lambda o: delivered.append(o.id),
                                metrics=PrometheusMetrics(registry),
                                outage_backoff=Fixed(0.5), lease=3.0)
        thread = run_in_thread(worker, stop)
        try:
            first = paid(sim, client, OrderScript.complete(after=0))
            direct.enqueue(first)
            assert wait_until(lambda: delivered == [first], 10)

            proxy.freeze()  # the queue stalls mid-statement for 5 s
            second = paid(sim, client, OrderScript.complete(after=0))
            direct.enqueue(second)
            time.sleep(5)
            assert thread.is_alive()
            assert errors(registry) >= 2
            proxy.thaw()
            # A take the worker gave up on still reaches the server when the proxy thaws,
            # and leases the job to no one: it comes back when that lease runs out.
            assert wait_until(lambda: delivered == [first, second], 15)

            third = paid(sim, client, OrderScript.complete(after=0))
            sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", times=100_000))
            direct.enqueue(third)  # and the API answers 503 for 5 s
            time.sleep(5)
            assert thread.is_alive()
            assert third not in delivered
            sim.clear_faults()
            assert wait_until(lambda: delivered == [first, second, third], 15)
        finally:
            stopped = time.monotonic()
            stop.set()
            thread.join(5)
            via_proxy.close()
        assert not thread.is_alive()
        assert time.monotonic() - stopped < 2.5  # a round in flight ends within its timeout
    # Two outages, the queue's and the API's: each logged once when it began and once when
    # it ended, whatever the number of rounds it failed.
    began = messages(caplog, logging.WARNING, OUTAGE_LOG)
    assert len(began) == 2
    assert "StoreUnavailable" in began[0]
    assert "InternalServerError" in began[1]
    assert len(messages(caplog, logging.INFO, "recovery worker: recovered")) == 2


@pytest.mark.slow
def test_a_sqlite_worker_outlives_a_5_s_lock_held_by_another_process(
    tmp_path: Path, real_api: tuple[FakeFoxReload, FoxReload],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="foxpoll.recovery")
    sim, client = real_api
    path = tmp_path / "q.db"
    registry = CollectorRegistry()
    delivered: list[str] = []
    stop = threading.Event()
    with SQLiteRecoveryQueue(path, busy_timeout=0.3) as queue:
        worker = RecoveryWorker(client, queue, MemoryDedupStore(),
                                on_completed=lambda o: delivered.append(o.id),
                                metrics=PrometheusMetrics(registry),
                                outage_backoff=Fixed(0.3))
        thread = run_in_thread(worker, stop)
        try:
            order_id = paid(sim, client, OrderScript.complete(after=0))
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")  # another process holds the file for 5 s
            try:
                time.sleep(0.5)
                with pytest.raises(StoreUnavailable):
                    queue.enqueue(order_id)
                time.sleep(4.5)
                assert thread.is_alive()
            finally:
                other.execute("ROLLBACK")
                other.close()
            queue.enqueue(order_id)
            assert wait_until(lambda: delivered == [order_id], 10)
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive()
    assert errors(registry) >= 3
    assert len(messages(caplog, logging.WARNING, OUTAGE_LOG)) == 1
    assert len(messages(caplog, logging.INFO, "recovery worker: recovered")) == 1


# -- procrastinate -----------------------------------------------------------------------

QUIET = {"install_signal_handlers": False, "fetch_job_polling_interval": 0.2}


@pytest.fixture
def database() -> Iterator[str]:
    with own_database("h6b_outage") as url:
        yield url.rsplit("/", 1)[1]  # its name


def procrastinate_queue(conninfo: str, **options: Any) -> Any:
    from foxpoll.recovery import ProcrastinateRecoveryQueue

    queue = ProcrastinateRecoveryQueue(conninfo, **options)
    queue.create_schema()
    return queue


@pytest.mark.service
async def test_procrastinate_s_worker_is_started_again_after_it_fails_or_stops_by_itself(
    database: str, real_api: tuple[FakeFoxReload, FoxReload],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from procrastinate.exceptions import ConnectorException

    _, client = real_api
    queue = procrastinate_queue(f"host=127.0.0.1 user=postgres dbname={database}")
    runs: list[dict[str, Any]] = []

    async def run_worker_async(**options: Any) -> None:
        runs.append(options)
        if len(runs) == 1:
            raise ConnectorException("a query lost its connection")
        if len(runs) == 2:
            return  # what procrastinate does when its heartbeat or LISTEN task fails
        signal.raise_signal(signal.SIGINT)  # then an operator presses ^C
        await asyncio.Event().wait()  # procrastinate's worker runs until cancelled

    monkeypatch.setattr(queue.app, "run_worker_async", run_worker_async)
    registry = CollectorRegistry()
    worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                            metrics=PrometheusMetrics(registry), outage_backoff=Fixed(0.05))
    before = signal.getsignal(signal.SIGINT)
    with queue:
        await asyncio.wait_for(queue.run_worker_async(worker), 30)  # the signal stops it
    assert len(runs) == 3
    assert all(options["install_signal_handlers"] is False for options in runs)
    assert messages(caplog, logging.WARNING, "procrastinate worker: round failed") == [
        "procrastinate worker: round failed (ConnectorException); retrying until it "
        "succeeds",
        "procrastinate worker: round failed (StoreUnavailable: procrastinate's worker "
        "stopped by itself (a side task failed)); retrying until it succeeds"]
    assert errors(registry) == 2
    assert signal.getsignal(signal.SIGINT) == before  # the handler before is back


@pytest.mark.service
async def test_a_programming_error_ends_the_procrastinate_worker(
    database: str, real_api: tuple[FakeFoxReload, FoxReload], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, client = real_api
    queue = procrastinate_queue(f"host=127.0.0.1 user=postgres dbname={database}")

    async def run_worker_async(**options: Any) -> None:
        raise TypeError("a task middleware with the wrong signature")

    monkeypatch.setattr(queue.app, "run_worker_async", run_worker_async)
    worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
    with queue, pytest.raises(TypeError, match="middleware"):
        await queue.run_worker_async(worker, **QUIET)


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.parametrize("outage", ["freeze", "down"])
async def test_the_procrastinate_worker_outlives_a_5_s_database_outage_then_delivers(
    outage: str, database: str, real_api: tuple[FakeFoxReload, FoxReload],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="foxpoll.recovery")
    sim, client = real_api
    direct = procrastinate_queue(f"host=127.0.0.1 user=postgres dbname={database}")
    proxy = FreezingProxy(("127.0.0.1", 5432))
    delivered: list[str] = []
    registry = CollectorRegistry()
    with proxy, direct:
        queue = procrastinate_queue(f"host=127.0.0.1 port={proxy.port} user=postgres "
                                    f"dbname={database}", dispatch_every=0.5,
                                    statement_timeout=1.0, connect_timeout=1.0)
        # A short lease: a reservation the freeze cut short on the client may still run
        # on the server when the network is back, and hold its job for a lease.
        worker = RecoveryWorker(client, queue, MemoryDedupStore(),
                                on_completed=lambda o: delivered.append(o.id),
                                metrics=PrometheusMetrics(registry),
                                outage_backoff=Fixed(0.5), lease=3.0)
        running = asyncio.ensure_future(queue.run_worker_async(worker, **QUIET))

        async def delivers(order_id: str, within: float) -> bool:
            deadline = time.monotonic() + within
            while time.monotonic() < deadline and not running.done():
                if order_id in delivered:
                    return True
                await asyncio.sleep(0.1)
            return False

        try:
            first = paid(sim, client, OrderScript.complete(after=0))
            direct.enqueue(first)
            assert await delivers(first, 15)
            proxy.freeze() if outage == "freeze" else proxy.down()
            second = paid(sim, client, OrderScript.complete(after=0))
            direct.enqueue(second)  # due during the outage: delivered after it
            await asyncio.sleep(5)
            assert second not in delivered
            proxy.thaw() if outage == "freeze" else proxy.up()
            assert await delivers(second, 30)
            assert not running.done()
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            await queue.aclose()
    assert delivered == [first, second]
    if outage == "down":  # procrastinate's worker failed, and was started again
        assert errors(registry) >= 1
        assert len(messages(caplog, logging.WARNING, "procrastinate worker: round failed")) == 1
        assert len(messages(caplog, logging.INFO, "procrastinate worker: recovered")) == 1
    else:  # procrastinate's queries only hang; the dispatcher's own one timed out
        assert errors(registry, "dispatcher") >= 1
        assert len(messages(caplog, logging.WARNING, "recovery dispatcher: round failed")) == 1
        assert len(messages(caplog, logging.INFO, "recovery dispatcher: recovered")) == 1
    for label in ("procrastinate worker", "recovery dispatcher"):  # once per outage at most
        assert len(messages(caplog, logging.WARNING, f"{label}: round failed")) <= 1


def test_the_worker_alert_uses_the_metric_foxpoll_exports() -> None:
    from foxpoll.metrics import OpenTelemetryMetrics

    added: list[tuple[str, float, Any]] = []

    class Meter:  # records what the instruments are given
        def create_counter(self, name: str, **_: Any) -> Any:
            class Counter:
                def add(self, value: float, attributes: Any = None) -> None:
                    added.append((name, value, attributes))
            return Counter()

        create_histogram = create_counter

    rules = (Path(__file__).parent.parent / "docs" / "alerts.yml").read_text()
    registry = CollectorRegistry()
    PrometheusMetrics(registry).on_worker_error("events", StoreUnavailable("down"))
    assert "foxpoll_worker_errors_total" in rules
    assert errors(registry, "events") == 1
    OpenTelemetryMetrics(Meter()).on_worker_error("dispatcher", RuntimeError())
    assert added == [("foxpoll.worker.errors", 1, {"component": "dispatcher"})]
