"""WaitPolicy and listeners: a client's defaults, a call's overrides, one listener shape."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator

import httpx
import pytest

from foxpoll import AsyncFoxReload, FoxReload, OrderStalled, PollAttempt, WaitResult
from foxpoll.backoff import Adaptive, ExponentialJitter, Fixed
from foxpoll.polling import Listener, Stall, StatusChange, WaitPolicy, WaitStart
from foxpoll.ratelimit import RateLimit
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript

STEAM = [{"itemId": "product_steam_10"}]


def paid(client: FoxReload) -> str:
    order = client.orders.create(items=STEAM)
    return client.orders.pay(order.id).id


class Journal(Listener):
    """Writes down every event, by name."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_start(self, start: WaitStart) -> None:
        self.events.append(("start", start))

    def on_poll(self, attempt: PollAttempt) -> None:
        self.events.append(("poll", attempt))

    def on_status_change(self, change: StatusChange) -> None:
        self.events.append(("change", change))

    def on_stall(self, stall: Stall) -> None:
        self.events.append(("stall", stall))

    def on_finish(self, result: WaitResult) -> None:
        self.events.append(("finish", result))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def test_the_client_policy_is_every_wait_default(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.stall(), OrderScript.stall())
    with sim.client(wait_policy=WaitPolicy(backoff=Fixed(2), max_attempts=3)) as client:
        first, second = paid(client), paid(client)
        with pytest.raises(OrderStalled) as info:
            client.wait_for_completion(first)
        assert info.value.attempts == 3
        assert clock.sleeps[-2:] == [2, 2]
        [result] = list(client.wait_many([second]))
        assert result.stalled
        assert result.attempts == 3
        assert client.wait_policy.max_attempts == 3
        assert client.with_options(max_retries=0).wait_policy is client.wait_policy


def test_a_call_policy_and_timeout_replace_the_client_one(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.script_next(OrderScript.stall(), OrderScript.stall())
    with sim.client(wait_policy=WaitPolicy(backoff=Fixed(2), max_attempts=3)) as client:
        first, second = paid(client), paid(client)
        with pytest.raises(OrderStalled) as info:
            client.wait_for_completion(first, policy=WaitPolicy(backoff=Fixed(1),
                                                                max_attempts=5))
        assert info.value.attempts == 5
        start = clock.monotonic()
        with pytest.raises(OrderStalled):  # the client's schedule, under this call's deadline
            client.wait_for_completion(second, policy=WaitPolicy(backoff=Fixed(2),
                                                                 max_attempts=1000),
                                       timeout=9)
        assert 7 <= clock.monotonic() - start <= 9


def test_after_payment_waits_before_its_first_poll(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=30))
    policy = WaitPolicy.after_payment(timeout=45)
    assert policy.backoff == ExponentialJitter(poll_at_start=False)
    assert policy.timeout == 45
    journal = Journal()
    with sim.client() as client:
        order_id = paid(client)
        start = clock.monotonic()
        client.wait_for_completion(order_id, policy=policy, listener=journal)
    first_poll = next(event for name, event in journal.events if name == "poll")
    assert isinstance(first_poll, PollAttempt)
    assert first_poll.elapsed >= 5  # the schedule's first wait came before it
    assert clock.monotonic() - start <= 45


def test_the_fleet_preset_learns_waits_first_and_gives_a_stall_up_in_half_the_polls(
        sim: FakeFoxReload, clock: FakeClock) -> None:
    policy = WaitPolicy.fleet()
    assert isinstance(policy.backoff, Adaptive)
    assert policy.timeout == 600
    assert WaitPolicy.fleet().backoff is not policy.backoff  # each policy learns its own
    sim.script_next(OrderScript.stall())
    journal = Journal()
    with sim.client() as client:
        order_id = paid(client)
        start = clock.monotonic()
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id, policy=policy, listener=journal)
    polls = [event for name, event in journal.events
             if name == "poll" and isinstance(event, PollAttempt)]
    assert polls[0].elapsed >= 5  # no poll at once
    gaps = [b.elapsed - a.elapsed for a, b in itertools.pairwise(polls)]
    assert max(gaps) <= 30 * 1.3 + 1e-6  # the vendor's longest
    assert len(polls) <= 21  # where the vendor's schedule makes 40
    assert clock.monotonic() - start <= 600


def test_the_fleet_preset_plans_from_what_it_learned(sim: FakeFoxReload) -> None:
    policy = WaitPolicy.fleet(target_delay=5)
    assert isinstance(policy.backoff, Adaptive)
    with sim.client() as client:
        for _ in range(25):
            sim.script_next(OrderScript.complete(after=20))
            client.wait_for_completion(paid(client), policy=policy)
    plan = policy.backoff.plan()
    assert plan is not None  # 20 finished waits are enough to plan
    assert plan[0] > 5  # nothing finishes before 20 s: the first poll comes later


class EveryTen:
    """A plan of instants 10 s apart, kept to (as Adaptive's are), or merely waited."""

    polls_immediately = False

    def __init__(self, keeps_to_plan: bool) -> None:
        self.keeps_to_plan = keeps_to_plan

    def delays(self, rng: random.Random) -> Iterator[float]:
        return itertools.repeat(10.0)


@pytest.mark.parametrize(("keeps_to_plan", "polled_at"), [
    (True, [25, 30, 40, 50]),  # the instant at 20 was overrun: skipped, the rest kept
    (False, [25, 35, 45, 55]),  # every later poll shifted by the postponement
])
def test_a_poll_the_budget_postponed_skips_the_plan_instants_it_overran(
        sim: FakeFoxReload, clock: FakeClock, keeps_to_plan: bool,
        polled_at: list[float]) -> None:
    sim.script_next(OrderScript.stall())
    budget = RateLimit(60, clock=clock)
    journal = Journal()
    policy = WaitPolicy(backoff=EveryTen(keeps_to_plan), max_attempts=4)
    with sim.client(rate_limit=budget) as client:
        order_id = paid(client)
        budget.throttled(25)  # no permit for 25 s: the first poll, due at 10, waits
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id, policy=policy, listener=journal)
    polls = [event.elapsed for name, event in journal.events
             if name == "poll" and isinstance(event, PollAttempt)]
    assert [round(elapsed) for elapsed in polls] == polled_at


def test_every_event_reaches_a_client_listener_then_the_call_one(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript(paid_for=1, processing_for=100))
    ours, call = Journal(), Journal()
    policy = WaitPolicy(backoff=Fixed(10), stall_after=30, max_attempts=6)
    with sim.client(listeners=[ours]) as client:
        order_id = paid(client)
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order_id, policy=policy, listener=call)
    assert ours.events == call.events
    names = ours.names()
    assert (names[0], names[-1]) == ("start", "finish")
    assert names.count("poll") == 6
    stalls = [event for name, event in ours.events if name == "stall"]
    assert [s.final for s in stalls if isinstance(s, Stall)] == [False, True]
    changes = [event for name, event in ours.events if name == "change"]
    assert [c.order.status for c in changes if isinstance(c, StatusChange)] == [
        "paid", "processing"]


def test_a_listener_needs_only_the_methods_it_uses(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.complete(after=5))

    class Finishes:  # no base class: any object with some of the methods
        def __init__(self) -> None:
            self.results: list[WaitResult] = []

        def on_finish(self, result: WaitResult) -> None:
            self.results.append(result)

    finishes = Finishes()
    with sim.client(listeners=[finishes]) as client:
        client.wait_for_completion(paid(client))
    assert [r.ok for r in finishes.results] == [True]
    with pytest.raises(TypeError, match="not a listener"):
        sim.client(listeners=[print])


async def test_async_listener_methods_are_awaited_in_order(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.complete(after=20))
    told: list[str] = []

    class Slow(Listener):
        async def on_poll(self, attempt: PollAttempt) -> None:
            told.append(f"poll {attempt.attempt}")

        def on_finish(self, result: WaitResult) -> None:
            told.append("finish")

    async with sim.async_client(listeners=[Slow()]) as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        await client.wait_for_completion(order.id)
    assert told[-1] == "finish"
    assert told[:-1] == [f"poll {n}" for n in range(1, len(told))]


def test_the_sync_wait_many_refuses_a_concurrency_it_cannot_give(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        with pytest.raises(ValueError, match="one order at a time"):
            list(client.wait_many(["o1"], max_in_flight=8))
        assert list(client.wait_many([], max_in_flight=1)) == []


class Counting(httpx.AsyncBaseTransport):
    """Answers from the simulator, after letting the loop run: counts requests at once."""

    def __init__(self, sim: FakeFoxReload) -> None:
        self.sim, self.in_flight, self.most = sim, 0, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        for _ in range(5):  # let every other ready poll start first
            await asyncio.sleep(0)
        self.in_flight -= 1
        return self.sim.handle(request)


@pytest.mark.parametrize(("client_slots", "call_slots", "most"),
                         [(20, None, 20), (20, 3, 3), (4, None, 4), (4, 10, 4)])
async def test_max_in_flight_means_requests_at_once_for_the_client_and_wait_many(
    client_slots: int, call_slots: int | None, most: int,
) -> None:
    sim = FakeFoxReload(default_script=OrderScript.complete(after=0))
    counting = Counting(sim)
    async with AsyncFoxReload(sim.api_key, base_url=sim.base_url, transport=counting,
                              clock=sim.clock, max_in_flight=client_slots) as client:
        ids = []
        for _ in range(20):
            order = await client.orders.create(items=STEAM)
            ids.append((await client.orders.pay(order.id)).id)
        counting.most = 0
        results = [r async for r in client.wait_many(ids, max_in_flight=call_slots)]
    assert all(r.ok for r in results)
    assert counting.most == most  # the call's own bound, within the client's
