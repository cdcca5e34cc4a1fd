"""The request budget: the rules on virtual time, each backend against its real store, and
the clients taking a permit for every request they send."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foxpoll import APITimeoutError, OrderStalled, RateLimitError
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.polling import WaitPolicy
from foxpoll.ratelimit import (
    MAX_PAUSE,
    BaseRateLimit,
    BudgetState,
    Priority,
    RateLimit,
    RedisRateLimit,
    SQLiteRateLimit,
    take,
)
from foxpoll.recovery import RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

from .services import REDIS_URL, delete_keys, require

STEAM = [{"itemId": "product_steam_10"}]


# -- the rules, on virtual time -------------------------------------------------------------


def grants(limit: BaseRateLimit, clock: FakeClock, demand: dict[Priority, int],
           seconds: float, step: float = 0.01) -> Counter[Priority]:
    """Every ``step`` seconds, each lane asks for permits until refused or its demand
    (per step) is met; count what each lane got."""
    got: Counter[Priority] = Counter()
    for _ in range(round(seconds / step)):
        for lane in sorted(demand):
            for _ in range(demand[lane]):
                if limit.acquire(lane) > 0:
                    break
                got[lane] += 1
        clock.advance(step)
    return got


@settings(max_examples=30, deadline=None)
@given(per_minute=st.integers(6, 6000), burst=st.integers(3, 50), window=st.floats(1, 120))
def test_no_window_gets_more_than_the_rate_plus_the_burst(per_minute: int, burst: int,
                                                        window: float) -> None:
    clock = FakeClock()
    limit = RateLimit(per_minute, burst=burst, clock=clock)
    times: list[float] = []
    while clock.monotonic() < 150:
        wait = limit.acquire(Priority.BUY)
        if wait == 0:
            times.append(clock.monotonic())
        else:
            clock.advance(wait)
    most, first = 0, 0
    for last, t in enumerate(times):  # the busiest window ending at each grant
        while times[first] <= t - window:
            first += 1
        most = max(most, last - first + 1)
    assert most <= per_minute / 60 * window + burst + 1e-9
    assert len(times) >= per_minute / 60 * 150  # and it does hand out the whole rate


def test_buys_go_first_then_first_polls_then_later_polls() -> None:
    clock = FakeClock()
    limit = RateLimit(120, clock=clock)  # 2 a second
    got = grants(limit, clock, {Priority.BUY: 1, Priority.FRESH: 5, Priority.POLL: 50},
                 seconds=60, step=1.0)
    assert got[Priority.BUY] == 60  # every buy, at once
    assert got[Priority.FRESH] >= 58  # the rest goes to first polls...
    assert got[Priority.POLL] <= 4  # ...and later polls wait (the burst at the start)
    assert sum(got.values()) <= 120 + limit.settings.lanes_burst


def test_a_buy_finds_a_permit_while_polls_saturate_the_budget() -> None:
    clock = FakeClock()
    limit = RateLimit(60, burst=5, clock=clock)
    grants(limit, clock, {Priority.POLL: 100}, seconds=30)
    while limit.acquire(Priority.POLL) == 0:  # polls take all they may...
        pass
    assert limit.acquire(Priority.POLL) > 0  # ...and are held back...
    assert [limit.acquire(Priority.BUY) for _ in range(2)] == [0.0, 0.0]  # ...buys are not
    assert 0 < limit.acquire(Priority.BUY) <= 1.0  # then a buy waits only for the next one


def test_a_lane_below_a_small_burst_still_gets_permits_when_the_budget_is_idle() -> None:
    state = BudgetState(tat=100.0, rate=1.0, paused_until=0.0, cut_until=0.0)
    _, wait = take(state, 100.0, Priority.POLL, burst=1)  # tau is negative for polls
    assert wait == 2.0
    granted, wait = take(state, 102.0, Priority.POLL, burst=1)
    assert (wait, granted.tat) == (0.0, 103.0)


def test_a_429_pauses_every_lane_for_its_retry_after_capped() -> None:
    clock = FakeClock()
    limit = RateLimit(600, clock=clock)
    limit.throttled(30)
    assert limit.acquire(Priority.BUY) == pytest.approx(30)
    clock.advance(30)
    assert limit.acquire(Priority.BUY) == 0
    limit.throttled(999_999)  # a hostile Retry-After, told by a caller that did not cap it
    assert limit.acquire(Priority.BUY) == pytest.approx(MAX_PAUSE)
    clock.advance(MAX_PAUSE)
    limit.throttled(float("inf"))
    limit.throttled(None)
    assert limit.acquire(Priority.BUY) == pytest.approx(1)  # neither is a number: 1 s
    assert limit.throttles == 4


def test_a_learned_rate_halves_once_per_storm_and_wins_back_slowly() -> None:
    clock = FakeClock()
    limit = RateLimit(clock=clock)  # per_minute=None: learned, from 1,200/min
    assert limit.per_minute == pytest.approx(1200)
    for _ in range(10):  # ten in-flight requests all answered 429
        limit.throttled(1)
    assert limit.per_minute == pytest.approx(600)  # halved once, not ten times
    clock.advance(1.5)
    limit.throttled(1)  # the storm's stragglers, after the pause: still one signal
    assert limit.per_minute == pytest.approx(600)
    clock.advance(1)
    limit.throttled(1)  # a later 429: halved again
    assert limit.per_minute == pytest.approx(300)
    for _ in range(8):
        clock.advance(2)
        limit.throttled(1)
    assert limit.per_minute == pytest.approx(75)  # never below a sixteenth of the ceiling
    clock.advance(2)
    for _ in range(100):  # each success wins back 1/400 of the ceiling
        limit.succeeded()
    limit.acquire()
    assert limit.per_minute == pytest.approx(375)
    for _ in range(2000):
        limit.succeeded()
    limit.acquire()
    assert limit.per_minute == pytest.approx(1200)  # never above the ceiling


def test_a_fixed_rate_is_never_halved_but_still_pauses() -> None:
    clock = FakeClock()
    limit = RateLimit(100, clock=clock)
    limit.throttled(5)
    assert limit.per_minute == pytest.approx(100)
    assert limit.acquire() == pytest.approx(5)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_settings_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="per_minute"):
        RateLimit(bad)
    with pytest.raises(ValueError, match="burst"):
        RateLimit(100, burst=0)


# -- every backend, the same rules -----------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.service)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of budgets sharing one state, as processes sharing a key would."""
    key = f"foxpoll-test:{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        shared: dict[str, RateLimit] = {}

        def memory(**kwargs: Any) -> BaseRateLimit:
            return shared.setdefault("one", RateLimit(**kwargs))

        yield memory
    elif request.param == "sqlite":
        made: list[SQLiteRateLimit] = []

        def sqlite(**kwargs: Any) -> BaseRateLimit:
            made.append(SQLiteRateLimit(tmp_path / "budget.db", key=key, **kwargs))
            return made[-1]

        yield sqlite
        for limit in made:
            limit.close()
    else:
        require("Redis", "127.0.0.1", 6379)
        opened: list[RedisRateLimit] = []

        def redis(**kwargs: Any) -> BaseRateLimit:
            opened.append(RedisRateLimit(REDIS_URL, key_prefix=f"{key}:", **kwargs))
            return opened[-1]

        yield redis
        for limit in opened:
            limit.close()


def test_backends_share_lanes_and_bursts(backend: Any) -> None:
    one, other = backend(per_minute=60, burst=5), backend(per_minute=60, burst=5)
    assert [one.acquire(Priority.POLL) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0 < other.acquire(Priority.POLL) <= 1.0  # the other holder sees the same bucket
    assert other.acquire(Priority.FRESH) == 0.0
    assert 0 < one.acquire(Priority.FRESH) <= 1.0
    assert one.acquire(Priority.BUY) == 0.0
    assert 0 < other.acquire(Priority.BUY) <= 1.0


def test_backends_share_a_pause_and_a_learned_rate(backend: Any) -> None:
    one, other = backend(adaptive=True, per_minute=600), backend(adaptive=True,
                                                                 per_minute=600)
    assert one.acquire() == 0.0
    for _ in range(3):
        other.throttled(5)
    wait = one.acquire(Priority.BUY)
    assert 4 < wait <= 5  # a 429 seen by one pauses the other
    assert one.per_minute == pytest.approx(300)  # halved once for the storm


def test_a_changed_tier_applies_at_once_to_a_shared_budget(backend: Any) -> None:
    old = backend(per_minute=60, burst=3)
    old.acquire(Priority.BUY)
    assert old.last_state.rate == pytest.approx(1.0)
    if isinstance(old, RateLimit):
        return  # one process holds one object: there is no stored state to outlive it
    upgraded = backend(per_minute=600, burst=3)  # the same key, after an upgrade
    upgraded.acquire(Priority.BUY)
    assert upgraded.last_state.rate == pytest.approx(10.0)  # not the stored 1 a second
    learned = backend(per_minute=30, burst=3, adaptive=True)
    learned.acquire(Priority.BUY)
    assert learned.last_state.rate == pytest.approx(0.5)  # never above its own ceiling


async def test_backends_serve_async_callers_too(backend: Any) -> None:
    limit = backend(per_minute=60, burst=3)
    assert [await limit.aacquire(Priority.BUY) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0 < await limit.aacquire(Priority.BUY) <= 1.0
    await limit.athrottled(3)
    assert 2 < limit.acquire(Priority.BUY) <= 3
    await limit.aclose()


def _connections(name: str) -> int:
    """How many connections Redis has open under the client name ``name``."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as admin:
        return sum(1 for c in admin.client_list() if c.get("name") == name)


@pytest.mark.service
async def test_a_redis_budget_used_from_asyncio_is_closed_by_aclose() -> None:
    """And by close() when it can; when it cannot, close() says so."""
    import asyncio
    import warnings

    require("Redis", "127.0.0.1", 6379)
    name = f"foxpoll-budget-{uuid.uuid4().hex[:8]}"
    url, prefix = f"{REDIS_URL}?client_name={name}", f"{name}:"
    try:
        budget = RedisRateLimit(url, per_minute=600, key_prefix=prefix)
        await budget.aacquire()
        budget.acquire()
        assert _connections(name) == 2  # one each, sync and asyncio
        with pytest.warns(ResourceWarning, match=r"close it with aclose\(\)"):
            budget.close()  # on the loop that is running: it cannot close that client
        assert _connections(name) == 1  # the asyncio one, left open
        await budget.aclose()
        assert _connections(name) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            budget.close()  # closed already: nothing to say

        # Sync use only: close() closes everything, and never warns.
        with RedisRateLimit(url, per_minute=600, key_prefix=prefix) as budget:
            budget.acquire()
        assert _connections(name) == 0

        # An idle loop that used it: close() closes its client on that loop.
        def on_a_loop_of_its_own() -> None:
            loop = asyncio.new_event_loop()
            try:
                budget = RedisRateLimit(url, per_minute=600, key_prefix=prefix)
                loop.run_until_complete(budget.aacquire())
                assert _connections(name) == 1
                budget.close()
                assert _connections(name) == 0
            finally:
                loop.close()

        await asyncio.to_thread(on_a_loop_of_its_own)  # a thread: this one runs a loop
    finally:
        delete_keys(prefix)


# -- the clients -----------------------------------------------------------------------------


class Recording(RateLimit):
    """Records the lane of every permit asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lanes: list[Priority] = []

    def acquire(self, priority: Priority = Priority.FRESH, *,
                timeout: float | None = None) -> float:
        wait = super().acquire(priority, timeout=timeout)
        if wait == 0:
            self.lanes.append(Priority(priority))
        return wait

    async def aacquire(self, priority: Priority = Priority.FRESH, *,
                       timeout: float | None = None) -> float:
        return self.acquire(priority, timeout=timeout)


def test_every_request_takes_a_permit_in_its_lane(clock: FakeClock, tmp_path: Path) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=20))
    limit = Recording(6000, clock=clock)
    queue = SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock)
    with sim.client(rate_limit=limit) as client, queue:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        client.wait_for_completion(order.id, policy=WaitPolicy(backoff=Fixed(5)))
        client.orders.get(order.id)
        client.orders.list()
        client.products.list(category="steam")
        client.categories.list()
        ids = []
        for _ in range(2):
            ids.append(client.orders.create(items=STEAM).id)
            client.orders.pay(ids[-1])
        assert all(r.ok for r in client.wait_many(ids, policy=WaitPolicy(backoff=Fixed(5))))
        queue.enqueue(order.id)
        RecoveryWorker(client, queue, MemoryDedupStore(clock=clock),
                       on_completed=print).run_pending()
    assert len(limit.lanes) == len(sim.requests)  # one permit per request, no more
    buys = [r for r in sim.requests if r.method == "POST"]
    assert limit.lanes.count(Priority.BUY) == len(buys) == 6
    # Each wait's first poll is FRESH; the user's get too; later polls and the re-check
    # are POLL.
    assert limit.lanes.count(Priority.FRESH) == 1 + 3 + 3  # waits, get, list, catalog
    assert limit.lanes.count(Priority.POLL) == len(sim.requests) - 6 - 7


async def test_the_async_client_takes_permits_too(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=20))
    limit = Recording(6000, clock=clock)
    async with sim.async_client(rate_limit=limit) as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        await client.wait_for_completion(order.id, policy=WaitPolicy(backoff=Fixed(5)))
        results = [r async for r in client.wait_many([order.id])]
    assert results[0].ok
    assert len(limit.lanes) == len(sim.requests)


def test_a_429_seen_by_one_client_pauses_another_sharing_the_budget(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=20))
    limit = RateLimit(600, clock=clock)
    with sim.client(rate_limit=limit) as one, sim.client(rate_limit=limit) as other:
        order = one.orders.create(items=STEAM)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=30))
        one.orders.get(order.id)  # 429, then retried after 30 s
        first_429 = next(r.at for r in sim.requests if r.method == "GET")
        other.orders.get(order.id)
    gets = [r.at for r in sim.requests if r.method == "GET"]
    assert all(t >= first_429 + 30 for t in gets[1:])
    assert limit.throttles == 1


@pytest.mark.parametrize("asked", [30, 999_999])
async def test_a_client_pauses_a_shared_budget_for_its_max_retry_after_at_most(
        clock: FakeClock, asked: int) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=20))
    limit = RateLimit(600, clock=clock)
    async with sim.async_client(rate_limit=limit, max_retry_after=5) as capped:
        with sim.client(rate_limit=limit) as other:  # the default max_retry_after, 60 s
            order = other.orders.create(items=STEAM)
            sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=asked))
            with pytest.raises(RateLimitError):  # asked to wait longer than it obeys
                await capped.orders.get(order.id)
            assert limit.throttles == 1
            assert limit.last_state.paused_until == pytest.approx(clock.monotonic() + 5)
            other.orders.get(order.id)  # waits out the pause: 5 s, not what was asked
    gets = [r.at for r in sim.requests if r.method == "GET"]
    assert gets[1] - gets[0] == pytest.approx(5)


def test_a_429_on_create_waits_and_buys_once(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock)
    sim.inject(Fault(FaultKind.RATE_LIMIT, method="POST", path="/api/orders/", retry_after=4))
    with sim.client(rate_limit=RateLimit(600, clock=clock)) as client:
        order = client.orders.create(items=STEAM)
    assert order.status == "active"
    assert len(sim.order_ids()) == 1
    assert sim.count("POST", "/api/orders/") == 2


def test_no_permit_before_the_deadline_ends_the_wait_in_time(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.stall())
    limit = RateLimit(600, clock=clock)
    with sim.client(rate_limit=limit) as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        limit.throttled(50)  # the budget is paused past the wait's deadline
        start = clock.monotonic()
        with pytest.raises((OrderStalled, APITimeoutError)):
            client.wait_for_completion(order.id, timeout=10)
    assert clock.monotonic() - start <= 10


def test_wait_many_refuses_a_second_budget(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock)
    with sim.client(rate_limit=RateLimit(100, clock=clock)) as client, \
            pytest.raises(ValueError, match="rate_limit"):
        list(client.wait_many(["o1"], max_requests_per_minute=50))


def test_a_rate_limit_must_be_a_budget() -> None:
    with pytest.raises(TypeError, match="RateLimit"):
        FakeFoxReload().client(rate_limit=100)


async def test_an_async_client_spends_a_shared_budget(backend: Any, clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=0))
    shared = backend(per_minute=60, burst=3)
    async with sim.async_client(rate_limit=shared) as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
    with sim.client(rate_limit=backend(per_minute=60, burst=3)) as other:
        # the async client's two buys left one permit of the burst, for buys only
        assert shared.acquire(Priority.POLL) > 0
        assert other.orders.get(order.id, priority=Priority.BUY).status == "completed"
    await shared.aclose()
