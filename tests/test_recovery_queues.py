"""The recovery-queue contract, on SQLite (virtual time) and the machine's PostgreSQL.

Time moves with :func:`advance`: SQLite's clock is a FakeClock; on PostgreSQL, whose
clock is the server's, every stored time is moved back instead, which is the same thing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import httpx
import pytest

from foxpoll import BudgetUnavailable, Clock, FoxReload, Order, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import DeliveryState, MemoryDedupStore
from foxpoll.errors import StoreError, StoreUnavailable
from foxpoll.ratelimit import RedisRateLimit
from foxpoll.recovery import (
    JobState,
    RecoveryJob,
    RecoveryPolicy,
    RecoveryWorker,
    SQLiteRecoveryQueue,
)
from foxpoll.testing import FakeClock, FakeFoxReload, HostileServer, OrderScript

from .services import POSTGRES_URL, drop_table, require

if TYPE_CHECKING:
    from foxpoll.recovery import PostgresRecoveryQueue

Advance = Callable[[float], None]
STEAM = [{"itemId": "product_steam_10"}]


@attrs.define
class Engine:
    queue: SQLiteRecoveryQueue | PostgresRecoveryQueue
    advance: Advance
    now: Callable[[], float]
    clock: Clock  # the queue's: a worker's client runs on it, so due times agree


def make_engine(kind: str, tmp_path: Path, policy: RecoveryPolicy | None = None) -> Engine:
    if kind.startswith("sqlite"):
        clock = FakeClock()
        table = 'main."Recovery ""Jobs"""' if kind == "sqlite-schema" else "foxpoll_recovery"
        queue = SQLiteRecoveryQueue(tmp_path / "q.db", policy=policy, table=table,
                                    clock=clock)
        return Engine(queue, clock.advance, clock.time, clock)
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg
    from psycopg import sql

    from foxpoll.recovery import PostgresRecoveryQueue

    name = f"recovery_{uuid.uuid4().hex[:10]}"
    if kind == "postgres-schema":  # another schema, and a name that needs its quotes
        table, where = f'{name}."Recovery Jobs"', sql.Identifier(name, "Recovery Jobs")
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    else:
        table, where = name, sql.Identifier(name)
    pg = PostgresRecoveryQueue(POSTGRES_URL, policy=policy, table=table)
    pg.create_schema()
    pg.create_schema()  # idempotent

    def advance(seconds: float) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {} SET due_at = due_at - %(s)s, "
                                 "locked_until = locked_until - %(s)s").format(where),
                         {"s": seconds})

    return Engine(pg, advance, time.time, SystemClock())


def drop_engine(kind: str, queue: SQLiteRecoveryQueue | PostgresRecoveryQueue) -> None:
    if kind == "postgres":
        drop_table(queue.table)  # type: ignore[union-attr]
    elif kind == "postgres-schema":
        import psycopg
        from psycopg import sql

        schema = queue.table.partition(".")[0]  # type: ignore[union-attr]
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "sqlite-schema",
                        pytest.param("postgres", marks=pytest.mark.service),
                        pytest.param("postgres-schema", marks=pytest.mark.service)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(request.param, tmp_path)
    yield made
    made.queue.close()
    drop_engine(request.param, made.queue)


def due_in(engine: Engine, order_id: str) -> float:
    job = engine.queue.get(order_id)
    assert job is not None
    return job.due_at - engine.now()


# -- enqueue is idempotent in every state -------------------------------------------------


def test_a_queued_order_keeps_the_earlier_due_time(engine: Engine) -> None:
    q = engine.queue
    assert q.enqueue("o1", due_at=engine.now() + 100)
    assert not q.enqueue("o1", due_at=engine.now() + 500)
    assert 95 < due_in(engine, "o1") <= 100
    assert not q.enqueue("o1")
    assert due_in(engine, "o1") <= 0
    assert [j.order_id for j in q.jobs(JobState.QUEUED)] == ["o1"]


def test_enqueueing_a_running_job_leaves_its_lease_alone(engine: Engine) -> None:
    q = engine.queue
    q.enqueue("o1")
    taken = q.take(lease=60)
    assert taken is not None
    assert taken.running(engine.now())
    assert not q.enqueue("o1")  # a second owner's wait stalls meanwhile: no second job
    assert q.take(lease=60) is None  # still the first worker's
    assert q.get("o1").running(engine.now())  # type: ignore[union-attr]
    retried = q.retry("o1", due_at=engine.now() + 30, last_status="processing",
                      last_error=None)  # the running job's retry never conflicts
    assert (retried.attempts, retried.last_status) == (1, "processing")
    assert not q.enqueue("o1")  # retrying: still one job
    engine.advance(31)
    assert q.take(lease=60) is not None


@pytest.mark.parametrize("end", ["dead", "resolved", "done"])
def test_enqueueing_a_finished_job_changes_nothing(engine: Engine, end: str) -> None:
    q = engine.queue
    q.enqueue("o1")
    q.take(lease=60)
    if end == "done":
        q.finish("o1", final_status="completed")
    else:
        q.bury("o1", last_status="processing", last_error=None)
        if end == "resolved":
            q.resolve("o1", "refunded")
    assert not q.enqueue("o1")
    assert not q.watch("o1", due_at=engine.now() + 10)
    assert q.get("o1").state is JobState(end)  # type: ignore[union-attr]
    if end != "done":
        assert q.requeue("o1").state is JobState.QUEUED  # the only way back
        assert q.take(lease=60) is not None


def test_dead_letters_requeue_and_close_report_bad_states(engine: Engine) -> None:
    q = engine.queue
    with pytest.raises(KeyError):
        q.requeue("never-seen")
    with pytest.raises(KeyError):
        q.resolve("never-seen", "x")
    q.enqueue("o1")
    with pytest.raises(ValueError, match="queued"):
        q.resolve("o1", "not dead yet")
    with pytest.raises(ValueError, match="queued"):
        q.requeue("o1")
    assert q.take(lease=60) is not None
    q.bury("o1", last_status=None, last_error="boom")
    with pytest.raises(ValueError, match="dead"):
        q.retry("o1", due_at=engine.now(), last_status=None, last_error=None)
    assert [(j.order_id, j.attempts, j.last_error) for j in q.list_dead()] == [("o1", 1, "boom")]
    with pytest.raises(ValueError, match="reason"):
        q.resolve("o1", " ")


# -- watches ------------------------------------------------------------------------------


def test_the_last_wait_sets_the_watch_which_never_touches_a_recovery_job(
    engine: Engine
) -> None:
    q = engine.queue
    assert q.watch("w", due_at=engine.now() + 100)
    assert q.watch("w", due_at=engine.now() + 300)
    assert 295 < due_in(engine, "w") <= 300
    assert q.watch("w", due_at=engine.now() + 50)
    assert 45 < due_in(engine, "w") <= 50
    assert q.get("w").reason == "watch"  # type: ignore[union-attr]
    q.enqueue("r", due_at=engine.now() + 40)
    assert not q.watch("r", due_at=engine.now() + 1000)
    assert 35 < due_in(engine, "r") <= 40
    assert q.get("r").reason == "stalled"  # type: ignore[union-attr]


def test_a_payment_s_watch_never_replaces_one(engine: Engine) -> None:
    q = engine.queue
    assert q.watch("w", due_at=engine.now() + 100, replace=False)  # new: recorded
    assert not q.watch("w", due_at=engine.now() + 999, replace=False)
    assert 95 < due_in(engine, "w") <= 100


def test_a_stalled_wait_turns_its_watch_into_a_recovery_job_due_now(engine: Engine) -> None:
    q = engine.queue
    q.watch("w", due_at=engine.now() + 1000)
    assert not q.enqueue("w", reason="stalled")
    job = q.get("w")
    assert job is not None
    assert (job.reason, job.state) == ("stalled", JobState.QUEUED)
    assert due_in(engine, "w") <= 0
    assert not q.settle("w", status="completed")  # now the worker's, not the wait's


def test_settling_a_watch(engine: Engine) -> None:
    q = engine.queue
    for order_id in ("failed", "cancelled", "completed"):
        q.watch(order_id, due_at=engine.now() + 1000)
        assert q.settle(order_id, status=order_id)
        assert not q.settle(order_id, status=order_id)  # a second wait: nothing to do
    assert q.get("failed").state is JobState.DONE  # type: ignore[union-attr]
    assert q.get("cancelled").note == "cancelled"  # type: ignore[union-attr]
    delivery = q.get("completed")
    assert delivery is not None
    assert (delivery.state, delivery.reason, delivery.last_status) == (
        JobState.QUEUED, "delivery", "completed")
    grace = q.policy.delivery_grace
    assert grace is not None
    assert grace - 5 < due_in(engine, "completed") <= grace


def test_without_a_delivery_grace_a_completed_wait_settles_at_once(tmp_path: Path) -> None:
    made = make_engine("sqlite", tmp_path, RecoveryPolicy(delivery_grace=None))
    with made.queue as q:
        q.watch("o1", due_at=made.now() + 10)
        assert q.settle("o1", status="completed")
        assert q.get("o1").state is JobState.DONE  # type: ignore[union-attr]


def test_unwatch_drops_only_an_untouched_watch(engine: Engine) -> None:
    q = engine.queue
    q.watch("fresh", due_at=engine.now() + 10)
    assert q.unwatch("fresh")
    assert q.get("fresh") is None
    q.watch("taken", due_at=engine.now())
    assert q.take(lease=60) is not None
    assert not q.unwatch("taken")  # a worker holds it
    q.enqueue("stalled")
    assert not q.unwatch("stalled")
    assert not q.unwatch("never-seen")


# -- taking jobs --------------------------------------------------------------------------


def test_take_leases_the_most_overdue_job_and_a_dead_worker_s_lease_runs_out(
    engine: Engine
) -> None:
    q = engine.queue
    q.enqueue("later", due_at=engine.now() + 60)
    q.enqueue("now", due_at=engine.now() - 5)
    q.enqueue("sooner", due_at=engine.now() - 1)
    first, second = q.take(lease=30), q.take(lease=30)
    assert (first.order_id, second.order_id) == ("now", "sooner")  # type: ignore[union-attr]
    assert q.take(lease=30) is None
    engine.advance(31)
    again = q.take(lease=30)
    assert again is not None
    assert again.order_id == "now"  # its worker died: the job comes back
    assert q.next_due() is not None


def test_concurrent_takers_never_share_a_job(engine: Engine) -> None:
    q = engine.queue
    ids = [f"o{i}" for i in range(60)]
    for order_id in ids:
        q.enqueue(order_id)
    taken: list[str] = []
    lock = threading.Lock()

    def take_all() -> None:
        while (job := q.take(lease=60)) is not None:
            with lock:
                taken.append(job.order_id)

    threads = [threading.Thread(target=take_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(ids)


def test_jobs_and_get_show_every_state(engine: Engine) -> None:
    q = engine.queue
    for order_id in ("a", "b", "c", "d"):
        q.enqueue(order_id)
    q.take(lease=60)  # a: running
    q.finish("b", final_status="completed")
    q.bury("c", last_status="processing", last_error=None)
    q.bury("d", last_status=None, last_error=None)
    q.resolve("d", "refunded")
    now = engine.now()
    queued = q.jobs(JobState.QUEUED)
    assert [(j.order_id, j.running(now)) for j in queued] == [("a", True)]
    assert [j.order_id for j in q.jobs(JobState.DONE)] == ["b"]
    assert [j.order_id for j in q.jobs(JobState.DEAD)] == ["c"]
    assert [(j.order_id, j.note) for j in q.jobs(JobState.RESOLVED)] == [("d", "refunded")]
    assert q.get("nope") is None


def test_bad_order_ids_and_times_are_rejected(engine: Engine) -> None:
    q = engine.queue
    for bad in ("", " ", "x" * 257, 42):
        with pytest.raises(ValueError, match="order id"):
            q.enqueue(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="order id"):
            q.watch(bad, due_at=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        q.enqueue("o1", due_at=float("nan"))
    assert q.get("o1") is None


# -- PostgreSQL only ----------------------------------------------------------------------


@pytest.mark.service
def test_a_missing_table_says_to_call_create_schema() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    from foxpoll.errors import StoreUnavailable
    from foxpoll.recovery import PostgresRecoveryQueue

    with PostgresRecoveryQueue(POSTGRES_URL, table="never_created_here") as q, \
            pytest.raises(StoreError, match=r"create_schema\(\)") as missing:
        q.enqueue("o1")
    assert not isinstance(missing.value, StoreUnavailable)  # not an outage to wait out


@pytest.mark.slow
@pytest.mark.service
def test_a_dead_server_is_store_unavailable_within_the_timeout() -> None:
    from foxpoll.errors import StoreUnavailable
    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with PostgresRecoveryQueue(url, connect_timeout=1.0) as q, \
            pytest.raises(StoreUnavailable, match="unavailable"):
        q.enqueue("o1")


@pytest.mark.service
def test_a_callers_due_time_is_read_on_the_queue_s_clock() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    from foxpoll.recovery import PostgresRecoveryQueue

    clock = FakeClock()  # its epoch is weeks away from the server's clock
    table = f"recovery_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresRecoveryQueue(POSTGRES_URL, table=table, clock=clock) as q:
            q.create_schema()
            q.enqueue("o1", due_at=clock.time() + 60)
            q.watch("w1", due_at=clock.time() + 600)
            assert q.take(lease=30) is None  # a minute from now, on the server too
            job, watch = q.get("o1"), q.get("w1")
            assert job is not None
            assert watch is not None
            assert 55 < job.due_at - time.time() <= 60  # stored on the server's clock
            assert 595 < watch.due_at - time.time() <= 600
    finally:
        drop_table(table)


@pytest.mark.service
def test_the_queue_uses_a_callers_pool_and_leaves_it_open() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg_pool

    from foxpoll.recovery import PostgresRecoveryQueue

    table = f"recovery_{uuid.uuid4().hex[:10]}"
    with psycopg_pool.ConnectionPool(POSTGRES_URL, min_size=1, max_size=2, open=True,
                                     kwargs={"autocommit": True}) as pool:
        q = PostgresRecoveryQueue(pool, table=table)
        q.create_schema()
        assert q.enqueue("o1")
        q.close()
        assert not pool.closed
        with pool.connection() as conn:
            conn.execute(f"DROP TABLE {table}")


@pytest.mark.service
async def test_close_and_async_with_release_the_queues_own_connections() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)

    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import eventually, postgres_connections

    table = f"recovery_{uuid.uuid4().hex[:10]}"
    name = f"foxpoll-test-{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES_URL}?application_name={name}"

    def connections() -> int:
        return postgres_connections(name)

    try:
        with PostgresRecoveryQueue(url, table=table) as queue:
            queue.create_schema()
            assert queue.enqueue("o1")
            assert connections() == 1
        assert eventually(lambda: connections() == 0)
        async with PostgresRecoveryQueue(url, table=table) as aqueue:
            assert aqueue.get("o1") is not None
            assert connections() == 1
        assert eventually(lambda: connections() == 0)
    finally:
        drop_table(table)


def test_a_closed_sqlite_queue_says_so_and_is_no_outage(tmp_path: Path) -> None:
    queue = SQLiteRecoveryQueue(tmp_path / "q.db")
    queue.enqueue("o1")
    queue.close()
    for call in (lambda: queue.get("o1"), lambda: queue.enqueue("o2")):
        # Waiting would not cure it: a worker that waits out outages must not wait on this.
        with pytest.raises(StoreError, match="SQLiteRecoveryQueue is closed") as closed:
            call()
        assert not isinstance(closed.value, StoreUnavailable)


def test_a_table_made_by_foxpoll_0_1_gets_its_token_column_under_a_quoted_name(
    tmp_path: Path
) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "q.db") as db:  # 0.1's table: no token column
        db.execute('CREATE TABLE "Old Jobs" (order_id TEXT PRIMARY KEY, state TEXT NOT NULL, '
                   "attempts INTEGER NOT NULL DEFAULT 0, due_at DOUBLE PRECISION NOT NULL, "
                   "locked_until DOUBLE PRECISION, reason TEXT NOT NULL DEFAULT '', "
                   "last_status TEXT, last_error TEXT, note TEXT, "
                   "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)")
    db.close()
    with SQLiteRecoveryQueue(tmp_path / "q.db", table='"Old Jobs"') as queue:
        assert queue.enqueue("o1")
        assert queue.take(lease=60) is not None  # the take writes the token column


def test_a_queue_that_cannot_open_its_file_holds_nothing_open(tmp_path: Path) -> None:
    # Another writer holds the file through the queue's busy timeout: the constructor
    # fails, and leaves no connection behind (Python 3.13 reports one as a ResourceWarning,
    # which the suite makes an error, when the collector finds it).
    import contextlib
    import gc
    import sqlite3

    from foxpoll.dedup import SQLiteDedupStore
    from foxpoll.ratelimit import SQLiteRateLimit

    path = tmp_path / "q.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):
            SQLiteRecoveryQueue(path, busy_timeout=0.1)
        with pytest.raises(StoreUnavailable):  # the dedup store and the budget alike
            SQLiteDedupStore(path, busy_timeout=0.1)
        with pytest.raises(StoreUnavailable):
            SQLiteRateLimit(path, 60, busy_timeout=0.1)
        other.execute("ROLLBACK")
    gc.collect()
    with SQLiteRecoveryQueue(path) as queue:  # the file is usable once the writer is done
        assert queue.enqueue("o1")


# -- attempts: counted when a job is taken; a poison job is dead-lettered ----------------


def test_taking_a_job_counts_its_attempt_and_retry_and_bury_do_not(engine: Engine) -> None:
    q = engine.queue
    q.enqueue("o1")
    assert q.take(lease=60).attempts == 1  # type: ignore[union-attr]
    retried = q.retry("o1", due_at=engine.now(), last_status="processing", last_error=None)
    assert retried.attempts == 1
    assert q.take(lease=60).attempts == 2  # type: ignore[union-attr]
    assert q.bury("o1", last_status="processing", last_error="x").attempts == 2
    assert q.requeue("o1").attempts == 0


def test_a_take_that_never_ends_counts_when_its_lease_runs_out(engine: Engine) -> None:
    q = engine.queue
    q.enqueue("o1")
    assert q.take(lease=30).attempts == 1  # type: ignore[union-attr]  # its worker dies
    engine.advance(31)
    again = q.take(lease=30)
    assert again is not None
    assert (again.attempts, again.last_error) == (2, None)


POISON = RecoveryPolicy(max_attempts=3, backoff=Fixed(60.0), delivery_grace=None)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def poison(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine whose queue dead-letters after 3 re-checks, a minute apart."""
    made = make_engine(request.param, tmp_path, POISON)
    yield made
    made.queue.close()
    drop_engine(request.param, made.queue)


def run_until_dead(engine: Engine, worker: RecoveryWorker, order_id: str) -> RecoveryJob:
    """Run ``worker`` a pass at a time, a minute apart, until the job is dead."""
    for _ in range(10):
        worker.run_pending()
        job = engine.queue.get(order_id)
        assert job is not None
        if job.state is not JobState.QUEUED:
            assert worker.run_pending() == 0  # a dead letter is never taken
            return job
        engine.advance(61)
    raise AssertionError("the job was never dead-lettered")


def test_a_job_whose_delivery_always_raises_is_dead_lettered_after_max_attempts(
    poison: Engine
) -> None:
    sim = FakeFoxReload(clock=poison.clock, default_script=OrderScript.complete(after=0))
    calls: list[str] = []

    def refused(order: Order) -> None:
        calls.append(order.id)
        raise ConnectionRefusedError("the customer's mailbox refused the message")

    store = MemoryDedupStore(clock=poison.clock)
    with sim.client() as client:
        order_id = client.orders.create(items=STEAM).id
        client.orders.pay(order_id)
        poison.queue.enqueue(order_id)
        worker = RecoveryWorker(client, poison.queue, store, on_completed=refused)
        dead = run_until_dead(poison, worker, order_id)
    assert calls == [order_id] * 3
    assert (dead.state, dead.attempts, dead.last_status, dead.last_error) == (
        JobState.DEAD, 3, "completed",
        "ConnectionRefusedError: the customer's mailbox refused the message")
    assert [j.order_id for j in poison.queue.list_dead()] == [order_id]
    assert store.get(order_id).state is not DeliveryState.DELIVERED  # type: ignore[union-attr]


def test_a_recheck_that_sent_no_request_uses_up_no_attempt(poison: Engine) -> None:
    """An unavailable request budget sends nothing: an outage, not a look at the order.
    The job waits on the policy's schedule with its attempt given back, however long the
    outage lasts, and is delivered once the budget is back."""
    delivered: list[Order] = []
    store = MemoryDedupStore(clock=poison.clock)
    poison.queue.enqueue("o1")
    with HostileServer() as server:
        # Nothing listens on port 1: each permit fails at once with BudgetUnavailable.
        with RedisRateLimit("redis://127.0.0.1:1", 100) as budget, \
                FoxReload("sk-live-budget", base_url=server.url, clock=poison.clock,
                          rate_limit=budget, max_retries=0) as client:
            worker = RecoveryWorker(client, poison.queue, store, on_completed=delivered.append)
            for _ in range(2 * POISON.max_attempts):
                with pytest.raises(BudgetUnavailable):  # an outage: the round ends on it
                    worker.run_pending()
                job = poison.queue.get("o1")
                assert job is not None
                assert (job.state, job.attempts) == (JobState.QUEUED, 0)
                assert (job.last_error or "").startswith("BudgetUnavailable: ")
                assert 59 < job.due_at - poison.now() <= 60  # Fixed(60): the schedule
                poison.advance(61)
        assert server.requests == []
        with FoxReload("sk-live-budget", base_url=server.url, clock=poison.clock,
                       max_retries=0) as client:
            worker = RecoveryWorker(client, poison.queue, store, on_completed=delivered.append)
            assert worker.run_pending() == 1
    assert [order.id for order in delivered] == ["o1"]
    done = poison.queue.get("o1")
    assert done is not None
    assert (done.state, done.attempts) == (JobState.DONE, 1)


class NestedBody(httpx.BaseTransport):
    """Every answer is JSON nested too deep for the parser."""

    def __init__(self) -> None:
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000,
                              headers={"content-type": "application/json"})


def test_a_body_the_client_cannot_parse_is_dead_lettered_after_max_attempts(
    poison: Engine
) -> None:
    transport = NestedBody()
    calls: list[Order] = []
    with FoxReload("k" * 32, base_url="https://foxreload.test", clock=poison.clock,
                   http_client=httpx.Client(transport=transport), max_retries=0) as client:
        poison.queue.enqueue("o-deep")
        worker = RecoveryWorker(client, poison.queue, MemoryDedupStore(),
                                on_completed=calls.append)
        dead = run_until_dead(poison, worker, "o-deep")
    assert (transport.requests, dead.attempts, dead.last_status, calls) == (3, 3, None, [])
    assert dead.last_error == "ResponseTooLarge: response body nested deeper than 32"


def test_an_id_the_client_refuses_is_dead_lettered_after_max_attempts(
    poison: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_id = "o" * 300
    with monkeypatch.context() as m:  # a row written before ids were checked
        m.setattr("foxpoll.recovery._sql.require_text", lambda value, what: value)
        poison.queue.enqueue(long_id)
    sim = FakeFoxReload(clock=poison.clock)
    with sim.client() as client:
        worker = RecoveryWorker(client, poison.queue, MemoryDedupStore(), on_completed=print)
        dead = run_until_dead(poison, worker, long_id)
    assert (dead.attempts, sim.count()) == (3, 0)
    assert dead.last_error == "ValueError: order id is 300 characters (at most 256)"


def test_a_job_taken_and_abandoned_until_its_attempts_are_used_up_is_buried(
    poison: Engine
) -> None:
    q = poison.queue
    q.enqueue("o1")
    for attempt in (1, 2, 3):  # each taker dies holding it
        taken = q.take(lease=30)
        assert taken is not None
        assert taken.attempts == attempt
        poison.advance(31)
    sim = FakeFoxReload(clock=poison.clock)
    delivered: list[Order] = []
    with sim.client() as client:
        worker = RecoveryWorker(client, q, MemoryDedupStore(), on_completed=delivered.append)
        assert worker.run_pending() == 1
    dead = q.get("o1")
    assert dead is not None
    assert (dead.state, dead.attempts, sim.count(), delivered) == (JobState.DEAD, 4, 0, [])
    assert dead.last_error == ("re-check 3 of 3 never ended (its worker stopped, or its lease "
                               "ran out first): dead-lettered when taken again")
