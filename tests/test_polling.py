"""wait_for_completion and wait_many on virtual time, through both clients."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from foxpoll import (
    AuthenticationError,
    FoxReload,
    NotFoundError,
    Order,
    OrderCancelled,
    OrderFailed,
    OrderStalled,
    OrderStatus,
    PollAttempt,
    StatusChange,
)
from foxpoll._effects import Notify, Send, Sleep
from foxpoll.backoff import Adaptive, ExponentialJitter, Fixed, Schedule, Step
from foxpoll.polling import Listeners, Stall, WaitPolicy, wait_flow
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

STEAM = [{"itemId": "product_steam_10"}]


def listen(**hooks: Any) -> Any:
    """A listener made of functions, by event name (any object with the methods will do)."""
    return type("Hooks", (), {name: staticmethod(hook) for name, hook in hooks.items()})()


def paid_order(client: FoxReload) -> Order:
    order = client.orders.create(items=STEAM)
    return client.orders.pay(order.id)


def test_returns_the_completed_order_with_codes(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=45))
    with sim.client() as client:
        order = paid_order(client)
        start = clock.monotonic()
        done = client.wait_for_completion(order.id)
    assert done.status is OrderStatus.COMPLETED
    assert len(done.codes) == 1
    waited = clock.monotonic() - start
    assert 45 <= waited <= 45 + 30 * 1.3  # detected within one capped wait
    # the default schedule's waits: 5, 7.5, 11.25, 16.9, ... each plus up to 30 %
    for n, slept in enumerate(clock.sleeps):
        plain = min(5 * 1.5**n, 30)
        assert plain <= slept <= plain * 1.3


def test_accepts_an_order_object(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        assert client.wait_for_completion(paid_order(client)).is_terminal


def test_hooks_see_every_poll_and_status_change(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript(paid_for=3, processing_for=20))
    polls: list[PollAttempt] = []
    changes: list[StatusChange] = []
    with sim.client() as client:
        order = paid_order(client)
        client.wait_for_completion(order.id, policy=WaitPolicy(backoff=Fixed(2)),
                                   listener=listen(on_poll=polls.append,
                                                   on_status_change=changes.append))
    assert [(c.previous, c.order.status) for c in changes] == [
        (None, OrderStatus.PAID), (OrderStatus.PAID, OrderStatus.PROCESSING),
        (OrderStatus.PROCESSING, OrderStatus.COMPLETED),
    ]
    assert len(polls) == sim.count("GET", "/api/orders/*")
    assert [p.attempt for p in polls] == list(range(1, len(polls) + 1))
    assert all(p.outcome == "ok" for p in polls)
    assert polls[-1].order is not None
    assert polls[-1].order.status is OrderStatus.COMPLETED


def test_failed_raises_order_failed(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.fail(after=10))
    with sim.client() as client:
        order = paid_order(client)
        with pytest.raises(OrderFailed) as info:
            client.wait_for_completion(order.id)
    assert info.value.order.items[0].error


def test_cancelled_raises_order_cancelled_with_reason(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.cancel(after=3, reason="payment_failure"))
    with sim.client() as client:
        order = paid_order(client)
        with pytest.raises(OrderCancelled) as info:
            client.wait_for_completion(order.id)
    assert info.value.cancel_reason == "payment_failure"


def test_raise_on_failure_false_returns_the_order(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.fail(after=3))
    with sim.client() as client:
        order = paid_order(client)
        final = client.wait_for_completion(order.id, raise_on_failure=False)
    assert final.status is OrderStatus.FAILED


def test_exhausted_attempts_call_on_stall_once_then_raise(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.script_next(OrderScript.stall())
    stalls: list[Stall] = []
    with sim.client() as client:
        order = paid_order(client)
        start = clock.monotonic()
        with pytest.raises(OrderStalled) as info:
            client.wait_for_completion(order.id, listener=listen(on_stall=stalls.append))
    error = info.value
    assert error.attempts == 40
    assert sim.count("GET", "/api/orders/*") == 40
    assert error.order is not None
    assert error.order.status is OrderStatus.PROCESSING
    assert error.elapsed == pytest.approx(clock.monotonic() - start)
    assert 1000 < error.elapsed < 1400  # the vendor's "~15 minutes", really 18-21
    assert stalls == [Stall(order.id, error.order, 40, error.elapsed, final=True)]


def test_timeout_is_one_deadline_and_never_overshot(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.stall())
    sim.inject(Fault(FaultKind.TIMEOUT, method="GET", times=3))
    with sim.client(timeout=20) as client:
        order = paid_order(client)
        start = clock.monotonic()
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order.id, policy=WaitPolicy(max_attempts=1000), timeout=100)
    assert clock.monotonic() - start <= 100


def test_a_deadline_shorter_than_a_request_timeout_cuts_the_request(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.inject(Fault(FaultKind.TIMEOUT, method="GET", times=100))
    with sim.client(timeout=30, max_retries=0) as client:
        order = paid_order(client)
        start = clock.monotonic()
        with pytest.raises(OrderStalled):
            client.wait_for_completion(order.id, timeout=7)
    assert clock.monotonic() - start <= 7


def test_stall_after_warns_early_and_keeps_polling(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript(paid_for=1, processing_for=200))
    stalls: list[Stall] = []
    with sim.client() as client:
        order = paid_order(client)
        done = client.wait_for_completion(order.id, policy=WaitPolicy(stall_after=60),
                                          listener=listen(on_stall=stalls.append))
    assert done.status is OrderStatus.COMPLETED
    assert len(stalls) == 1
    [stall] = stalls
    assert stall.order is not None
    assert stall.order.status is OrderStatus.PROCESSING
    assert stall.elapsed >= 60
    assert stall.attempts < 40
    assert not stall.final  # a warning: the wait went on


@pytest.mark.parametrize(
    ("fault", "failed_polls"),
    [(Fault(FaultKind.SERVER_ERROR, method="GET", times=6), 3),  # 2 requests per poll
     (Fault(FaultKind.RATE_LIMIT, method="GET", times=6, retry_after=20), 3),
     (Fault(FaultKind.TIMEOUT, method="GET", times=6), 3),
     (Fault(FaultKind.DISCONNECT, method="GET", times=6), 3),
     (Fault(FaultKind.MALFORMED_JSON, method="GET", times=6), 6)],  # not retried per request
    ids=lambda f: f.kind.value if isinstance(f, Fault) else str(f),
)
def test_transient_poll_errors_never_end_the_wait(
    sim: FakeFoxReload, fault: Fault, failed_polls: int
) -> None:
    outcomes: list[str] = []
    with sim.client(max_retries=1, timeout=5) as client:
        order = paid_order(client)
        sim.inject(fault)
        policy = WaitPolicy(max_attempts=5, max_errors=failed_polls)
        done = client.wait_for_completion(
            order.id, policy=policy, listener=listen(on_poll=lambda p: outcomes.append(p.outcome)))
    assert done.status is OrderStatus.COMPLETED
    assert outcomes.count("ok") >= 1
    assert len([o for o in outcomes if o != "ok"]) == failed_polls


def test_rate_limited_polls_wait_at_least_retry_after(sim: FakeFoxReload, clock: FakeClock) -> None:
    with sim.client(max_retries=0) as client:
        order = paid_order(client)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=45))
        client.wait_for_completion(order.id)
    assert clock.sleeps[0] >= 45


def test_not_found_right_after_create_is_not_visible_yet(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript(visible_after=8))
    outcomes: list[str] = []
    with sim.client() as client:
        order = paid_order(client) if False else client.orders.create(items=STEAM)
        sim.script(order.id, OrderScript(visible_after=8, paid_for=0, processing_for=0))
        client.wait_for_completion(order.id, raise_on_failure=False,
                                   listener=listen(on_poll=lambda p: outcomes.append(p.outcome)))
    assert outcomes[0] == "not_found"
    assert outcomes[-1] == "ok"


def test_not_found_beyond_the_grace_raises(sim: FakeFoxReload) -> None:
    with sim.client() as client, pytest.raises(NotFoundError):
        client.wait_for_completion("00000000-0000-4000-8000-000000000000",
                                   policy=WaitPolicy(not_found_grace=20))


def test_not_found_after_having_seen_the_order_raises(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.stall())
    with sim.client() as client:
        order = paid_order(client)
        sim.inject(Fault(FaultKind.NOT_FOUND, method="GET", times=1, path="*"),)
        sim.inject()
        polls = []
        sim.clear_faults()

        def then_vanish(attempt: PollAttempt) -> None:
            polls.append(attempt)
            if len(polls) == 2:
                sim.inject(Fault(FaultKind.NOT_FOUND, method="GET"))

        with pytest.raises(NotFoundError):
            client.wait_for_completion(order.id, listener=listen(on_poll=then_vanish))
    assert [p.outcome for p in polls] == ["ok", "ok", "not_found"]


def test_non_transient_errors_raise_at_once(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        order = paid_order(client)
    with sim.client(api_key="revoked") as client, pytest.raises(AuthenticationError):
        client.wait_for_completion(order.id)
    assert sim.count("GET") == 1


def test_error_budget_exhaustion_stalls_with_the_cause(sim: FakeFoxReload) -> None:
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", times=1000))
    with sim.client(max_retries=0) as client:
        order = paid_order(client)
        with pytest.raises(OrderStalled) as info:
            client.wait_for_completion(order.id, policy=WaitPolicy(max_errors=5))
    assert info.value.order is None
    assert info.value.attempts == 6  # five tolerated, the sixth ends it
    assert info.value.__cause__ is not None


def test_bad_options_are_rejected(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        for kwargs in ({"max_attempts": 0}, {"max_attempts": True}, {"timeout": 0},
                       {"stall_after": -1}, {"backoff": object()}):
            with pytest.raises((ValueError, TypeError)):
                WaitPolicy(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            client.wait_for_completion("x", timeout=0)
        with pytest.raises(TypeError, match="WaitPolicy"):
            client.wait_for_completion("x", policy={"max_attempts": 3})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a listener"):
            client.wait_for_completion("x", listener=print)
        with pytest.raises(ValueError, match="order id"):
            client.wait_for_completion("")


def test_sync_client_rejects_async_hooks(sim: FakeFoxReload) -> None:
    async def hook(attempt: PollAttempt) -> None:
        pass

    with sim.client() as client:
        order = paid_order(client)
        with pytest.raises(TypeError, match="async"):
            client.wait_for_completion(order.id, listener=listen(on_poll=hook))


def test_keyboard_interrupt_in_a_hook_propagates_at_once(sim: FakeFoxReload) -> None:
    calls = []

    def hook(attempt: PollAttempt) -> None:
        calls.append(attempt)
        raise KeyboardInterrupt

    with sim.client() as client:
        order = paid_order(client)
        with pytest.raises(KeyboardInterrupt):
            client.wait_for_completion(order.id, listener=listen(on_poll=hook))
    assert len(calls) == 1


class CountingAdaptive(Adaptive):
    """Adaptive, counting what it is told."""

    observed = 0

    def observe(self, earliest: float, latest: float) -> None:
        self.observed += 1
        super().observe(earliest, latest)


def test_adaptive_policy_learns_from_waits(sim: FakeFoxReload) -> None:
    adaptive = CountingAdaptive(min_samples=5, refresh_every=5, explore=0)
    polls: list[int] = []
    delays: list[float] = []
    with sim.client() as client:
        for _ in range(20):
            sim.script_next(OrderScript.complete(after=20))
            order = paid_order(client)
            seen: list[PollAttempt] = []
            client.wait_for_completion(order, policy=WaitPolicy(backoff=adaptive),
                                       listener=listen(on_poll=seen.append))
            polls.append(len(seen))
            delays.append(seen[-1].elapsed - 20)
    assert adaptive.plan() is not None
    assert adaptive.observed == 20  # every wait taught it
    assert polls[:5] == [3] * 5  # the baseline, waiting first: ~5.75, ~14.4, ~27.3 s
    assert max(polls[5:]) <= 2  # learned: no poll at once, fewer after...
    assert sum(delays[5:]) / 15 <= sum(delays[:5]) / 5  # ...and no later


def test_poll_at_start_false_skips_the_immediate_poll(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.script_next(OrderScript.complete(after=10))
    with sim.client() as client:
        order = paid_order(client)
        start = clock.monotonic()
        seen: list[PollAttempt] = []
        client.wait_for_completion(order.id,
                                   policy=WaitPolicy(backoff=ExponentialJitter(poll_at_start=False)),
                                   listener=listen(on_poll=seen.append))
    assert seen[0].elapsed >= 5  # waited before the first poll
    assert clock.sleeps[0] == pytest.approx(seen[0].elapsed)
    assert len(seen) == sim.count("GET")
    assert clock.monotonic() - start >= 10


def test_the_flow_is_sans_io() -> None:
    """Drive the generator by hand: it yields effects and decides from what it is sent."""
    import httpx

    from foxpoll._api import Runtime
    from foxpoll._core import make_config

    clock = FakeClock()
    rt = Runtime(make_config(api_key="k", base_url="https://x.test", timeout=5, max_retries=0),
                 clock, random.Random(0))
    seen: list[PollAttempt] = []
    flow = wait_flow(rt, "o1", WaitPolicy(backoff=Fixed(10)),
                     listeners=Listeners.of([listen(on_poll=seen.append)]))
    statuses = iter(["paid", "processing", "completed"])
    effect = next(flow)
    effects = []
    try:
        while True:
            effects.append(type(effect).__name__)
            if isinstance(effect, Send):
                body = {"id": "o1", "status": next(statuses)}
                effect = flow.send(httpx.Response(200, json=body, request=effect.request))
            elif isinstance(effect, Sleep):
                clock.advance(effect.seconds)
                effect = flow.send(None)
            else:
                assert isinstance(effect, Notify)
                effect.hook(*effect.args)
                effect = flow.send(None)
    except StopIteration as stop:
        result = stop.value
    assert result.status is OrderStatus.COMPLETED
    assert effects == ["Send", "Notify", "Sleep", "Send", "Notify", "Sleep", "Send", "Notify"]
    assert [p.elapsed for p in seen] == [0, 10, 20]


# -- async -------------------------------------------------------------------------


async def test_async_wait_with_sync_and_async_hooks(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.complete(after=30))
    sync_polls: list[PollAttempt] = []
    async_changes: list[StatusChange] = []

    async def on_change(change: StatusChange) -> None:
        await asyncio.sleep(0)
        async_changes.append(change)

    async with sim.async_client() as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        done = await client.wait_for_completion(
            order.id, listener=listen(on_poll=sync_polls.append, on_status_change=on_change))
    assert done.status is OrderStatus.COMPLETED
    assert len(sync_polls) == sim.count("GET")
    assert async_changes[-1].order.status is OrderStatus.COMPLETED


async def test_async_stall_and_failure(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.stall(), OrderScript.fail(after=5))
    async with sim.async_client() as client:
        stalled = await client.orders.create(items=STEAM)
        failed = await client.orders.create(items=STEAM)
        for order in (stalled, failed):
            await client.orders.pay(order.id)
        with pytest.raises(OrderStalled):
            await client.wait_for_completion(stalled.id, policy=WaitPolicy(max_attempts=5))
        with pytest.raises(OrderFailed):
            await client.wait_for_completion(failed.id)


class ParkingClock(FakeClock):
    """Virtual time whose async sleeps never end by themselves: a wait parks in its first."""

    def __init__(self) -> None:
        super().__init__()
        self.parked = asyncio.Event()

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        self.parked.set()
        await asyncio.Event().wait()


async def test_cancelling_the_wait_propagates_immediately() -> None:
    clock = ParkingClock()
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.stall())
    async with sim.async_client() as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        task = asyncio.ensure_future(client.wait_for_completion(order.id,
                                                                policy=WaitPolicy(backoff=Fixed(60))))
        await clock.parked.wait()  # in the sleep after its first poll
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=1)  # a guard: it ends at once, or fails
    assert sim.count("GET") == 1
    assert clock.sleeps == [60]


# -- wait_many -----------------------------------------------------------------------


def make_orders(sim: FakeFoxReload, client: FoxReload, scripts: list[OrderScript]) -> list[str]:
    sim.script_next(*scripts)
    return [paid_order(client).id for _ in scripts]


def test_wait_many_yields_results_as_they_finish(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        ids = make_orders(sim, client, [
            OrderScript.complete(after=200), OrderScript.fail(after=5),
            OrderScript.complete(after=40), OrderScript.stall(),
            OrderScript.cancel(after=100),
        ])
        results = list(client.wait_many(ids, policy=WaitPolicy(max_attempts=30)))
    finished = [r.order_id for r in results]
    assert finished == [ids[1], ids[2], ids[4], ids[0], ids[3]]
    by_id = {r.order_id: r for r in results}
    assert by_id[ids[0]].ok
    assert by_id[ids[2]].unwrap().codes
    assert isinstance(by_id[ids[1]].error, OrderFailed)
    assert isinstance(by_id[ids[3]].error, OrderStalled)
    assert isinstance(by_id[ids[4]].error, OrderCancelled)
    with pytest.raises(OrderFailed):
        by_id[ids[1]].unwrap()


def test_wait_many_deduplicates_ids(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        ids = make_orders(sim, client, [OrderScript.complete(after=1)])
        assert len(list(client.wait_many(ids * 3))) == 1


def requests_per_window(sim: FakeFoxReload, window: float) -> list[int]:
    times = [r.at for r in sim.requests if r.method == "GET"]
    counts: dict[int, int] = {}
    for t in times:
        counts[int(t // window)] = counts.get(int(t // window), 0) + 1
    return list(counts.values())


def test_wait_many_respects_the_shared_budget(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock)
    with sim.client() as client:
        ids = make_orders(sim, client, [OrderScript.complete(after=90)] * 100)
        start = clock.monotonic()
        results = list(client.wait_many(ids, max_requests_per_minute=60))
    assert all(r.ok for r in results)
    gets = [r.at - start for r in sim.requests if r.method == "GET"]
    for minute_start in range(int(max(gets) // 60)):
        in_window = [t for t in gets if minute_start * 60 <= t < minute_start * 60 + 60]
        assert len(in_window) <= 60 + 2  # the rate, plus the bucket's burst of 2


def test_a_429_slows_the_whole_budget(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock)
    with sim.client() as client:
        ids = make_orders(sim, client, [OrderScript.complete(after=60)] * 30)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=30))
        start = clock.monotonic()
        results = list(client.wait_many(ids, max_requests_per_minute=600))
    assert all(r.ok for r in results)
    gets = [r.at - start for r in sim.requests if r.method == "GET"]
    throttled_at = gets[0]
    assert all(not (throttled_at < t < throttled_at + 30) for t in gets[1:])


def test_wait_many_in_the_simulators_own_rate_limit(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, rate_limit_per_minute=100)
    with sim.client() as client:
        ids = make_orders(sim, client, [OrderScript.complete(after=30)] * 50)
        clock.advance(60)  # a fresh minute for the polls
        results = list(client.wait_many(ids))  # no budget given: learns from the 429s
    assert all(r.ok for r in results)


async def test_async_wait_many_concurrent(sim: FakeFoxReload) -> None:
    rng = random.Random(4)
    scripts = [OrderScript.complete(after=rng.uniform(1, 120)) for _ in range(300)]
    sim.script_next(*scripts)
    changes = 0

    async def count_change(change: StatusChange) -> None:
        nonlocal changes
        changes += 1

    async with sim.async_client() as client:
        ids = []
        for _ in scripts:
            order = await client.orders.create(items=STEAM)
            await client.orders.pay(order.id)
            ids.append(order.id)
        results = [r async for r in client.wait_many(ids, max_requests_per_minute=6000,
                                                     max_in_flight=32,
                                                     listener=listen(on_status_change=count_change))]
    assert sorted(r.order_id for r in results) == sorted(ids)
    assert all(r.ok for r in results)
    assert changes >= 300


async def test_async_wait_many_holds_ten_thousand_orders() -> None:
    """10,000 in-flight waits in one process, one loop."""
    clock = FakeClock()
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=0),
                        balance=10**9)
    async with sim.async_client() as client:
        ids = []
        for _ in range(10_000):
            order = await client.orders.create(items=STEAM)
            await client.orders.pay(order.id)
            ids.append(order.id)
        count = 0
        async for result in client.wait_many(ids, max_in_flight=256):
            assert result.ok
            count += 1
    assert count == 10_000


def test_wait_many_stops_cleanly_when_the_consumer_stops(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        ids = make_orders(sim, client, [OrderScript.complete(after=5)] * 5)
        stream = client.wait_many(ids)
        first = next(stream)
        stream.close()  # type: ignore[attr-defined]
    assert first.ok


def test_schedule_policy_in_a_wait(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=100))
    with sim.client() as client:
        order = paid_order(client)
        schedule = Schedule([Step(5, times=12), Step(20)])
        client.wait_for_completion(order.id, policy=WaitPolicy(backoff=schedule))
    assert clock.sleeps[:12] == [5.0] * 12
    assert set(clock.sleeps[12:]) == {20.0}


def test_default_attempts_match_the_vendor_guidance() -> None:
    options = WaitPolicy()
    assert options.max_attempts == 40
    assert isinstance(options.backoff, ExponentialJitter)
    assert next(options.backoff.delays(random.Random(0))) >= 5


def test_on_finish_is_called_once_however_a_wait_ends(sim: FakeFoxReload) -> None:
    sim.script_next(OrderScript.complete(after=5), OrderScript.fail(after=5),
                    OrderScript.stall())
    finished: list[Any] = []
    with sim.client() as client:
        ids = [paid_order(client).id for _ in range(3)]
        assert client.wait_for_completion(ids[0], listener=listen(on_finish=finished.append)).codes
        with pytest.raises(OrderFailed):
            client.wait_for_completion(ids[1], listener=listen(on_finish=finished.append))
        with pytest.raises(OrderStalled):
            client.wait_for_completion(ids[2], policy=WaitPolicy(max_attempts=3),
                                       listener=listen(on_finish=finished.append))
        with sim.client(api_key="revoked") as bad, pytest.raises(AuthenticationError):
            bad.wait_for_completion(ids[0], listener=listen(on_finish=finished.append))
    assert [r.order_id for r in finished] == [ids[0], ids[1], ids[2], ids[0]]
    assert [(r.ok, r.stalled) for r in finished] == [
        (True, False), (False, False), (False, True), (False, False)
    ]
    assert isinstance(finished[1].error, OrderFailed)
    assert finished[2].attempts == 3
    assert finished[2].order is not None  # the last order seen
    assert finished[0].elapsed >= 5


def test_on_poll_is_told_when_the_next_poll_comes(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=30))
    seen: list[PollAttempt] = []
    with sim.client() as client:
        client.wait_for_completion(paid_order(client), listener=listen(on_poll=seen.append))
    assert [p.next_poll_in for p in seen[:-1]] == pytest.approx(clock.sleeps)
    assert seen[-1].next_poll_in is None  # the poll that saw it completed ended the wait


@pytest.mark.parametrize("retry_after", [999_999, "Wed, 21 Oct 2037 07:28:00 GMT"])
def test_a_hostile_retry_after_postpones_the_next_poll_by_max_retry_after_at_most(
    clock: FakeClock, retry_after: Any
) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=30))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=retry_after))
        start = clock.monotonic()
        assert client.wait_for_completion(order.id).status == "completed"
    assert clock.monotonic() - start <= 30 + 60 + 40  # completion, one capped pause, a poll
    gets = [r.at for r in sim.requests if r.method == "GET"]
    assert gets[1] - gets[0] <= 60 + 1e-6  # the client's max_retry_after, not days


def test_wait_many_and_wait_for_completion_retry_a_failed_poll_alike(clock: FakeClock) -> None:
    def first_gets(many: bool) -> list[float]:
        sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=60))
        with sim.client() as client:
            order = client.orders.create(items=STEAM)
            client.orders.pay(order.id)
            sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", times=2))
            start = clock.monotonic()
        with sim.client(rng=random.Random(3)) as client:
            if many:
                assert all(r.ok for r in client.wait_many([order.id]))
            else:
                client.wait_for_completion(order.id)
        return [round(r.at - start, 6) for r in sim.requests if r.method == "GET"][:4]

    # The same flaky first poll: retried inside the poll, after the same short backoffs.
    assert first_gets(many=True) == first_gets(many=False)
    assert first_gets(many=True)[2] < 5  # not a whole schedule step later


def test_the_last_poll_lands_just_before_the_deadline(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=10.5))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        start = clock.monotonic()
        # polls at 0 and ~5-6.5 s; the schedule's next (13 s or more) is past 12 s
        assert client.wait_for_completion(order.id, timeout=12).status == "completed"
    gets = [r.at - start for r in sim.requests if r.method == "GET"]
    assert 10.5 <= gets[-1] < 12


async def test_wait_many_s_last_poll_lands_just_before_the_deadline_too(
    clock: FakeClock
) -> None:
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.stall())
    async with sim.async_client() as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        start = clock.monotonic()
        [result] = [r async for r in client.wait_many([order.id], timeout=40)]
    assert result.stalled
    gets = [r.at - start for r in sim.requests if r.method == "GET"]
    assert 38 <= gets[-1] < 40  # not a whole backoff step (up to 39 s) before it
    assert 38 <= result.elapsed <= 40
