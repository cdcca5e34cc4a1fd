"""A request budget whose backend is frozen, locked, unreachable or corrupt: every call
ends within the caller's deadline, with a foxpoll error, never a driver's; a wait counts
the outage as a passing error, and ``fail_open`` sends unmetered instead."""

from __future__ import annotations

import contextlib
import io
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import (
    APIConnectionError,
    AsyncFoxReload,
    BudgetUnavailable,
    FoxReload,
    OrderStalled,
    StoreError,
    StoreUnavailable,
    SystemClock,
)
from foxpoll.backoff import Fixed
from foxpoll.cli import main
from foxpoll.polling import WaitPolicy
from foxpoll.ratelimit import Priority, RedisRateLimit, SQLiteRateLimit
from foxpoll.recovery import JobState, SQLiteRecoveryQueue
from foxpoll.testing import (
    FakeClock,
    FakeFoxReload,
    FreezingProxy,
    OrderScript,
    SimulatorServer,
)

from .services import REDIS_URL, delete_keys, free_port, require

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

#: Seconds a bounded call may take past its bound, on a busy machine.
SLACK = 1.0


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.stall())
    with SimulatorServer(sim) as running:
        yield running


@pytest.fixture
def redis_proxy() -> Iterator[FreezingProxy]:
    require("Redis", "127.0.0.1", 6379)
    with FreezingProxy(("127.0.0.1", 6379)) as proxy:
        yield proxy


@pytest.fixture
def prefix() -> Iterator[str]:
    key = f"foxpoll-test:{uuid.uuid4().hex[:8]}:"
    yield key
    delete_keys(key)


def client_of(server: SimulatorServer, **kwargs: Any) -> FoxReload:
    return FoxReload(api_key=server.sim.api_key, base_url=server.url, **kwargs)


def elapsed(started: float) -> float:
    return time.monotonic() - started


# -- a frozen Redis: the wait's deadline holds, whatever the client ------------------------


def test_a_frozen_redis_budget_on_your_own_client_ends_a_wait_at_its_deadline(
    server: SimulatorServer, redis_proxy: FreezingProxy, prefix: str
) -> None:
    import redis

    # redis-py's defaults: a 5 s socket timeout, retried ten times.
    mine = redis.Redis(host="127.0.0.1", port=redis_proxy.port, socket_timeout=5)
    budget = RedisRateLimit(mine, per_minute=600, key_prefix=prefix)
    with client_of(server, rate_limit=budget) as client, contextlib.closing(mine):
        budget.acquire()  # connected, then frozen
        redis_proxy.freeze()
        started = time.monotonic()
        with pytest.raises(OrderStalled) as stalled:
            client.wait_for_completion("o1", timeout=1.5)
        assert elapsed(started) < 1.5 + SLACK
    assert isinstance(stalled.value.__cause__, BudgetUnavailable)
    assert server.sim.requests == []  # no permit, no request


async def test_a_frozen_redis_budget_bounds_an_async_wait_on_a_client_without_timeouts(
    server: SimulatorServer, redis_proxy: FreezingProxy, prefix: str
) -> None:
    import redis.asyncio

    mine = redis.asyncio.Redis(host="127.0.0.1", port=redis_proxy.port)  # no socket timeout
    budget = RedisRateLimit(mine, per_minute=600, key_prefix=prefix)
    async with AsyncFoxReload(api_key=server.sim.api_key, base_url=server.url,
                              rate_limit=budget) as client:
        await budget.aacquire()
        redis_proxy.freeze()
        started = time.monotonic()
        with pytest.raises(OrderStalled) as stalled:
            await client.wait_for_completion("o1", timeout=1.5)
        assert elapsed(started) < 1.5 + SLACK
    assert isinstance(stalled.value.__cause__, BudgetUnavailable)
    redis_proxy.thaw()
    await mine.aclose()


def test_a_frozen_redis_budget_from_a_url_raises_budget_unavailable_in_time(
    redis_proxy: FreezingProxy, prefix: str
) -> None:
    budget = RedisRateLimit(f"redis://127.0.0.1:{redis_proxy.port}/0", per_minute=600,
                            key_prefix=prefix, statement_timeout=0.5)
    with budget:
        assert budget.acquire() == 0.0
        redis_proxy.freeze()
        for call in (lambda: budget.acquire(Priority.BUY),
                     lambda: budget.acquire(timeout=0.2),
                     lambda: budget.throttled(3)):
            started = time.monotonic()
            with pytest.raises(BudgetUnavailable, match="RedisRateLimit"):
                call()
            assert elapsed(started) < 0.5 + SLACK


def test_a_redis_client_of_yours_without_a_socket_timeout_is_refused(prefix: str) -> None:
    import redis

    with pytest.raises(ValueError, match="socket_timeout"):
        RedisRateLimit(redis.Redis(socket_timeout=None), key_prefix=prefix)


# -- a locked SQLite file ------------------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    """A budget file another process holds locked, as a long write would."""
    path = tmp_path / "budget.db"
    SQLiteRateLimit(path, per_minute=600).close()  # the table exists
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    yield path
    holder.execute("ROLLBACK")
    holder.close()


def test_a_locked_sqlite_budget_ends_a_wait_at_its_deadline_not_its_busy_timeout(
    server: SimulatorServer, locked: Path
) -> None:
    with SQLiteRateLimit(locked, per_minute=600, busy_timeout=30) as budget, \
            client_of(server, rate_limit=budget) as client:
        started = time.monotonic()
        with pytest.raises(OrderStalled) as stalled:
            client.wait_for_completion("o1", timeout=1.5)
        assert elapsed(started) < 1.5 + SLACK
    assert isinstance(stalled.value.__cause__, BudgetUnavailable)


def test_a_locked_sqlite_budget_raises_budget_unavailable_after_its_busy_timeout(
    locked: Path
) -> None:
    with SQLiteRateLimit(locked, per_minute=600, busy_timeout=0.3) as budget:
        started = time.monotonic()
        with pytest.raises(BudgetUnavailable, match="SQLiteRateLimit is unavailable"):
            budget.acquire()
        assert 0.25 < elapsed(started) < 0.3 + SLACK
        started = time.monotonic()
        with pytest.raises(BudgetUnavailable):
            budget.throttled(1, timeout=0.1)  # a caller's shorter deadline
        assert elapsed(started) < 0.1 + SLACK


# -- an unreachable Redis: a passing error in waits, one line in the CLI --------------------


@pytest.fixture
def nowhere() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def test_an_unreachable_budget_raises_budget_unavailable_never_a_driver_error(
    server: SimulatorServer, nowhere: str
) -> None:
    with RedisRateLimit(nowhere, per_minute=600) as budget, \
            client_of(server, rate_limit=budget) as client, \
            pytest.raises(BudgetUnavailable) as raised:
        client.orders.get("o1")
    # One error, caught as an outage of a store and as a request that never left.
    assert isinstance(raised.value, StoreUnavailable)
    assert isinstance(raised.value, APIConnectionError)
    assert str(raised.value) == "RedisRateLimit is unavailable: ConnectionError"
    assert server.sim.requests == []


def test_wait_many_turns_a_budget_outage_into_stalls_that_reach_the_recovery_queue(
    tmp_path: Path, nowhere: str
) -> None:
    clock = FakeClock()
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=5))
    with SimulatorServer(sim) as server, \
            SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        ids = []
        with FoxReload(api_key=sim.api_key, base_url=server.url, clock=clock) as buyer:
            for _ in range(3):
                ids.append(buyer.orders.create(items=[{"itemId": "product_steam_10"}]).id)
                buyer.orders.pay(ids[-1])
        served = len(sim.requests)
        with RedisRateLimit(nowhere, per_minute=600) as budget, \
                FoxReload(api_key=sim.api_key, base_url=server.url, clock=clock,
                          rate_limit=budget, recovery_queue=queue) as client:
            results = list(client.wait_many(
                ids, policy=WaitPolicy(backoff=Fixed(1), max_attempts=10, max_errors=3)))
        assert len(sim.requests) == served  # the budget said nothing: nothing was sent
        assert sorted(r.order_id for r in results) == sorted(ids)
        assert all(r.stalled for r in results)
        assert all(isinstance(r.error.__cause__, BudgetUnavailable) for r in results
                   if r.error is not None)
        assert sorted(j.order_id for j in queue.jobs(JobState.QUEUED)) == sorted(ids)


def test_the_cli_prints_one_line_when_the_budget_is_unreachable(
    server: SimulatorServer, nowhere: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOXRELOAD_API_KEY", server.sim.api_key)
    monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
    code = main(["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store", nowhere],
                out=io.StringIO())
    assert code == 1
    assert capsys.readouterr().err == (
        "foxpoll: error: BudgetUnavailable: RedisRateLimit is unavailable: ConnectionError\n")


# -- failing open --------------------------------------------------------------------------


def test_fail_open_sends_unmetered_while_the_budget_is_down_and_warns_once(
    server: SimulatorServer, nowhere: str, caplog: pytest.LogCaptureFixture
) -> None:
    with client_of(server) as buyer:
        order_id = buyer.orders.create(items=[{"itemId": "product_steam_10"}]).id
    served = len(server.sim.requests)
    with RedisRateLimit(nowhere, per_minute=600, fail_open=True) as budget, \
            client_of(server, rate_limit=budget) as client, \
            caplog.at_level(logging.WARNING, logger="foxpoll.ratelimit"):
        for _ in range(3):
            client.orders.get(order_id)
    assert len(server.sim.requests) == served + 3
    assert budget.unmetered == 3
    said = [r.getMessage() for r in caplog.records if r.name == "foxpoll.ratelimit"]
    assert said == ["RedisRateLimit cannot be reached: requests go unmetered (fail_open) "
                    "until it answers"]


# -- corrupt state: a StoreError naming the key --------------------------------------------


def test_a_redis_budget_key_of_another_type_is_a_store_error_naming_it(prefix: str) -> None:
    import redis

    require("Redis", "127.0.0.1", 6379)
    with redis.Redis.from_url(REDIS_URL) as raw, \
            RedisRateLimit(REDIS_URL, per_minute=600, key_prefix=prefix) as budget:
        raw.rpush(budget.key, "x")
        with pytest.raises(StoreError, match=f"key '{budget.key}': WRONGTYPE") as raised:
            budget.acquire()
        assert not isinstance(raised.value, StoreUnavailable)  # an answer, not an outage
        raw.delete(budget.key)
        raw.hset(budget.key, mapping={"tat": "0", "rate": "nan", "paused": "0", "cut": "0"})
        with pytest.raises(StoreError, match="CORRUPT"):
            budget.acquire()
        raw.hset(budget.key, "rate", "garbage")
        with pytest.raises(StoreError, match="CORRUPT"):
            budget.throttled(1)


def test_a_sqlite_budget_row_it_cannot_read_is_a_store_error_naming_it(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "budget.db"
    with SQLiteRateLimit(path, per_minute=600, key="k1") as budget:
        budget.acquire()
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE foxpoll_rate_limit SET rate = 'garbage' WHERE key = 'k1'")
        with pytest.raises(StoreError, match="row 'k1' of \"foxpoll_rate_limit\""):
            budget.acquire()
